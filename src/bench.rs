//! `collapse-lab bench`: the lab's own training step (forward, loss, backward, clipping, AdamW) on
//! random tokens, with the same shapes and work as `../shared/bench/torch_gpt.py`, so the two can be
//! compared on one machine. Warm-up iterations, then the median of timed ones.

use crate::config::{Config, TrainConfig};
use crate::model::{self, init_model, ModelConfig};
use crate::train::AdamW;
use anyhow::Result;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// A benchmark shape: the model and the batch.
#[derive(Debug, Clone, Serialize)]
pub struct BenchShape {
    pub name: String,
    pub model: ModelConfig,
    pub batch: usize,
}

/// Config A and B of torch_gpt.py, or a preset's model.
pub fn shape(name: &str) -> Result<BenchShape> {
    let m = |vocab_size, ctx, d_model, n_layer, n_head| ModelConfig {
        vocab_size,
        ctx,
        d_model,
        n_layer,
        n_head,
        dropout: 0.0,
    };
    Ok(match name {
        "A" | "a" => BenchShape { name: "A".into(), model: m(8192, 128, 256, 4, 4), batch: 16 },
        "B" | "b" => BenchShape { name: "B".into(), model: m(4096, 64, 128, 2, 4), batch: 32 },
        preset => {
            let c = Config::preset(preset)?;
            BenchShape {
                name: preset.into(),
                model: ModelConfig { dropout: 0.0, ..c.model },
                batch: c.train.batch_size,
            }
        }
    })
}

/// Timings of the training step, medians over `iters` after `warmup`.
#[derive(Debug, Clone, Serialize)]
pub struct TrainBench {
    pub shape: BenchShape,
    pub params: usize,
    pub threads: usize,
    pub median_step_s: f64,
    pub median_forward_s: f64,
    pub median_backward_s: f64,
    pub median_optimizer_s: f64,
    pub tokens_per_s: f64,
    pub first_loss: f64,
    pub last_loss: f64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Benchmarks the training step of the lab (the same code `train` runs).
pub fn bench_train(shape: &BenchShape, warmup: usize, iters: usize, dev: &Device) -> Result<TrainBench> {
    let cfg = &shape.model;
    let (model, varmap) = init_model(cfg, 0, dev)?;
    let tc =
        TrainConfig { lr: 3e-4, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, ..Config::preset("cpu")?.train };
    let mut opt = AdamW::new(&varmap, &tc)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (shape.batch, cfg.ctx);
    let (mut step, mut fwd, mut bwd, mut optim, mut losses) = (vec![], vec![], vec![], vec![], vec![]);
    for i in 0..warmup + iters {
        let data: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        let data = Tensor::from_vec(data, (b, t + 1), dev)?;
        let (x, y) = (data.narrow(1, 0, t)?, data.narrow(1, 1, t)?.contiguous()?);
        let t0 = Instant::now();
        let loss = model::loss(&model.forward(&x, None)?, &y)?;
        let loss_v = loss.to_scalar::<f32>()? as f64;
        let t1 = Instant::now();
        let grads = loss.backward()?;
        let t2 = Instant::now();
        let norm = opt.grad_norm(&grads)?;
        opt.step(&grads, tc.lr, if norm > 1.0 { 1.0 / norm } else { 1.0 })?;
        let t3 = Instant::now();
        losses.push(loss_v);
        if i >= warmup {
            step.push((t3 - t0).as_secs_f64());
            fwd.push((t1 - t0).as_secs_f64());
            bwd.push((t2 - t1).as_secs_f64());
            optim.push((t3 - t2).as_secs_f64());
        }
    }
    let median_step_s = median(step);
    Ok(TrainBench {
        shape: shape.clone(),
        params: cfg.n_params(),
        threads: threads(),
        median_step_s,
        median_forward_s: median(fwd),
        median_backward_s: median(bwd),
        median_optimizer_s: median(optim),
        tokens_per_s: (b * t) as f64 / median_step_s,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
    })
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, default: the number of cores).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}
