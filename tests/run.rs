//! End-to-end tests of the recursion lab (`run`, `resume`, `inspect`, `metrics`) on the smoke preset.

use serde_json::Value;
use std::path::Path;
use std::process::Output;

mod common;
use common::{bin, run, stderr};

fn smoke_run(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--preset", "smoke", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "run failed: {}", stderr(&o));
    o
}

fn rows(out: &Path) -> Vec<Value> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

/// Fields that are NaN (null) by definition when their set is empty: the smoke train split (150
/// lines) has no word counted 1000 times and no trigram counted 100 times, so the common-word
/// perplexity and the common-trigram control have nothing to measure.
const MAY_BE_UNDEFINED: [&str; 2] = ["common_ngram_recall_3", "test_ppl_common"];

const MODEL_FIELDS: [&str; 5] = ["test_ppl", "test_word_ppl", "test_ppl_rare", "valid_ppl", "valid_word_ppl"];
const CORPUS_FIELDS: [&str; 17] = [
    "ttr_at_n",
    "mattr",
    "distinct_1",
    "distinct_2",
    "distinct_3",
    "rare_ngram_recall_1",
    "rare_ngram_recall_2",
    "rare_ngram_recall_3",
    "common_ngram_recall_1",
    "common_ngram_recall_2",
    "novel_trigram_rate",
    "unigram_js",
    "zipf_alpha",
    "unigram_entropy",
    "gen0_seq_ppl_p5",
    "gen0_seq_ppl_p50",
    "gen0_seq_ppl_p95",
];

#[test]
fn smoke_run_writes_every_metric_and_provenance() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    let o = smoke_run(&out, &[]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert_eq!(table.lines().filter(|l| l.trim_start().starts_with(['0', '1', '2'])).count(), 3, "{table}");

    let rows = rows(&out);
    assert_eq!(rows.len(), 4, "a row for the real split and each of 3 generations");
    assert_eq!(rows[0]["generation"], "real");
    for (g, row) in rows.iter().enumerate() {
        let fields: Vec<&str> =
            if g == 0 { CORPUS_FIELDS.to_vec() } else { [&MODEL_FIELDS[..], &CORPUS_FIELDS[..]].concat() };
        for f in fields {
            let v = row[f].as_f64().unwrap_or_else(|| panic!("row {g}: {f} missing or not a number: {row}"));
            assert!(v.is_finite(), "row {g}: {f} = {v}");
        }
        for f in MAY_BE_UNDEFINED.iter().filter(|f| g > 0 || !f.starts_with("test")) {
            assert!(row.get(*f).is_some(), "row {g}: {f} missing");
        }
        assert_eq!(row["gen0_seq_ppl_hist"].as_array().unwrap().len(), 20);
        if g > 0 {
            assert_eq!(row["generation"], g - 1);
        }
    }
    // The real split against itself: every rare n-gram is recalled, nothing is novel.
    assert_eq!(rows[0]["rare_ngram_recall_1"], 1.0);
    assert_eq!(rows[0]["novel_trigram_rate"], 0.0);

    let csv = std::fs::read_to_string(out.join("metrics.csv")).unwrap();
    assert_eq!(csv.lines().count(), 5);
    assert!(csv.starts_with("generation,"));

    let state: Value = serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    for g in state["generations"].as_array().unwrap() {
        assert_eq!(g["status"], "measured");
        assert!(g["artifacts"]["corpus.jsonl"].as_str().unwrap().len() == 64);
    }

    let mut counts = vec![];
    for g in 0..3 {
        let dir = out.join(format!("gen-{g:02}"));
        assert!(dir.join("model.safetensors").is_file() && dir.join("model.json").is_file());
        let text = std::fs::read_to_string(dir.join("corpus.jsonl")).unwrap();
        let mut n = 0;
        for (i, line) in text.lines().enumerate() {
            let r: Value = serde_json::from_str(line).unwrap();
            assert_eq!(r["id"], i);
            assert_eq!(r["generation"], g);
            assert_eq!(r["prompt_id"], i);
            assert!(r["prompt"].is_string() && r["text"].is_string());
            assert_eq!(r["tokens"].as_array().unwrap().len(), 16, "one 16-token block per prompt");
            assert_eq!(r["sampler"]["temperature"], 1.0);
            assert_eq!(r["parent_model"], format!("gen-{g:02}/model.safetensors"));
            assert!(r["gen0_ppl"].as_f64().unwrap().is_finite());
            n += 1;
        }
        counts.push(n);
    }
    assert!(
        counts[0] > 100 && counts.iter().all(|&c| c == counts[0]),
        "same count every generation: {counts:?}"
    );

    // Lineage: generation 1 continues generation 0's text of the same block.
    let gen0: Vec<Value> = std::fs::read_to_string(out.join("gen-00/corpus.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let gen1_first: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("gen-01/corpus.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert_eq!(gen1_first["prompt"], gen0[0]["text"]);

    // The report: every plot inline, nothing fetched from the network, SVGs that parse as XML and
    // hold the expected series.
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.contains("http"), "report.html must be self-contained");
    let expected: [(&str, &[&str]); 6] = [
        ("test_ppl", &["test_ppl", "test_ppl_rare", "generation 0"]),
        ("test_word_ppl", &["test_word_ppl", "KN bigram", "unigram"]),
        ("diversity", &["ttr_at_n", "mattr", "distinct_2"]),
        ("tails", &["rare_ngram_recall_1", "common_ngram_recall_1", "novel_trigram_rate", "unigram_js"]),
        ("gen0_seq_ppl", &["real", "gen 0", "gen 1", "gen 2"]),
        ("zipf", &["real (prompts)", "gen 0", "gen 2"]),
    ];
    assert_eq!(html.matches("<svg").count(), expected.len());
    for (stem, labels) in expected {
        assert!(html.contains(&format!("<figure id=\"{stem}\">")), "{stem} not inline");
        let svg = std::fs::read_to_string(out.join(format!("plots/{stem}.svg"))).unwrap();
        let doc = roxmltree::Document::parse(&svg).unwrap_or_else(|e| panic!("{stem}.svg: {e}"));
        let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).map(str::trim).collect();
        for label in labels {
            assert!(texts.contains(label), "{stem}.svg lacks the series {label}");
        }
    }

    // inspect: a generation's texts, and one lineage across generations.
    let o = run(&["inspect", out.to_str().unwrap(), "--generation", "1", "-n", "2"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(String::from_utf8_lossy(&o.stdout).matches("--- generation 1").count(), 2);
    let o = run(&["inspect", out.to_str().unwrap(), "--lineage", "5"]);
    let text = String::from_utf8_lossy(&o.stdout);
    for label in ["[real]", "[gen 0]", "[gen 1]", "[gen 2]"] {
        assert!(text.contains(label), "{label} missing in:\n{text}");
    }

    // A finished run is not started again by accident, and resume says it is complete.
    let o = run(&["run", "--preset", "smoke", "--out", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("already holds a run"));
    let o = run(&["resume", out.to_str().unwrap()]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("complete"));
}

#[test]
fn keep_real_and_accumulate_regimes_run() {
    let tmp = tempfile::tempdir().unwrap();
    for regime in ["keep-real", "accumulate", "accumulate-subsample"] {
        let out = tmp.path().join(regime);
        smoke_run(&out, &["--regime", regime, "--generations", "2", "--quiet"]);
        let rows = rows(&out);
        assert_eq!(rows.len(), 3);
        let steps: Vec<u64> = rows[1..].iter().map(|r| r["train_tokens"].as_u64().unwrap()).collect();
        match regime {
            // Accumulate trains generation 1 on the real data plus generation 0's corpus: about twice.
            "accumulate" => assert!(steps[1] as f64 > 1.8 * steps[0] as f64, "{steps:?}"),
            _ => assert!((steps[1] as f64 - steps[0] as f64).abs() < 0.1 * steps[0] as f64, "{steps:?}"),
        }
    }
}

#[test]
fn measure_valid_off_leaves_the_validation_columns_out_and_everything_else_equal() {
    let tmp = tempfile::tempdir().unwrap();
    let (on, off) = (tmp.path().join("on"), tmp.path().join("off"));
    smoke_run(&on, &["--generations", "1", "--quiet"]);
    smoke_run(&off, &["--generations", "1", "--quiet", "--set", "recursion.measure_valid=false"]);
    for (a, b) in rows(&on).iter().zip(rows(&off)) {
        let (mut a, mut b) = (a.as_object().unwrap().clone(), b.as_object().unwrap().clone());
        for key in ["valid_ppl", "valid_word_ppl"] {
            assert!(b.remove(key).is_none(), "{key} measured with measure_valid off");
            a.remove(key);
        }
        assert_eq!(a, b, "only the validation columns differ");
    }
}

#[test]
fn beam_and_free_modes_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("beam");
    smoke_run(&out, &["--beam", "3", "--generations", "1", "--quiet", "--set", "data.train_lines=40"]);
    // A word-level vocabulary of every type (model.vocab_size 0) takes beam search too (it was
    // refused: the beam was checked against the unresolved size 0).
    let out = tmp.path().join("word-beam");
    let word = ["--set", "tokenizer.kind=\"word\"", "--set", "model.vocab_size=0"];
    smoke_run(&out, &[&["--beam", "3", "--generations", "1", "--quiet"][..], &word[..]].concat());
    let out = tmp.path().join("free");
    smoke_run(&out, &["--prompt-mode", "free", "--generations", "1", "--quiet"]);
    let first: Value = serde_json::from_str(
        std::fs::read_to_string(out.join("gen-00/corpus.jsonl")).unwrap().lines().next().unwrap(),
    )
    .unwrap();
    assert_eq!(first["tokens"].as_array().unwrap().len(), 31, "ctx − 1 tokens after the end-of-text prompt");
}

#[test]
fn bad_run_settings_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    let o_ = out.to_str().unwrap();
    let cases: [(&[&str], &str); 11] = [
        (&["--temperature", "-1"], "--temperature"),
        (&["--top-p", "0"], "--top-p"),
        (&["--top-p", "1.5"], "--top-p"),
        (&["--beam", "1000000"], "--beam"),
        (&["--generations", "1000000000"], "--generations"),
        (&["--real-fraction", "1.5"], "--real-fraction"),
        (&["--real-fraction", "-0.1"], "--real-fraction"),
        (&["--generations", "0"], "--generations"),
        (&["--regime", "recycle"], "recycle"),
        (&["--repetition-penalty", "0"], "--repetition-penalty"),
        (&["--set", "recursion.regime=\"recycle\""], "recursion.regime"),
    ];
    for (flags, culprit) in cases {
        let mut args = vec!["run", "--preset", "smoke", "--quiet", "--out", o_];
        args.extend_from_slice(flags);
        let o = run(&args);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{flags:?}: {err}");
        assert!(err.contains(culprit), "{flags:?}: stderr should name {culprit}: {err}");
        assert!(!err.contains("panicked"), "{err}");
        assert!(!out.exists(), "{flags:?}: nothing may be written for a bad setting");
    }
    let o = run(&["resume", tmp.path().to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("not a run directory"), "{}", stderr(&o));
    assert_eq!(o.status.code(), Some(2));
    assert!(std::fs::read_dir(tmp.path()).unwrap().next().is_none(), "nothing may be written");
}

#[test]
fn metrics_command_measures_any_two_texts() {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("ref.txt");
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&reference, "a b a c\n").unwrap();
    std::fs::write(&corpus, "a b\n").unwrap();
    let o = run(&[
        "metrics",
        "--reference",
        reference.to_str().unwrap(),
        "--corpus",
        corpus.to_str().unwrap(),
        "--json",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let m: Value = serde_json::from_slice(&o.stdout).unwrap();
    // Reference "a b a c": unigrams a:2, b:1, c:1; rare (count ≤ 5) = {a, b, c}; the corpus has a, b.
    assert!((m["rare_ngram_recall_1"].as_f64().unwrap() - 2.0 / 3.0).abs() < 1e-12);
    assert_eq!(m["ttr_at_n"], 1.0);
    let o = run(&["metrics", "--reference", "/nonexistent.txt", "--corpus", corpus.to_str().unwrap()]);
    assert!(!o.status.success() && stderr(&o).contains("/nonexistent.txt"));
}

fn same_bytes(a: &Path, b: &Path, generations: usize) {
    let read = |p: &Path| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    assert!(
        read(&a.join("metrics.jsonl")) == read(&b.join("metrics.jsonl")),
        "metrics.jsonl differs: {} vs {}",
        a.display(),
        b.display()
    );
    for g in 0..generations {
        let f = format!("gen-{g:02}/corpus.jsonl");
        assert!(read(&a.join(&f)) == read(&b.join(&f)), "{f} differs: {} vs {}", a.display(), b.display());
    }
}

#[test]
fn the_same_seed_gives_byte_identical_runs() {
    let tmp = tempfile::tempdir().unwrap();
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    smoke_run(&a, &["--quiet"]);
    smoke_run(&b, &["--quiet"]);
    same_bytes(&a, &b, 3);
    let w = |d: &Path| std::fs::read(d.join("gen-02/model.safetensors")).unwrap();
    assert!(w(&a) == w(&b));
    let c = tmp.path().join("c");
    smoke_run(&c, &["--quiet", "--seed", "1"]);
    assert!(
        std::fs::read(a.join("gen-00/corpus.jsonl")).unwrap()
            != std::fs::read(c.join("gen-00/corpus.jsonl")).unwrap()
    );
}

#[test]
fn killed_and_resumed_runs_equal_an_uninterrupted_run() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let straight = tmp.path().join("straight");
    smoke_run(&straight, &["--quiet"]);
    for point in ["train:gen 1", "sample:gen 0", "sample:gen 2", "measure:gen 1"] {
        let out = tmp.path().join(point.replace([':', ' '], "-"));
        let o = bin()
            .args(["run", "--preset", "smoke", "--quiet", "--out", out.to_str().unwrap()])
            .env("COLLAPSE_LAB_ABORT_AT", point)
            .output()
            .unwrap();
        assert_eq!(
            o.status.signal(),
            Some(9),
            "{point}: the run should die of SIGKILL; stderr: {}",
            stderr(&o)
        );
        let o = run(&["resume", out.to_str().unwrap(), "--quiet"]);
        assert!(o.status.success(), "{point}: resume failed: {}", stderr(&o));
        same_bytes(&straight, &out, 3);
    }
    // A corpus changed behind the run's back is redone, not trusted.
    let f = straight.join("gen-01/corpus.jsonl");
    let good = std::fs::read(&f).unwrap();
    std::fs::write(&f, &good[..good.len() / 2]).unwrap();
    let o = run(&["resume", straight.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("generation 1"), "{}", stderr(&o));
    assert!(std::fs::read(&f).unwrap() == good);
}

#[test]
fn sweep_runs_the_grid_and_compares_with_confidence_bands() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("sweep");
    let grid =
        ["sweep", "--preset", "smoke", "--temperature", "0.7,1.0", "--seeds", "2", "--generations", "2"];
    let o = run(&[&grid[..], &["--quiet", "--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let runs: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.join("run.json").is_file())
        .collect();
    assert_eq!(runs.len(), 4, "2 temperatures × 2 seeds");
    let html = std::fs::read_to_string(out.join("compare/compare.html")).unwrap();
    assert!(
        html.contains("temperature=0.7 (n=2)") && html.contains("temperature=1 (n=2)"),
        "labelled by what differs"
    );
    assert!(!html.contains("http"));
    // compare.md: per group and generation, the mean over the seeds ± the 95 % half-width.
    let md = std::fs::read_to_string(out.join("compare/compare.md")).unwrap();
    let gen0 =
        |seed: u32| rows(&out.join(format!("t0.7-p1-replace-seed{seed}")))[1]["test_ppl"].as_f64().unwrap();
    let (x0, x1) = (gen0(0), gen0(1));
    // Two seeds: sd = |x0 − x1| / √2, half-width = t(1 df) · sd / √2 = 12.706 · |x0 − x1| / 2.
    let half = 12.706 * (x0 - x1).abs() / 2.0;
    let mean = (x0 + x1) / 2.0;
    let cell = match mean {
        m if m >= 100.0 => format!("| temperature=0.7 | {m:.1} ± {half:.1} |"),
        m if m >= 10.0 => format!("| temperature=0.7 | {m:.2} ± {half:.2} |"),
        m => format!("| temperature=0.7 | {m:.4} ± {half:.4} |"),
    };
    assert!(md.contains("### test_ppl") && md.contains(&cell), "expected {cell:?} in\n{md}");
    let svg = std::fs::read_to_string(out.join("compare/plots/compare_test_ppl.svg")).unwrap();
    let doc = roxmltree::Document::parse(&svg).unwrap();
    assert_eq!(doc.descendants().filter(|n| n.has_tag_name("polygon")).count(), 2, "one 95% band per group");
    // compare of two runs that differ only in temperature: two labelled curves, no band (n = 1 each).
    let (a, b) = (out.join("t0.7-p1-replace-seed0"), out.join("t1-p1-replace-seed0"));
    let cmp = tmp.path().join("cmp");
    let o = run(&["compare", a.to_str().unwrap(), b.to_str().unwrap(), "--out", cmp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let svg = std::fs::read_to_string(cmp.join("plots/compare_test_ppl.svg")).unwrap();
    assert!(svg.contains("temperature=0.7 (n=1)") && svg.contains("temperature=1 (n=1)"));
    // Resuming the sweep keeps the finished runs.
    let o = run(&[&grid[..], &["--out", out.to_str().unwrap()]].concat());
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).matches("is complete").count() == 4);
    // More --generations extends a finished run (its generations 0 and 1 kept byte for byte).
    let one = ["sweep", "--preset", "smoke", "--temperature", "1.0", "--seeds", "1", "--quiet", "--out"];
    let run1 = out.join("t1-p1-replace-seed0");
    let before = std::fs::read(run1.join("gen-01/corpus.jsonl")).unwrap();
    let o = run(&[&one[..], &[out.to_str().unwrap(), "--generations", "3"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let gens: Vec<String> = rows(&run1).iter().map(|r| r["generation"].to_string()).collect();
    assert_eq!(gens, ["\"real\"", "0", "1", "2"], "extended to 3 generations");
    assert!(std::fs::read(run1.join("gen-01/corpus.jsonl")).unwrap() == before);
    // The whole grid is checked before any point is touched: with t1-…-seed0 at 4 generations, a
    // sweep asking 3 of both temperatures refuses (naming it) and leaves t0.7-…-seed0 at 2, where
    // running the points in order would have extended it first.
    let o = run(&[&one[..], &[out.to_str().unwrap(), "--generations", "4"]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let two = ["sweep", "--preset", "smoke", "--temperature", "0.7,1.0", "--seeds", "1", "--quiet", "--out"];
    let other = out.join("t0.7-p1-replace-seed0");
    let o = run(&[&two[..], &[out.to_str().unwrap(), "--generations", "3"]].concat());
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    let want = format!("--generations 3: {} already has 4 generations", run1.display());
    assert!(stderr(&o).contains(&want), "{}", stderr(&o));
    assert_eq!((rows(&run1).len(), rows(&other).len()), (5, 3), "real + generations, unchanged");
}

#[test]
fn divergence_stops_the_run_naming_generation_and_step() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("div");
    let o = run(&[
        "run",
        "--preset",
        "smoke",
        "--quiet",
        "--set",
        "train.lr=1e9",
        "--set",
        "train.min_lr=0",
        "--set",
        "train.grad_clip=0",
        "--set",
        "train.weight_decay=0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("gen 0: training diverged at step"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    // What was written so far is kept: the run can be inspected and resumed with other settings later.
    assert!(out.join("run.json").is_file() && out.join("tokenizer.json").is_file());
}
