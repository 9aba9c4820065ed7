//! End-to-end tests: the real binary on the `smoke` preset in temporary directories.

use std::path::{Path, PathBuf};

mod common;
use common::{assert_clean_error, run, snapshot, stderr};

/// Trains the smoke model once per test binary run into `dir`.
fn smoke_model(dir: &Path) -> PathBuf {
    let out = dir.join("model");
    let o = run(&["train", "--preset", "smoke", "--quiet", "--out", out.to_str().unwrap()]);
    assert!(o.status.success(), "train failed: {}", stderr(&o));
    out
}

/// A copy of the real data directory with one file replaced.
fn data_with(dir: &Path, file: &str, contents: &[u8]) -> PathBuf {
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2");
    for f in ["wiki.train.tokens", "wiki.valid.tokens", "wiki.test.tokens"] {
        std::fs::copy(real.join(f), data.join(f)).unwrap();
    }
    std::fs::write(data.join(file), contents).unwrap();
    data
}

#[test]
fn smoke_train_then_eval_prints_finite_perplexities() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smoke_model(tmp.path());
    for f in ["model.safetensors", "model.json", "tokenizer.json"] {
        assert!(model.join(f).is_file(), "{f} missing");
    }
    for split in ["test", "valid"] {
        let o = run(&["eval", "--model", model.to_str().unwrap(), "--split", split, "--json"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        let ppl = v[format!("{split}_ppl")].as_f64().unwrap();
        let word_ppl = v[format!("{split}_word_ppl")].as_f64().unwrap();
        // A trained model beats the uniform distribution over the smoke vocabulary (384 tokens).
        assert!(ppl.is_finite() && ppl > 1.0 && ppl < 384.0, "{split}_ppl {ppl}");
        assert!(word_ppl.is_finite() && word_ppl > ppl, "{split}_word_ppl {word_ppl}");
    }
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(model.join("model.json")).unwrap()).unwrap();
    assert_eq!(info["training"]["steps"], 40);
    assert!(info["training"]["best_valid_loss"].as_f64().unwrap().is_finite());
}

#[test]
fn training_is_reproducible_from_the_seed() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a");
    let b = tmp.path().join("b");
    for out in [&a, &b] {
        let o =
            run(&["train", "--preset", "smoke", "--quiet", "--seed", "3", "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    let read = |d: &Path| std::fs::read(d.join("model.safetensors")).unwrap();
    assert_eq!(read(&a), read(&b), "same seed, same weights");
}

#[test]
fn bad_inputs_give_one_line_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let t = tmp.path();
    let model = smoke_model(t);
    let m = model.to_str().unwrap();
    let out = t.join("o");
    let o_ = out.to_str().unwrap();
    let model_files = snapshot(&model);

    // Missing data directory.
    let o = run(&["train", "--preset", "smoke", "--quiet", "--data", "/nonexistent/wt2", "--out", o_]);
    assert_clean_error(&o, "/nonexistent/wt2");
    // Empty, non-UTF-8 and binary data files.
    let d = data_with(t, "wiki.train.tokens", b"\n  \n");
    assert_clean_error(
        &run(&["train", "--preset", "smoke", "--data", d.to_str().unwrap(), "--out", o_]),
        "wiki.train.tokens",
    );
    let d = data_with(t, "wiki.valid.tokens", b"caf\xe9 au lait\n");
    assert_clean_error(
        &run(&["train", "--preset", "smoke", "--data", d.to_str().unwrap(), "--out", o_]),
        "not valid UTF-8",
    );
    let d = data_with(t, "wiki.test.tokens", b"\x00\x01\x02binary");
    assert_clean_error(&run(&["eval", "--model", m, "--data", d.to_str().unwrap()]), "wiki.test.tokens");
    // Unknown preset, unknown and mistyped --set keys.
    let o = run(&["train", "--preset", "huge", "--out", o_]);
    assert_clean_error(&o, "huge");
    assert_eq!(o.status.code(), Some(2));
    let o = run(&["train", "--preset", "smoke", "--set", "train.lrate=1", "--out", o_]);
    assert_clean_error(&o, "train.lrate");
    assert_eq!(o.status.code(), Some(2));
    assert_clean_error(
        &run(&["train", "--preset", "smoke", "--set", "model.n_layer=two", "--out", o_]),
        "model.n_layer",
    );
    // Corrupt tokenizer.json.
    let broken = t.join("broken");
    std::fs::create_dir_all(&broken).unwrap();
    for f in ["model.safetensors", "model.json", "tokenizer.json"] {
        std::fs::copy(model.join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("tokenizer.json"), "{\"version\": ").unwrap();
    assert_clean_error(&run(&["eval", "--model", broken.to_str().unwrap()]), "tokenizer.json");
    // Truncated model.safetensors.
    std::fs::copy(model.join("tokenizer.json"), broken.join("tokenizer.json")).unwrap();
    let w = std::fs::read(model.join("model.safetensors")).unwrap();
    std::fs::write(broken.join("model.safetensors"), &w[..w.len() / 2]).unwrap();
    assert_clean_error(&run(&["eval", "--model", broken.to_str().unwrap()]), "model.safetensors");
    // A tokenizer whose vocabulary does not match the model.
    let o = run(&[
        "prepare",
        "--vocab-size",
        "300",
        "--train-lines",
        "200",
        "--out",
        broken.join("tokenizer.json").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    std::fs::write(broken.join("model.safetensors"), &w).unwrap();
    assert_clean_error(&run(&["eval", "--model", broken.to_str().unwrap()]), "vocabulary");
    // Missing model directory; an output path that is a file.
    assert_clean_error(&run(&["eval", "--model", "/nonexistent/model"]), "/nonexistent/model");
    let file = t.join("a-file");
    std::fs::write(&file, "x").unwrap();
    assert_clean_error(&run(&["train", "--preset", "smoke", "--out", file.to_str().unwrap()]), "a-file");
    // Bad flag values are caught by clap with exit code 2.
    let o = run(&["prepare", "--vocab-size", "ten"]);
    assert_eq!(o.status.code(), Some(2));
    assert_clean_error(&run(&["prepare", "--vocab-size", "100", "--out", o_]), "--vocab-size");
    // An output directory that cannot be created.
    assert_clean_error(
        &run(&["train", "--preset", "smoke", "--out", "/proc/collapse-lab/x"]),
        "/proc/collapse-lab/x",
    );
    // None of the failures above touched the model they read, and none left an output behind.
    assert!(snapshot(&model) == model_files, "a failed command changed {}", model.display());
    assert!(!out.exists(), "a failed command created {}", out.display());
}

#[test]
fn prepare_is_deterministic() {
    let tmp = tempfile::tempdir().unwrap();
    let a = tmp.path().join("a.json");
    let b = tmp.path().join("b.json");
    for p in [&a, &b] {
        let o =
            run(&["prepare", "--vocab-size", "512", "--train-lines", "2000", "--out", p.to_str().unwrap()]);
        assert!(o.status.success(), "{}", stderr(&o));
    }
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
}

#[test]
fn device_flag_errors_name_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("o");
    let o_ = out.to_str().unwrap();
    let o = run(&["train", "--preset", "smoke", "--device", "tpu", "--out", o_]);
    assert_clean_error(&o, "--device tpu: expected cpu, cuda, cuda:N or auto");
    assert_eq!(o.status.code(), Some(2), "a usage error");
    let o = run(&["bench", "--config", "B", "--device", "cuda:x"]);
    assert_clean_error(&o, "--device cuda:x");
    // A build without the cuda feature says how to get one.
    if !cfg!(feature = "cuda") {
        for args in [
            &["train", "--preset", "smoke", "--device", "cuda", "--out", o_][..],
            &["run", "--preset", "smoke", "--device", "cuda:1", "--out", o_][..],
            &["bench", "--config", "B", "--device", "cuda"][..],
        ] {
            let o = run(args);
            assert_clean_error(
                &o,
                "this build has no CUDA support (rebuild with `cargo build --release --features cuda`)",
            );
            assert_eq!(o.status.code(), Some(2));
        }
    }
    assert!(!out.exists(), "nothing written on a device error");
}

/// `bench --profile` times every phase of the fast engine's step: each phase once per call, nested
/// under the phase it runs in (smoke model: 2 layers, so per step 2 attention calls and 8 linear
/// backwards, each with its d input and d weight products; one head chunk).
#[test]
fn bench_profile_times_every_phase_of_the_step() {
    let o = run(&["bench", "--config", "smoke", "--iters", "3", "--warmup", "1", "--profile", "--json"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    let json = text.lines().find_map(|l| l.strip_prefix("RESULT ")).expect("a RESULT line");
    let v: serde_json::Value = serde_json::from_str(json).unwrap();
    let phases = v["phases"].as_array().expect("phases");
    let calls = |path: &[&str]| {
        phases.iter().find(|p| p["path"] == serde_json::json!(path)).map(|p| p["calls"].as_u64().unwrap())
    };
    let (iters, layers) = (3, 2);
    for (path, per_step) in [
        (&["zero gradients"][..], 1),
        (&["forward", "embedding"], 1),
        (&["forward", "layernorm"], 2 * layers + 1),
        (&["forward", "linear", "product"], 4 * layers),
        (&["forward", "attention"], layers),
        (&["forward", "gelu"], layers),
        (&["forward", "residual"], 2 * layers),
        (&["forward", "head"], 1),
        (&["forward", "cross-entropy"], 1),
        (&["forward", "head backward", "d weight"], 1),
        (&["backward", "linear backward", "d input"], 4 * layers),
        (&["backward", "linear backward", "d weight"], 4 * layers),
        (&["backward", "attention backward"], layers),
        (&["backward", "layernorm backward"], 2 * layers + 1),
        (&["backward", "embedding backward"], 1),
        (&["gradient norm"], 1),
        (&["AdamW"], 1),
    ] {
        assert_eq!(calls(path), Some(per_step * iters), "{path:?}");
    }
    assert!(phases.iter().all(|p| p["seconds"].as_f64().unwrap() >= 0.0));
    // Without --json, a table: the phases indented under their parents, then the total.
    let o = run(&["bench", "--config", "smoke", "--iters", "1", "--warmup", "0", "--profile"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8(o.stdout).unwrap();
    for line in ["\n  forward ", "\n    attention ", "\n      d weight ", "\n  AdamW ", "\n  all phases "] {
        assert!(text.contains(line), "{line:?} in\n{text}");
    }
    let o = run(&["bench", "--config", "smoke", "--mode", "sample", "--profile"]);
    assert_clean_error(&o, "--profile times the training step: it needs --mode train");
    assert_eq!(o.status.code(), Some(2), "a usage error");
}

/// `generate` continues a prompt with the same tokens as the lab's own sampler for the same seed
/// and settings, streams one prompt's text, and writes JSONL for a file of prompts.
#[test]
fn generate_samples_like_the_lab_sampler() {
    use collapse_lab::checkpoint::load_model_dir;
    use collapse_lab::config::SamplerSettings;
    use collapse_lab::model::engine::Engine;
    use collapse_lab::sample::{generate, Decoding};
    let tmp = tempfile::tempdir().unwrap();
    let model = smoke_model(tmp.path());
    let m = model.to_str().unwrap();
    let loaded = load_model_dir(&model, &Engine::cpu()).unwrap();
    let tok = &loaded.tokenizer;
    let prompts = ["The game was released", "In 1995 , the band"];
    let sampler = SamplerSettings { temperature: 0.8, top_k: 40, top_p: 0.95, repetition_penalty: 1.0 };
    let decoding = Decoding { sampler, beam: 0 };
    let want: Vec<Vec<u32>> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let ids = [vec![tok.eot], tok.encode(p).unwrap()].concat();
            let seed = collapse_lab::cli::generate_seed(3, i);
            generate(&loaded.model, &[&ids], 12, &decoding, &[seed]).unwrap().remove(0)
        })
        .collect();
    let flags =
        ["--temperature", "0.8", "--top-k", "40", "--top-p", "0.95", "--seed", "3", "--max-new-tokens", "12"];
    // One prompt: the prompt, then the continuation as it streams.
    let o = run(&[&["generate", "--model", m, "--prompt", prompts[0]][..], &flags[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let text = String::from_utf8_lossy(&o.stdout);
    assert_eq!(text.trim_end(), format!("{} {}", prompts[0], tok.decode(&want[0])).trim_end());
    // A file of prompts: JSONL with the tokens.
    let file = tmp.path().join("prompts.txt");
    std::fs::write(&file, prompts.join("\n")).unwrap();
    let o = run(&[&["generate", "--model", m, "--prompts", file.to_str().unwrap()][..], &flags[..]].concat());
    assert!(o.status.success(), "{}", stderr(&o));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for (line, want) in lines.iter().zip(&want) {
        let got: Vec<u32> =
            line["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as u32).collect();
        assert_eq!(&got, want);
    }
    // Bad inputs: one line, exit 2, nothing printed on stdout.
    for (args, culprit) in [
        (
            &["generate", "--model", m, "--prompt", "x", "--max-new-tokens", "1000"][..],
            "--max-new-tokens 1000",
        ),
        (&["generate", "--model", m, "--prompt", "x", "--top-p", "2"][..], "--top-p"),
        (&["generate", "--model", m, "--prompt", "x", "--beam", "100000"][..], "--beam"),
    ] {
        let o = run(args);
        assert_clean_error(&o, culprit);
        assert_eq!(o.status.code(), Some(2));
        assert!(o.stdout.is_empty());
    }
}

/// `export --format hf` writes what `GPT2LMHeadModel` expects (the fixture's config keys, tensor
/// names and orientation), and the export reads back with the same perplexities; a Hugging Face
/// directory is also a model for `eval` and a base for `run --init base`.
#[test]
fn export_and_import_hugging_face_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let model = smoke_model(tmp.path());
    let hf = tmp.path().join("hf");
    let o = run(&["export", "--format", "hf", model.to_str().unwrap(), hf.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-gpt2");
    let keys = |d: &Path| -> Vec<String> {
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(d.join("config.json")).unwrap()).unwrap();
        v.as_object().unwrap().keys().cloned().collect()
    };
    assert_eq!(keys(&hf), keys(&fixture));
    let names = |d: &Path| -> Vec<String> {
        let bytes = std::fs::read(d.join("model.safetensors")).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut n: Vec<String> = st.names().into_iter().map(String::from).collect();
        n.sort();
        n
    };
    assert_eq!(names(&hf), names(&fixture), "GPT2LMHeadModel's tensor names (2 layers, tied head)");
    let eval = |d: &Path| {
        let o =
            run(&["eval", "--model", d.to_str().unwrap(), "--json", "--lines", "200", "--block-size", "16"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
        v["nats"].as_f64().unwrap()
    };
    assert_eq!(eval(&model), eval(&hf), "the export computes what the lab model computes");
    // Exporting onto a directory of other files is refused, one line, nothing written.
    let busy = tmp.path().join("busy");
    std::fs::create_dir(&busy).unwrap();
    std::fs::write(busy.join("notes.txt"), "mine").unwrap();
    assert_clean_error(&run(&["export", model.to_str().unwrap(), busy.to_str().unwrap()]), "busy");
    assert_eq!(std::fs::read_dir(&busy).unwrap().count(), 1);
    // The transformers fixture as the base of a run of its shape.
    let out = tmp.path().join("run");
    let o = run(&[
        "run",
        "--preset",
        "smoke",
        "--init",
        "base",
        "--base",
        fixture.to_str().unwrap(),
        "--generations",
        "1",
        "--set",
        "model.d_model=48",
        "--set",
        "model.n_head=4",
        "--set",
        "model.ctx=64",
        "--quiet",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(state["base"]["pretrained_by_this_run"], false);
    // A transformers model the lab cannot compute exactly is refused, naming the field.
    let relu = tmp.path().join("relu");
    std::fs::create_dir(&relu).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(fixture.join(f), relu.join(f)).unwrap();
    }
    let cfg = std::fs::read_to_string(relu.join("config.json")).unwrap().replace("gelu_new", "relu");
    std::fs::write(relu.join("config.json"), cfg).unwrap();
    assert_clean_error(&run(&["eval", "--model", relu.to_str().unwrap()]), "activation_function");
}
