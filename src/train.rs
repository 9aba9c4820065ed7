//! Training: random windows of the token stream, AdamW (decay on weight matrices only), linear
//! warmup then cosine decay, global gradient-norm clipping, periodic evaluation on the real
//! validation split, the best-validation checkpoint kept (Shumailov's model selection), early
//! stopping, and a clear stop on a non-finite loss. One visible loop, as in nanoGPT's `train.py`.

use crate::config::TrainConfig;
use crate::metrics::perplexity::stream_nats;
use crate::model::{self, Dropout, Gpt};
use crate::run_dir::write_atomic_with;
use anyhow::{bail, Context, Result};
use candle_core::{backprop::GradStore, Device, Tensor, Var};
use candle_nn::VarMap;
use indicatif::{ProgressBar, ProgressStyle};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::time::Instant;

/// What a training run did, saved in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainSummary {
    pub steps: usize,
    pub planned_steps: usize,
    pub tokens_seen: u64,
    /// tokens seen / tokens in the training stream.
    pub epochs: f64,
    pub train_tokens: u64,
    pub best_valid_loss: f64,
    pub best_step: usize,
    pub final_train_loss: f64,
    pub stopped_early: bool,
    pub wall_s: f64,
    pub tokens_per_s: f64,
}

/// The learning rate at `step` (0-based): linear warmup to `lr`, then cosine decay to `min_lr`.
pub fn lr_at(step: usize, total: usize, cfg: &TrainConfig) -> f64 {
    if step < cfg.warmup_steps {
        return cfg.lr * (step + 1) as f64 / cfg.warmup_steps as f64;
    }
    let span = total.saturating_sub(cfg.warmup_steps).max(1) as f64;
    let progress = ((step - cfg.warmup_steps) as f64 / span).min(1.0);
    cfg.min_lr + 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()) * (cfg.lr - cfg.min_lr)
}

/// Number of optimiser steps for a stream of `stream_len` tokens.
pub fn planned_steps(cfg: &TrainConfig, ctx: usize, stream_len: usize) -> usize {
    if cfg.max_steps > 0 {
        return cfg.max_steps;
    }
    let per_step = (cfg.batch_size * ctx) as f64;
    ((cfg.epochs * stream_len as f64) / per_step).ceil().max(1.0) as usize
}

/// Draws batches of random windows (`ctx` inputs + the next token as target) from a token stream.
pub struct Batcher<'a> {
    stream: &'a [u32],
    ctx: usize,
    batch: usize,
    rng: ChaCha8Rng,
}

impl<'a> Batcher<'a> {
    pub fn new(stream: &'a [u32], ctx: usize, batch: usize, seed: u64) -> Result<Self> {
        if stream.len() < ctx + 1 {
            bail!(
                "the training stream has {} tokens, fewer than one window of model.ctx + 1 = {}",
                stream.len(),
                ctx + 1
            );
        }
        Ok(Self { stream, ctx, batch, rng: ChaCha8Rng::seed_from_u64(seed) })
    }

    /// (inputs, targets), both (B, ctx) u32.
    pub fn next(&mut self, dev: &Device) -> candle_core::Result<(Tensor, Tensor)> {
        let (mut x, mut y) = (Vec::new(), Vec::new());
        for _ in 0..self.batch {
            let start = self.rng.random_range(0..=self.stream.len() - self.ctx - 1);
            x.extend_from_slice(&self.stream[start..start + self.ctx]);
            y.extend_from_slice(&self.stream[start + 1..start + self.ctx + 1]);
        }
        let shape = (self.batch, self.ctx);
        Ok((Tensor::from_vec(x, shape, dev)?, Tensor::from_vec(y, shape, dev)?))
    }
}

/// AdamW with decoupled weight decay applied only to parameters of rank ≥ 2.
pub struct AdamW {
    params: Vec<(Var, Tensor, Tensor, bool)>, // (param, m, v, decays)
    beta1: f64,
    beta2: f64,
    weight_decay: f64,
    t: i32,
}

impl AdamW {
    /// Parameters in name order, so the optimiser is deterministic.
    pub fn new(varmap: &VarMap, cfg: &TrainConfig) -> candle_core::Result<Self> {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        let mut named: Vec<(&String, &Var)> = data.iter().collect();
        named.sort_by(|a, b| a.0.cmp(b.0));
        let params = named
            .into_iter()
            .map(|(_, var)| {
                let zeros = var.as_tensor().zeros_like()?;
                Ok((var.clone(), zeros.clone(), zeros, var.as_tensor().rank() >= 2))
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { params, beta1: cfg.beta1, beta2: cfg.beta2, weight_decay: cfg.weight_decay, t: 0 })
    }

    /// Global L2 norm of all gradients.
    pub fn grad_norm(&self, grads: &GradStore) -> candle_core::Result<f64> {
        // One read-back for all parameters (on a GPU each read is a synchronisation).
        let mut sums = Vec::with_capacity(self.params.len());
        for (var, ..) in &self.params {
            if let Some(g) = grads.get(var.as_tensor()) {
                sums.push(g.sqr()?.sum_all()?.to_dtype(candle_core::DType::F64)?);
            }
        }
        if sums.is_empty() {
            return Ok(0.0);
        }
        Ok(Tensor::stack(&sums, 0)?.sum_all()?.to_scalar::<f64>()?.sqrt())
    }

    /// One update with learning rate `lr`, gradients multiplied by `grad_scale` (clipping).
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> candle_core::Result<()> {
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

/// What performs a training step: the hand-written CPU path ([`crate::fast`]) when it applies
/// (CPU, no dropout, `COLLAPSE_LAB_REFERENCE` unset), else candle autograd with [`AdamW`] (CUDA,
/// dropout, or the reference path on request).
pub enum Engine {
    Fast(Box<crate::fast::FastGpt>),
    Candle(AdamW),
}

impl Engine {
    pub fn new(model: &Gpt, varmap: &VarMap, cfg: &TrainConfig, dev: &Device) -> Result<Self> {
        Ok(
            if dev.is_cpu()
                && model.cfg.dropout == 0.0
                && std::env::var_os("COLLAPSE_LAB_REFERENCE").is_none()
            {
                Engine::Fast(Box::new(crate::fast::FastGpt::from_varmap(&model.cfg, varmap)?))
            } else {
                Engine::Candle(AdamW::new(varmap, cfg)?)
            },
        )
    }

    /// Forward, backward, clipping and AdamW on one batch; returns (loss, gradient norm before
    /// clipping). A non-finite loss or norm returns before the update.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        model: &Gpt,
        x: &Tensor,
        y: &Tensor,
        drop: Option<Dropout>,
        lr: f64,
        cfg: &TrainConfig,
    ) -> Result<(f64, f64)> {
        let clip =
            |norm: f64| if cfg.grad_clip > 0.0 && norm > cfg.grad_clip { cfg.grad_clip / norm } else { 1.0 };
        match self {
            Engine::Fast(f) => {
                let (b, t) = x.dims2()?;
                let loss =
                    f.forward_backward(&x.flatten_all()?.to_vec1()?, &y.flatten_all()?.to_vec1()?, b, t)
                        as f64;
                let norm = f.grad_norm();
                if loss.is_finite() && norm.is_finite() {
                    f.adamw(lr, clip(norm), cfg.beta1, cfg.beta2, cfg.weight_decay);
                }
                Ok((loss, norm))
            }
            Engine::Candle(opt) => {
                let loss = model::loss(&model.forward(x, drop)?, y)?;
                let loss_value = loss.to_scalar::<f32>()? as f64;
                let grads = loss.backward()?;
                let norm = opt.grad_norm(&grads)?;
                if loss_value.is_finite() && norm.is_finite() {
                    opt.step(&grads, lr, clip(norm))?;
                }
                Ok((loss_value, norm))
            }
        }
    }

    /// Makes the candle variables hold the current weights (before evaluation or a checkpoint).
    pub fn sync(&mut self, varmap: &VarMap) -> Result<()> {
        if let Engine::Fast(f) = self {
            f.store(varmap)?;
        }
        Ok(())
    }
}

/// Where and how quietly to train.
pub struct TrainTarget<'a> {
    /// The best checkpoint is written here (atomically) whenever validation improves.
    pub checkpoint: &'a Path,
    pub quiet: bool,
    /// Prefix of progress messages and errors, e.g. "generation 2".
    pub label: String,
}

/// Trains `model` (whose parameters live in `varmap`) on `train` and selects the checkpoint with the
/// best loss on `valid`. On return the best weights are in `target.checkpoint` and in `varmap`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    model: &Gpt,
    varmap: &VarMap,
    cfg: &TrainConfig,
    train: &[u32],
    valid: &[u32],
    block: usize,
    seed: u64,
    target: &TrainTarget,
    dev: &Device,
) -> Result<TrainSummary> {
    let ctx = model.cfg.ctx;
    let total = planned_steps(cfg, ctx, train.len());
    let mut batcher = Batcher::new(train, ctx, cfg.batch_size, seed)?;
    let mut dropout_rng = ChaCha8Rng::seed_from_u64(seed ^ 0x000d_20b0_u64);
    model::seed_device(dev, seed ^ 0x000d_20b0_u64)?;
    let mut engine = Engine::new(model, varmap, cfg, dev)?;
    let bar = progress_bar(total as u64, target.quiet, &target.label);
    let started = Instant::now();
    let (mut best, mut best_step, mut since_best) = (f64::INFINITY, 0usize, 0usize);
    let (mut last_loss, mut stopped_early, mut steps) = (f64::NAN, false, 0usize);
    let tokens_per_step = (cfg.batch_size * ctx) as u64;

    for step in 0..total {
        let lr = lr_at(step, total, cfg);
        let (x, y) = batcher.next(dev)?;
        let drop =
            (model.cfg.dropout > 0.0).then_some(Dropout { p: model.cfg.dropout, rng: &mut dropout_rng });
        let (loss_value, norm) = engine.step(model, &x, &y, drop, lr, cfg)?;
        if !loss_value.is_finite() || !norm.is_finite() {
            bar.abandon();
            let kept = if best_step > 0 {
                format!(
                    "the best checkpoint so far (step {best_step}) is kept in {}",
                    target.checkpoint.display()
                )
            } else {
                "no checkpoint had been written yet".to_string()
            };
            bail!(
                "{}: training diverged at step {} (loss {loss_value}, gradient norm {norm}); {kept} \
                 (try a lower train.lr)",
                target.label,
                step + 1,
            );
        }
        last_loss = loss_value;
        steps = step + 1;
        bar.inc(1);
        let tok_s = (steps as u64 * tokens_per_step) as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss_value:.3} | {tok_s:.0} tok/s | best valid {best:.3}"));

        if steps % cfg.eval_interval == 0 || steps == total {
            engine.sync(varmap)?;
            let valid_loss = stream_nats(&model.detached(), valid, block, cfg.eval_blocks, dev)?.mean();
            if valid_loss < best {
                (best, best_step, since_best) = (valid_loss, steps, 0);
                save_weights(varmap, target.checkpoint)?;
                crate::recursion::fault_point(&format!("train:{}", target.label));
            } else {
                since_best += 1;
                if cfg.patience > 0 && since_best >= cfg.patience && steps < total {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
    // Continue from the selected checkpoint, not from the last step.
    load_weights(varmap, target.checkpoint)?;
    let tokens_seen = steps as u64 * tokens_per_step;
    Ok(TrainSummary {
        steps,
        planned_steps: total,
        tokens_seen,
        epochs: tokens_seen as f64 / train.len() as f64,
        train_tokens: train.len() as u64,
        best_valid_loss: best,
        best_step,
        final_train_loss: last_loss,
        stopped_early,
        wall_s,
        tokens_per_s: tokens_seen as f64 / wall_s,
    })
}

fn progress_bar(len: u64, quiet: bool, label: &str) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let style = ProgressStyle::with_template(&format!(
        "{label} train {{bar:30}} {{pos}}/{{len}} steps | {{msg}} | ETA {{eta}}"
    ))
    .expect("valid progress template");
    bar.set_style(style);
    bar
}

/// Writes every variable of `varmap` to `path` as safetensors, atomically.
pub fn save_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    write_atomic_with(path, |tmp| varmap.save(tmp).map_err(anyhow::Error::from))
}

/// Loads `path` into the variables of `varmap`, naming the file when it is missing, truncated or
/// does not match the model.
pub fn load_weights(varmap: &VarMap, path: &Path) -> Result<()> {
    let mut varmap = varmap.clone();
    varmap.load(path).with_context(|| {
        format!(
            "cannot load weights from {} (missing, truncated, or not this model's shapes)",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> TrainConfig {
        crate::config::Config::preset("smoke").unwrap().train
    }

    #[test]
    fn schedule_warms_up_then_decays_to_min() {
        let c = TrainConfig { lr: 1.0, min_lr: 0.1, warmup_steps: 10, ..cfg() };
        assert!((lr_at(0, 110, &c) - 0.1).abs() < 1e-12);
        assert!((lr_at(9, 110, &c) - 1.0).abs() < 1e-12);
        assert!((lr_at(10, 110, &c) - 1.0).abs() < 1e-12);
        assert!((lr_at(60, 110, &c) - 0.55).abs() < 1e-12); // halfway: min + 0.5·(lr − min)
        assert!((lr_at(110, 110, &c) - 0.1).abs() < 1e-12);
    }

    #[test]
    fn steps_follow_epochs_unless_fixed() {
        let c = TrainConfig { max_steps: 0, epochs: 2.0, batch_size: 4, ..cfg() };
        assert_eq!(planned_steps(&c, 10, 100), 5); // 200 tokens / 40 per step
        assert_eq!(planned_steps(&TrainConfig { max_steps: 7, ..c }, 10, 100), 7);
    }

    #[test]
    fn batches_are_shifted_windows_and_reproducible() {
        let stream: Vec<u32> = (0..50).collect();
        let dev = Device::Cpu;
        let (x, y) = Batcher::new(&stream, 8, 3, 1).unwrap().next(&dev).unwrap();
        let (x, y) = (x.to_vec2::<u32>().unwrap(), y.to_vec2::<u32>().unwrap());
        for (xr, yr) in x.iter().zip(&y) {
            assert!(xr.iter().zip(yr).all(|(a, b)| b == &(a + 1)));
        }
        let (x2, _) = Batcher::new(&stream, 8, 3, 1).unwrap().next(&dev).unwrap();
        assert_eq!(x, x2.to_vec2::<u32>().unwrap());
        assert!(Batcher::new(&stream[..5], 8, 3, 1).is_err());
    }
}

#[cfg(test)]
mod overfit {
    use super::*;
    use crate::model::{init_model, ModelConfig};

    /// A 0.02 M-parameter model memorises one fixed batch of 2 × 16 tokens: the loss starts near
    /// ln(32) ≈ 3.47 (uniform over the vocabulary) and must fall below 0.1 within 150 AdamW steps.
    #[test]
    fn loss_on_one_batch_falls_below_threshold() {
        let cfg = ModelConfig { vocab_size: 32, ctx: 16, d_model: 32, n_layer: 2, n_head: 4, dropout: 0.0 };
        let dev = Device::Cpu;
        let (model, varmap) = init_model(&cfg, 0, &dev).unwrap();
        let tc = TrainConfig {
            lr: 1e-2,
            weight_decay: 0.0,
            ..crate::config::Config::preset("smoke").unwrap().train
        };
        let mut opt = AdamW::new(&varmap, &tc).unwrap();
        let stream: Vec<u32> = (0..34).map(|i| (i * 7 + i / 3) % 32).collect();
        let x = Tensor::from_vec([&stream[0..16], &stream[17..33]].concat(), (2, 16), &dev).unwrap();
        let y = Tensor::from_vec([&stream[1..17], &stream[18..34]].concat(), (2, 16), &dev).unwrap();
        let mut losses = vec![];
        for _ in 0..150 {
            let l = model::loss(&model.forward(&x, None).unwrap(), &y).unwrap();
            losses.push(l.to_scalar::<f32>().unwrap());
            let grads = l.backward().unwrap();
            opt.step(&grads, tc.lr, 1.0).unwrap();
        }
        assert!((losses[0] - 32f32.ln()).abs() < 0.3, "initial loss {}", losses[0]);
        assert!(*losses.last().unwrap() < 0.1, "final loss {}", losses.last().unwrap());
    }
}
