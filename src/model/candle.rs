//! The GPT in candle, read top-down like nanoGPT's `model.py`: the plain reference path (llm.c
//! keeps one beside its fast kernels) and what runs on a GPU. Its parameters are the tree of
//! [`super::describe`], as candle tensors; training uses candle's autograd and [`AdamW`].
//!
//! One code path serves training (weights are `Var`s, ops without a backward are avoided) and
//! inference (detached weights, fused softmax / LayerNorm, a KV cache). Which ops run is decided by
//! whether autograd tracks the tensor, so a fused op can never silently cut a gradient: candle-nn's
//! fused LayerNorm and `softmax_last_dim` have no backward (candle issues #2168, #2977).

use super::{describe, Attention, Block, LayerNorm, Linear, Mlp, ModelConfig, Params, Weights};
use crate::config::TrainConfig;
use candle_core::{backprop::GradStore, DType, Device, Result, Tensor, Var, D};
use rand::Rng;
use rand_chacha::ChaCha8Rng;

impl LayerNorm<Tensor> {
    /// x: (B, T, C) → (B, T, C). candle's fused kernel only when no gradient is needed.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, 1e-5)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, 1e-5)
        }
    }
}

impl Linear<Tensor> {
    /// x: (B, T, in) → (B, T, out), as one 2-D matmul over all rows (faster than a batched
    /// matmul on CPU).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, d_in) = x.dims3()?;
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

impl Attention<Tensor> {
    /// x: (B, T, C) at positions pos0..pos0+T; `cache` holds positions 0..pos0 when given.
    /// `mask` is the model's (ctx, ctx) causal mask.
    fn forward(
        &self,
        x: &Tensor,
        n_head: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &Tensor,
    ) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let (h, hs) = (n_head, c / n_head);
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

impl Mlp<Tensor> {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.c_proj.forward(&self.c_fc.forward(x)?.gelu()?) // (B, T, C)
    }
}

impl Block<Tensor> {
    fn forward(
        &self,
        x: &Tensor,
        n_head: usize,
        cache: Option<&mut Option<(Tensor, Tensor)>>,
        mask: &Tensor,
        drop: &mut Option<Dropout>,
    ) -> Result<Tensor> {
        let x = (x + dropout(self.attn.forward(&self.ln_1.forward(x)?, n_head, cache, mask)?, drop)?)?;
        &x + dropout(self.mlp.forward(&self.ln_2.forward(&x)?)?, drop)?
    }
}

/// (ctx, ctx) additive mask: the query at position i sees keys j ≤ i. Built once per model, on its
/// device (a GPU would otherwise wait for a host copy in every layer).
fn causal_mask(ctx: usize, dev: &Device) -> Result<Tensor> {
    let mask: Vec<f32> =
        (0..ctx).flat_map(|i| (0..ctx).map(move |j| if j <= i { 0.0 } else { f32::NEG_INFINITY })).collect();
    Tensor::from_vec(mask, (ctx, ctx), dev)
}

/// The whole model on one device.
#[derive(Clone)]
pub struct Gpt {
    pub cfg: ModelConfig,
    p: Params<Tensor>,
    mask: Tensor, // (ctx, ctx) causal, additive
}

impl Gpt {
    /// An inference model holding `weights` on `dev` (no autograd).
    pub fn new(cfg: &ModelConfig, weights: &Weights, dev: &Device) -> Result<Self> {
        let specs = describe(cfg);
        let mut shapes = specs.iter().into_iter().map(|s| s.shape.clone());
        let p =
            weights.try_map(|w| Tensor::from_slice(w, shapes.next().expect("one shape per weight"), dev))?;
        Ok(Self { cfg: cfg.clone(), p, mask: causal_mask(cfg.ctx, dev)? })
    }

    /// A trainable model starting from `weights`: its parameters as candle variables, in the
    /// description's order, each with whether AdamW decays it.
    pub fn trainable(cfg: &ModelConfig, weights: &Weights, dev: &Device) -> Result<(Self, Vec<(Var, bool)>)> {
        let model = Self::new(cfg, weights, dev)?;
        let specs = describe(cfg);
        let mut decays = specs.iter().into_iter().map(|s| s.decay);
        let mut vars = Vec::new();
        let p = model.p.try_map(|t| {
            let var = Var::from_tensor(t)?;
            vars.push((var.clone(), decays.next().expect("one spec per tensor")));
            Ok::<_, candle_core::Error>(var.as_tensor().clone())
        })?;
        Ok((Self { p, ..model }, vars))
    }

    /// The same weights, detached from autograd: what evaluation uses while training.
    pub fn detached(&self) -> Self {
        Self { cfg: self.cfg.clone(), p: self.p.map(Tensor::detach), mask: self.mask.clone() }
    }

    /// The weights, copied to the host.
    pub fn weights(&self) -> Result<Weights> {
        self.p.try_map(|t| t.flatten_all()?.to_vec1::<f32>())
    }

    pub fn device(&self) -> &Device {
        self.mask.device()
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
        let tok = self.p.wte.index_select(&idx.flatten_all()?, 0)?.reshape((b, t, ()))?; // (B, T, C)
        let pos = self.p.wpe.narrow(0, pos0, t)?; // (T, C)
        let mut x = dropout(tok.broadcast_add(&pos)?, drop)?; // (B, T, C)
        for (i, block) in self.p.h.iter().enumerate() {
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            x = block.forward(&x, self.cfg.n_head, slot, &self.mask, drop)?;
        }
        self.p.ln_f.forward(&x)
    }

    /// x: (B, T, C) → logits (B, T, V) through the tied embedding, as one 2-D matmul.
    fn head(&self, x: &Tensor) -> Result<Tensor> {
        let (b, t, c) = x.dims3()?;
        let logits = x.reshape((b * t, c))?.matmul(&self.p.wte.t()?)?; // (B·T, V)
        logits.reshape((b, t, ()))
    }
}

/// Mean cross-entropy of logits (B, T, V) against targets (B, T).
pub fn loss(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (b, t, v) = logits.dims3()?;
    candle_nn::loss::cross_entropy(&logits.reshape((b * t, v))?, &targets.reshape(b * t)?)
}

/// AdamW with decoupled weight decay applied only to the parameters the description marks (matrices
/// and embeddings); the same arithmetic as the fast engine's.
pub struct AdamW {
    params: Vec<(Var, Tensor, Tensor, bool)>, // (param, m, v, decays)
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    t: i32,
}

impl AdamW {
    pub fn new(vars: Vec<(Var, bool)>, cfg: &TrainConfig) -> Result<Self> {
        let params = vars
            .into_iter()
            .map(|(var, decays)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok((var, zeros.clone(), zeros, decays))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { params, beta1: cfg.beta1, beta2: cfg.beta2, weight_decay: cfg.weight_decay, t: 0 })
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> Result<f64> {
        // One read-back for all parameters (on a GPU each read is a synchronisation).
        let mut sums = Vec::with_capacity(self.params.len());
        for (var, ..) in &self.params {
            if let Some(g) = grads.get(var.as_tensor()) {
                sums.push(g.sqr()?.sum_all()?.to_dtype(DType::F64)?);
            }
        }
        if sums.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.t += 1;
        let (b1, b2) = (self.beta1, self.beta2);
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        for (var, m, v, decays) in self.params.iter_mut() {
            let Some(g) = grads.get(var.as_tensor()) else { continue };
            let g = if grad_scale != 1.0 { g.affine(grad_scale, 0.0)? } else { g.clone() };
            *m = ((m.affine(b1, 0.0))? + g.affine(1.0 - b1, 0.0)?)?;
            *v = ((v.affine(b2, 0.0))? + g.sqr()?.affine(1.0 - b2, 0.0)?)?;
            let update = (m.affine(1.0 / c1, 0.0)? / (v.affine(1.0 / c2, 0.0)?.sqrt()? + 1e-8)?)?;
            let decay = if *decays { 1.0 - lr * self.weight_decay } else { 1.0 };
            let theta = (var.as_tensor().affine(decay, 0.0)? - update.affine(lr, 0.0)?)?;
            var.set(&theta)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::init_weights;
    use rand::SeedableRng;

    fn tiny() -> ModelConfig {
        ModelConfig { vocab_size: 11, ctx: 8, d_model: 16, n_layer: 2, n_head: 2, dropout: 0.0 }
    }

    fn model(seed: u64) -> Gpt {
        Gpt::new(&tiny(), &init_weights(&tiny(), seed), &Device::Cpu).unwrap()
    }

    fn tokens(rows: &[&[u32]]) -> Tensor {
        let t = rows[0].len();
        let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
        Tensor::from_vec(flat, (rows.len(), t), &Device::Cpu).unwrap()
    }

    #[test]
    fn every_parameter_receives_a_nonzero_gradient() {
        let (model, vars) = Gpt::trainable(&tiny(), &init_weights(&tiny(), 3), &Device::Cpu).unwrap();
        let x = tokens(&[&[1, 2, 3, 4, 5, 6, 7, 8], &[8, 7, 6, 5, 4, 3, 2, 1]]);
        let y = tokens(&[&[2, 3, 4, 5, 6, 7, 8, 9], &[7, 6, 5, 4, 3, 2, 1, 0]]);
        let grads = loss(&model.forward(&x, None).unwrap(), &y).unwrap().backward().unwrap();
        let names = describe(&tiny());
        assert_eq!(vars.len(), 4 + 12 * 2, "wte, wpe, ln_f (2) + 12 tensors per block");
        for ((var, _), spec) in vars.iter().zip(names.iter()) {
            let g = grads.get(var.as_tensor()).unwrap_or_else(|| panic!("{} has no gradient", spec.name));
            let norm = g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap();
            assert!(norm > 0.0 && norm.is_finite(), "{}: gradient norm² {norm}", spec.name);
        }
    }

    #[test]
    fn attention_is_causal() {
        let m = model(1);
        let a = m.forward(&tokens(&[&[1, 2, 3, 4, 5, 6]]), None).unwrap();
        let b = m.forward(&tokens(&[&[1, 2, 3, 9, 10, 0]]), None).unwrap();
        let (a, b) = (a.to_vec3::<f32>().unwrap(), b.to_vec3::<f32>().unwrap());
        assert_eq!(a[0][..3], b[0][..3], "positions 0..=2 must not see tokens 3..");
        assert_ne!(a[0][3], b[0][3]);
    }

    #[test]
    fn kv_cache_gives_the_full_forward_logits() {
        let m = model(5);
        let seq: &[u32] = &[3, 1, 4, 1, 5, 9, 2];
        let full = m.forward(&tokens(&[seq]), None).unwrap().to_vec3::<f32>().unwrap();
        let mut cache = KvCache::new(2);
        let first = m.forward_cached(&tokens(&[&seq[..4]]), &mut cache).unwrap();
        let mut rows = vec![first.to_vec2::<f32>().unwrap()[0].clone()];
        for &t in &seq[4..] {
            rows.push(
                m.forward_cached(&tokens(&[&[t]]), &mut cache).unwrap().to_vec2::<f32>().unwrap()[0].clone(),
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
        let m = Gpt::new(&cfg, &init_weights(&cfg, 0), &Device::Cpu).unwrap();
        let x = tokens(&[&[1, 2, 3]]);
        let run = |seed| {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            m.forward(&x, Some(Dropout { p: 0.5, rng: &mut rng })).unwrap().to_vec3::<f32>().unwrap()
        };
        assert_eq!(run(1), run(1));
        assert_ne!(run(1), run(2));
        assert_ne!(run(1), m.forward(&x, None).unwrap().to_vec3::<f32>().unwrap());
    }

    #[test]
    fn weights_round_trip_through_the_device() {
        let w = init_weights(&tiny(), 7);
        assert_eq!(Gpt::new(&tiny(), &w, &Device::Cpu).unwrap().weights().unwrap(), w);
    }

    /// A 0.02 M-parameter model memorises one fixed batch of 2 × 16 tokens: the loss starts near
    /// ln(32) ≈ 3.47 (uniform over the vocabulary) and must fall below 0.1 within 150 AdamW steps.
    #[test]
    fn loss_on_one_batch_falls_below_threshold() {
        let cfg = ModelConfig { vocab_size: 32, ctx: 16, d_model: 32, n_layer: 2, n_head: 4, dropout: 0.0 };
        let dev = Device::Cpu;
        let (model, vars) = Gpt::trainable(&cfg, &init_weights(&cfg, 0), &dev).unwrap();
        let tc = TrainConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..crate::config::Config::preset("smoke").unwrap().train
        };
        let mut opt = AdamW::new(vars, &tc).unwrap();
        let stream: Vec<u32> = (0..34).map(|i| (i * 7 + i / 3) % 32).collect();
        let x = Tensor::from_vec([&stream[0..16], &stream[17..33]].concat(), (2, 16), &dev).unwrap();
        let y = Tensor::from_vec([&stream[1..17], &stream[18..34]].concat(), (2, 16), &dev).unwrap();
        let mut losses = vec![];
        for _ in 0..150 {
            let l = loss(&model.forward(&x, None).unwrap(), &y).unwrap();
            losses.push(l.to_scalar::<f32>().unwrap());
            let grads = l.backward().unwrap();
            opt.step(&grads, tc.lr, 1.0).unwrap();
        }
        assert!((losses[0] - 32f32.ln()).abs() < 0.3, "initial loss {}", losses[0]);
        assert!(*losses.last().unwrap() < 0.1, "final loss {}", losses.last().unwrap());
    }
}
