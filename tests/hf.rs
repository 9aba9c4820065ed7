//! Hugging Face interchange against the committed fixture (tests/fixtures/hf-tiny-gpt2, computed by
//! `transformers`): import gives transformers' logits, losses and greedy continuation; export
//! round-trips bit for bit and writes exactly what `GPT2LMHeadModel` expects; bad inputs are one-line
//! errors that write nothing.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use collapse_lab::hf::*;
use collapse_lab::model::candle::Gpt;
use collapse_lab::model::engine::Model;
use collapse_lab::model::{init_weights, ModelConfig};
use collapse_lab::tokenizer::{Tokenizer, EOT};
use safetensors::SafeTensors;
use serde_json::{json, Map, Value};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The committed reference: a `transformers` GPT-2 directory and what transformers computed from it.
fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/hf-tiny-gpt2")
}

#[derive(serde::Deserialize)]
struct Reference {
    input_ids: Vec<u32>,
    logits: Vec<Vec<f32>>,
    sum_nll_nats: f64,
    predicted_tokens: usize,
    greedy_prompt_ids: Vec<u32>,
    greedy_new_ids: Vec<u32>,
    first_4_logits_when_loaded_as: HashMap<String, Vec<Vec<f32>>>,
}

fn reference() -> Reference {
    serde_json::from_str(&std::fs::read_to_string(fixture().join("reference.json")).unwrap()).unwrap()
}

/// The one place that builds the lab's model from lab-layout tensors.
fn build(cfg: &ModelConfig, tensors: HashMap<String, Tensor>) -> Gpt {
    Gpt::new(cfg, &weights(cfg, &tensors).unwrap(), &Device::Cpu).unwrap()
}

/// The shape `transformers` stores for a lab tensor: the blocks' matrices transposed (Conv1D).
fn hf_shape(name: &str, lab_shape: &[usize]) -> Vec<usize> {
    if lab_shape.len() == 2 && name.starts_with("h.") {
        lab_shape.iter().rev().copied().collect()
    } else {
        lab_shape.to_vec()
    }
}

/// Logits at every position of `ids`: [T][V].
fn logits(model: &Gpt, ids: &[u32]) -> Vec<Vec<f32>> {
    let idx = Tensor::from_vec(ids.to_vec(), (1, ids.len()), &Device::Cpu).unwrap();
    model.forward(&idx, None).unwrap().squeeze(0).unwrap().to_vec2().unwrap()
}

fn max_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .flat_map(|(x, y)| {
            assert_eq!(x.len(), y.len());
            x.iter().zip(y).map(|(p, q)| (p - q).abs())
        })
        .fold(0.0, f32::max)
}

/// The files of the fixture's model directory, copied into a fresh temporary directory.
fn copy_fixture() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for name in [CONFIG, GENERATION_CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG] {
        std::fs::copy(fixture().join(name), dir.path().join(name)).unwrap();
    }
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut Map<String, Value>)) {
    let mut v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(v.as_object_mut().unwrap());
    std::fs::write(path, serde_json::to_string_pretty(&v).unwrap()).unwrap();
}

/// The fixture's stored tensors, under their stored (HF) names.
fn fixture_weights() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(fixture().join(WEIGHTS), &Device::Cpu).unwrap()
}

/// Writes `tensors` (any dtype) as safetensors with transformers' metadata.
fn write_weights(path: &Path, tensors: &HashMap<String, Tensor>) {
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), path).unwrap();
}

/// (names → (dtype, shape)) and metadata of a safetensors file.
type Header = (HashMap<String, (String, Vec<usize>)>, Option<HashMap<String, String>>);

fn header(path: &Path) -> Header {
    let bytes = std::fs::read(path).unwrap();
    let (_, meta) = SafeTensors::read_metadata(&bytes).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let names =
        st.iter().map(|(n, v)| (n.to_string(), (v.dtype().to_string(), v.shape().to_vec()))).collect();
    (names, meta.metadata().clone())
}

fn listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::read(e.path()).unwrap_or_default())
        })
        .collect();
    out.sort();
    out
}

#[test]
fn hf_fixture_imports_and_matches_transformers() {
    let r = reference();
    let imp = import(&fixture(), &Device::Cpu).unwrap();
    assert_eq!(
        imp.config,
        ModelConfig { vocab_size: 384, ctx: 64, d_model: 48, n_layer: 2, n_head: 4, dropout: 0.0 }
    );
    assert!(imp.source.contains("transformers 5.24.0") && imp.source.contains("F32"), "{}", imp.source);
    let tok = Tokenizer::from_json(&imp.tokenizer_json).unwrap();
    assert_eq!((tok.eot, tok.unk()), (0, Some(1)));
    let model = build(&imp.config, imp.tensors);

    let got = logits(&model, &r.input_ids);
    let d = max_diff(&got, &r.logits);
    eprintln!("fp32 fixture: max |logit - transformers| = {d:e}");
    assert!(d < 1e-4, "max logit difference {d}");

    assert_eq!(r.predicted_tokens, r.input_ids.len() - 1);
    let nll: f64 = (0..r.predicted_tokens)
        .map(|i| {
            let row: Vec<f64> = got[i].iter().map(|&x| f64::from(x)).collect();
            let max = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
            let lse = max + row.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
            lse - row[r.input_ids[i + 1] as usize]
        })
        .sum();
    eprintln!("sum NLL {nll} vs transformers {} (diff {:e})", r.sum_nll_nats, (nll - r.sum_nll_nats).abs());
    assert!((nll - r.sum_nll_nats).abs() < 1e-3, "sum NLL {nll} vs {}", r.sum_nll_nats);

    // Greedy continuation. `greedy_new_ids` is what transformers' `generate` produced, and it did
    // not see the prompt's leading end-of-text token: that id is also the pad token, and generate,
    // given no attention mask, infers one from pad tokens, which hides it and shifts the position
    // ids (cumsum of the mask) — exactly the prompt without it. (With the token, the reference
    // logits at the prompt's last position put 45 first by 2.9 nats, not the reference's 10.) So the
    // lab runs the prompt without it, and must then give the same 24 tokens. With the token, the
    // lab's first choice is the argmax of the fp32 reference logits there.
    let prompt = &r.greedy_prompt_ids;
    assert_eq!(prompt[0], tok.eot);
    assert_eq!(prompt.as_slice(), &r.input_ids[..prompt.len()]);
    let with_eot = collapse_lab::sampler::argmax(&got[prompt.len() - 1]);
    assert_eq!(with_eot, collapse_lab::sampler::argmax(&r.logits[prompt.len() - 1]));
    let mut ids = prompt[1..].to_vec();
    for _ in 0..r.greedy_new_ids.len() {
        let last = logits(&model, &ids).pop().unwrap();
        ids.push(collapse_lab::sampler::argmax(&last));
    }
    assert_eq!(&ids[prompt.len() - 1..], r.greedy_new_ids.as_slice());
    let decoding =
        collapse_lab::sample::Decoding { sampler: collapse_lab::sampler::SamplerSettings::GREEDY, beam: 1 };
    let gen = collapse_lab::sample::generate(
        &Model::Candle(model.clone()),
        &[&prompt[1..]],
        r.greedy_new_ids.len(),
        &decoding,
        &[0],
    )
    .unwrap();
    assert_eq!(gen[0], r.greedy_new_ids, "the lab's generator (KV cache)");
    // And with the token: both lab paths agree.
    let mut ids = prompt.clone();
    for _ in 0..r.greedy_new_ids.len() {
        let last = logits(&model, &ids).pop().unwrap();
        ids.push(collapse_lab::sampler::argmax(&last));
    }
    assert_eq!(ids[prompt.len()], with_eot);
    let gen = collapse_lab::sample::generate(
        &Model::Candle(model.clone()),
        &[prompt],
        r.greedy_new_ids.len(),
        &decoding,
        &[0],
    )
    .unwrap();
    assert_eq!(gen[0], ids[prompt.len()..]);
}

/// The fixture re-saved in f16 and bf16 imports (converted to f32 exactly) and computes what
/// transformers computes from those files, to within the rounding transformers adds.
///
/// Tolerances, with u the unit roundoff (f16 2⁻¹¹, bf16 2⁻⁸) and M = max |logit| (9.31 here):
/// - transformers loads the half file and computes in half precision: its result is the exact
///   function of the half weights Ŵ plus the rounding of every activation it stores in half. For
///   each layer: ln_1 out, qkv, scores, probabilities, attention out, c_proj out, residual, ln_2
///   out, fc out, gelu out, mlp out, residual (12), plus embedding sum, ln_f and the logits: n = 27
///   sites. Each is a relative error uniform in [−u, u] (σ = u/√3); through pre-LN blocks a relative
///   error carries to the logits with gain about 1, and independent errors add like a random walk,
///   σ ≈ √(n/3)·u = 3u. Over 4 × 384 logits, 4σ: |lab − transformers half| ≤ 12·u·M (f16 0.055, bf16
///   0.44). The lab computes in f32 on the same Ŵ, so this is all the difference there should be.
/// - Against the fp32 reference the lab differs only by the weight rounding Ŵ − W: exactly the
///   difference of the lab on Ŵ and on W, plus the 1e-4 of the fp32 check. That difference has
///   28 rounded tensors behind it, the same random-walk bound 4·√(28/3)·u·M ≈ 12.2·u·M. And since
///   the lab adds no activation rounding, it is closer to the fp32 reference than transformers'
///   half-precision result is (the tighter bound).
///
/// Measured: |lab − transformers half| = 9.98e-3 (2.2·u·M) for f16 and 8.19e-2 (2.3·u·M) for bf16;
/// |lab − fp32 reference| = 2.55e-2 (5.6·u·M) and 0.185 (5.1·u·M), against transformers' own
/// 2.97e-2 and 0.229. Both scale with u, as rounding errors should.
#[test]
fn hf_half_precision_files_import() {
    let r = reference();
    let ids = &r.input_ids[..4];
    let fp32 = &r.logits[..4];
    let m = fp32.iter().flatten().fold(0f32, |m, x| m.max(x.abs()));
    let imp = import(&fixture(), &Device::Cpu).unwrap();
    let lab_fp32 = logits(&build(&imp.config, imp.tensors), ids);
    for (dtype, name, u) in
        [(DType::F16, "float16", 2f32.powi(-11)), (DType::BF16, "bfloat16", 2f32.powi(-8))]
    {
        let dir = copy_fixture();
        let half: HashMap<String, Tensor> =
            fixture_weights().into_iter().map(|(k, t)| (k, t.to_dtype(dtype).unwrap())).collect();
        write_weights(&dir.path().join(WEIGHTS), &half);
        let imp = import(dir.path(), &Device::Cpu).unwrap();
        assert!(imp.source.contains(&format!("{dtype:?}").to_uppercase()), "{}", imp.source);
        let got = logits(&build(&imp.config, imp.tensors), ids);
        let hf_half = &r.first_4_logits_when_loaded_as[name];
        let d_half = max_diff(&got, hf_half);
        let d_fp32 = max_diff(&got, fp32);
        let d_weights = max_diff(&got, &lab_fp32);
        let d_hf = max_diff(hf_half, fp32);
        eprintln!(
            "{name}: |lab - transformers {name}| = {d_half:.3e} ({:.2} u·M), |lab - transformers fp32| = \
             {d_fp32:.3e} ({:.2} u·M), weight rounding alone {d_weights:.3e}, |transformers {name} - fp32| = \
             {d_hf:.3e}",
            d_half / (u * m),
            d_fp32 / (u * m)
        );
        assert!(d_half <= 12.0 * u * m, "{name}: {d_half} vs transformers {name}");
        assert!(d_weights <= 12.2 * u * m, "{name}: weight rounding moved the logits by {d_weights}");
        assert!(d_fp32 <= d_weights + 1e-4, "{name}: {d_fp32} vs fp32 is more than the weight rounding");
        assert!(d_fp32 < d_hf, "{name}: {d_fp32} vs fp32, transformers {name} is at {d_hf}");
    }
}

/// Tensors of a lab model, deterministically perturbed so that every one (biases and LayerNorm
/// gains too) is non-trivial and no matrix is symmetric.
fn fresh_lab_model(cfg: &ModelConfig) -> HashMap<String, Tensor> {
    tensors(cfg, &init_weights(cfg, 7))
        .unwrap()
        .into_iter()
        .enumerate()
        .map(|(i, (name, t))| {
            let n = t.elem_count();
            let wave = Tensor::arange(0u32, n as u32, &Device::Cpu)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
                .affine(0.37 + 0.01 * i as f64, i as f64)
                .unwrap()
                .sin()
                .unwrap()
                .affine(0.05, 0.0)
                .unwrap()
                .reshape(t.shape())
                .unwrap();
            (name, (t.detach() + wave).unwrap())
        })
        .collect()
}

fn fixture_json(name: &str) -> Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(fixture().join(name)).unwrap()).unwrap()
}

fn out_json(dir: &Path, name: &str) -> Map<String, Value> {
    serde_json::from_str(&std::fs::read_to_string(dir.join(name)).unwrap()).unwrap()
}

/// Exports `tensors`, checks every file against the fixture's, imports the export and checks the
/// logits are bit-identical. `size_keys` are the config.json keys allowed to differ.
fn export_round_trip(
    cfg: &ModelConfig,
    tensors: HashMap<String, Tensor>,
    size_keys: &[&str],
) -> (tempfile::TempDir, PathBuf) {
    let tok_json = std::fs::read_to_string(fixture().join(TOKENIZER)).unwrap();
    let tok = Tokenizer::from_json(&tok_json).unwrap();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("export");
    export(cfg, &tensors, &tok_json, tok.eot, tok.unk(), &out).unwrap();

    let mut names: Vec<String> = listing(&out).into_iter().map(|(n, _)| n).collect();
    names.sort();
    let mut want: Vec<String> = EXPORT_FILES.iter().map(|s| s.to_string()).collect();
    want.sort();
    assert_eq!(names, want, "exactly the export's files, no temporaries");

    // config.json: the fixture's keys, the fixture's values except the model's sizes.
    let (got, fix) = (out_json(&out, CONFIG), fixture_json(CONFIG));
    assert_eq!(got.keys().collect::<Vec<_>>(), fix.keys().collect::<Vec<_>>(), "config.json keys, in order");
    for (k, v) in &fix {
        if !size_keys.contains(&k.as_str()) {
            assert_eq!(&got[k], v, "config.json `{k}`");
        }
    }
    assert_eq!(got["n_embd"], json!(cfg.d_model));
    assert_eq!(got["n_positions"], json!(cfg.ctx));
    assert_eq!(got["vocab_size"], json!(cfg.vocab_size));
    assert_eq!(out_json(&out, GENERATION_CONFIG), fixture_json(GENERATION_CONFIG));

    // Tokenizer files.
    assert_eq!(std::fs::read_to_string(out.join(TOKENIZER)).unwrap(), tok_json);
    for file in [TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP] {
        let m = out_json(&out, file);
        for key in ["eos_token", "bos_token", "pad_token"] {
            assert_eq!(m[key], json!(EOT), "{file} `{key}`");
        }
        assert_eq!(m["unk_token"], json!("<unk>"), "{file} `unk_token`");
    }
    let tc = out_json(&out, TOKENIZER_CONFIG);
    let fix_tc = fixture_json(TOKENIZER_CONFIG);
    for key in fix_tc.keys() {
        assert!(tc.contains_key(key), "tokenizer_config.json lacks the fixture's `{key}`");
    }
    assert_eq!(tc["tokenizer_class"], json!("PreTrainedTokenizerFast"));
    assert_eq!(tc["model_max_length"], json!(cfg.ctx));

    // Weights: the fixture's names and dtypes, shapes scaled to the model, transformers' metadata.
    let (got_h, meta) = header(&out.join(WEIGHTS));
    let (fix_h, fix_meta) = header(&fixture().join(WEIGHTS));
    assert_eq!(meta, fix_meta);
    assert_eq!(meta.unwrap()["format"], "pt");
    let mut got_names: Vec<&String> = got_h.keys().collect();
    let mut fix_names: Vec<&String> = fix_h.keys().collect();
    got_names.sort();
    fix_names.sort();
    if cfg.n_layer == 2 {
        assert_eq!(got_names, fix_names);
    }
    for (name, (dtype, shape)) in &got_h {
        assert_eq!(dtype, "F32", "{name}");
        let lab = name.strip_prefix("transformer.").unwrap();
        let spec =
            collapse_lab::model::describe(cfg).iter().into_iter().find(|s| s.name == lab).cloned().unwrap();
        assert_eq!(shape, &hf_shape(lab, &spec.shape), "{name}");
    }

    // Back in: the same tensors, the same logits to the bit.
    let imp = import(&out, &Device::Cpu).unwrap();
    assert_eq!(&imp.config, cfg);
    for (name, t) in &tensors {
        let a = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = imp.tensors[name].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()), "{name} changed");
    }
    let ids: Vec<u32> = (0..cfg.ctx as u32).map(|i| (i * 37 + 5) % 384).collect();
    let before = logits(&build(cfg, tensors), &ids);
    let after = logits(&build(&imp.config, imp.tensors), &ids);
    let same = before.iter().flatten().zip(after.iter().flatten()).all(|(x, y)| x.to_bits() == y.to_bits());
    assert!(same, "logits differ by {}", max_diff(&before, &after));
    (root, out)
}

#[test]
fn hf_export_of_the_fixture_is_the_fixture() {
    let imp = import(&fixture(), &Device::Cpu).unwrap();
    let (_root, out) = export_round_trip(&imp.config, imp.tensors, &[]);
    // Every tensor's bytes are those transformers saved.
    let got = std::fs::read(out.join(WEIGHTS)).unwrap();
    let fix = std::fs::read(fixture().join(WEIGHTS)).unwrap();
    let (got, fix) = (SafeTensors::deserialize(&got).unwrap(), SafeTensors::deserialize(&fix).unwrap());
    for (name, view) in fix.iter() {
        assert!(got.tensor(name).unwrap().data() == view.data(), "{name} bytes differ");
    }
}

#[test]
fn hf_export_of_a_fresh_lab_model_round_trips() {
    // Non-square everywhere it can be: 3 heads of 10, 3 layers, 19 positions, and a vocabulary of
    // 400 > the tokenizer's 384 (a padded vocabulary).
    let cfg = ModelConfig { vocab_size: 400, ctx: 19, d_model: 30, n_layer: 3, n_head: 3, dropout: 0.0 };
    let tensors = fresh_lab_model(&cfg);
    let (_root, out) = export_round_trip(
        &cfg,
        tensors.clone(),
        &["n_embd", "n_head", "n_layer", "n_positions", "vocab_size"],
    );
    // The Conv1D matrices are stored transposed: HF[i][j] = lab[j][i], and (not symmetric) ≠ lab[i][j].
    let bytes = std::fs::read(out.join(WEIGHTS)).unwrap();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    for name in
        ["h.1.attn.c_attn.weight", "h.1.attn.c_proj.weight", "h.1.mlp.c_fc.weight", "h.1.mlp.c_proj.weight"]
    {
        let lab = &tensors[name];
        let view = st.tensor(&format!("transformer.{name}")).unwrap();
        let hf = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu).unwrap();
        assert_eq!(max_diff(&hf.to_vec2().unwrap(), &lab.t().unwrap().to_vec2().unwrap()), 0.0, "{name}");
        if lab.dim(0).unwrap() == lab.dim(1).unwrap() {
            assert!(max_diff(&hf.to_vec2().unwrap(), &lab.to_vec2().unwrap()) > 0.01, "{name} is symmetric");
        }
    }
}

/// The fixture, changed by `edit`, imported.
fn import_edited(edit: impl FnOnce(&Path)) -> (tempfile::TempDir, Result<Imported>) {
    let dir = copy_fixture();
    edit(dir.path());
    let before = listing(dir.path());
    let result = import(dir.path(), &Device::Cpu);
    assert_eq!(listing(dir.path()), before, "import wrote into its directory");
    (dir, result)
}

fn edit_config(edit: impl FnOnce(&mut Map<String, Value>)) -> impl FnOnce(&Path) {
    |dir: &Path| edit_json(&dir.join(CONFIG), edit)
}

fn edit_weights(edit: impl FnOnce(&mut HashMap<String, Tensor>)) -> impl FnOnce(&Path) {
    |dir: &Path| {
        let mut w = fixture_weights();
        edit(&mut w);
        write_weights(&dir.join(WEIGHTS), &w);
    }
}

/// The fixture's tokenizer.json without `<unk>` (as GPT-2's): id 1 becomes a hole.
fn tokenizer_without_unk() -> String {
    let mut v: Value =
        serde_json::from_str(&std::fs::read_to_string(fixture().join(TOKENIZER)).unwrap()).unwrap();
    v["added_tokens"].as_array_mut().unwrap().retain(|t| t["content"] != "<unk>");
    assert!(v["model"]["vocab"].as_object_mut().unwrap().shift_remove("<unk>").is_some());
    v["model"]["unk_token"] = Value::Null;
    // The smoke corpus had literal "<unk>" text, so BPE also learned a merge that builds it.
    v["model"]["merges"].as_array_mut().unwrap().retain(|m| m != &json!(["<unk", ">"]));
    serde_json::to_string(&v).unwrap()
}

#[test]
fn hf_import_refuses_what_the_lab_cannot_compute() {
    type Edit = Box<dyn FnOnce(&Path)>;
    let wte = "transformer.wte.weight";
    let cases: Vec<(&str, &[&str], Edit)> = vec![
        (
            "relu",
            &[CONFIG, "`activation_function`", "relu"],
            Box::new(edit_config(|c| {
                c.insert("activation_function".into(), json!("relu"));
            })),
        ),
        (
            "exact gelu",
            &[CONFIG, "`activation_function`"],
            Box::new(edit_config(|c| {
                c.insert("activation_function".into(), json!("gelu"));
            })),
        ),
        (
            "epsilon",
            &[CONFIG, "`layer_norm_epsilon`", "1e-6"],
            Box::new(edit_config(|c| {
                c.insert("layer_norm_epsilon".into(), json!(1e-6));
            })),
        ),
        (
            "inverse layer scaling",
            &[CONFIG, "`scale_attn_by_inverse_layer_idx`"],
            Box::new(edit_config(|c| {
                c.insert("scale_attn_by_inverse_layer_idx".into(), json!(true));
            })),
        ),
        (
            "unscaled attention",
            &[CONFIG, "`scale_attn_weights`"],
            Box::new(edit_config(|c| {
                c.insert("scale_attn_weights".into(), json!(false));
            })),
        ),
        (
            "cross attention",
            &[CONFIG, "`add_cross_attention`"],
            Box::new(edit_config(|c| {
                c.insert("add_cross_attention".into(), json!(true));
            })),
        ),
        (
            "untied config",
            &[CONFIG, "`tie_word_embeddings`"],
            Box::new(edit_config(|c| {
                c.insert("tie_word_embeddings".into(), json!(false));
            })),
        ),
        (
            "n_inner",
            &[CONFIG, "`n_inner`", "100"],
            Box::new(edit_config(|c| {
                c.insert("n_inner".into(), json!(100));
            })),
        ),
        (
            "heads",
            &[CONFIG, "`n_embd`", "`n_head`"],
            Box::new(edit_config(|c| {
                c.insert("n_head".into(), json!(5));
            })),
        ),
        (
            "llama",
            &[CONFIG, "`model_type`", "llama"],
            Box::new(edit_config(|c| {
                c.insert("model_type".into(), json!("llama"));
            })),
        ),
        (
            "size type",
            &[CONFIG, "`n_embd`"],
            Box::new(edit_config(|c| {
                c.insert("n_embd".into(), json!("48"));
            })),
        ),
        (
            "eos id",
            &[CONFIG, "`eos_token_id`"],
            Box::new(edit_config(|c| {
                c.insert("eos_token_id".into(), json!(1));
            })),
        ),
        (
            "malformed config",
            &[CONFIG, "not valid JSON"],
            Box::new(|d: &Path| {
                std::fs::write(d.join(CONFIG), "{\"model_type\": \"gpt2\",").unwrap();
            }),
        ),
        (
            "generation eos",
            &[GENERATION_CONFIG, "`eos_token_id`"],
            Box::new(|d: &Path| {
                edit_json(&d.join(GENERATION_CONFIG), |c| {
                    c.insert("eos_token_id".into(), json!([0, 5]));
                })
            }),
        ),
        (
            "tokenizer eos",
            &[TOKENIZER_CONFIG, "`eos_token`"],
            Box::new(|d: &Path| {
                edit_json(&d.join(TOKENIZER_CONFIG), |c| {
                    c.insert("eos_token".into(), json!("<unk>"));
                })
            }),
        ),
        (
            "missing tokenizer",
            &[TOKENIZER, "missing"],
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join(TOKENIZER)).unwrap();
            }),
        ),
        (
            "malformed tokenizer",
            &[TOKENIZER],
            Box::new(|d: &Path| {
                std::fs::write(d.join(TOKENIZER), "{\"version\": ").unwrap();
            }),
        ),
        (
            "no end of text",
            &[TOKENIZER, EOT],
            Box::new(|d: &Path| {
                let t = std::fs::read_to_string(fixture().join(TOKENIZER)).unwrap();
                std::fs::write(d.join(TOKENIZER), t.replace(EOT, "<|eos|>")).unwrap();
            }),
        ),
        (
            "missing weights",
            &[WEIGHTS, "missing"],
            Box::new(|d: &Path| {
                std::fs::remove_file(d.join(WEIGHTS)).unwrap();
            }),
        ),
        (
            "truncated weights",
            &[WEIGHTS, "not a safetensors file"],
            Box::new(|d: &Path| {
                let b = std::fs::read(fixture().join(WEIGHTS)).unwrap();
                std::fs::write(d.join(WEIGHTS), &b[..b.len() / 2]).unwrap();
            }),
        ),
        (
            "missing tensor",
            &[WEIGHTS, "`transformer.h.1.mlp.c_fc.bias`", "missing"],
            Box::new(edit_weights(|w| {
                w.remove("transformer.h.1.mlp.c_fc.bias");
            })),
        ),
        (
            "extra tensor",
            &[WEIGHTS, "`transformer.h.2.ln_1.weight`", "unexpected"],
            Box::new(edit_weights(|w| {
                let t = w["transformer.h.1.ln_1.weight"].clone();
                w.insert("transformer.h.2.ln_1.weight".into(), t);
            })),
        ),
        (
            "lab orientation",
            &[WEIGHTS, "`transformer.h.0.attn.c_attn.weight`", "[144, 48]", "[48, 144]"],
            Box::new(edit_weights(|w| {
                let t = w["transformer.h.0.attn.c_attn.weight"].t().unwrap().contiguous().unwrap();
                w.insert("transformer.h.0.attn.c_attn.weight".into(), t);
            })),
        ),
        (
            "wrong dtype",
            &[WEIGHTS, "`transformer.ln_f.bias`", "F64"],
            Box::new(edit_weights(|w| {
                let t = w["transformer.ln_f.bias"].to_dtype(DType::F64).unwrap();
                w.insert("transformer.ln_f.bias".into(), t);
            })),
        ),
        (
            "untied head",
            &[WEIGHTS, "`lm_head.weight`", "tied"],
            Box::new(edit_weights(move |w| {
                let t = (w[wte].clone() * 1.001).unwrap();
                w.insert("lm_head.weight".into(), t);
            })),
        ),
        (
            "tokenizer larger than the model",
            &[TOKENIZER, "vocab_size"],
            Box::new(|d: &Path| {
                edit_config(|c| {
                    c.insert("vocab_size".into(), json!(300));
                })(d);
                edit_weights(|w| {
                    let t = w[wte].narrow(0, 0, 300).unwrap();
                    w.insert(wte.into(), t);
                })(d);
            }),
        ),
    ];
    for (what, needles, edit) in cases {
        let (_dir, result) = import_edited(edit);
        let Err(e) = result else { panic!("{what}: imported") };
        let msg = format!("{e:#}");
        assert!(!msg.contains('\n'), "{what}: not one line: {msg}");
        for needle in needles {
            assert!(msg.contains(needle), "{what}: {msg:?} does not name {needle:?}");
        }
        eprintln!("{what}: {msg}");
    }
}

#[test]
fn hf_import_accepts_equivalent_files() {
    let r = reference();
    let ids = &r.input_ids[..8];
    let base = import(&fixture(), &Device::Cpu).unwrap();
    let want = logits(&build(&base.config, base.tensors), ids);
    let wte = "transformer.wte.weight";
    type Edit = Box<dyn FnOnce(&Path)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "gelu_pytorch_tanh",
            Box::new(edit_config(|c| {
                c.insert("activation_function".into(), json!("gelu_pytorch_tanh"));
            })),
        ),
        (
            "gelu_fast",
            Box::new(edit_config(|c| {
                c.insert("activation_function".into(), json!("gelu_fast"));
            })),
        ),
        (
            "reorder_and_upcast_attn",
            Box::new(edit_config(|c| {
                c.insert("reorder_and_upcast_attn".into(), json!(true));
            })),
        ),
        (
            "eos list, n_inner 4·n_embd",
            Box::new(edit_config(|c| {
                c.insert("eos_token_id".into(), json!([0]));
                c.insert("n_inner".into(), json!(192));
            })),
        ),
        (
            "a 2019 config.json (GPT2Config defaults for the rest)",
            Box::new(edit_config(|c| {
                for key in [
                    "activation_function",
                    "add_cross_attention",
                    "layer_norm_epsilon",
                    "reorder_and_upcast_attn",
                    "scale_attn_by_inverse_layer_idx",
                    "scale_attn_weights",
                    "tie_word_embeddings",
                    "n_inner",
                    "eos_token_id",
                    "transformers_version",
                ] {
                    c.shift_remove(key);
                }
                c.insert("n_ctx".into(), json!(64));
            })),
        ),
        (
            "tied head saved twice",
            Box::new(edit_weights(move |w| {
                let t = w[wte].clone();
                w.insert("lm_head.weight".into(), t);
            })),
        ),
        (
            "GPT2Model names with the old attention buffers",
            Box::new(edit_weights(|w| {
                *w = w
                    .drain()
                    .map(|(k, v)| (k.strip_prefix("transformer.").unwrap().to_string(), v))
                    .collect();
                for i in 0..2 {
                    let tril =
                        Tensor::tril2(64, DType::F32, &Device::Cpu).unwrap().reshape((1, 1, 64, 64)).unwrap();
                    w.insert(format!("h.{i}.attn.bias"), tril);
                    w.insert(format!("h.{i}.attn.masked_bias"), Tensor::new(-1e4f32, &Device::Cpu).unwrap());
                }
            })),
        ),
        (
            "no <unk>, no tokenizer_config.json",
            Box::new(|d: &Path| {
                std::fs::write(d.join(TOKENIZER), tokenizer_without_unk()).unwrap();
                std::fs::remove_file(d.join(TOKENIZER_CONFIG)).unwrap();
                std::fs::remove_file(d.join(GENERATION_CONFIG)).unwrap();
            }),
        ),
        (
            "padded vocabulary",
            Box::new(|d: &Path| {
                edit_config(|c| {
                    c.insert("vocab_size".into(), json!(400));
                })(d);
                edit_weights(|w| {
                    let pad = Tensor::full(0.01f32, (16, 48), &Device::Cpu).unwrap();
                    let t = Tensor::cat(&[&w[wte], &pad], 0).unwrap();
                    w.insert(wte.into(), t);
                })(d);
            }),
        ),
    ];
    for (what, edit) in cases {
        let (_dir, result) = import_edited(edit);
        let imp = result.unwrap_or_else(|e| panic!("{what}: {e:#}"));
        let got = logits(&build(&imp.config, imp.tensors), ids);
        let got: Vec<Vec<f32>> = got.into_iter().map(|row| row[..384].to_vec()).collect();
        // (A padded vocabulary only adds logit columns; the tokenizer's 384 are unchanged.)
        assert_eq!(max_diff(&got, &want), 0.0, "{what}");
        if what.starts_with("no <unk>") {
            assert_eq!(Tokenizer::from_json(&imp.tokenizer_json).unwrap().unk(), None);
        }
    }
}

#[test]
fn hf_export_refuses_bad_inputs_and_writes_nothing() {
    let imp = import(&fixture(), &Device::Cpu).unwrap();
    let tok_json = imp.tokenizer_json.clone();
    let root = tempfile::tempdir().unwrap();
    let out = root.path().join("export");
    let refuse = |cfg: &ModelConfig, t: &HashMap<String, Tensor>, tok: &str, eot, unk, needle: &str| {
        let e = export(cfg, t, tok, eot, unk, &out).unwrap_err();
        let msg = format!("{e:#}");
        assert!(!msg.contains('\n') && msg.contains(needle), "{msg:?} should name {needle:?}");
        assert!(!out.exists(), "{msg}: something was written");
    };
    let cfg = &imp.config;
    let mut missing = imp.tensors.clone();
    missing.remove("h.1.attn.c_proj.bias");
    refuse(cfg, &missing, &tok_json, 0, Some(1), "`h.1.attn.c_proj.bias` is missing");
    let mut wrong = imp.tensors.clone();
    let t = wrong["h.0.mlp.c_fc.weight"].t().unwrap();
    wrong.insert("h.0.mlp.c_fc.weight".into(), t);
    refuse(cfg, &wrong, &tok_json, 0, Some(1), "`h.0.mlp.c_fc.weight` has shape [48, 192]");
    let mut half = imp.tensors.clone();
    let t = half["ln_f.weight"].to_dtype(DType::F16).unwrap();
    half.insert("ln_f.weight".into(), t);
    refuse(cfg, &half, &tok_json, 0, Some(1), "`ln_f.weight` is F16");
    let mut extra = imp.tensors.clone();
    extra.insert("lm_head.weight".into(), imp.tensors["wte.weight"].clone());
    refuse(cfg, &extra, &tok_json, 0, Some(1), "unexpected tensor `lm_head.weight`");
    refuse(cfg, &imp.tensors, &tok_json, 1, Some(1), "eot_id is 1");
    refuse(cfg, &imp.tensors, &tok_json, 0, Some(999), "unk_id 999");
    refuse(cfg, &imp.tensors, "{", 0, Some(1), "tokenizer");
    let small = ModelConfig { vocab_size: 300, ..cfg.clone() };
    let mut t300 = imp.tensors.clone();
    t300.insert("wte.weight".into(), imp.tensors["wte.weight"].narrow(0, 0, 300).unwrap());
    refuse(&small, &t300, &tok_json, 0, Some(1), "vocab_size");

    // A directory with other files is refused and left alone; a previous export is replaced.
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let e = export(cfg, &imp.tensors, &tok_json, 0, Some(1), &out).unwrap_err();
    assert!(format!("{e:#}").contains("`notes.txt`"), "{e:#}");
    assert_eq!(listing(&out), vec![("notes.txt".to_string(), b"mine".to_vec())]);
    std::fs::remove_file(out.join("notes.txt")).unwrap();
    export(cfg, &imp.tensors, &tok_json, 0, Some(1), &out).unwrap();
    let fresh = fresh_lab_model(cfg);
    export(cfg, &fresh, &tokenizer_without_unk(), 0, None, &out).unwrap();
    assert_eq!(listing(&out).len(), EXPORT_FILES.len());
    let tc = out_json(&out, TOKENIZER_CONFIG);
    assert!(!tc.contains_key("unk_token") && tc["eos_token"] == json!(EOT));
    let back = import(&out, &Device::Cpu).unwrap();
    let ids = &reference().input_ids[..8];
    assert_eq!(
        max_diff(&logits(&build(cfg, fresh), ids), &logits(&build(&back.config, back.tensors), ids)),
        0.0
    );
}

#[test]
fn hf_is_hf_dir() {
    assert!(is_hf_dir(&fixture()));
    let dir = tempfile::tempdir().unwrap();
    assert!(!is_hf_dir(dir.path()));
    std::fs::write(dir.path().join(CONFIG), "{\"vocab_size\": 3}").unwrap();
    assert!(!is_hf_dir(dir.path()), "a config.json without model_type");
}
