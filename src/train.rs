//! Training: random windows of the token stream, AdamW (decay on weight matrices only), linear
//! warmup then cosine decay, global gradient-norm clipping, periodic evaluation on the real
//! validation split, the best-validation checkpoint kept (Shumailov's model selection), early
//! stopping, and a clear stop on a non-finite loss. One visible loop, as in nanoGPT's `train.py`.

use crate::config::TrainConfig;
use crate::model::engine::Engine;
use crate::model::score::stream_nats;
use crate::model::{save_weights, ModelConfig, Weights};
use anyhow::{bail, Result};
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
    /// At every evaluation: the step, the mean training loss since the previous evaluation, and
    /// the validation loss (the loss curve).
    #[serde(default)]
    pub curve: Vec<CurvePoint>,
}

/// One point of a loss curve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurvePoint {
    pub step: usize,
    pub train_loss: f64,
    pub valid_loss: f64,
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

    /// (inputs, targets), both (B, ctx) u32 row-major.
    pub fn next_batch(&mut self) -> (Vec<u32>, Vec<u32>) {
        let (mut x, mut y) =
            (Vec::with_capacity(self.batch * self.ctx), Vec::with_capacity(self.batch * self.ctx));
        for _ in 0..self.batch {
            let start = self.rng.random_range(0..=self.stream.len() - self.ctx - 1);
            x.extend_from_slice(&self.stream[start..start + self.ctx]);
            y.extend_from_slice(&self.stream[start + 1..start + self.ctx + 1]);
        }
        (x, y)
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

/// Trains a model of shape `cfg` starting from `init` on `train` with `engine`, and keeps the
/// checkpoint with the best loss on `valid` (scored in blocks of `block` tokens): on return the
/// selected weights are in `target.checkpoint`.
#[allow(clippy::too_many_arguments)]
pub fn train(
    engine: &Engine,
    cfg: &ModelConfig,
    init: &Weights,
    tc: &TrainConfig,
    train: &[u32],
    valid: &[u32],
    block: usize,
    seed: u64,
    target: &TrainTarget,
) -> Result<TrainSummary> {
    let ctx = cfg.ctx;
    let total = planned_steps(tc, ctx, train.len());
    let mut batcher = Batcher::new(train, ctx, tc.batch_size, seed)?;
    let mut trainer = engine.trainer(cfg, init, tc, seed)?;
    let bar = progress_bar(total as u64, target.quiet, &target.label);
    let started = Instant::now();
    let (mut best, mut best_step, mut since_best) = (f64::INFINITY, 0usize, 0usize);
    let (mut last_loss, mut stopped_early, mut steps) = (f64::NAN, false, 0usize);
    let (mut curve, mut since_eval) = (Vec::new(), (0.0f64, 0usize));
    let tokens_per_step = (tc.batch_size * ctx) as u64;

    for step in 0..total {
        let lr = lr_at(step, total, tc);
        let (x, y) = batcher.next_batch();
        let (loss_value, norm) = trainer.step(&x, &y, tc.batch_size, ctx, lr, tc)?;
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
        since_eval = (since_eval.0 + loss_value, since_eval.1 + 1);
        steps = step + 1;
        bar.inc(1);
        let tok_s = (steps as u64 * tokens_per_step) as f64 / started.elapsed().as_secs_f64();
        bar.set_message(format!("loss {loss_value:.3} | {tok_s:.0} tok/s | best valid {best:.3}"));

        if steps % tc.eval_interval == 0 || steps == total {
            let valid_loss =
                stream_nats(&mut trainer.scorer(), valid, block, tc.eval_blocks, engine.is_gpu())?.mean();
            curve.push(CurvePoint {
                step: steps,
                train_loss: since_eval.0 / since_eval.1.max(1) as f64,
                valid_loss,
            });
            since_eval = (0.0, 0);
            if valid_loss < best {
                (best, best_step, since_best) = (valid_loss, steps, 0);
                save_weights(cfg, &trainer.weights()?, target.checkpoint)?;
                crate::fault::point(&format!("train:{}", target.label));
            } else {
                since_best += 1;
                if tc.patience > 0 && since_best >= tc.patience && steps < total {
                    stopped_early = true;
                    break;
                }
            }
        }
    }
    bar.finish_and_clear();
    let wall_s = started.elapsed().as_secs_f64();
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
        curve,
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
        let (x, y) = Batcher::new(&stream, 8, 3, 1).unwrap().next_batch();
        assert_eq!((x.len(), y.len()), (24, 24));
        for (xr, yr) in x.chunks(8).zip(y.chunks(8)) {
            assert!(xr.iter().zip(yr).all(|(a, b)| b == &(a + 1)));
            assert!(xr.windows(2).all(|w| w[1] == w[0] + 1), "a window is contiguous");
        }
        let (x2, _) = Batcher::new(&stream, 8, 3, 1).unwrap().next_batch();
        assert_eq!(x, x2);
        assert!(Batcher::new(&stream[..5], 8, 3, 1).is_err());
    }
}
