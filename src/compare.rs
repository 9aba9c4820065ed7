//! `compare` and `sweep`: several runs in one set of plots. Runs are labelled by the settings in
//! which they differ (temperature, top-p, regime, …); runs that differ only in their seed form one
//! group, drawn as its mean with a 95 % confidence band (Student's t over the seeds). A sweep is a
//! grid of settings × seeds ([`sweep_runs`]), each point an ordinary, resumable run.

use crate::config::{usage, Config};
use crate::files::{create_dir, write_atomic};
use crate::metrics::registry::{Metric, Row, RowId};
use crate::recursion::run_dir::{load_state, read_rows, RunState};
use crate::report::{line_chart, Axes, Series};
use anyhow::Result;
use serde_json::Value;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// Two-sided 95 % Student-t critical values for 1..=30 degrees of freedom (then ≈ 1.96).
const T95: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
];

/// Mean and 95 % confidence half-width of `xs` (half-width 0 for a single value).
pub fn mean_ci(xs: &[f64]) -> (f64, f64) {
    let n = xs.len();
    let mean = xs.iter().sum::<f64>() / n as f64;
    if n < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / (n - 1) as f64;
    let t = T95.get(n - 2).copied().unwrap_or(1.96);
    (mean, t * (var / n as f64).sqrt())
}

struct Run {
    dir: PathBuf,
    state: RunState,
    rows: Vec<Row>,
}

fn load(dir: &Path) -> Result<Run> {
    Ok(Run { dir: dir.to_path_buf(), state: load_state(dir)?, rows: read_rows(dir)? })
}

/// Dotted leaves of a run's settings, without the seed and the preset's name.
fn settings(state: &RunState) -> BTreeMap<String, String> {
    fn walk(prefix: &str, v: &Value, out: &mut BTreeMap<String, String>) {
        match v {
            Value::Object(m) => m.iter().for_each(|(k, c)| walk(&format!("{prefix}{k}."), c, out)),
            Value::Number(n) if n.is_f64() => {
                // Settings are f32 or f64; print the shortest form that reads back as the f32.
                let x = n.as_f64().unwrap_or(f64::NAN);
                out.insert(prefix.trim_end_matches('.').to_string(), format!("{}", x as f32));
            }
            leaf => {
                out.insert(
                    prefix.trim_end_matches('.').to_string(),
                    leaf.to_string().trim_matches('"').to_string(),
                );
            }
        }
    }
    let mut out = BTreeMap::new();
    walk("", &serde_json::to_value(&state.config).unwrap_or(Value::Null), &mut out);
    out.remove("seed");
    out
}

/// Groups of runs (same settings but the seed), labelled by the settings that differ.
fn groups(runs: &[Run]) -> Vec<(String, Vec<&Run>)> {
    let all: Vec<BTreeMap<String, String>> = runs.iter().map(|r| settings(&r.state)).collect();
    let differing: Vec<&String> =
        all[0].keys().filter(|k| all.iter().any(|s| s.get(*k) != all[0].get(*k))).collect();
    let mut groups: Vec<(String, Vec<&Run>)> = Vec::new();
    for (run, s) in runs.iter().zip(&all) {
        let label = differing
            .iter()
            .map(|k| {
                format!(
                    "{}={}",
                    k.rsplit('.').next().unwrap_or(k),
                    s.get(*k).map(String::as_str).unwrap_or("?")
                )
            })
            .collect::<Vec<_>>()
            .join(", ");
        let label = if label.is_empty() { "all runs".to_string() } else { label };
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, members)) => members.push(run),
            None => groups.push((label, vec![run])),
        }
    }
    groups
}

/// Per generation: mean and CI of `metric` over a group's runs.
fn aggregate(members: &[&Run], metric: Metric) -> Vec<(f64, f64, f64)> {
    let mut by_gen: BTreeMap<u64, Vec<f64>> = BTreeMap::new();
    for run in members {
        for row in &run.rows {
            if let (Some(g), Some(v)) = (row.generation(), row.get(metric)) {
                by_gen.entry(g as u64).or_default().push(v);
            }
        }
    }
    by_gen
        .into_iter()
        .map(|(g, xs)| {
            let (m, ci) = mean_ci(&xs);
            (g as f64, m, ci)
        })
        .collect()
}

/// One cell per generation 0..=`gens`: the aggregate's (mean, CI) where it has that generation,
/// None where it does not.
fn by_generation(agg: &[(f64, f64, f64)], gens: u64) -> Vec<Option<(f64, f64)>> {
    (0..=gens).map(|g| agg.iter().find(|a| a.0 as u64 == g).map(|a| (a.1, a.2))).collect()
}

/// Mean and CI of `metric` in the runs' "real" rows (the real data's own value: the same for every
/// run of one data set, except for gen0_seq_ppl, which depends on each run's generation 0).
fn aggregate_real(members: &[&Run], metric: Metric) -> Option<(f64, f64)> {
    let xs: Vec<f64> = members
        .iter()
        .flat_map(|r| &r.rows)
        .filter(|row| row.id == RowId::Real)
        .filter_map(|row| row.get(metric))
        .collect();
    (!xs.is_empty()).then(|| mean_ci(&xs))
}

/// Four significant figures or so, without exponents (1468.0, 160.8, 12.34, 0.1120); the
/// half-width `ci`, when given, with as many decimals as the mean.
fn short(x: f64, ci: Option<f64>) -> String {
    let x = if x == 0.0 { 0.0 } else { x }; // no "-0.0000"
    let decimals = match x.abs() {
        a if a >= 100.0 => 1,
        a if a >= 10.0 => 2,
        _ => 4,
    };
    match ci {
        Some(ci) => format!("{x:.decimals$} ± {ci:.decimals$}"),
        None => format!("{x:.decimals$}"),
    }
}

/// The runs of a sweep: every combination of the `axes` (a setting's key and its values, as
/// `--set` takes them) × seeds 0..`seeds`, each a resolved config and a directory name made of
/// its values (`t0.7-p1-replace-seed0`; other keys as `name=value`). Values are compared after
/// parsing, so `1` and `1.0` are one grid point.
pub fn sweep_runs(
    preset: &str,
    sets: &[String],
    axes: &[(String, Vec<String>)],
    seeds: u64,
) -> Result<Vec<(String, Config)>> {
    // Distinct values per axis, by the setting they give.
    let mut distinct: Vec<(&str, Vec<(String, Value)>)> = Vec::new();
    for (key, values) in axes {
        let mut kept: Vec<(String, Value)> = Vec::new();
        for v in values {
            let cfg = Config::resolve(preset, None, &[sets, &[format!("{key}={v}")]].concat(), None)?;
            let setting = settings_value(&cfg, key);
            if !kept.iter().any(|(_, s)| *s == setting) {
                kept.push((v.clone(), setting));
            }
        }
        if kept.is_empty() {
            return usage(format!("sweep: no values for {key}"));
        }
        distinct.push((key, kept));
    }
    let mut points: Vec<Vec<(&str, &str)>> = vec![Vec::new()];
    for (key, values) in &distinct {
        points = points
            .into_iter()
            .flat_map(|p| values.iter().map(move |(v, _)| [p.clone(), vec![(*key, v.as_str())]].concat()))
            .collect();
    }
    let mut runs = Vec::new();
    for point in points {
        for seed in 0..seeds {
            let mut all = sets.to_vec();
            all.extend(point.iter().map(|(k, v)| format!("{k}={v}")));
            let cfg = Config::resolve(preset, None, &all, Some(seed))?;
            let mut name: Vec<String> = point
                .iter()
                .map(|(k, _)| {
                    let v = settings_value(&cfg, k);
                    let v = match &v {
                        Value::Number(n) if n.is_f64() => {
                            format!("{}", n.as_f64().unwrap_or(f64::NAN) as f32)
                        }
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    match *k {
                        "sample.temperature" => format!("t{v}"),
                        "sample.top_p" => format!("p{v}"),
                        "recursion.regime" => v,
                        other => format!("{}={v}", other.rsplit('.').next().unwrap_or(other)),
                    }
                })
                .collect();
            name.push(format!("seed{seed}"));
            runs.push((name.join("-"), cfg));
        }
    }
    Ok(runs)
}

/// The value of the setting at dotted `key` in a resolved config.
fn settings_value(cfg: &Config, key: &str) -> Value {
    let mut v = serde_json::to_value(cfg).unwrap_or(Value::Null);
    for part in key.split('.') {
        v = v.get(part).cloned().unwrap_or(Value::Null);
    }
    v
}

/// Writes `plots/compare_*.svg` and `compare.html` into `out` for the runs in `dirs`.
pub fn compare(dirs: &[PathBuf], out: &Path) -> Result<()> {
    let runs: Vec<Run> = dirs.iter().map(|d| load(d)).collect::<Result<_>>()?;
    let groups = groups(&runs);
    create_dir(&out.join("plots"))?;
    let mut html = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>collapse-lab: comparison</title>\n<style>\
         body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}table{border-collapse:collapse;font-size:13px}\
         td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}th{background:#f2f2f2}</style></head><body>\n\
         <h1>Comparison of runs</h1>\n<ul>\n",
    );
    for (label, members) in &groups {
        let names: Vec<String> = members.iter().map(|r| r.dir.display().to_string()).collect();
        writeln!(
            html,
            "<li><b>{}</b>: {} run(s): {}</li>",
            esc(label),
            members.len(),
            esc(&names.join(", "))
        )?;
    }
    let mut md = String::from("# Comparison of runs\n\n");
    for (label, members) in &groups {
        writeln!(md, "- **{label}**: {} run(s)", members.len())?;
    }
    md.push_str("\nMean ± 95 % confidence half-width over seeds (Student's t) per generation.\n");
    html.push_str("</ul>\n<p>Curves are means over the runs of a group; shaded bands are 95 % confidence intervals (Student's t over seeds).</p>\n");
    // The metrics compared, and whether their axis is logarithmic: the registry says.
    for (metric, log_y) in Metric::ALL.iter().filter_map(|&m| m.def().compare.map(|log| (m, log))) {
        let key = metric.key();
        let series: Vec<Series> = groups
            .iter()
            .map(|(label, members)| {
                let agg = aggregate(members, metric);
                Series {
                    label: format!("{label} (n={})", members.len()),
                    points: agg.iter().map(|&(g, m, _)| (g, m)).collect(),
                    dashed: false,
                    band: (members.len() > 1)
                        .then(|| agg.iter().map(|&(g, m, ci)| (g, m - ci, m + ci)).collect()),
                }
            })
            .collect();
        let title = format!("{key} per generation");
        let axes = Axes { title: &title, x: "generation", y: key, log_x: false, log_y };
        let svg = line_chart(&axes, &series)?;
        write_atomic(&out.join("plots").join(format!("compare_{key}.svg")), svg.as_bytes())?;
        writeln!(html, "<figure id=\"{key}\">{}</figure>", crate::report::inline_svg(&svg))?;
        // The table under each plot: mean ± CI per group and generation.
        html.push_str("<table><tr><th>group</th>");
        write!(md, "\n### {key}\n\n| group |")?;
        let has_real = groups.iter().any(|(_, m)| aggregate_real(m, metric).is_some());
        if has_real {
            html.push_str("<th>real</th>");
            md.push_str(" real |");
        }
        let gens = groups
            .iter()
            .flat_map(|(_, m)| aggregate(m, metric))
            .map(|(g, _, _)| g as u64)
            .max()
            .unwrap_or(0);
        for g in 0..=gens {
            write!(html, "<th>gen {g}</th>")?;
            write!(md, " gen {g} |")?;
        }
        html.push_str("</tr>\n");
        writeln!(md, "\n| --- |{}", " --- |".repeat(gens as usize + 1 + has_real as usize))?;
        for (label, members) in &groups {
            write!(html, "<tr><td>{}</td>", esc(label))?;
            write!(md, "| {label} |")?;
            if has_real {
                write_cell(&mut html, &mut md, aggregate_real(members, metric), members.len())?;
            }
            // A generation where the metric is undefined (the Zipf fit of a corpus with too few
            // word types) gets a dash, so the columns stay aligned.
            for cell in by_generation(&aggregate(members, metric), gens) {
                write_cell(&mut html, &mut md, cell, members.len())?;
            }
            html.push_str("</tr>\n");
            md.push('\n');
        }
        html.push_str("</table>\n");
    }
    html.push_str("</body></html>\n");
    write_atomic(&out.join("compare.md"), md.as_bytes())?;
    write_atomic(&out.join("compare.html"), html.as_bytes())
}

/// One table cell in both formats: mean ± CI over `n` runs (the CI only when n > 1 in Markdown), or
/// a dash where there is no value.
fn write_cell(html: &mut String, md: &mut String, cell: Option<(f64, f64)>, n: usize) -> std::fmt::Result {
    match cell {
        Some((m, ci)) => {
            write!(html, "<td>{m:.4} ± {ci:.4}</td>")?;
            write!(md, " {} |", short(m, (n > 1).then_some(ci)))
        }
        None => {
            html.push_str("<td>–</td>");
            md.push_str(" – |");
            Ok(())
        }
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_grids_count_each_setting_once() {
        let axes = vec![
            ("sample.temperature".to_string(), vec!["1".to_string(), "1.0".to_string(), "0.7".to_string()]),
            ("recursion.regime".to_string(), vec!["\"replace\"".to_string()]),
        ];
        let runs = sweep_runs("smoke", &[], &axes, 2).unwrap();
        let names: Vec<&str> = runs.iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(
            names,
            ["t1-replace-seed0", "t1-replace-seed1", "t0.7-replace-seed0", "t0.7-replace-seed1"]
        );
        assert_eq!(runs[3].1.seed, 1);
        let beam = vec![("sample.beam".to_string(), vec!["0".to_string(), "5".to_string()])];
        let names: Vec<String> =
            sweep_runs("smoke", &[], &beam, 1).unwrap().into_iter().map(|r| r.0).collect();
        assert_eq!(names, ["beam=0-seed0", "beam=5-seed0"]);
        assert!(sweep_runs("smoke", &[], &[("sample.top_p".into(), vec!["2".into()])], 1).is_err());
    }

    #[test]
    fn confidence_interval_uses_student_t() {
        // xs = 1, 2, 3: mean 2, sd 1, half-width = t(2 df) · 1/√3 = 4.303 / 1.732 = 2.484
        let (m, ci) = mean_ci(&[1.0, 2.0, 3.0]);
        assert_eq!(m, 2.0);
        assert!((ci - 4.303 / 3f64.sqrt()).abs() < 1e-12);
        assert_eq!(mean_ci(&[5.0]), (5.0, 0.0));
    }

    #[test]
    fn missing_generations_become_empty_cells() {
        // A Zipf fit that stopped being defined after generation 1, in a table of 4 generations.
        let agg = [(0.0, 1.5, 0.1), (1.0, 1.7, 0.2)];
        assert_eq!(by_generation(&agg, 3), vec![Some((1.5, 0.1)), Some((1.7, 0.2)), None, None]);
        // A gap in the middle stays in its column.
        let agg = [(0.0, 1.0, 0.0), (2.0, 3.0, 0.0)];
        assert_eq!(by_generation(&agg, 2), vec![Some((1.0, 0.0)), None, Some((3.0, 0.0))]);
    }

    #[test]
    fn short_never_prints_negative_zero() {
        assert_eq!(short(-0.0, None), short(0.0, None));
        assert!(!short(-0.0, Some(0.0)).starts_with('-'));
    }
}
