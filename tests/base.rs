//! Shumailov's protocol (issue 16): a base model pretrained once on the train split after the real
//! data, cached by content, every generation fine-tuned from it; its zero-shot row; nonword_rate.

use serde_json::Value;
use std::path::Path;
use std::process::Output;

mod common;
use common::{bin, read, stderr};

/// A smoke-sized run of the protocol: the smoke model, a base pretrained on 300 lines after the
/// real data (40 steps), every generation fine-tuned from it.
const PROTOCOL: [&str; 8] =
    ["--preset", "smoke", "--init", "base", "--set", "tokenizer.corpus=\"train\"", "--set", "base.lines=300"];

fn run_protocol(out: &Path, cache: &Path, extra: &[&str]) -> Output {
    let mut args =
        vec!["run", "--quiet", "--out", out.to_str().unwrap(), "--base-cache", cache.to_str().unwrap()];
    args.extend_from_slice(&PROTOCOL);
    if !extra.contains(&"--generations") {
        args.extend(["--generations", "2"]);
    }
    args.extend_from_slice(extra);
    bin().args(&args).output().unwrap()
}

fn state(out: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap()
}

#[test]
fn the_base_is_pretrained_once_and_every_generation_starts_from_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("bases");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    let o = run_protocol(&a, &cache, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run_protocol(&b, &cache, &["--seed", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (sa, sb) = (state(&a), state(&b));
    // The record says who pretrained it, and both runs use the same bytes.
    assert_eq!(sa["base"]["pretrained_by_this_run"], true);
    assert_eq!(sb["base"]["pretrained_by_this_run"], false);
    assert_eq!(sa["base"]["weights_sha256"], sb["base"]["weights_sha256"]);
    assert_eq!(
        std::fs::read_dir(&cache)
            .unwrap()
            .filter(|e| !e.as_ref().unwrap().file_name().to_string_lossy().starts_with('.'))
            .count(),
        1
    );
    let base_sha = sa["base"]["weights_sha256"].as_str().unwrap();
    // Every generation's model.json names the base it started from.
    for g in 0..2 {
        let info: Value = serde_json::from_slice(&read(&a.join(format!("gen-{g:02}/model.json")))).unwrap();
        assert_eq!(info["init_sha256"], base_sha, "generation {g}");
    }
    // The zero-shot row comes after the real one, before generation 0, with a corpus of its own.
    let rows: Vec<Value> = std::fs::read_to_string(a.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let ids: Vec<&Value> = rows.iter().map(|r| &r["generation"]).collect();
    assert_eq!(ids, [&Value::from("real"), &Value::from("base"), &Value::from(0), &Value::from(1)]);
    for f in ["test_ppl", "test_word_ppl", "ttr_at_n", "nonword_rate", "gen0_seq_ppl_p50"] {
        assert!(rows[1][f].as_f64().is_some_and(f64::is_finite), "base row: {f}");
    }
    assert_eq!(rows[0]["nonword_rate"], 0.0, "real text has no non-words");
    assert!(a.join("base/corpus.jsonl").is_file());
    let csv = std::fs::read_to_string(a.join("metrics.csv")).unwrap();
    assert!(csv.lines().nth(2).unwrap().starts_with("base,"), "{csv}");
    // Fine-tuning from the base helps: generation 0 beats the base zero-shot on the real test split.
    assert!(
        rows[2]["test_ppl"].as_f64() < rows[1]["test_ppl"].as_f64(),
        "{} vs {}",
        rows[2]["test_ppl"],
        rows[1]["test_ppl"]
    );
    // A block's lineage shows what the base wrote for it, between the real block and generation 0.
    let o = bin().args(["inspect", a.to_str().unwrap(), "--lineage", "0"]).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout);
    let at = |tag: &str| text.find(tag).unwrap_or_else(|| panic!("{tag} missing: {text}"));
    assert!(at("[real]") < at("[base]") && at("[base]") < at("[gen 0]"), "{text}");
}

#[test]
fn a_damaged_cached_base_is_pretrained_again_with_the_same_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("bases");
    let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
    assert!(run_protocol(&a, &cache, &["--generations", "1"]).status.success());
    let sha = state(&a)["base"]["weights_sha256"].as_str().unwrap().to_string();
    let dir = std::path::PathBuf::from(state(&a)["base"]["dir"].as_str().unwrap());
    let w = dir.join("model.safetensors");
    let bytes = read(&w);
    std::fs::write(&w, &bytes[..bytes.len() / 2]).unwrap();
    let o = run_protocol(&b, &cache, &["--generations", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("is damaged") && stderr(&o).contains("pretraining it again"),
        "{}",
        stderr(&o)
    );
    assert_eq!(state(&b)["base"]["weights_sha256"], sha.as_str(), "pretraining is deterministic");
    // resume refuses a base whose bytes changed under the run, naming it.
    std::fs::write(&w, b"not weights").unwrap();
    let o = bin().args(["resume", a.to_str().unwrap()]).output().unwrap();
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("the run's base") && err.contains(dir.to_str().unwrap()), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_kill_during_pretraining_then_run_gives_the_same_bytes() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let (straight, killed) = (tmp.path().join("straight"), tmp.path().join("killed"));
    assert!(run_protocol(&straight, &tmp.path().join("c1"), &[]).status.success());
    let cache = tmp.path().join("c2");
    let mut args =
        vec!["run", "--quiet", "--out", killed.to_str().unwrap(), "--base-cache", cache.to_str().unwrap()];
    args.extend_from_slice(&PROTOCOL);
    args.extend(["--generations", "2"]);
    let o = bin().args(&args).env("COLLAPSE_LAB_ABORT_AT", "train:base").output().unwrap();
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));
    assert!(!killed.exists(), "the run directory is written only once the base is ready");
    let o = run_protocol(&killed, &cache, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(read(&straight.join("metrics.jsonl")), read(&killed.join("metrics.jsonl")));
    for g in ["base", "gen-00", "gen-01"] {
        assert_eq!(
            read(&straight.join(g).join("corpus.jsonl")),
            read(&killed.join(g).join("corpus.jsonl")),
            "{g}"
        );
    }
}

#[test]
fn a_base_of_another_shape_or_vocabulary_is_refused_naming_both() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("m");
    let o = bin()
        .args([
            "train",
            "--preset",
            "smoke",
            "--quiet",
            "--set",
            "model.d_model=16",
            "--out",
            model.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    let out = tmp.path().join("r");
    let o = run_protocol(&out, &tmp.path().join("c"), &["--base", model.to_str().unwrap()]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("d_model 16") && err.contains("d_model 32") && err.contains("is not the run's"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(!out.exists());
    let o = bin()
        .args(["run", "--preset", "smoke", "--base", model.to_str().unwrap(), "--out", out.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(stderr(&o).contains("--base needs --init base"), "{}", stderr(&o));
}

#[test]
fn pretrain_fills_the_cache_that_run_then_uses() {
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("bases");
    let mut args = vec!["pretrain", "--quiet", "--base-cache", cache.to_str().unwrap(), "--preset", "smoke"];
    args.extend_from_slice(&PROTOCOL[4..]);
    let o = bin().args(&args).output().unwrap();
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("best valid loss"));
    let out = tmp.path().join("r");
    let o = run_protocol(&out, &cache, &["--generations", "1"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(state(&out)["base"]["pretrained_by_this_run"], false);
}
