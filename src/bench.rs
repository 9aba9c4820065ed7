//! `collapse-lab bench`: the lab's own training step (forward, loss, backward, clipping, AdamW) on
//! random tokens, with the same shapes and work as `../shared/bench/torch_gpt.py`, so the two can be
//! compared on one machine. Warm-up iterations, then the median of timed ones.

use crate::config::{Config, TrainConfig};
use crate::model::engine::Engine;
use crate::model::profile::{self, PhaseTime};
use crate::model::{init_weights, n_params, ModelConfig};
use anyhow::Result;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use std::time::Instant;

/// The word tokenizer's vocabulary on wikitext-2's train split (every word type, `<unk>` and the
/// end-of-text token).
pub const WIKITEXT2_WORDS: usize = 33_278;

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
            // A word-level preset (vocabulary 0 = every word type) has wikitext-2's 33,278 tokens.
            let vocab_size = if c.model.vocab_size == 0 { WIKITEXT2_WORDS } else { c.model.vocab_size };
            BenchShape {
                name: preset.into(),
                model: ModelConfig { dropout: 0.0, vocab_size, ..c.model },
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
    /// "fast" (the hand-written CPU path) or "candle" (autograd).
    pub engine: String,
    pub median_step_s: f64,
    pub tokens_per_s: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// With `profile`: the fast engine's phases over the timed iterations (their own wall time,
    /// summed over the iterations; [`crate::model::profile`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub phases: Option<Vec<PhaseTime>>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Benchmarks the training step of the lab (the same code `train` runs); with `profile` (the fast
/// engine only), also times the phases of the timed steps.
pub fn bench_train(
    shape: &BenchShape,
    warmup: usize,
    iters: usize,
    engine: &Engine,
    profile: bool,
) -> Result<TrainBench> {
    if profile && engine.name() != "fast" {
        return crate::config::usage(
            "--profile: only the fast CPU engine's step is profiled (use --device cpu)",
        );
    }
    let cfg = &shape.model;
    let tc =
        TrainConfig { lr: 3e-4, weight_decay: 0.1, beta1: 0.9, beta2: 0.95, ..Config::preset("cpu")?.train };
    let mut trainer = engine.trainer(cfg, &init_weights(cfg, 0), &tc, 0)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let (b, t) = (shape.batch, cfg.ctx);
    let (mut step, mut losses) = (vec![], vec![]);
    for i in 0..warmup + iters {
        let data: Vec<u32> = (0..b * (t + 1)).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect();
        let x: Vec<u32> = data.chunks(t + 1).flat_map(|r| r[..t].to_vec()).collect();
        let y: Vec<u32> = data.chunks(t + 1).flat_map(|r| r[1..].to_vec()).collect();
        if profile && i == warmup {
            profile::start();
        }
        let t0 = Instant::now();
        let stepped = trainer.step(&x, &y, b, t, tc.lr, &tc);
        let t1 = Instant::now();
        if profile && stepped.is_err() {
            profile::finish();
        }
        let (loss_v, _) = stepped?;
        losses.push(loss_v);
        if i >= warmup {
            step.push((t1 - t0).as_secs_f64());
        }
    }
    let phases = profile.then(profile::finish);
    let median_step_s = median(step);
    Ok(TrainBench {
        shape: shape.clone(),
        params: n_params(cfg),
        threads: threads(),
        engine: trainer.name().into(),
        median_step_s,
        tokens_per_s: (b * t) as f64 / median_step_s,
        first_loss: losses[0],
        last_loss: *losses.last().unwrap_or(&f64::NAN),
        phases,
    })
}

/// Threads candle's CPU kernels use (`RAYON_NUM_THREADS`, default: the number of cores).
pub fn threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

/// Timings of batched KV-cache sampling (temperature 1), as `torch_gpt.py sample` does it.
#[derive(Debug, Clone, Serialize)]
pub struct SampleBench {
    pub shape: BenchShape,
    pub params: usize,
    pub threads: usize,
    pub prompts: usize,
    pub prompt_len: usize,
    pub new: usize,
    pub median_s: f64,
    pub new_tokens_per_s: f64,
}

/// Benchmarks [`crate::sample::generate`]: `prompts` random prompts of `prompt_len` tokens, `new`
/// new tokens each, on a randomly initialised model.
pub fn bench_sample(
    shape: &BenchShape,
    prompts: usize,
    prompt_len: usize,
    new: usize,
    iters: usize,
    engine: &Engine,
) -> Result<SampleBench> {
    let cfg = &shape.model;
    anyhow::ensure!(prompt_len + new <= cfg.ctx, "--prompt-len + --new must fit the context ({})", cfg.ctx);
    let model = engine.load(cfg, &init_weights(cfg, 0))?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let data: Vec<Vec<u32>> = (0..prompts)
        .map(|_| (0..prompt_len).map(|_| rng.random_range(0..cfg.vocab_size as u32)).collect())
        .collect();
    let refs: Vec<&[u32]> = data.iter().map(Vec::as_slice).collect();
    let seeds: Vec<u64> = (0..prompts as u64).collect();
    let decoding = crate::sample::Decoding { sampler: crate::sampler::SamplerSettings::default(), beam: 0 };
    crate::sample::generate(&model, &refs, new, &decoding, &seeds)?; // warm-up
    let mut times = vec![];
    for _ in 0..iters {
        let t0 = Instant::now();
        crate::sample::generate(&model, &refs, new, &decoding, &seeds)?;
        times.push(t0.elapsed().as_secs_f64());
    }
    let median_s = median(times);
    Ok(SampleBench {
        shape: shape.clone(),
        params: n_params(cfg),
        threads: threads(),
        prompts,
        prompt_len,
        new,
        median_s,
        new_tokens_per_s: (prompts * new) as f64 / median_s,
    })
}
