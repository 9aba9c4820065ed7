//! The report of a run: `plots/*.svg` drawn with plotters (SVG backend, no system fonts) and one
//! self-contained `report.html` (inline SVG and CSS, no external reference) with the metrics table,
//! sample texts, lineages and the run's settings.

use crate::files::{create_dir, write_atomic};
use crate::metrics::corpus::rank_frequency;
use crate::metrics::ppl_bin_edges;
use crate::metrics::registry::{Metric, Plot, Row, RowId, Value};
use crate::recursion::run_dir::{load_state, read_corpus, read_rows, CorpusRecord, RunState, CORPUS};
use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::fmt::Write as _;
use std::path::Path;

/// One curve of a chart.
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    /// Reference lines (generation 0, the n-gram baselines) are dashed.
    pub dashed: bool,
    /// A shaded band (x, low, high), e.g. a confidence interval.
    pub band: Option<Vec<(f64, f64, f64)>>,
}

/// Axes of a chart; a log axis plots log10 of the values and labels ticks with the values.
pub struct Axes<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
    pub log_x: bool,
    pub log_y: bool,
}

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a plot: {e:?}")
}

/// Draws `series` as an SVG document.
pub fn line_chart(axes: &Axes, series: &[Series]) -> Result<String> {
    let tx = |v: f64| if axes.log_x { v.log10() } else { v };
    let ty = |v: f64| if axes.log_y { v.log10() } else { v };
    let curves: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            s.points
                .iter()
                .map(|&(x, y)| (tx(x), ty(y)))
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect()
        })
        .collect();
    let bands: Vec<Vec<(f64, f64)>> = series
        .iter()
        .map(|s| {
            let b = s.band.as_deref().unwrap_or(&[]);
            let upper = b.iter().map(|&(x, _, hi)| (tx(x), ty(hi)));
            let lower = b.iter().rev().map(|&(x, lo, _)| (tx(x), ty(lo)));
            upper.chain(lower).filter(|(x, y)| x.is_finite() && y.is_finite()).collect()
        })
        .collect();
    let all: Vec<&(f64, f64)> = curves.iter().flatten().chain(bands.iter().flatten()).collect();
    let range = |f: fn(&(f64, f64)) -> f64| {
        let (lo, hi) = all
            .iter()
            .map(|p| f(p))
            .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            return (0.0, 1.0);
        }
        let pad = ((hi - lo) * 0.06).max(1e-9);
        (lo - pad, hi + pad)
    };
    let ((x0, x1), (y0, y1)) = (range(|p| p.0), range(|p| p.1));
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (760, 430)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(axes.title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)
            .map_err(plot_err)?;
        let fmt = |log: bool| move |v: &f64| sig3(if log { 10f64.powf(*v) } else { *v });
        let (fy, integer_x) = (fmt(axes.log_y), axes.x == "generation");
        let fx = move |v: &f64| match (integer_x, axes.log_x) {
            (true, _) if (v - v.round()).abs() > 1e-6 => String::new(),
            (true, _) => format!("{v:.0}"),
            (false, log) => fmt(log)(v),
        };
        let x_labels = if integer_x { ((x1 - x0).ceil() as usize + 1).clamp(2, 12) } else { 10 };
        chart
            .configure_mesh()
            .x_desc(axes.x)
            .y_desc(axes.y)
            .x_labels(x_labels)
            .x_label_formatter(&fx)
            .y_label_formatter(&fy)
            .light_line_style(WHITE.mix(0.0))
            .draw()
            .map_err(plot_err)?;
        for (i, (s, pts)) in series.iter().zip(curves).enumerate() {
            let color = Palette99::pick(i).to_rgba();
            let style = ShapeStyle { color, filled: true, stroke_width: 2 };
            if bands[i].len() >= 3 {
                let fill = Palette99::pick(i).mix(0.18).filled();
                chart.draw_series(std::iter::once(Polygon::new(bands[i].clone(), fill))).map_err(plot_err)?;
            }
            let legend = move |(x, y): (i32, i32)| PathElement::new(vec![(x, y), (x + 18, y)], style);
            if s.dashed {
                chart
                    .draw_series(DashedLineSeries::new(pts, 7, 5, style))
                    .map_err(plot_err)?
                    .label(&s.label)
                    .legend(legend);
            } else {
                chart
                    .draw_series(LineSeries::new(pts.clone(), style))
                    .map_err(plot_err)?
                    .label(&s.label)
                    .legend(legend);
                if pts.len() <= 40 {
                    chart.draw_series(pts.iter().map(|&p| Circle::new(p, 3, style))).map_err(plot_err)?;
                }
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperLeft)
            .draw()
            .map_err(plot_err)?;
        root.present().map_err(plot_err)?;
    }
    Ok(svg)
}

/// Three significant digits, no trailing zeros: 316227.8 → "316000", 0.01234 → "0.0123".
fn sig3(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = (2 - v.abs().log10().floor() as i32).max(0) as usize;
    let rounded = if digits == 0 {
        let scale = 10f64.powi(v.abs().log10().floor() as i32 - 2);
        (v / scale).round() * scale
    } else {
        v
    };
    let s = format!("{rounded:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

fn generation_rows(rows: &[Row]) -> Vec<(usize, &Row)> {
    rows.iter().filter_map(|r| r.generation().map(|g| (g, r))).collect()
}

/// The metrics the registry draws in `plot`.
fn plotted(plot: Plot) -> Vec<Metric> {
    Metric::ALL.iter().copied().filter(|m| m.def().plot == Some(plot)).collect()
}

/// Per generation, one series per metric.
fn per_generation(rows: &[Row], metrics: &[Metric]) -> Vec<Series> {
    metrics
        .iter()
        .map(|&m| Series {
            label: m.key().to_string(),
            points: generation_rows(rows)
                .iter()
                .filter_map(|(g, r)| r.get(m).map(|v| (*g as f64, v)))
                .collect(),
            dashed: false,
            band: None,
        })
        .collect()
}

/// A horizontal reference line across generations.
fn reference(label: &str, value: Option<f64>, generations: usize) -> Option<Series> {
    value.map(|v| Series {
        label: label.to_string(),
        points: vec![(0.0, v), ((generations.max(2) - 1) as f64, v)],
        dashed: true,
        band: None,
    })
}

/// The plots of a run, as (file stem, title, SVG).
pub fn plots(run: &Path, state: &RunState, rows: &[Row]) -> Result<Vec<(String, String, String)>> {
    let n = state.generations.len();
    let real = rows.iter().find(|r| r.id == RowId::Real);
    let gen0 = rows.iter().find(|r| r.id == RowId::Generation(0));
    let mut out = Vec::new();
    let axes = |title, y, log_y| Axes { title, x: "generation", y, log_x: false, log_y };

    let mut s = per_generation(rows, &plotted(Plot::TestPpl));
    s.extend(reference("generation 0", gen0.and_then(|r| r.get(Metric::TestPpl)), n));
    out.push((
        "test_ppl",
        "Token perplexity on the real test split",
        line_chart(&axes("Token perplexity on the real test split", "perplexity (log)", true), &s)?,
    ));

    let mut s = per_generation(rows, &plotted(Plot::WordPpl));
    s.extend(reference("generation 0", gen0.and_then(|r| r.get(Metric::TestWordPpl)), n));
    s.extend(reference("KN bigram", real.and_then(|r| r.get(Metric::KnBigramTestWordPpl)), n));
    s.extend(reference("unigram", real.and_then(|r| r.get(Metric::UnigramTestWordPpl)), n));
    out.push((
        "test_word_ppl",
        "Word perplexity on the real test split",
        line_chart(&axes("Word perplexity on the real test split", "perplexity (log)", true), &s)?,
    ));

    let s = per_generation(rows, &plotted(Plot::Diversity));
    out.push((
        "diversity",
        "Diversity of each generation's text",
        line_chart(&axes("Diversity of each generation's text", "ratio", false), &s)?,
    ));

    let s = per_generation(rows, &plotted(Plot::Tails));
    out.push((
        "tails",
        "Tails: rare n-gram recall (common as control), novelty, divergence",
        line_chart(&axes("Tails: rare n-gram recall, novelty, divergence", "fraction / bits", false), &s)?,
    ));

    // Shumailov's Fig. 1: every sequence scored by generation 0, share per log-spaced bin.
    let edges = ppl_bin_edges();
    let centers: Vec<f64> = edges.windows(2).map(|w| (w[0] * w[1]).sqrt()).collect();
    let hist = |label: String, r: &Row, dashed: bool| -> Option<Series> {
        let h = r.hist(Metric::Gen0SeqPplHist)?;
        let total: f64 = h.iter().map(|&x| x as f64).sum();
        (total > 0.0).then(|| Series {
            label,
            points: centers.iter().zip(h).map(|(&c, &v)| (c, v as f64 / total)).collect(),
            dashed,
            band: None,
        })
    };
    let mut s: Vec<Series> = real.and_then(|r| hist("real".into(), r, true)).into_iter().collect();
    s.extend(generation_rows(rows).into_iter().filter_map(|(g, r)| hist(format!("gen {g}"), r, false)));
    let hist_axes = Axes {
        title: "Perplexity of each sequence under generation 0",
        x: "perplexity under generation 0 (log)",
        y: "share of sequences",
        log_x: true,
        log_y: false,
    };
    out.push((
        "gen0_seq_ppl",
        "Perplexity of each sequence under generation 0 (Shumailov Fig. 1)",
        line_chart(&hist_axes, &s)?,
    ));

    // Zipf: rank–frequency of each generation's words, log–log, at about 60 log-spaced ranks.
    let mut s = Vec::new();
    for g in 0..n {
        let path = run.join(format!("gen-{g:02}")).join(CORPUS);
        if !path.exists() {
            continue;
        }
        let records = read_corpus(&path)?;
        if g == 0 {
            let words: Vec<&str> = records.iter().flat_map(|r| r.prompt.split_whitespace()).collect();
            s.push(Series {
                label: "real (prompts)".into(),
                points: zipf_points(&rank_frequency(&words)),
                dashed: true,
                band: None,
            });
        }
        let words: Vec<&str> = records.iter().flat_map(|r| r.text.split_whitespace()).collect();
        s.push(Series {
            label: format!("gen {g}"),
            points: zipf_points(&rank_frequency(&words)),
            dashed: false,
            band: None,
        });
    }
    let zipf_axes = Axes {
        title: "Rank-frequency (Zipf)",
        x: "rank (log)",
        y: "frequency (log)",
        log_x: true,
        log_y: true,
    };
    out.push(("zipf", "Rank-frequency of words (Zipf), log-log", line_chart(&zipf_axes, &s)?));
    Ok(out.into_iter().map(|(a, b, c)| (a.to_string(), b.to_string(), c)).collect())
}

fn zipf_points(freq: &[u64]) -> Vec<(f64, f64)> {
    let mut ranks: Vec<usize> =
        (0..60).map(|i| (10f64.powf(i as f64 * 5.0 / 59.0)).round() as usize).collect();
    ranks.dedup();
    ranks.into_iter().filter(|&r| r >= 1 && r <= freq.len()).map(|r| (r as f64, freq[r - 1] as f64)).collect()
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// An SVG document as an inline element: no XML declaration, no namespace URL.
pub fn inline_svg(svg: &str) -> String {
    let body = svg.trim_start();
    let body = match body.strip_prefix("<?xml") {
        Some(rest) => rest.split_once("?>").map(|(_, b)| b).unwrap_or(rest),
        None => body,
    };
    body.replace(" xmlns=\"http://www.w3.org/2000/svg\"", "")
}

/// One cell of the report's table.
fn cell(v: Option<&Value>) -> String {
    match v {
        Some(Value::Float(x)) if x.is_nan() => "–".into(),
        Some(Value::Float(x)) if x.abs() >= 100.0 => format!("{x:.1}"),
        Some(Value::Float(x)) => format!("{x:.4}"),
        Some(Value::Count(n)) => n.to_string(),
        Some(Value::Text(s)) => esc(s),
        _ => "–".into(),
    }
}

/// Writes `plots/*.svg` and `report.html` for the run in `run`.
pub fn write_report(run: &Path) -> Result<()> {
    let state = load_state(run)?;
    let rows = read_rows(run)?;
    let plots = plots(run, &state, &rows)?;
    let dir = run.join("plots");
    create_dir(&dir)?;
    for (stem, _, svg) in &plots {
        write_atomic(&dir.join(format!("{stem}.svg")), svg.as_bytes())?;
    }
    let mut html = String::new();
    let name = run.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>collapse-lab: {n}</title>\n<style>\
         body{{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}}\
         table{{border-collapse:collapse;font-size:13px}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right}}\
         th{{background:#f2f2f2}}pre{{white-space:pre-wrap;background:#f7f7f7;padding:.6em;font-size:13px}}\
         figure{{margin:1.5em 0}}figcaption{{font-weight:bold;margin-bottom:.3em}}.lab{{color:#777;font-size:12px}}\
         </style></head><body>\n<h1>collapse-lab run <code>{n}</code></h1>\n",
        n = esc(&name)
    )?;
    let c = &state.config;
    let r = &c.recursion;
    let s = &c.sample;
    writeln!(
        html,
        "<p>Preset <b>{}</b>, seed {}, {} generations, regime <b>{:?}</b> (real fraction {}), prompts {:?}, init {:?}; \
         sampling: temperature {}, top-k {}, top-p {}, repetition penalty {}, beam {}. Model: d {} × {} layers, \
         vocabulary {}, context {}; train lines: {} (0 = all); {} epochs per generation. crate {}, tokenizer sha256 <code>{}</code>.</p>",
        esc(&c.preset),
        c.seed,
        r.generations,
        r.regime,
        r.real_fraction,
        r.prompt_mode,
        r.init,
        s.temperature,
        s.top_k,
        s.top_p,
        s.repetition_penalty,
        s.beam,
        c.model.d_model,
        c.model.n_layer,
        c.model.vocab_size,
        c.model.ctx,
        c.data.train_lines,
        c.train.epochs,
        esc(&state.crate_version),
        esc(&state.tokenizer_sha256[..16.min(state.tokenizer_sha256.len())])
    )?;
    let columns: Vec<Metric> = Metric::ALL.iter().copied().filter(|m| m.def().report).collect();
    html.push_str("<h2>Metrics</h2>\n<div style=\"overflow-x:auto\"><table><tr><th>generation</th>");
    for m in &columns {
        write!(html, "<th title=\"{}\">{}</th>", esc(m.def().description), esc(m.key()))?;
    }
    html.push_str("</tr>\n");
    for row in &rows {
        write!(html, "<tr><td>{}</td>", row.id.label())?;
        for &m in &columns {
            write!(html, "<td>{}</td>", cell(row.value(m)))?;
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</table></div>\n<p class=\"lab\">All metrics per generation are in metrics.jsonl / metrics.csv.</p>\n<h2>Plots</h2>\n");
    for (stem, caption, svg) in &plots {
        writeln!(
            html,
            "<figure id=\"{stem}\"><figcaption>{}</figcaption>{}</figure>",
            esc(caption),
            inline_svg(svg)
        )?;
    }
    html.push_str("<h2>What the generations wrote</h2>\n");
    let corpora: Vec<(usize, Vec<CorpusRecord>)> = (0..state.generations.len())
        .filter_map(|g| {
            let p = run.join(format!("gen-{g:02}")).join(CORPUS);
            p.exists().then(|| read_corpus(&p).map(|c| (g, c)))
        })
        .collect::<Result<_>>()?;
    for (g, records) in &corpora {
        writeln!(html, "<h3>Generation {g}</h3>")?;
        for rec in records.iter().take(3) {
            write!(html, "<pre><span class=\"lab\">prompt {}:</span> {}\n<span class=\"lab\">text (gen-0 perplexity {:.1}):</span> {}</pre>\n", rec.prompt_id, esc(&rec.prompt), rec.gen0_ppl, esc(&rec.text))?;
        }
    }
    html.push_str("<h2>Lineages: one block through the generations</h2>\n");
    if let Some((_, first)) = corpora.first() {
        let ids: Vec<usize> =
            [0, first.len() / 3, 2 * first.len() / 3].into_iter().filter(|&i| i < first.len()).collect();
        for id in ids {
            write!(
                html,
                "<h3>Block {id}</h3>\n<pre><span class=\"lab\">[real]</span> {}\n",
                esc(&first[id].prompt)
            )?;
            for (g, records) in &corpora {
                if let Some(rec) = records.get(id) {
                    writeln!(html, "<span class=\"lab\">[gen {g}]</span> {}", esc(&rec.text))?;
                }
            }
            html.push_str("</pre>\n");
        }
    }
    html.push_str("</body></html>\n");
    write_atomic(&run.join("report.html"), html.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn significant_digits() {
        assert_eq!(sig3(316227.766), "316000");
        assert_eq!(sig3(123.456), "123");
        assert_eq!(sig3(3.16227), "3.16");
        assert_eq!(sig3(0.012345), "0.0123");
        assert_eq!(sig3(1.0), "1");
    }

    #[test]
    fn a_chart_holds_its_series() {
        let s = [
            Series { label: "alpha".into(), points: vec![(0.0, 1.0), (1.0, 2.0)], dashed: false, band: None },
            Series { label: "beta".into(), points: vec![(0.0, 2.0), (1.0, 2.0)], dashed: true, band: None },
        ];
        let axes = Axes { title: "T", x: "generation", y: "y", log_x: false, log_y: true };
        let svg = line_chart(&axes, &s).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap();
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).map(str::trim).collect();
        assert!(texts.contains(&"alpha") && texts.contains(&"beta"), "{texts:?}");
        assert!(doc.descendants().filter(|n| n.has_tag_name("polyline")).count() >= 2);
        assert!(!inline_svg(&svg).contains("http"));
    }
}
