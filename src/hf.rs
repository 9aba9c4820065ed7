//! Hugging Face interchange: a lab model written as a `transformers` GPT-2 directory, and a GPT-2
//! directory written by `transformers` read as lab weights.
//!
//! The lab's [`Gpt`](crate::model::Gpt) is exactly GPT-2 (pre-LN blocks, learned absolute positions,
//! tanh-approximated GELU, LayerNorm epsilon 1e-5, attention scaled by 1/√(head size), LM head tied to
//! the token embedding), so a model crosses over without approximation:
//!
//! - [`export`] writes `config.json`, `generation_config.json`, `model.safetensors`, `tokenizer.json`,
//!   `tokenizer_config.json` and `special_tokens_map.json`, so that
//!   `AutoModelForCausalLM.from_pretrained(dir)` builds a `GPT2LMHeadModel` and `AutoTokenizer` a fast
//!   tokenizer that knows its end-of-text, padding and unknown tokens.
//! - [`import`] reads such a directory back as lab weights and refuses, with a one-line error naming the
//!   file and the field, everything the lab cannot compute exactly (another activation or epsilon,
//!   inverse-layer attention scaling, an untied head, cross-attention, …).
//!
//! The only layout difference is the orientation of the four matrices of each block: `transformers`
//! stores them as `Conv1D` weights `(in, out)` applied as `x·W + b`, the lab as `Linear` weights
//! `(out, in)` applied as `x·Wᵀ + b`. The embeddings and LayerNorm vectors are the same arrays, and the
//! query/key/value split of `c_attn`'s output (q, k, v, each head-major) is the same in both.

use crate::model::ModelConfig;
use crate::run_dir::{create_dir, write_atomic, write_atomic_with};
use crate::tokenizer::{Tokenizer, EOT};
use anyhow::{anyhow, bail, Result};
use candle_core::{DType, Device, Tensor};
use safetensors::{Dtype, SafeTensors, View};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::Path;

/// The model configuration (`GPT2Config`).
pub const CONFIG: &str = "config.json";
/// The weights, in `GPT2LMHeadModel` layout.
pub const WEIGHTS: &str = "model.safetensors";
/// The tokenizer (a `tokenizers` file, the lab's own format too).
pub const TOKENIZER: &str = "tokenizer.json";
/// The `transformers` tokenizer wrapper's settings: which tokens are eos, bos, pad and unk.
pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
/// The special tokens again, for `transformers` versions that read them from here.
pub const SPECIAL_TOKENS_MAP: &str = "special_tokens_map.json";
/// `generate()` defaults: bos/eos ids.
pub const GENERATION_CONFIG: &str = "generation_config.json";
/// Every file [`export`] writes; a directory holding only these is a previous export.
pub const EXPORT_FILES: [&str; 6] =
    [CONFIG, GENERATION_CONFIG, WEIGHTS, TOKENIZER, TOKENIZER_CONFIG, SPECIAL_TOKENS_MAP];

/// The `transformers` release whose `save_pretrained` output [`export`] reproduces (that of the
/// committed reference fixture); written as `transformers_version`, which `transformers` only reports.
pub const TRANSFORMERS_VERSION: &str = "5.24.0";

/// The lab's LayerNorm epsilon (GPT-2's).
const LAYER_NORM_EPSILON: f64 = 1e-5;

/// A GPT-2 directory read as lab weights.
pub struct Imported {
    /// The architecture; `dropout` is 0 (HF's `*_pdrop` are training settings, not part of the model).
    pub config: ModelConfig,
    /// Every weight under its lab name and in the lab's layout ((out, in) matrices), f32.
    pub tensors: HashMap<String, Tensor>,
    /// The directory's `tokenizer.json`, unchanged. Its ids are all below `config.vocab_size`, which
    /// may be larger (GPT-2 style padded vocabularies): the extra rows are never produced by encoding.
    pub tokenizer_json: String,
    /// Where the weights came from, for the record: the directory, the `transformers` version that
    /// wrote it, the stored dtypes and the sha256 of `model.safetensors`.
    pub source: String,
}

/// Whether `dir` looks like a Hugging Face model directory: it has a `config.json` with a
/// `model_type`. (Whether that model can be imported is [`import`]'s business.)
pub fn is_hf_dir(dir: &Path) -> bool {
    std::fs::read_to_string(dir.join(CONFIG))
        .ok()
        .and_then(|text| serde_json::from_str::<Value>(&text).ok())
        .is_some_and(|v| v.get("model_type").is_some_and(Value::is_string))
}

/// One weight of the lab's model: its name, its shape in the lab, and whether `transformers` stores it
/// transposed (a `Conv1D` weight).
struct Slot {
    name: String,
    shape: Vec<usize>,
    conv1d: bool,
}

impl Slot {
    /// The shape `transformers` stores.
    fn hf_shape(&self) -> Vec<usize> {
        if self.conv1d {
            self.shape.iter().rev().copied().collect()
        } else {
            self.shape.clone()
        }
    }
}

/// Every weight of a lab model of `cfg`, in the order of [`crate::model::Gpt::named_tensors`].
fn layout(cfg: &ModelConfig) -> Vec<Slot> {
    let (v, c) = (cfg.vocab_size, cfg.d_model);
    let slot = |name: String, shape: &[usize], conv1d| Slot { name, shape: shape.to_vec(), conv1d };
    let mut out =
        vec![slot("wte.weight".into(), &[v, c], false), slot("wpe.weight".into(), &[cfg.ctx, c], false)];
    for i in 0..cfg.n_layer {
        let p = |s: &str| format!("h.{i}.{s}");
        out.extend([
            slot(p("ln_1.weight"), &[c], false),
            slot(p("ln_1.bias"), &[c], false),
            slot(p("attn.c_attn.weight"), &[3 * c, c], true),
            slot(p("attn.c_attn.bias"), &[3 * c], false),
            slot(p("attn.c_proj.weight"), &[c, c], true),
            slot(p("attn.c_proj.bias"), &[c], false),
            slot(p("ln_2.weight"), &[c], false),
            slot(p("ln_2.bias"), &[c], false),
            slot(p("mlp.c_fc.weight"), &[4 * c, c], true),
            slot(p("mlp.c_fc.bias"), &[4 * c], false),
            slot(p("mlp.c_proj.weight"), &[c, 4 * c], true),
            slot(p("mlp.c_proj.bias"), &[c], false),
        ]);
    }
    out.push(slot("ln_f.weight".into(), &[c], false));
    out.push(slot("ln_f.bias".into(), &[c], false));
    out
}

/// An error message on one line (library messages may carry newlines).
fn one_line(s: impl std::fmt::Display) -> String {
    s.to_string().split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Reads and parses a JSON file; `None` when it does not exist and `optional`.
fn read_json(path: &Path, optional: bool) -> Result<Option<Value>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if optional && e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => bail!("{}: cannot read ({})", path.display(), one_line(e)),
    };
    let value: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow!("{}: not valid JSON ({})", path.display(), one_line(e)))?;
    if !value.is_object() {
        bail!("{}: not a JSON object", path.display());
    }
    Ok(Some(value))
}

// ---------------------------------------------------------------------------------------------------
// Import
// ---------------------------------------------------------------------------------------------------

/// The fields of a `config.json`, with `GPT2Config`'s defaults for absent ones (older files omit the
/// fields that were added later, and `save_pretrained` of transformers 4.x omits some defaults).
struct Fields<'a> {
    path: &'a Path,
    obj: &'a Map<String, Value>,
}

impl Fields<'_> {
    fn get(&self, key: &str) -> Option<&Value> {
        self.obj.get(key)
    }

    fn wrong(&self, key: &str, what: &str) -> anyhow::Error {
        let v = self.get(key).map(|v| v.to_string()).unwrap_or_default();
        anyhow!("{}: `{key}` is {v}, expected {what}", self.path.display())
    }

    fn str_or(&self, key: &str, default: &str) -> Result<String> {
        match self.get(key) {
            None => Ok(default.to_string()),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(self.wrong(key, "a string")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(Value::Bool(b)) => Ok(*b),
            Some(_) => Err(self.wrong(key, "true or false")),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| self.wrong(key, "a number")),
        }
    }

    /// A size: a positive integer.
    fn size_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(v) => match v.as_u64() {
                Some(n) if n >= 1 => Ok(n as usize),
                _ => Err(self.wrong(key, "a positive integer")),
            },
        }
    }

    /// An optional token id or list of ids (`eos_token_id` may be either); `null` is none.
    fn ids(&self, key: &str) -> Result<Vec<u64>> {
        match self.get(key) {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(v) if v.is_u64() => Ok(vec![v.as_u64().unwrap_or_default()]),
            Some(Value::Array(a)) if a.iter().all(Value::is_u64) => {
                Ok(a.iter().filter_map(Value::as_u64).collect())
            }
            Some(_) => Err(self.wrong(key, "a token id, a list of token ids, or null")),
        }
    }
}

/// What `config.json` says, once everything the lab cannot compute exactly has been refused.
struct HfConfig {
    model: ModelConfig,
    eos_token_ids: Vec<u64>,
    transformers_version: String,
}

/// Parses and validates `config.json` (`GPT2Config`).
fn parse_config(path: &Path) -> Result<HfConfig> {
    let value = read_json(path, false)?.unwrap_or_default();
    let obj = value.as_object().cloned().unwrap_or_default();
    let f = Fields { path, obj: &obj };
    let at = path.display();

    match f.get("model_type") {
        Some(Value::String(t)) if t == "gpt2" => {}
        Some(v) => bail!("{at}: `model_type` is {v}; the lab imports only GPT-2 models (\"gpt2\")"),
        None => bail!("{at}: no `model_type`; the lab imports only GPT-2 models (\"gpt2\")"),
    }
    // `gelu_new` is GPT-2's tanh approximation 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))), which is what
    // the lab computes. `gelu_pytorch_tanh` is PyTorch's fused `gelu(approximate="tanh")`: the same
    // function, only a different kernel. `gelu_fast` is the same formula written as
    // x·0.7978845608·(1 + 0.044715·x²) (the constant is √(2/π) to 10 digits, the same f32). The exact
    // erf GELU (`gelu`) and the sigmoid one (`quick_gelu`) differ by up to ~1e-3 and are refused.
    let act = f.str_or("activation_function", "gelu_new")?;
    if !matches!(act.as_str(), "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") {
        bail!(
            "{at}: `activation_function` is \"{act}\"; the lab's MLP uses the tanh-approximated GELU \
             (\"gelu_new\", \"gelu_pytorch_tanh\" or \"gelu_fast\")"
        );
    }
    let eps = f.f64_or("layer_norm_epsilon", LAYER_NORM_EPSILON)?;
    if eps != LAYER_NORM_EPSILON {
        bail!("{at}: `layer_norm_epsilon` is {eps:e}; the lab's LayerNorm uses 1e-5");
    }
    if !f.bool_or("scale_attn_weights", true)? {
        bail!("{at}: `scale_attn_weights` is false; the lab always scales attention scores by 1/sqrt(head size)");
    }
    if f.bool_or("scale_attn_by_inverse_layer_idx", false)? {
        bail!(
            "{at}: `scale_attn_by_inverse_layer_idx` is true; the lab does not divide attention scores by \
             the layer index (needs false)"
        );
    }
    // `reorder_and_upcast_attn` only changes how transformers evaluates the attention scores of a
    // half-precision model (q·kᵀ computed in f32 with the 1/√hs scale folded into the product, then
    // softmax in f32). Mathematically it is the same function, and the lab computes every step in f32
    // anyway, i.e. at least the precision the flag asks for; on f32 weights the two orders differ by
    // rounding only (~1 ulp of a score). So it is accepted either way (read only to check its type).
    f.bool_or("reorder_and_upcast_attn", false)?;
    if f.bool_or("add_cross_attention", false)? {
        bail!("{at}: `add_cross_attention` is true; the lab's GPT is decoder-only (needs false)");
    }
    if !f.bool_or("tie_word_embeddings", true)? {
        bail!(
            "{at}: `tie_word_embeddings` is false; the lab's LM head is always the token embedding \
             (needs true)"
        );
    }

    let vocab_size = f.size_or("vocab_size", 50257)?;
    let n_positions = f.size_or("n_positions", 1024)?;
    let n_embd = f.size_or("n_embd", 768)?;
    let n_layer = f.size_or("n_layer", 12)?;
    let n_head = f.size_or("n_head", 12)?;
    if !n_embd.is_multiple_of(n_head) {
        bail!("{at}: `n_embd` ({n_embd}) is not divisible by `n_head` ({n_head}); the lab needs whole heads");
    }
    match f.get("n_inner") {
        None | Some(Value::Null) => {}
        Some(v) if v.as_u64() == Some(4 * n_embd as u64) => {}
        Some(v) => {
            bail!("{at}: `n_inner` is {v}; the lab's MLP is 4 × n_embd = {} wide (needs null)", 4 * n_embd)
        }
    }
    let eos_token_ids = f.ids("eos_token_id")?;
    let transformers_version = f.str_or("transformers_version", "unknown")?;
    let model = ModelConfig { vocab_size, ctx: n_positions, d_model: n_embd, n_layer, n_head, dropout: 0.0 };
    model.validate().map_err(|e| anyhow!("{at}: {e}"))?;
    Ok(HfConfig { model, eos_token_ids, transformers_version })
}

/// The end-of-text id check: `ids` (from `key` of `path`) may be empty (not set) or must be exactly
/// the tokenizer's `<|endoftext|>` id.
fn check_eos_ids(path: &Path, key: &str, ids: &[u64], eot: u32) -> Result<()> {
    if ids.is_empty() || ids == [u64::from(eot)] {
        return Ok(());
    }
    bail!(
        "{}: `{key}` is {ids:?}; the lab's end-of-text token is the tokenizer's {EOT} (id {eot}), \
         and it must be the only one",
        path.display()
    )
}

/// The token a `tokenizer_config.json` entry names: a string, or an `AddedToken` object.
fn token_content(v: &Value) -> Option<&str> {
    v.as_str().or_else(|| v.get("content").and_then(Value::as_str))
}

/// Reads `tokenizer.json` and checks it against the model: every id below `vocab_size`, and the
/// end-of-text token the same in the tokenizer, `config.json`, `generation_config.json` and
/// `tokenizer_config.json`.
fn read_tokenizer(dir: &Path, hf: &HfConfig) -> Result<String> {
    let path = dir.join(TOKENIZER);
    let at = path.display();
    let json = match std::fs::read_to_string(&path) {
        Ok(j) => j,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{at}: missing; the lab needs the model's tokenizer as a `tokenizers` tokenizer.json \
             (vocab.json/merges.txt alone are not read)"
        ),
        Err(e) => bail!("{at}: cannot read ({})", one_line(e)),
    };
    let tok = Tokenizer::from_json(&json).map_err(|e| anyhow!("{at}: {}", one_line(format!("{e:#}"))))?;
    check_ids_fit(&path, &json, hf.model.vocab_size)?;
    check_eos_ids(&dir.join(CONFIG), "eos_token_id", &hf.eos_token_ids, tok.eot)?;
    let gen_path = dir.join(GENERATION_CONFIG);
    if let Some(gen) = read_json(&gen_path, true)? {
        let obj = gen.as_object().cloned().unwrap_or_default();
        let ids = Fields { path: &gen_path, obj: &obj }.ids("eos_token_id")?;
        check_eos_ids(&gen_path, "eos_token_id", &ids, tok.eot)?;
    }
    let tc_path = dir.join(TOKENIZER_CONFIG);
    if let Some(tc) = read_json(&tc_path, true)? {
        match tc.get("eos_token") {
            None | Some(Value::Null) => {}
            Some(v) if token_content(v) == Some(EOT) => {}
            Some(v) => bail!(
                "{}: `eos_token` is {v}; the lab's end-of-text token is {EOT} (id {})",
                tc_path.display(),
                tok.eot
            ),
        }
    }
    Ok(json)
}

/// Every token id of the tokenizer (vocabulary and added tokens) must index a row of the embedding.
fn check_ids_fit(path: &Path, json: &str, vocab_size: usize) -> Result<()> {
    let inner = tokenizers::Tokenizer::from_bytes(json.as_bytes())
        .map_err(|e| anyhow!("{}: {}", path.display(), one_line(e)))?;
    let vocab = inner.get_vocab(true);
    if let Some((token, &id)) = vocab.iter().max_by_key(|(_, &id)| id) {
        if id as usize >= vocab_size {
            bail!(
                "{}: token {token:?} has id {id}, but the model's `vocab_size` is {vocab_size}; the lab needs \
                 every token id below vocab_size",
                path.display()
            );
        }
    }
    Ok(())
}

/// Whether `name` (without the `transformer.` prefix) is one of the attention buffers that old
/// `transformers` versions saved: `h.{i}.attn.bias` (the causal mask) and `h.{i}.attn.masked_bias`
/// (the fill value -1e4). Current `transformers` registers both as non-persistent and ignores them in
/// a file, building its causal mask itself, so ignoring them computes what `transformers` computes.
fn is_attention_buffer(name: &str, n_layer: usize) -> bool {
    let Some(rest) = name.strip_prefix("h.") else { return false };
    let Some((layer, buffer)) = rest.split_once('.') else { return false };
    layer.parse::<usize>().is_ok_and(|i| i < n_layer) && matches!(buffer, "attn.bias" | "attn.masked_bias")
}

/// A stored tensor as f32 on the CPU, in its stored shape.
fn to_f32(path: &Path, name: &str, view: &safetensors::tensor::TensorView) -> Result<Tensor> {
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        other => {
            bail!("{}: tensor `{name}` is {other}; the lab reads F32, F16 or BF16 weights", path.display())
        }
    };
    // Half-precision values are exactly representable in f32: the conversion loses nothing.
    let t = Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| anyhow!("{}: tensor `{name}`: {}", path.display(), one_line(e)))?;
    Ok(t)
}

/// The bit patterns of an f32 tensor, in order.
fn bits(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<f32>()?.into_iter().map(f32::to_bits).collect())
}

/// `model.safetensors` in lab names and layout.
struct Weights {
    /// On the CPU, f32.
    tensors: HashMap<String, Tensor>,
    /// The stored dtypes ("F32", "F16", "BF16").
    dtypes: BTreeSet<String>,
    /// sha256 of the file.
    sha256: String,
}

/// Reads `model.safetensors` into lab names and layout, checking names, shapes and dtypes.
fn read_weights(path: &Path, cfg: &ModelConfig) -> Result<Weights> {
    let at = path.display();
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => bail!(
            "{at}: missing; the lab reads the weights from model.safetensors (pytorch_model.bin is not read)"
        ),
        Err(e) => bail!("{at}: cannot read ({})", one_line(e)),
    };
    let sha = crate::tokenizer::hex(&Sha256::digest(&bytes));
    let st = SafeTensors::deserialize(&bytes).map_err(|e| anyhow!("{at}: not a safetensors file ({e})"))?;
    let mut names: Vec<&str> = st.names();
    names.sort_unstable();
    // `GPT2LMHeadModel` saves `transformer.*`; a bare `GPT2Model` (and the original gpt2 upload) saves
    // the same names without the prefix. Either is the same model; mixing them is not.
    let prefix = if names.iter().any(|n| n.starts_with("transformer.")) { "transformer." } else { "" };
    let slots = layout(cfg);
    let by_name: HashMap<&str, &Slot> = slots.iter().map(|s| (s.name.as_str(), s)).collect();
    let mut tensors = HashMap::new();
    let mut dtypes = BTreeSet::new();
    let mut lm_head = None;
    for name in names {
        let view = st.tensor(name).map_err(|e| anyhow!("{at}: tensor `{name}`: {e}"))?;
        if name == "lm_head.weight" {
            lm_head = Some(view);
            continue;
        }
        let Some(bare) = name.strip_prefix(prefix) else {
            bail!("{at}: unexpected tensor `{name}` (not a weight of a GPT-2 LM with the lab's layout)")
        };
        if is_attention_buffer(bare, cfg.n_layer) {
            continue;
        }
        let Some(slot) = by_name.get(bare) else {
            bail!("{at}: unexpected tensor `{name}` (not a weight of a GPT-2 LM with the lab's layout)")
        };
        let want = slot.hf_shape();
        if view.shape() != want.as_slice() {
            bail!(
                "{at}: tensor `{name}` has shape {:?}; config.json (vocab_size {}, n_positions {}, n_embd {}) \
                 needs {want:?}",
                view.shape(),
                cfg.vocab_size,
                cfg.ctx,
                cfg.d_model
            );
        }
        dtypes.insert(view.dtype().to_string());
        let t = to_f32(path, name, &view)?;
        let t = if slot.conv1d { t.t().and_then(|t| t.contiguous())? } else { t };
        tensors.insert(slot.name.clone(), t);
    }
    if let Some(slot) = slots.iter().find(|s| !tensors.contains_key(&s.name)) {
        bail!("{at}: tensor `{prefix}{}` is missing (config.json has n_layer {})", slot.name, cfg.n_layer);
    }
    if let Some(view) = lm_head {
        // An `lm_head.weight` that equals the embedding is the tied head saved twice; any other is a
        // second output matrix the lab has no place for.
        let wte = &tensors["wte.weight"];
        let same = view.shape() == wte.dims() && bits(&to_f32(path, "lm_head.weight", &view)?)? == bits(wte)?;
        if !same {
            bail!(
                "{at}: `lm_head.weight` differs from `{prefix}wte.weight`; the lab's LM head is tied to the \
                 token embedding and would drop this untied head"
            );
        }
    }
    Ok(Weights { tensors, dtypes, sha256: sha })
}

/// Reads a `transformers` GPT-2 directory (`config.json`, `model.safetensors` in f32, f16 or bf16,
/// `tokenizer.json`, and when present `generation_config.json` / `tokenizer_config.json`, which are
/// only checked) as lab weights on `dev`.
///
/// Refused, each with a one-line error naming the file and the field: a `model_type` other than
/// `gpt2`; an activation other than the tanh GELU; `layer_norm_epsilon` ≠ 1e-5;
/// `scale_attn_weights` false; `scale_attn_by_inverse_layer_idx` true; `add_cross_attention` true;
/// `tie_word_embeddings` false; `n_inner` other than null or 4·n_embd; `n_embd` not divisible by
/// `n_head`; a tensor missing, unexpected, of another shape or dtype; an `lm_head.weight` that differs
/// from the embedding; a missing or unloadable `tokenizer.json` (it must have `<|endoftext|>`); a
/// token id ≥ `vocab_size`; an `eos_token_id` (config.json, generation_config.json) or `eos_token`
/// (tokenizer_config.json) other than the tokenizer's `<|endoftext|>`. Nothing is written.
pub fn import(dir: &Path, dev: &Device) -> Result<Imported> {
    if !dir.is_dir() {
        bail!("{}: not a directory (expected a Hugging Face model directory)", dir.display());
    }
    let hf = parse_config(&dir.join(CONFIG))?;
    let Weights { tensors, dtypes, sha256: sha } = read_weights(&dir.join(WEIGHTS), &hf.model)?;
    let tokenizer_json = read_tokenizer(dir, &hf)?;
    let tensors = tensors
        .into_iter()
        .map(|(k, t)| Ok((k, t.to_device(dev)?)))
        .collect::<candle_core::Result<HashMap<_, _>>>()?;
    let dtypes: Vec<String> = dtypes.into_iter().collect();
    let source = format!(
        "{}: Hugging Face gpt2 (transformers {}), {} weights, {WEIGHTS} sha256 {sha}",
        dir.display(),
        hf.transformers_version,
        dtypes.join("+")
    );
    Ok(Imported { config: hf.model, tensors, tokenizer_json, source })
}

// ---------------------------------------------------------------------------------------------------
// Export
// ---------------------------------------------------------------------------------------------------

/// An f32 tensor's bytes, ready for `safetensors`.
struct Raw {
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

impl View for &Raw {
    fn dtype(&self) -> Dtype {
        Dtype::F32
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.bytes)
    }
    fn data_len(&self) -> usize {
        self.bytes.len()
    }
}

/// `config.json` as `GPT2Config.save_pretrained` writes it (keys sorted, as transformers does).
fn config_json(cfg: &ModelConfig, eot: u32) -> Value {
    json!({
        "activation_function": "gelu_new",
        "add_cross_attention": false,
        "architectures": ["GPT2LMHeadModel"],
        "attn_pdrop": 0.0,
        "bos_token_id": eot,
        "dtype": "float32",
        "embd_pdrop": 0.0,
        "eos_token_id": eot,
        "initializer_range": 0.02,
        "layer_norm_epsilon": LAYER_NORM_EPSILON,
        "model_type": "gpt2",
        "n_embd": cfg.d_model,
        "n_head": cfg.n_head,
        "n_inner": null,
        "n_layer": cfg.n_layer,
        "n_positions": cfg.ctx,
        "pad_token_id": null,
        "reorder_and_upcast_attn": false,
        "resid_pdrop": 0.0,
        "scale_attn_by_inverse_layer_idx": false,
        "scale_attn_weights": true,
        "summary_activation": null,
        "summary_first_dropout": 0.1,
        "summary_proj_to_labels": true,
        "summary_type": "cls_index",
        "summary_use_proj": true,
        "tie_word_embeddings": true,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": true,
        "vocab_size": cfg.vocab_size,
    })
}

/// `generation_config.json`: `generate()` starts from and stops at the end-of-text token.
fn generation_config_json(eot: u32) -> Value {
    json!({
        "_from_model_config": true,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "output_attentions": false,
        "output_hidden_states": false,
        "transformers_version": TRANSFORMERS_VERSION,
        "use_cache": true,
    })
}

/// The special tokens: the end-of-text token is eos, bos and pad (GPT-2's convention); unk when the
/// tokenizer has one.
fn special_tokens(unk: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("bos_token".into(), json!(EOT));
    m.insert("eos_token".into(), json!(EOT));
    m.insert("pad_token".into(), json!(EOT));
    if let Some(unk) = unk {
        m.insert("unk_token".into(), json!(unk));
    }
    m
}

/// `tokenizer_config.json`. `PreTrainedTokenizerFast` rather than transformers 5's
/// `TokenizersBackend`: 5.x defines the former as an alias of the latter, and 4.x knows only the
/// former. `clean_up_tokenization_spaces` is off so that decoding gives the text back (wikitext's
/// " ." and " 's" would otherwise lose their spaces); `model_max_length` is the model's context.
fn tokenizer_config_json(cfg: &ModelConfig, unk: Option<&str>) -> Value {
    let mut m = special_tokens(unk);
    m.insert("backend".into(), json!("tokenizers"));
    m.insert("clean_up_tokenization_spaces".into(), json!(false));
    m.insert("model_max_length".into(), json!(cfg.ctx));
    m.insert("tokenizer_class".into(), json!("PreTrainedTokenizerFast"));
    m.sort_keys();
    Value::Object(m)
}

fn pretty(v: &Value) -> Vec<u8> {
    let mut s = serde_json::to_string_pretty(v).expect("a JSON value serialises");
    s.push('\n');
    s.into_bytes()
}

/// `out` may not exist yet, or be a directory holding nothing but files of a previous export.
fn check_out(out: &Path) -> Result<()> {
    if !out.exists() {
        return Ok(());
    }
    if !out.is_dir() {
        bail!("cannot export to {}: it exists and is not a directory", out.display());
    }
    let entries =
        std::fs::read_dir(out).map_err(|e| anyhow!("cannot read {}: {}", out.display(), one_line(e)))?;
    for entry in entries {
        let entry = entry.map_err(|e| anyhow!("cannot read {}: {}", out.display(), one_line(e)))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if !EXPORT_FILES.contains(&name.as_str()) || !entry.path().is_file() {
            bail!(
                "cannot export to {}: it holds `{name}`, which is not part of a Hugging Face export \
                 (use a new or empty directory)",
                out.display()
            );
        }
    }
    Ok(())
}

/// Writes a lab model as a `transformers` GPT-2 directory `out` (see the module doc for the files).
///
/// `tensors` are the lab's weights under their lab names and layout, f32 (e.g.
/// [`crate::model::Gpt::named_tensors`], or a checkpoint's `model.safetensors` loaded with
/// `candle_core::safetensors::load`); `tokenizer_json` the lab's `tokenizer.json` text, written
/// unchanged; `eot_id` its `<|endoftext|>` id (eos, bos and pad of the export); `unk_id` its `<unk>`
/// id if it has one.
///
/// Everything is validated before anything is written (the model's shapes and names, the tokenizer
/// and its ids); `out` is created only then, and refused if it holds anything but a previous export.
/// Each file is written under a temporary name and renamed; `config.json` goes last (and a previous
/// one is removed first), so a half-written export is never taken for a model directory.
pub fn export(
    config: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    tokenizer_json: &str,
    eot_id: u32,
    unk_id: Option<u32>,
    out: &Path,
) -> Result<()> {
    config.validate().map_err(|e| anyhow!("cannot export: {e}"))?;
    let slots = layout(config);
    let mut extra: Vec<&String> = tensors.keys().filter(|k| !slots.iter().any(|s| &s.name == *k)).collect();
    extra.sort();
    if let Some(name) = extra.first() {
        bail!("cannot export: unexpected tensor `{name}` (not a weight of the lab's GPT)");
    }
    for slot in &slots {
        let Some(t) = tensors.get(&slot.name) else {
            bail!(
                "cannot export: tensor `{}` is missing (the model has n_layer {})",
                slot.name,
                config.n_layer
            )
        };
        if t.dims() != slot.shape.as_slice() {
            bail!(
                "cannot export: tensor `{}` has shape {:?}, the model config needs {:?}",
                slot.name,
                t.dims(),
                slot.shape
            );
        }
        if t.dtype() != DType::F32 {
            bail!("cannot export: tensor `{}` is {:?}, expected F32", slot.name, t.dtype());
        }
    }

    let tok = Tokenizer::from_json(tokenizer_json)
        .map_err(|e| anyhow!("cannot export: the tokenizer: {}", one_line(format!("{e:#}"))))?;
    if tok.eot != eot_id {
        bail!("cannot export: eot_id is {eot_id}, but the tokenizer's {EOT} is id {}", tok.eot);
    }
    let inner = tokenizers::Tokenizer::from_bytes(tokenizer_json.as_bytes())
        .map_err(|e| anyhow!("cannot export: the tokenizer: {}", one_line(e)))?;
    let unk = match unk_id {
        None => None,
        Some(id) => Some(
            inner
                .id_to_token(id)
                .ok_or_else(|| anyhow!("cannot export: unk_id {id} is not a token of the tokenizer"))?,
        ),
    };
    check_ids_fit(Path::new(TOKENIZER), tokenizer_json, config.vocab_size)
        .map_err(|e| anyhow!("cannot export: {e}"))?;
    check_out(out)?;

    // Conv1D matrices transposed to (in, out); everything made contiguous f32 bytes on the host.
    let mut raws = Vec::with_capacity(slots.len());
    for slot in &slots {
        let t = tensors[&slot.name].to_device(&Device::Cpu)?;
        let t = if slot.conv1d { t.t()? } else { t };
        let values = t.flatten_all()?.to_vec1::<f32>()?;
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        raws.push((format!("transformer.{}", slot.name), Raw { shape: slot.hf_shape(), bytes }));
    }
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);

    create_dir(out)?;
    let config_path = out.join(CONFIG);
    if config_path.exists() {
        std::fs::remove_file(&config_path)
            .map_err(|e| anyhow!("cannot remove the previous {}: {}", config_path.display(), one_line(e)))?;
    }
    write_atomic_with(&out.join(WEIGHTS), |tmp| {
        safetensors::serialize_to_file(raws.iter().map(|(n, r)| (n.as_str(), r)), Some(metadata), tmp)?;
        std::fs::File::open(tmp)?.sync_all()?;
        Ok(())
    })?;
    write_atomic(&out.join(TOKENIZER), tokenizer_json.as_bytes())?;
    write_atomic(&out.join(TOKENIZER_CONFIG), &pretty(&tokenizer_config_json(config, unk.as_deref())))?;
    write_atomic(&out.join(SPECIAL_TOKENS_MAP), &pretty(&Value::Object(special_tokens(unk.as_deref()))))?;
    write_atomic(&out.join(GENERATION_CONFIG), &pretty(&generation_config_json(eot_id)))?;
    write_atomic(&config_path, &pretty(&config_json(config, eot_id)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, Gpt};
    use candle_nn::VarBuilder;
    use std::path::PathBuf;

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
        Gpt::new(cfg, VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)).unwrap()
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
        safetensors::serialize_to_file(tensors.iter().map(|(k, v)| (k.as_str(), v)), Some(meta), path)
            .unwrap();
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
        eprintln!(
            "sum NLL {nll} vs transformers {} (diff {:e})",
            r.sum_nll_nats,
            (nll - r.sum_nll_nats).abs()
        );
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
        let with_eot = crate::sampler::argmax(&got[prompt.len() - 1]);
        assert_eq!(with_eot, crate::sampler::argmax(&r.logits[prompt.len() - 1]));
        let mut ids = prompt[1..].to_vec();
        for _ in 0..r.greedy_new_ids.len() {
            let last = logits(&model, &ids).pop().unwrap();
            ids.push(crate::sampler::argmax(&last));
        }
        assert_eq!(&ids[prompt.len() - 1..], r.greedy_new_ids.as_slice());
        let decoding = crate::sample::Decoding { sampler: crate::sampler::SamplerSettings::GREEDY, beam: 1 };
        let gen = crate::sample::generate(
            &model,
            &[&prompt[1..]],
            r.greedy_new_ids.len(),
            &decoding,
            &[0],
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(gen[0], r.greedy_new_ids, "the lab's generator (KV cache)");
        // And with the token: both lab paths agree.
        let mut ids = prompt.clone();
        for _ in 0..r.greedy_new_ids.len() {
            let last = logits(&model, &ids).pop().unwrap();
            ids.push(crate::sampler::argmax(&last));
        }
        assert_eq!(ids[prompt.len()], with_eot);
        let gen =
            crate::sample::generate(&model, &[prompt], r.greedy_new_ids.len(), &decoding, &[0], &Device::Cpu)
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
        let (model, _varmap) = init_model(cfg, 7, &Device::Cpu).unwrap();
        model
            .named_tensors()
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
        assert_eq!(
            got.keys().collect::<Vec<_>>(),
            fix.keys().collect::<Vec<_>>(),
            "config.json keys, in order"
        );
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
            let slot = layout(cfg).into_iter().find(|s| format!("transformer.{}", s.name) == *name).unwrap();
            assert_eq!(shape, &slot.hf_shape(), "{name}");
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
        let same =
            before.iter().flatten().zip(after.iter().flatten()).all(|(x, y)| x.to_bits() == y.to_bits());
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
        for name in [
            "h.1.attn.c_attn.weight",
            "h.1.attn.c_proj.weight",
            "h.1.mlp.c_fc.weight",
            "h.1.mlp.c_proj.weight",
        ] {
            let lab = &tensors[name];
            let view = st.tensor(&format!("transformer.{name}")).unwrap();
            let hf = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu).unwrap();
            assert_eq!(max_diff(&hf.to_vec2().unwrap(), &lab.t().unwrap().to_vec2().unwrap()), 0.0, "{name}");
            if lab.dim(0).unwrap() == lab.dim(1).unwrap() {
                assert!(
                    max_diff(&hf.to_vec2().unwrap(), &lab.to_vec2().unwrap()) > 0.01,
                    "{name} is symmetric"
                );
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
                        let tril = Tensor::tril2(64, DType::F32, &Device::Cpu)
                            .unwrap()
                            .reshape((1, 1, 64, 64))
                            .unwrap();
                        w.insert(format!("h.{i}.attn.bias"), tril);
                        w.insert(
                            format!("h.{i}.attn.masked_bias"),
                            Tensor::new(-1e4f32, &Device::Cpu).unwrap(),
                        );
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
}
