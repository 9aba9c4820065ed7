//! The GPT: a GPT-2 style decoder-only transformer, read top-down like nanoGPT's `model.py`.
//!
//! token + learned position embeddings → `n_layer` × pre-LayerNorm [`Block`] → final LayerNorm →
//! LM head tied to the token embedding. Shapes: `B` batch, `T` time, `C` = `d_model`, `H` heads,
//! `hs` = C / H, `V` vocabulary.
//!
//! One code path serves training (weights are candle `Var`s, fast ops without a backward are avoided)
//! and inference (weights detached, fused softmax / LayerNorm, a KV cache). Which ops run is decided by
//! whether autograd tracks the tensor, so a fused op can never silently cut a gradient (SPEC §5).

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Init, VarBuilder, VarMap};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use serde::{Deserialize, Serialize};
use std::sync::Mutex;

/// The architecture. `vocab_size` is the tokenizer's; `ctx` the longest sequence the model sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub ctx: usize,
    pub d_model: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Dropout on attention output, MLP output and embeddings while training (0 = off).
    pub dropout: f64,
}

impl ModelConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        let positive = [
            ("model.vocab_size", self.vocab_size),
            ("model.ctx", self.ctx),
            ("model.d_model", self.d_model),
            ("model.n_layer", self.n_layer),
            ("model.n_head", self.n_head),
        ];
        for (name, v) in positive {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(format!(
                "model.d_model ({}) must be a multiple of model.n_head ({})",
                self.d_model, self.n_head
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("model.dropout must be in [0, 1), got {}", self.dropout));
        }
        Ok(())
    }

    /// Number of trainable parameters (the tied head is counted once).
    pub fn n_params(&self) -> usize {
        let (v, c, l) = (self.vocab_size, self.d_model, self.n_layer);
        let block = 2 * 2 * c + (3 * c * c + 3 * c) + (c * c + c) + (4 * c * c + 4 * c) + (4 * c * c + c);
        v * c + self.ctx * c + l * block + 2 * c
    }
}

/// LayerNorm with weight and bias. Uses candle's fused kernel only when no gradient is needed.
#[derive(Clone)]
struct LayerNorm {
    weight: Tensor, // (C)
    bias: Tensor,   // (C)
}

impl LayerNorm {
    fn new(c: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(c, "weight", Init::Const(1.0))?;
        let bias = vb.get_with_hints(c, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, 1e-5)
        }
    }
}

/// A linear layer applied as one 2-D matmul over all rows (faster than a batched matmul on CPU).
#[derive(Clone)]
struct Linear {
    weight: Tensor, // (out, in)
    bias: Tensor,   // (out)
}

impl Linear {
    fn new(d_in: usize, d_out: usize, std: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints((d_out, d_in), "weight", Init::Randn { mean: 0.0, stdev: std })?;
        let bias = vb.get_with_hints(d_out, "bias", Init::Const(0.0))?;
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?; // (B, T, in)
        let y = x.reshape((b * t, d_in))?.matmul(&self.weight.t()?)?; // (B·T, out)
        y.broadcast_add(&self.bias)?.reshape((b, t, ()))
    }
}

fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if x.track_op() {
        candle_nn::ops::softmax(x, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(x)
    }
}

/// Inverted dropout. On the CPU the mask comes from `rng`, a seeded ChaCha stream (candle's own CPU
/// RNG cannot be seeded). On a GPU it is drawn on the device by its own generator (curand), which
/// training seeds from the run's seed ([`seed_device`]): no mask crosses the bus, and a run is
/// reproducible on the same device, though its masks differ from the CPU's.
pub struct Dropout<'a> {
    pub p: f64,
    pub rng: &'a mut ChaCha8Rng,
}

impl Dropout<'_> {
    fn apply(&mut self, x: &Tensor) -> Result<Tensor> {
        if self.p == 0.0 {
            return Ok(x.clone());
        }
        let keep = (1.0 - self.p) as f32;
        let scale = 1.0 / keep;
        let mask = if x.device().is_cpu() {
            let mask: Vec<f32> = (0..x.elem_count())
                .map(|_| if self.rng.random::<f32>() < keep { scale } else { 0.0 })
                .collect();
            Tensor::from_vec(mask, x.shape(), x.device())?
        } else {
            let u = Tensor::rand(0f32, 1f32, x.shape(), x.device())?; // U[0, 1)
            (u.lt(keep)?.to_dtype(DType::F32)? * scale as f64)?
        };
        x.mul(&mask)
    }
}

/// Seeds the generator of an accelerator (dropout masks are drawn there); the CPU needs nothing,
/// its masks come from the ChaCha stream handed to [`Dropout`].
pub fn seed_device(dev: &Device, seed: u64) -> Result<()> {
    if dev.is_cpu() {
        Ok(())
    } else {
        dev.set_seed(seed)
    }
}

fn dropout(x: Tensor, d: &mut Option<Dropout>) -> Result<Tensor> {
    match d {
        Some(d) => d.apply(&x),
        None => Ok(x),
    }
}

/// Keys and values of earlier positions for every layer: each (B, H, T_past, hs).
#[derive(Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn new(n_layer: usize) -> Self {
        Self { layers: vec![None; n_layer] }
    }

    /// Number of cached positions.
    pub fn len(&self) -> usize {
        match self.layers.first() {
            Some(Some((k, _))) => k.dim(2).unwrap_or(0),
            _ => 0,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Keep (and reorder) the batch rows `rows` (beam search picks parents this way).
    pub fn select_rows(&mut self, rows: &Tensor) -> Result<()> {
        for (k, v) in self.layers.iter_mut().flatten() {
            *k = k.index_select(rows, 0)?;
            *v = v.index_select(rows, 0)?;
        }
        Ok(())
    }
}

#[derive(Clone)]
struct CausalSelfAttention {
    c_attn: Linear, // C → 3C (q, k, v)
    c_proj: Linear, // C → C
    n_head: usize,
}

impl CausalSelfAttention {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.d_model;
        Ok(Self {
            c_attn: Linear::new(c, 3 * c, 0.02, vb.pp("c_attn"))?,
            c_proj: Linear::new(c, c, residual_std(cfg), vb.pp("c_proj"))?,
            n_head: cfg.n_head,
        })
    }

    /// x: (B, T, C) at positions pos0..pos0+T; `cache` holds positions 0..pos0 when given.
    /// `mask` is the model's (ctx, ctx) causal mask.
    fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, hs) = (self.n_head, c / self.n_head);
        let qkv = self.c_attn.forward(x)?; // (B, T, 3C)
        let qkv = qkv.reshape((b, t, 3, h, hs))?.permute((2, 0, 3, 1, 4))?; // (3, B, H, T, hs)
        let q = qkv.get(0)?.contiguous()?; // (B, H, T, hs)
        let mut k = qkv.get(1)?.contiguous()?; // (B, H, T, hs)
        let mut v = qkv.get(2)?.contiguous()?; // (B, H, T, hs)
        if let Some(slot) = cache {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?; // (B, H, T_past + T, hs)
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let t_all = k.dim(2)?;
        let att = (q.matmul(&k.t()?)? * (1.0 / (hs as f64).sqrt()))?; // (B, H, T, T_all)
        let att = if t > 1 {
            // Rows T_all − T.. of the mask: the absolute positions of the T queries.
            att.broadcast_add(&mask.narrow(0, t_all - t, t)?.narrow(1, 0, t_all)?)?
        } else {
            att // a single new query may attend to every earlier position
        };
        let att = softmax_last(&att)?;
        let y = att.matmul(&v)?; // (B, H, T, hs)
        let y = y.transpose(1, 2)?.reshape((b, t, c))?; // (B, T, C)
        self.c_proj.forward(&y)
    }
}

/// (ctx, ctx) additive mask: the query at position i sees keys j ≤ i. Built once per model, on its
/// device (a GPU would otherwise wait for a host copy in every layer).
fn causal_mask(ctx: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..ctx).flat_map(|i| (0..ctx).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (ctx, ctx), dev)
}

/// GPT-2's scaled init for projections that write into the residual stream.
fn residual_std(cfg: &ModelConfig) -> f64 {
    0.02 / (2.0 * cfg.n_layer as f64).sqrt()
}

#[derive(Clone)]
struct Mlp {
    c_fc: Linear,   // C → 4C
    c_proj: Linear, // 4C → C
}

impl Mlp {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let c = cfg.d_model;
        Ok(Self {
            c_fc: Linear::new(c, 4 * c, 0.02, vb.pp("c_fc"))?,
            c_proj: Linear::new(4 * c, c, residual_std(cfg), vb.pp("c_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?) // (B, T, C)
    }
}

#[derive(Clone)]
struct Block {
    ln_1: LayerNorm,
    attn: CausalSelfAttention,
    ln_2: LayerNorm,
    mlp: Mlp,
}

impl Block {
    fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            ln_1: LayerNorm::new(cfg.d_model, vb.pp("ln_1"))?,
            attn: CausalSelfAttention::new(cfg, vb.pp("attn"))?,
            ln_2: LayerNorm::new(cfg.d_model, vb.pp("ln_2"))?,
            mlp: Mlp::new(cfg, vb.pp("mlp"))?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &Tensor,
        drop: &mut Option<Dropout>,
    ) -> Result<Tensor> {
        let x = (x + dropout(self.attn.forward(&self.ln_1.forward(x)?, cache, mask)?, drop)?)?;
        &x + dropout(self.mlp.forward(&self.ln_2.forward(&x)?)?, drop)?
    }
}

/// The whole model.
#[derive(Clone)]
pub struct Gpt {
    pub cfg: ModelConfig,
    wte: Tensor, // (V, C), also the LM head
    wpe: Tensor, // (ctx, C)
    blocks: Vec<Block>,
    ln_f: LayerNorm,
    mask: Tensor, // (ctx, ctx) causal, additive
}

impl Gpt {
    /// Builds the model from `vb`: fresh weights from a [`SeededInit`] VarMap, or loaded ones.
    pub fn new(cfg: &ModelConfig, vb: VarBuilder) -> Result<Self> {
        let randn = Init::Randn { mean: 0.0, stdev: 0.02 };
        let wte = vb.get_with_hints((cfg.vocab_size, cfg.d_model), "wte.weight", randn)?;
        let wpe = vb.get_with_hints((cfg.ctx, cfg.d_model), "wpe.weight", randn)?;
        let blocks =
            (0..cfg.n_layer).map(|i| Block::new(cfg, vb.pp(format!("h.{i}")))).collect::<Result<Vec<_>>>()?;
        let ln_f = LayerNorm::new(cfg.d_model, vb.pp("ln_f"))?;
        let mask = causal_mask(cfg.ctx, vb.device())?;
        Ok(Self { cfg: cfg.clone(), wte, wpe, blocks, ln_f, mask })
    }

    /// The same weights, detached from autograd: what sampling and evaluation use.
    pub fn detached(&self) -> Self {
        let ln = |l: &LayerNorm| LayerNorm { weight: l.weight.detach(), bias: l.bias.detach() };
        let lin = |l: &Linear| Linear { weight: l.weight.detach(), bias: l.bias.detach() };
        Self {
            cfg: self.cfg.clone(),
            wte: self.wte.detach(),
            wpe: self.wpe.detach(),
            blocks: self
                .blocks
                .iter()
                .map(|b| Block {
                    ln_1: ln(&b.ln_1),
                    attn: CausalSelfAttention {
                        c_attn: lin(&b.attn.c_attn),
                        c_proj: lin(&b.attn.c_proj),
                        n_head: b.attn.n_head,
                    },
                    ln_2: ln(&b.ln_2),
                    mlp: Mlp { c_fc: lin(&b.mlp.c_fc), c_proj: lin(&b.mlp.c_proj) },
                })
                .collect(),
            ln_f: ln(&self.ln_f),
            mask: self.mask.clone(),
        }
    }

    /// Every weight under its checkpoint name (what [`crate::fast`] converts from).
    pub fn named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out =
            vec![("wte.weight".to_string(), self.wte.clone()), ("wpe.weight".to_string(), self.wpe.clone())];
        for (i, b) in self.blocks.iter().enumerate() {
            let p = |s: &str| format!("h.{i}.{s}");
            out.extend([
                (p("ln_1.weight"), b.ln_1.weight.clone()),
                (p("ln_1.bias"), b.ln_1.bias.clone()),
                (p("attn.c_attn.weight"), b.attn.c_attn.weight.clone()),
                (p("attn.c_attn.bias"), b.attn.c_attn.bias.clone()),
                (p("attn.c_proj.weight"), b.attn.c_proj.weight.clone()),
                (p("attn.c_proj.bias"), b.attn.c_proj.bias.clone()),
                (p("ln_2.weight"), b.ln_2.weight.clone()),
                (p("ln_2.bias"), b.ln_2.bias.clone()),
                (p("mlp.c_fc.weight"), b.mlp.c_fc.weight.clone()),
                (p("mlp.c_fc.bias"), b.mlp.c_fc.bias.clone()),
                (p("mlp.c_proj.weight"), b.mlp.c_proj.weight.clone()),
                (p("mlp.c_proj.bias"), b.mlp.c_proj.bias.clone()),
            ]);
        }
        out.push(("ln_f.weight".to_string(), self.ln_f.weight.clone()));
        out.push(("ln_f.bias".to_string(), self.ln_f.bias.clone()));
        out
    }

    /// idx: (B, T) u32 tokens → logits (B, T, V). The training and evaluation forward.
    pub fn forward(&self, idx: &Tensor, drop: Option<Dropout>) -> Result<Tensor> {
        let mut drop = drop;
        let x = self.trunk(idx, 0, None, &mut drop)?; // (B, T, C)
        self.head(&x)
    }

    /// idx: (B, T) tokens at positions `cache.len()..`; appends to the cache and returns the
    /// logits of the last position only: (B, V). The sampling forward.
    pub fn forward_cached(&self, idx: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        let pos0 = cache.len();
        let x = self.trunk(idx, pos0, Some(cache), &mut None)?; // (B, T, C)
        let t = x.dim(1)?;
        let last = x.narrow(1, t - 1, 1)?; // (B, 1, C)
        self.head(&last)?.squeeze(1) // (B, V)
    }

    fn trunk(
        &self,
        idx: &Tensor,
        pos0: usize,
        mut cache: Option<&mut KvCache>,
        drop: &mut Option<Dropout>,
    ) -> Result<Tensor> {
        let (b, t) = idx.dims2()?;
        if pos0 + t > self.cfg.ctx {
            candle_core::bail!("sequence of {} tokens exceeds the model context {}", pos0 + t, self.cfg.ctx)
        }
        let tok = self.wte.index_select(&idx.flatten_all()?, 0)?.reshape((b, t, ()))?; // (B, T, C)
        let pos = self.wpe.narrow(0, pos0, t)?; // (T, C)
        let mut x = dropout(tok.broadcast_add(&pos)?, drop)?; // (B, T, C)
        for (i, block) in self.blocks.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, slot, &self.mask, drop)?;
        }
        self.ln_f.forward(&x)
    }

    /// x: (B, T, C) → logits (B, T, V) through the tied embedding, as one 2-D matmul.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let logits = x.reshape((b * t, c))?.matmul(&self.wte.t()?)?; // (B·T, V)
        logits.reshape((b, t, ()))
    }
}

/// Mean cross-entropy of logits (B, T, V) against targets (B, T).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
}

/// A `VarMap` whose fresh variables are drawn from a seeded ChaCha8 stream, so the same seed gives
/// bit-identical weights (candle's CPU RNG cannot be seeded). Variables are created in the model's
/// construction order, which is fixed, so the stream is consumed deterministically.
pub struct SeededInit {
    varmap: VarMap,
    rng: Mutex<ChaCha8Rng>,
}

impl SeededInit {
    pub fn new(varmap: VarMap, seed: u64) -> Self {
        Self { varmap, rng: Mutex::new(ChaCha8Rng::seed_from_u64(seed)) }
    }
}

impl candle_nn::var_builder::SimpleBackend for SeededInit {
    fn get(&self, s: candle_core::Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let mut vars = self.varmap.data().lock().expect("VarMap lock poisoned");
        if let Some(var) = vars.get(name) {
            let t = var.as_tensor();
            if t.shape() != &s {
                candle_core::bail!("shape mismatch for {name}: {:?} vs {:?}", t.shape(), s)
            }
            return Ok(t.clone());
        }
        let n = s.elem_count();
        let mut rng = self.rng.lock().expect("init RNG lock poisoned");
        let values: Vec<f32> = match h {
            Init::Const(c) => vec![c as f32; n],
            Init::Randn { mean, stdev } => (0..n)
                .map(|_| {
                    let z: f64 = StandardNormal.sample(&mut *rng);
                    (mean + stdev * z) as f32
                })
                .collect(),
            Init::Uniform { lo, up } => (0..n).map(|_| rng.random_range(lo..up) as f32).collect(),
            other => candle_core::bail!("SeededInit does not support {other:?} for {name}"),
        };
        let tensor = Tensor::from_vec(values, s, dev)?.to_dtype(dtype)?;
        let var = candle_core::Var::from_tensor(&tensor)?;
        let t = var.as_tensor().clone();
        vars.insert(name.to_string(), var);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _dtype: DType, _dev: &Device) -> Result<Tensor> {
        candle_core::bail!("SeededInit cannot get {name} without a shape")
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.varmap.data().lock().map(|v| v.contains_key(name)).unwrap_or(false)
    }
}

/// A trainable model with reproducible initial weights. The `VarMap` holds every parameter.
pub fn init_model(cfg: &ModelConfig, seed: u64, dev: &Device) -> Result<(Gpt, VarMap)> {
    let varmap = VarMap::new();
    let backend = SeededInit::new(varmap.clone(), seed);
    let vb = VarBuilder::from_backend(Box::new(backend), DType::F32, dev.clone());
    let model = Gpt::new(cfg, vb)?;
    Ok((model, varmap))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> ModelConfig {
        ModelConfig { vocab_size: 11, ctx: 8, d_model: 16, n_layer: 2, n_head: 2, dropout: 0.0 }
    }

    fn tokens(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    fn all_values(varmap: &VarMap) -> Vec<(String, Vec<f32>)> {
        let data = varmap.data().lock().unwrap();
        let mut v: Vec<_> = data
            .iter()
            .map(|(k, var)| (k.clone(), var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }

    #[test]
    fn parameter_count_matches_the_formula() {
        let (_, varmap) = init_model(&tiny(), 0, &Device::Cpu).unwrap();
        let n: usize = all_values(&varmap).iter().map(|(_, v)| v.len()).sum();
        assert_eq!(n, tiny().n_params());
    }

    #[test]
    fn every_parameter_receives_a_nonzero_gradient() {
        let (model, varmap) = init_model(&tiny(), 3, &Device::Cpu).unwrap();
        let x = tokens(&[&[1, 2, 3, 4, 5, 6, 7, 8], &[8, 7, 6, 5, 4, 3, 2, 1]]);
        let y = tokens(&[&[2, 3, 4, 5, 6, 7, 8, 9], &[7, 6, 5, 4, 3, 2, 1, 0]]);
        let grads = loss(&model.forward(&x, None).unwrap(), &y).unwrap().backward().unwrap();
        let data = varmap.data().lock().unwrap();
        assert_eq!(data.len(), 4 + 12 * 2, "wte, wpe, ln_f (2) + 12 tensors per block");
        for (name, var) in data.iter() {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{name} has no gradient"));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{name}: gradient norm² {norm}");
        }
    }

    #[test]
    fn attention_is_causal() {
        let (model, _) = init_model(&tiny(), 1, &Device::Cpu).unwrap();
        let a = model.forward(&tokens(&[&[1, 2, 3, 4, 5, 6]]), None).unwrap();
        let b = model.forward(&tokens(&[&[1, 2, 3, 9, 10, 0]]), None).unwrap();
        let (a, b) = (a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
        assert_eq!(a[0][..3], b[0][..3], "positions 0..=2 must not see tokens 3..");
        assert_ne!(a[0][3], b[0][3]);
    }

    #[test]
    fn same_seed_same_weights_other_seed_differs() {
        let dev = Device::Cpu;
        let (_, a) = init_model(&tiny(), 42, &dev).unwrap();
        let (_, b) = init_model(&tiny(), 42, &dev).unwrap();
        let (_, c) = init_model(&tiny(), 43, &dev).unwrap();
        assert_eq!(all_values(&a), all_values(&b));
        assert_ne!(all_values(&a), all_values(&c));
        // N(0, 0.02) for embeddings, 0.02/√(2·layers) = 0.01 for residual projections.
        let std = |name: &str| {
            let v = all_values(&a).into_iter().find(|(k, _)| k == name).unwrap().1;
            (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt()
        };
        assert!((std("wte.weight") - 0.02).abs() < 0.004, "{}", std("wte.weight"));
        assert!((std("h.0.mlp.c_proj.weight") - 0.01).abs() < 0.002);
        assert_eq!(std("h.0.ln_1.bias"), 0.0);
    }

    #[test]
    fn kv_cache_gives_the_full_forward_logits() {
        let (model, _) = init_model(&tiny(), 5, &Device::Cpu).unwrap();
        let model = model.detached();
        let seq: &[u32] = &[3, 1, 4, 1, 5, 9, 2];
        let full = model.forward(&tokens(&[seq]), None).unwrap().to_vec3::<f32>().unwrap();
        let mut cache = KvCache::new(2);
        let first = model.forward_cached(&tokens(&[&seq[..4]]), &mut cache).unwrap();
        let mut rows = vec![first.to_vec2::<f32>().unwrap()[0].clone()];
        for &t in &seq[4..] {
            rows.push(
                model.forward_cached(&tokens(&[&[t]]), &mut cache).unwrap().to_vec2::<f32>().unwrap()[0]
                    .clone(),
            );
        }
        for (i, row) in rows.iter().enumerate() {
            let pos = 3 + i;
            let diff = row.iter().zip(&full[0][pos]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-5, "position {pos}: max |Δlogit| = {diff}");
        }
        assert_eq!(cache.len(), 7);
    }

    #[test]
    fn dropout_is_seeded() {
        let cfg = ModelConfig { dropout: 0.5, ..tiny() };
        let (model, _) = init_model(&cfg, 0, &Device::Cpu).unwrap();
        let x = tokens(&[&[1, 2, 3]]);
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            model.forward(&x, Some(Dropout { p: 0.5, rng: &mut rng })).unwrap().to_vec3::<f32>().unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_ne!(run(1), model.forward(&x, None).unwrap().to_vec3::<f32>().unwrap());
    }
}
