//! The GPT: a GPT-2 style decoder-only transformer, described once.
//!
//! ```text
//! tokens (B, T) → wte[token] + wpe[position]                      (B, T, C)
//!   → n_layer × Block:  x = x + attn(ln_1(x));  x = x + mlp(ln_2(x))
//!   → ln_f → logits = x · wteᵀ (the LM head is tied to the embedding) (B, T, V)
//! ```
//! Shapes: `B` batch, `T` time, `C` = `d_model`, `H` heads, `hs` = C / H, `V` vocabulary.
//!
//! This module is the one description of the architecture: [`describe`] lists every parameter
//! (name, shape, initialisation, whether AdamW decays it) in one fixed order, as a [`Params`] tree
//! whose structure (blocks, attention, MLP, LayerNorms) is the model's. Everything else is derived
//! from it: the candle reference ([`candle`], autograd and CUDA), the hand-written CPU engine
//! ([`fast`]: training, scoring and the KV-cache decoder), seeded initialisation ([`init_weights`]),
//! checkpoint files ([`save_weights`], [`load_weights`]) and [`n_params`]. [`engine`] is the one
//! place that chooses which engine runs; [`score`] is what evaluation asks of a model.

pub mod candle;
pub mod engine;
pub mod fast;
pub mod ops;
pub mod profile;
pub mod score;

pub use crate::config::ModelConfig;
use crate::files::write_atomic_with;
use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use std::collections::HashMap;
use std::convert::Infallible;
use std::ops::Range;
use std::path::Path;

/// How a parameter starts.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, std²), drawn from the seeded stream.
    Normal { std: f64 },
    /// Every element the same (LayerNorm gains 1, biases 0); draws nothing from the stream.
    Const(f32),
}

/// One parameter tensor of the model.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamSpec {
    /// The checkpoint name, e.g. `h.0.attn.c_attn.weight`.
    pub name: String,
    pub shape: Vec<usize>,
    pub init: Init,
    /// AdamW's decoupled weight decay applies (matrices and embeddings, not biases or gains).
    pub decay: bool,
}

impl ParamSpec {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

/// A linear layer: `y = x · weightᵀ + bias`, weight (out, in), bias (out).
#[derive(Debug, Clone, PartialEq)]
pub struct Linear<T> {
    pub weight: T,
    pub bias: T,
}

/// LayerNorm over the last dimension (eps 1e-5): gain and bias, each (C).
#[derive(Debug, Clone, PartialEq)]
pub struct LayerNorm<T> {
    pub weight: T,
    pub bias: T,
}

/// Causal self-attention: `c_attn` C → 3C (q | k | v, heads side by side), `c_proj` C → C.
#[derive(Debug, Clone, PartialEq)]
pub struct Attention<T> {
    pub c_attn: Linear<T>,
    pub c_proj: Linear<T>,
}

/// The MLP: `c_fc` C → 4C, GELU (tanh approximation), `c_proj` 4C → C.
#[derive(Debug, Clone, PartialEq)]
pub struct Mlp<T> {
    pub c_fc: Linear<T>,
    pub c_proj: Linear<T>,
}

/// A pre-LayerNorm transformer block.
#[derive(Debug, Clone, PartialEq)]
pub struct Block<T> {
    pub ln_1: LayerNorm<T>,
    pub attn: Attention<T>,
    pub ln_2: LayerNorm<T>,
    pub mlp: Mlp<T>,
}

/// Every parameter of the model, one `T` each: a [`ParamSpec`] in the description, a `Vec<f32>`
/// on the host ([`Weights`]), a candle tensor, a range of a flat buffer, a gradient slice.
#[derive(Debug, Clone, PartialEq)]
pub struct Params<T> {
    /// Token embedding (V, C), also the LM head.
    pub wte: T,
    /// Position embedding (ctx, C).
    pub wpe: T,
    pub h: Vec<Block<T>>,
    pub ln_f: LayerNorm<T>,
}

/// The weights of a model on the host, f32, each tensor row-major in its spec's shape.
pub type Weights = Params<Vec<f32>>;

/// The architecture: every parameter in the fixed order in which it is initialised, stored and
/// updated (wte, wpe, then per block ln_1, attn.c_attn, attn.c_proj, ln_2, mlp.c_fc, mlp.c_proj,
/// then ln_f; weight before bias).
pub fn describe(cfg: &ModelConfig) -> Params<ParamSpec> {
    let c = cfg.d_model;
    // GPT-2's scaled initialisation for the projections that write into the residual stream.
    let residual = 0.02 / (2.0 * cfg.n_layer as f64).sqrt();
    let spec = |name: String, shape: Vec<usize>, init, decay| ParamSpec { name, shape, init, decay };
    let embedding = |name: &str, rows| spec(name.into(), vec![rows, c], Init::Normal { std: 0.02 }, true);
    let linear = |name: String, d_in: usize, d_out: usize, std| Linear {
        weight: spec(format!("{name}.weight"), vec![d_out, d_in], Init::Normal { std }, true),
        bias: spec(format!("{name}.bias"), vec![d_out], Init::Const(0.0), false),
    };
    let norm = |name: String| LayerNorm {
        weight: spec(format!("{name}.weight"), vec![c], Init::Const(1.0), false),
        bias: spec(format!("{name}.bias"), vec![c], Init::Const(0.0), false),
    };
    Params {
        wte: embedding("wte.weight", cfg.vocab_size),
        wpe: embedding("wpe.weight", cfg.ctx),
        h: (0..cfg.n_layer)
            .map(|i| Block {
                ln_1: norm(format!("h.{i}.ln_1")),
                attn: Attention {
                    c_attn: linear(format!("h.{i}.attn.c_attn"), c, 3 * c, 0.02),
                    c_proj: linear(format!("h.{i}.attn.c_proj"), c, c, residual),
                },
                ln_2: norm(format!("h.{i}.ln_2")),
                mlp: Mlp {
                    c_fc: linear(format!("h.{i}.mlp.c_fc"), c, 4 * c, 0.02),
                    c_proj: linear(format!("h.{i}.mlp.c_proj"), 4 * c, c, residual),
                },
            })
            .collect(),
        ln_f: norm("ln_f".into()),
    }
}

/// Number of trainable parameters (the tied head counted once).
pub fn n_params(cfg: &ModelConfig) -> usize {
    describe(cfg).iter().iter().map(|s| s.numel()).sum()
}

// The traversal of the tree, in the description's order: the only code that lists the fields.

impl<T> Linear<T> {
    fn try_map<'s, U, E>(&'s self, f: &mut impl FnMut(&'s T) -> Result<U, E>) -> Result<Linear<U>, E> {
        Ok(Linear { weight: f(&self.weight)?, bias: f(&self.bias)? })
    }
}

impl<T> LayerNorm<T> {
    fn try_map<'s, U, E>(&'s self, f: &mut impl FnMut(&'s T) -> Result<U, E>) -> Result<LayerNorm<U>, E> {
        Ok(LayerNorm { weight: f(&self.weight)?, bias: f(&self.bias)? })
    }
}

impl<T> Block<T> {
    fn try_map<'s, U, E>(&'s self, f: &mut impl FnMut(&'s T) -> Result<U, E>) -> Result<Block<U>, E> {
        Ok(Block {
            ln_1: self.ln_1.try_map(f)?,
            attn: Attention { c_attn: self.attn.c_attn.try_map(f)?, c_proj: self.attn.c_proj.try_map(f)? },
            ln_2: self.ln_2.try_map(f)?,
            mlp: Mlp { c_fc: self.mlp.c_fc.try_map(f)?, c_proj: self.mlp.c_proj.try_map(f)? },
        })
    }
}

impl<T> Params<T> {
    /// The same tree with every parameter mapped by `f`, called in the description's order.
    pub fn try_map<'s, U, E>(&'s self, mut f: impl FnMut(&'s T) -> Result<U, E>) -> Result<Params<U>, E> {
        let f = &mut f;
        Ok(Params {
            wte: f(&self.wte)?,
            wpe: f(&self.wpe)?,
            h: self.h.iter().map(|b| b.try_map(f)).collect::<Result<_, E>>()?,
            ln_f: self.ln_f.try_map(f)?,
        })
    }

    /// [`Params::try_map`] for a function that cannot fail.
    pub fn map<'s, U>(&'s self, mut f: impl FnMut(&'s T) -> U) -> Params<U> {
        let mapped: Result<Params<U>, Infallible> = self.try_map(|x| Ok(f(x)));
        match mapped {
            Ok(p) => p,
        }
    }

    /// Every parameter, in the description's order.
    pub fn iter(&self) -> Vec<&T> {
        let mut out = Vec::new();
        self.map(|x| out.push(x));
        out
    }
}

/// Bytes a training step holds for batches of `batch` sequences of `model.ctx` tokens: weights,
/// gradients and AdamW moments, and the fast engine's activations (forward and backward).
pub fn training_bytes(cfg: &ModelConfig, batch: usize) -> u64 {
    let (c, v, h, l, t, b) = (cfg.d_model, cfg.vocab_size, cfg.n_head, cfg.n_layer, cfg.ctx, batch);
    let (c, v, h, l, t, b) = (c as u64, v as u64, h as u64, l as u64, t as u64, b as u64);
    let bt = b * t;
    let attn = b * h * t * t;
    let per_layer = bt * c * 16 + bt * 4 + attn;
    let acts = bt * c * 3 + l * per_layer + bt * v + bt * c * 9 + attn;
    4 * (4 * n_params(cfg) as u64 + acts)
}

/// Bytes sampling holds for `rows` sequences at once: the weights (and their packed copy), the
/// KV cache, and one step's activations and logits.
pub fn sampling_bytes(cfg: &ModelConfig, rows: usize) -> u64 {
    let (c, v, l, ctx, r) =
        (cfg.d_model as u64, cfg.vocab_size as u64, cfg.n_layer as u64, cfg.ctx as u64, rows as u64);
    4 * (2 * n_params(cfg) as u64 + r * l * 2 * ctx * c + r * ctx * c * 16 + r * v)
}

/// Where each parameter lives in one flat buffer holding them all in the description's order.
pub fn flat_layout(cfg: &ModelConfig) -> (Params<Range<usize>>, usize) {
    let mut at = 0;
    let layout = describe(cfg).map(|s| {
        let r = at..at + s.numel();
        at = r.end;
        r
    });
    (layout, at)
}

/// Views of a flat buffer laid out by [`flat_layout`], one slice per parameter.
pub fn split<'a>(layout: &Params<Range<usize>>, buf: &'a [f32]) -> Params<&'a [f32]> {
    layout.map(|r| &buf[r.clone()])
}

/// Disjoint mutable views of a flat buffer laid out by [`flat_layout`].
pub fn split_mut<'a>(layout: &Params<Range<usize>>, buf: &'a mut [f32]) -> Params<&'a mut [f32]> {
    let mut rest = buf;
    let mut at = 0;
    layout.map(|r| {
        assert_eq!(r.start, at, "layout ranges are contiguous and in order");
        let (head, tail) = std::mem::take(&mut rest).split_at_mut(r.len());
        rest = tail;
        at = r.end;
        head
    })
}

/// Fresh weights drawn from a ChaCha8 stream seeded with `seed`: the same seed gives the same
/// bits on every machine. Tensors are drawn in the description's order, elements row by row.
pub fn init_weights(cfg: &ModelConfig, seed: u64) -> Weights {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    describe(cfg).map(|s| match s.init {
        Init::Const(v) => vec![v; s.numel()],
        Init::Normal { std } => (0..s.numel())
            .map(|_| {
                let z: f64 = StandardNormal.sample(&mut rng);
                (std * z) as f32
            })
            .collect(),
    })
}

/// Builds [`Weights`] from tensors by name, checking that every parameter is there, with its
/// shape, and nothing else. `what` names the source in errors (a file).
pub fn weights_from_named(
    cfg: &ModelConfig,
    mut tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
    what: &str,
) -> Result<Weights> {
    let weights = describe(cfg).try_map(|s| {
        let (shape, data) =
            tensors.remove(&s.name).with_context(|| format!("{what}: tensor {} is missing", s.name))?;
        if shape != s.shape {
            bail!("{what}: tensor {} has shape {shape:?}, the model needs {:?}", s.name, s.shape);
        }
        Ok(data)
    })?;
    if let Some(extra) = tensors.keys().min() {
        bail!("{what}: tensor {extra} is not a parameter of this model");
    }
    Ok(weights)
}

/// Writes `weights` as a safetensors file (f32, the checkpoint names), atomically.
pub fn save_weights(cfg: &ModelConfig, weights: &Weights, path: &Path) -> Result<()> {
    let specs = describe(cfg);
    let mut tensors = HashMap::new();
    for (s, w) in specs.iter().into_iter().zip(weights.iter()) {
        let t =
            ::candle_core::Tensor::from_slice(w.as_slice(), s.shape.as_slice(), &::candle_core::Device::Cpu)?;
        tensors.insert(s.name.clone(), t);
    }
    write_atomic_with(path, |tmp| Ok(::candle_core::safetensors::save(&tensors, tmp)?))
}

/// Reads a safetensors checkpoint (f32, f16 or bf16) into [`Weights`], naming the file when it is
/// missing, truncated, or not this model's.
pub fn load_weights(cfg: &ModelConfig, path: &Path) -> Result<Weights> {
    let file = path.display().to_string();
    let tensors = ::candle_core::safetensors::load(path, &::candle_core::Device::Cpu).map_err(|e| {
        anyhow::anyhow!("cannot load weights {file} (missing, truncated, or not safetensors): {e}")
    })?;
    let mut named = HashMap::new();
    for (name, t) in tensors {
        let shape = t.dims().to_vec();
        let data = t.to_dtype(::candle_core::DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        named.insert(name, (shape, data));
    }
    weights_from_named(cfg, named, &file)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig { vocab_size: 11, ctx: 8, d_model: 16, n_layer: 2, n_head: 2, dropout: 0.0 }
    }

    #[test]
    fn the_description_counts_every_parameter_once() {
        let cfg = tiny();
        let specs = describe(&cfg);
        assert_eq!(specs.iter().len(), 2 + 12 * 2 + 2, "wte, wpe, 12 tensors per block, ln_f");
        // Hand count: V·C + ctx·C + L·(2·2C + (3C·C + 3C) + (C·C + C) + (4C·C + 4C) + (4C·C + C)) + 2C
        let (v, c, l, ctx) = (11, 16, 2, 8);
        let block = 4 * c + 3 * c * c + 3 * c + c * c + c + 4 * c * c + 4 * c + 4 * c * c + c;
        assert_eq!(n_params(&cfg), v * c + ctx * c + l * block + 2 * c);
        let (layout, total) = flat_layout(&cfg);
        assert_eq!(total, n_params(&cfg));
        assert_eq!(layout.h[1].attn.c_attn.weight.len(), 3 * c * c);
        let names: Vec<&str> = specs.iter().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[..4], ["wte.weight", "wpe.weight", "h.0.ln_1.weight", "h.0.ln_1.bias"]);
        assert_eq!(names[names.len() - 1], "ln_f.bias");
    }

    #[test]
    fn seeded_init_is_reproducible_and_gpt2_scaled() {
        let (a, b, c) = (init_weights(&tiny(), 42), init_weights(&tiny(), 42), init_weights(&tiny(), 43));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let std = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        // N(0, 0.02) for embeddings, 0.02/√(2·layers) = 0.01 for residual projections.
        assert!((std(&a.wte) - 0.02).abs() < 0.004, "{}", std(&a.wte));
        assert!((std(&a.h[0].mlp.c_proj.weight) - 0.01).abs() < 0.002);
        assert!(a.h[0].ln_1.bias.iter().all(|&x| x == 0.0) && a.h[0].ln_1.weight.iter().all(|&x| x == 1.0));
    }

    #[test]
    fn checkpoints_round_trip_and_name_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("model.safetensors");
        let w = init_weights(&tiny(), 1);
        save_weights(&tiny(), &w, &p).unwrap();
        assert_eq!(load_weights(&tiny(), &p).unwrap(), w);
        let other = ModelConfig { d_model: 8, ..tiny() };
        let e = load_weights(&other, &p).unwrap_err().to_string();
        assert!(e.contains("model.safetensors") && e.contains("wte.weight") && e.contains("shape"), "{e}");
        let deeper = ModelConfig { n_layer: 3, ..tiny() };
        let e = load_weights(&deeper, &p).unwrap_err().to_string();
        assert!(e.contains("h.2.ln_1.weight is missing"), "{e}");
        std::fs::write(&p, b"not a checkpoint").unwrap();
        assert!(load_weights(&tiny(), &p).unwrap_err().to_string().contains("model.safetensors"));
    }

    #[test]
    fn mutable_views_are_the_layout() {
        let cfg = tiny();
        let (layout, total) = flat_layout(&cfg);
        let mut buf: Vec<f32> = (0..total).map(|i| i as f32).collect();
        let views = split_mut(&layout, &mut buf);
        assert_eq!(views.wpe[0], layout.wpe.start as f32);
        assert_eq!(views.ln_f.bias.len(), 16);
    }
}
