//! Which engine runs the model: the one place that decides. On the CPU the hand-written kernels of
//! [`super::fast`]; on a GPU, or on the CPU with `COLLAPSE_LAB_REFERENCE=1` (the plain reference
//! path, for checks), candle's ops ([`super::candle`]). Everything that trains, scores or samples
//! takes an [`Engine`] and gets a [`Model`], a [`Trainer`], a [`Scorer`] or a [`Decoder`] from it.

use super::candle::{self as reference, AdamW, Dropout, Gpt, KvCache};
use super::fast;
use super::ops::Compute;
use super::profile::phase;
use super::{ModelConfig, Weights};
use crate::config::TrainConfig;
use crate::kernels::{Kernels, Precision};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The engine that runs every model of a command.
#[derive(Debug, Clone)]
pub enum Engine {
    /// The hand-written CPU engine, its products on these kernels and in this precision (training;
    /// measurements are f32).
    Fast(Compute),
    /// candle's ops on a device (CUDA, or the CPU reference path).
    Candle(Device),
}

impl Engine {
    /// The engine for `device`: the fast kernels on the CPU unless `COLLAPSE_LAB_REFERENCE` is set,
    /// candle elsewhere.
    pub fn new(device: Device) -> Self {
        if device.is_cpu() && std::env::var_os("COLLAPSE_LAB_REFERENCE").is_none() {
            Engine::Fast(Compute::fp32())
        } else {
            Engine::Candle(device)
        }
    }

    /// The fast CPU engine (or the reference path when `COLLAPSE_LAB_REFERENCE` is set).
    pub fn cpu() -> Self {
        Self::new(Device::Cpu)
    }

    /// The same engine on `kernels` (e.g. as `COLLAPSE_LAB_KERNELS` chose them) with training's
    /// products in `precision`. bf16 needs the fast engine on a CPU with a bf16 kernel;
    /// fp32-bf16-head-grad runs the head's gradient in f32 where there is none (another engine, a
    /// CPU without AVX512-BF16 or AMX-BF16, or kernels forced down) and says so once: the default
    /// preset uses it, and a run must not fail for want of an optional speed-up. What it ran in
    /// is recorded with what it trains ([`Self::precision_name`]).
    pub fn with(self, kernels: Kernels, precision: crate::config::Precision) -> Result<Self> {
        use crate::config::Precision as P;
        let fallback = |why: String| {
            static NOTE: std::sync::Once = std::sync::Once::new();
            NOTE.call_once(|| {
                eprintln!(
                    "note: train.precision = fp32-bf16-head-grad: {why}; the head's gradient runs in fp32"
                )
            });
        };
        match (self, precision) {
            (Engine::Fast(_), P::Fp32) => Ok(Engine::Fast(Compute::new(kernels, Precision::F32))),
            (Engine::Fast(_), P::Bf16) if kernels.bf16().is_some() => {
                Ok(Engine::Fast(Compute::new(kernels, Precision::Bf16)))
            }
            (Engine::Fast(_), P::Bf16) => crate::config::usage(format!(
                "train.precision = bf16 needs a CPU with AVX512-BF16 or AMX-BF16; this one has {} (use fp32)",
                kernels.describe()
            )),
            (Engine::Fast(_), P::Fp32Bf16HeadGrad) => {
                let head_grad = if kernels.bf16().is_some() {
                    Precision::Bf16
                } else {
                    fallback(format!("this CPU has {}, no bf16 kernel", kernels.describe()));
                    Precision::F32
                };
                Ok(Engine::Fast(Compute { head_grad, ..Compute::new(kernels, Precision::F32) }))
            }
            (Engine::Candle(_), P::Bf16) => crate::config::usage(
                "train.precision = bf16 runs on the fast CPU engine only (use fp32 with --device cuda)",
            ),
            (Engine::Candle(d), P::Fp32Bf16HeadGrad) => {
                fallback(format!("candle on {d:?} trains in fp32 only"));
                Ok(Engine::Candle(d))
            }
            (candle, P::Fp32) => Ok(candle),
        }
    }

    /// The same engine with training's products in `precision` (a run's `train.precision`).
    pub fn with_precision(self, precision: crate::config::Precision) -> Result<Self> {
        let kernels = match &self {
            Engine::Fast(c) => c.kernels,
            Engine::Candle(_) => Kernels::detect(),
        };
        self.with(kernels, precision)
    }

    /// The kernels and precision of the fast engine (what `bench` prints).
    pub fn describe(&self) -> String {
        match self {
            Engine::Fast(c) => {
                let head = if c.head_grad != c.precision { " (the head's gradient in bf16)" } else { "" };
                format!("fast engine, {}, training in {:?}{head}", c.kernels.describe(), c.precision)
            }
            Engine::Candle(d) => format!("candle on {d:?}"),
        }
    }

    pub fn device(&self) -> Device {
        match self {
            Engine::Fast(_) => Device::Cpu,
            Engine::Candle(d) => d.clone(),
        }
    }

    /// A GPU wants wide batches to be busy.
    pub fn is_gpu(&self) -> bool {
        !self.device().is_cpu()
    }

    /// The `train.precision` this engine actually trains in: fp32-bf16-head-grad that fell back is
    /// fp32 (a base's spec records this, so the same arithmetic gets the same cache key).
    pub fn effective_precision(&self) -> crate::config::Precision {
        use crate::config::Precision as P;
        match self {
            Engine::Fast(c) if c.precision == Precision::Bf16 => P::Bf16,
            Engine::Fast(c) if c.head_grad == Precision::Bf16 => P::Fp32Bf16HeadGrad,
            _ => P::Fp32,
        }
    }

    /// The engine and its arithmetic, as recorded with what it trains (a base's cache key).
    pub fn precision_name(&self) -> &'static str {
        match self {
            // Named for its batch sums by blocks of rows (53e173c), which changed its bytes: a
            // base cached by an earlier version under "fast-bf16" is not reused.
            Engine::Fast(c) if c.precision == Precision::Bf16 => "fast-bf16-blocked-sums",
            Engine::Fast(c) if c.head_grad == Precision::Bf16 => "fast-fp32-bf16-head-grad",
            Engine::Fast(_) => "fast-fp32",
            Engine::Candle(d) if d.is_cpu() => "candle-cpu-fp32",
            Engine::Candle(_) => "candle-cuda-fp32",
        }
    }

    /// "fast" or "candle" (what `bench` prints).
    pub fn name(&self) -> &'static str {
        match self {
            Engine::Fast(_) => "fast",
            Engine::Candle(_) => "candle",
        }
    }

    /// A model holding `weights`, ready for scoring and sampling.
    pub fn load(&self, cfg: &ModelConfig, weights: &Weights) -> Result<Model> {
        Ok(match self {
            // Sampling multiplies in the engine's precision; scoring is always f32.
            Engine::Fast(c) => Model::Fast(fast::Model::new(*c, cfg, weights)),
            Engine::Candle(dev) => Model::Candle(Gpt::new(cfg, weights, dev)?),
        })
    }

    /// A trainer starting from `weights`. The fast engine has no dropout, so a model with dropout
    /// trains on candle's ops on the same device. `seed` seeds the dropout masks.
    pub fn trainer(
        &self,
        cfg: &ModelConfig,
        weights: &Weights,
        tc: &TrainConfig,
        seed: u64,
    ) -> Result<Trainer> {
        if let Engine::Fast(c) = self {
            if cfg.dropout == 0.0 {
                return Ok(Trainer::Fast(Box::new(fast::Trainer::new(*c, cfg, weights))));
            }
        }
        let dev = self.device();
        let (model, vars) = Gpt::trainable(cfg, weights, &dev)?;
        let dropout_seed = seed ^ 0x000d_20b0_u64;
        reference::seed_device(&dev, dropout_seed)?;
        Ok(Trainer::Candle(Box::new(CandleTrainer {
            model,
            opt: AdamW::new(vars, tc)?,
            rng: ChaCha8Rng::seed_from_u64(dropout_seed),
            dev,
        })))
    }
}

/// A model for inference on one engine.
#[derive(Clone)]
pub enum Model {
    Fast(fast::Model),
    Candle(Gpt),
}

impl Model {
    pub fn cfg(&self) -> &ModelConfig {
        match self {
            Model::Fast(m) => &m.cfg,
            Model::Candle(m) => &m.cfg,
        }
    }

    pub fn is_gpu(&self) -> bool {
        matches!(self, Model::Candle(m) if !m.device().is_cpu())
    }

    /// The weights, on the host.
    pub fn weights(&self) -> Result<Weights> {
        Ok(match self {
            Model::Fast(m) => m.weights(),
            Model::Candle(m) => m.weights()?,
        })
    }

    /// Computes the NLL of target tokens, batch by batch.
    pub fn scorer(&self) -> Scorer<'_> {
        match self {
            Model::Fast(m) => Scorer::Fast(Box::new(m.scorer())),
            Model::Candle(m) => Scorer::Candle(m.clone()),
        }
    }

    /// A KV-cache decoder for `rows` sequences that advance together.
    pub fn decoder(&self, rows: usize) -> Decoder<'_> {
        match self {
            Model::Fast(m) => Decoder::Fast(Box::new(m.decoder(rows))),
            Model::Candle(m) => Decoder::Candle { model: m, cache: KvCache::new(m.cfg.n_layer) },
        }
    }
}

/// Scores batches of equal-length sequences.
pub enum Scorer<'a> {
    Fast(Box<fast::Scorer<'a>>),
    Candle(Gpt),
}

impl Scorer<'_> {
    /// inputs, targets: (B, T) row-major → the NLL of each target, (B·T).
    pub fn nlls(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Result<Vec<f32>> {
        match self {
            Scorer::Fast(s) => Ok(s.nlls(inputs, targets, b, t)),
            Scorer::Candle(m) => {
                let dev = m.device().clone();
                let x = Tensor::from_slice(inputs, (b, t), &dev)?; // (B, T)
                let y = Tensor::from_slice(targets, (b, t), &dev)?; // (B, T)
                let logits = m.forward(&x, None)?; // (B, T, V)
                let logp = candle_nn::ops::log_softmax(&logits, candle_core::D::Minus1)?; // (B, T, V)
                let nll = logp.gather(&y.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?; // (B, T)
                Ok(nll.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }
}

/// Extends a batch of rows by some tokens and returns each row's next-token logits.
pub enum Decoder<'a> {
    Fast(Box<fast::Decoder<'a>>),
    Candle { model: &'a Gpt, cache: KvCache },
}

impl Decoder<'_> {
    /// tokens: one slice per row, all of one length → logits (rows, V), row-major.
    pub fn forward(&mut self, tokens: &[&[u32]]) -> Result<Vec<f32>> {
        let t = tokens[0].len();
        if tokens.iter().any(|r| r.len() != t) {
            bail!("all rows of a decoding step must have the same length");
        }
        let flat: Vec<u32> = tokens.iter().flat_map(|r| r.iter().copied()).collect();
        match self {
            Decoder::Fast(d) => Ok(d.forward(&flat, t)),
            Decoder::Candle { model, cache } => {
                let x = Tensor::from_vec(flat, (tokens.len(), t), model.device())?;
                let logits = model.forward_cached(&x, cache)?; // (B, V)
                Ok(logits.flatten_all()?.to_vec1::<f32>()?)
            }
        }
    }

    /// The new row i continues old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[usize]) -> Result<()> {
        match self {
            Decoder::Fast(d) => d.select_rows(rows),
            Decoder::Candle { model, cache } => {
                let idx: Vec<u32> = rows.iter().map(|&r| r as u32).collect();
                cache.select_rows(&Tensor::from_vec(idx, rows.len(), model.device())?)?;
            }
        }
        Ok(())
    }
}

/// candle autograd with [`AdamW`], and dropout when the model has it.
pub struct CandleTrainer {
    model: Gpt,
    opt: AdamW,
    rng: ChaCha8Rng,
    dev: Device,
}

/// Performs training steps on one engine.
pub enum Trainer {
    Fast(Box<fast::Trainer>),
    Candle(Box<CandleTrainer>),
}

impl Trainer {
    pub fn name(&self) -> &'static str {
        match self {
            Trainer::Fast(_) => "fast",
            Trainer::Candle(_) => "candle",
        }
    }

    /// Forward, backward, clipping and AdamW on one batch (x, y: (B, T) row-major); returns (loss,
    /// gradient norm before clipping). A non-finite loss or norm returns before the update.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        x: &[u32],
        y: &[u32],
        b: usize,
        t: usize,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<(f64, f64)> {
        let clip =
            |norm: f64| if cfg.grad_clip > 0.0 && norm > cfg.grad_clip { cfg.grad_clip / norm } else { 1.0 };
        match self {
            Trainer::Fast(f) => {
                let loss = f.forward_backward(x, y, b, t) as f64;
                let norm = phase("gradient norm", || f.grad_norm());
                if loss.is_finite() && norm.is_finite() {
                    phase("AdamW", || f.adamw(lr, clip(norm), cfg.beta1, cfg.beta2, cfg.weight_decay));
                }
                Ok((loss, norm))
            }
            Trainer::Candle(c) => {
                let xt = Tensor::from_slice(x, (b, t), &c.dev)?;
                let yt = Tensor::from_slice(y, (b, t), &c.dev)?;
                let p = c.model.cfg.dropout;
                let drop = (p > 0.0).then_some(Dropout { p, rng: &mut c.rng });
                let loss = reference::loss(&c.model.forward(&xt, drop)?, &yt)?;
                let loss_value = loss.to_scalar::<f32>()? as f64;
                let grads = loss.backward()?;
                let norm = c.opt.grad_norm(&grads)?;
                if loss_value.is_finite() && norm.is_finite() {
                    c.opt.step(&grads, lr, clip(norm))?;
                }
                Ok((loss_value, norm))
            }
        }
    }

    /// A scorer on the current weights.
    pub fn scorer(&self) -> Scorer<'_> {
        match self {
            Trainer::Fast(f) => Scorer::Fast(Box::new(f.scorer())),
            Trainer::Candle(c) => Scorer::Candle(c.model.detached()),
        }
    }

    /// The current weights, on the host.
    pub fn weights(&self) -> Result<Weights> {
        Ok(match self {
            Trainer::Fast(f) => f.weights(),
            Trainer::Candle(c) => c.model.weights()?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Precision as P;

    /// What each `train.precision` runs in on the fast engine: fp32-bf16-head-grad puts the head's
    /// gradient in bf16 only where a bf16 kernel exists and falls back to fp32 (recorded as
    /// "fast-fp32" and effectively fp32, so its base is the fp32 one) where the kernels are capped
    /// at AVX2;
    /// bf16 without a kernel is a usage error, not a fallback.
    #[test]
    fn precision_values_pick_the_products_and_record_them() {
        let fast = || Engine::Fast(Compute::fp32());
        let avx2 = Kernels::parse("avx2").unwrap();
        assert_eq!(avx2.bf16(), None);
        let e = fast().with(avx2, P::Fp32Bf16HeadGrad).unwrap();
        assert_eq!((e.precision_name(), e.effective_precision()), ("fast-fp32", P::Fp32));
        assert!(
            matches!(e, Engine::Fast(c) if c.head_grad == Precision::F32 && c.precision == Precision::F32)
        );
        let err = fast().with(avx2, P::Bf16).unwrap_err();
        assert!(err.downcast_ref::<crate::config::UsageError>().is_some(), "{err:#}");
        assert_eq!(fast().with(avx2, P::Fp32).unwrap().precision_name(), "fast-fp32");
        let best = Kernels::detect();
        if best.bf16().is_none() {
            eprintln!("skipped: the bf16 half of precision_values_pick_the_products_and_record_them: this CPU has {}", best.describe());
            return;
        }
        let e = fast().with(best, P::Fp32Bf16HeadGrad).unwrap();
        assert_eq!(
            (e.precision_name(), e.effective_precision()),
            ("fast-fp32-bf16-head-grad", P::Fp32Bf16HeadGrad)
        );
        assert!(
            matches!(e, Engine::Fast(c) if c.head_grad == Precision::Bf16 && c.precision == Precision::F32)
        );
        assert_eq!(fast().with(best, P::Bf16).unwrap().precision_name(), "fast-bf16-blocked-sums");
    }
}
