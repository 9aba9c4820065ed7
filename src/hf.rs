//! Hugging Face interchange: a lab model written as a `transformers` GPT-2 directory, and a GPT-2
//! directory written by `transformers` read as lab weights.
//!
//! The lab's model ([`crate::model`]) is exactly GPT-2 (pre-LN blocks, learned absolute positions,
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

use crate::files::{create_dir, write_atomic, write_atomic_with};
use crate::model::ModelConfig;
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

/// Every weight of a lab model of `cfg`, in the description's order ([`crate::model::describe`]);
/// the blocks' matrices are `Conv1D` weights in `transformers`.
fn layout(cfg: &ModelConfig) -> Vec<Slot> {
    crate::model::describe(cfg)
        .iter()
        .into_iter()
        .map(|s| Slot {
            name: s.name.clone(),
            shape: s.shape.clone(),
            conv1d: s.shape.len() == 2 && s.name.starts_with("h."),
        })
        .collect()
}

/// The lab's weights from lab-layout tensors (what [`import`] gives).
pub fn weights(cfg: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<crate::model::Weights> {
    let named = tensors
        .iter()
        .map(|(k, t)| Ok((k.clone(), (t.dims().to_vec(), t.flatten_all()?.to_vec1::<f32>()?))))
        .collect::<Result<HashMap<_, _>>>()?;
    crate::model::weights_from_named(cfg, named, "imported weights")
}

/// Lab-layout tensors of `weights` (what [`export`] takes).
pub fn tensors(cfg: &ModelConfig, weights: &crate::model::Weights) -> Result<HashMap<String, Tensor>> {
    let specs = crate::model::describe(cfg);
    specs
        .iter()
        .into_iter()
        .zip(weights.iter())
        .map(|(s, w)| {
            Ok((s.name.clone(), Tensor::from_slice(w.as_slice(), s.shape.as_slice(), &Device::Cpu)?))
        })
        .collect()
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
    let sha = crate::files::hex(&Sha256::digest(&bytes));
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
/// `tensors` are the lab's weights under their lab names and layout, f32 (e.g. a checkpoint's
/// `model.safetensors` loaded with `candle_core::safetensors::load`); `tokenizer_json` the lab's
/// `tokenizer.json` text, written unchanged; `eot_id` its `<|endoftext|>` id (eos, bos and pad of
/// the export); `unk_id` its `<unk>` id if it has one.
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
