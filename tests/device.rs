//! The same model on every device: each check runs on the CPU and, in a build with `--features
//! cuda`, again on CUDA device 0 (candle's `test_device!` pattern). The reference is always the CPU:
//! on the CPU the candle ops are checked against the hand-written kernels of `fast.rs` (what CPU
//! training and sampling run), on CUDA candle's CUDA ops against the CPU.
//!
//! Tolerance for float32 values: |device − reference| ≤ 1e-4 + 1e-4·|reference|. Both sides compute
//! in float32 with different reduction orders (cuBLAS, rayon-split gemm), which gives differences of
//! order 1e-6 on these shapes; a wrong kernel is off by far more.

use candle_core::{DType, Device, Tensor, D};
use collapse_lab::config::{Config, TrainConfig};
use collapse_lab::model::candle::{seed_device, Dropout, Gpt, KvCache};
use collapse_lab::model::engine::{Engine, Model};
use collapse_lab::model::ops::Compute;
use collapse_lab::model::score::sequence_nlls;
use collapse_lab::model::{fast, init_weights, ModelConfig};
use collapse_lab::sample::{generate, Decoding};
use collapse_lab::sampler::SamplerSettings;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `$check(&Device)` as `$check::cpu` and, with the `cuda` feature, `$check::cuda`.
macro_rules! test_device {
    ($check:ident) => {
        mod $check {
            #[test]
            fn cpu() {
                super::$check(&candle_core::Device::Cpu)
            }

            #[cfg(feature = "cuda")]
            #[test]
            fn cuda() {
                super::$check(&candle_core::Device::new_cuda(0).expect("CUDA device 0"))
            }
        }
    };
}

fn cfg() -> ModelConfig {
    ModelConfig { vocab_size: 97, ctx: 24, d_model: 32, n_layer: 2, n_head: 4, dropout: 0.0 }
}

fn random_rows(rows: usize, len: usize, vocab: usize, seed: u64) -> Vec<Vec<u32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..rows).map(|_| (0..len).map(|_| rng.random_range(0..vocab as u32)).collect()).collect()
}

fn tensor(rows: &[Vec<u32>], dev: &Device) -> Tensor {
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Tensor::from_vec(flat, (rows.len(), rows[0].len()), dev).unwrap()
}

fn assert_close(what: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(g.is_finite(), "{what}[{i}] is {g}");
        assert!((g - w).abs() <= 1e-4 + 1e-4 * w.abs(), "{what}[{i}]: {g} on the device, {w} on the CPU");
    }
}

/// Initial weights are drawn on the host from the seed, so every device starts from the same model.
/// On the CPU this is the fast engine (what CPU runs use), on CUDA candle's ops.
fn model_on(dev: &Device, seed: u64) -> Model {
    Engine::new(dev.clone()).load(&cfg(), &init_weights(&cfg(), seed)).unwrap()
}

/// The candle model on `dev` (the reference path on the CPU).
fn candle_on(dev: &Device, seed: u64) -> Gpt {
    Gpt::new(&cfg(), &init_weights(&cfg(), seed), dev).unwrap()
}

fn per_token_nll_matches_the_cpu_reference(dev: &Device) {
    let seqs = random_rows(5, 21, cfg().vocab_size, 1);
    let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
    // Device: what evaluation runs there (fast kernels on the CPU, candle's ops on CUDA).
    let got: Vec<f32> = sequence_nlls(&mut model_on(dev, 7).scorer(), &refs, 2).unwrap().concat();
    // Reference: candle's log-softmax of the full forward on the CPU.
    let cpu = candle_on(&Device::Cpu, 7);
    let inputs: Vec<Vec<u32>> = seqs.iter().map(|s| s[..20].to_vec()).collect();
    let targets: Vec<Vec<u32>> = seqs.iter().map(|s| s[1..].to_vec()).collect();
    let logp =
        candle_nn::ops::log_softmax(&cpu.forward(&tensor(&inputs, &Device::Cpu), None).unwrap(), D::Minus1)
            .unwrap(); // (5, 20, V)
    let want = logp
        .gather(&tensor(&targets, &Device::Cpu).unsqueeze(2).unwrap(), 2)
        .unwrap()
        .neg()
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert_eq!(got.len(), 5 * 20);
    assert_close("per-token NLL", &got, &want);
    // A random 97-way model predicts at about ln 97 = 4.57 nats per token.
    let mean = got.iter().sum::<f32>() / got.len() as f32;
    assert!((mean - 97f32.ln()).abs() < 0.1, "mean NLL {mean}");
}
test_device!(per_token_nll_matches_the_cpu_reference);

fn kv_cache_logits_match_the_cpu_reference(dev: &Device) {
    // Device: candle's KV-cache forward (what sampling runs on CUDA): a 12-token prefill, then 6
    // single-token steps. Reference: the hand-written CPU decoder on the same weights and tokens.
    let rows = random_rows(3, 18, cfg().vocab_size, 2);
    let model = candle_on(dev, 9);
    let mut cache = KvCache::new(cfg().n_layer);
    let cpu = fast::Model::new(Compute::fp32(), &cfg(), &init_weights(&cfg(), 9));
    let mut fast = cpu.decoder(3);
    let prefill: Vec<Vec<u32>> = rows.iter().map(|r| r[..12].to_vec()).collect();
    let got = model.forward_cached(&tensor(&prefill, dev), &mut cache).unwrap();
    let want = fast.forward(&prefill.concat(), 12);
    assert_close("prefill logits", &got.flatten_all().unwrap().to_vec1::<f32>().unwrap(), &want);
    for pos in 12..18 {
        let step: Vec<Vec<u32>> = rows.iter().map(|r| vec![r[pos]]).collect();
        let got = model.forward_cached(&tensor(&step, dev), &mut cache).unwrap(); // (3, V)
        let want = fast.forward(&step.concat(), 1);
        assert_close(
            &format!("logits after position {pos}"),
            &got.flatten_all().unwrap().to_vec1().unwrap(),
            &want,
        );
    }
    assert_eq!(cache.len(), 18);
}
test_device!(kv_cache_logits_match_the_cpu_reference);

fn a_training_step_matches_the_cpu_reference(dev: &Device) {
    // Device: candle autograd + the lab's AdamW (what training runs on CUDA). Reference: the
    // hand-written forward/backward and AdamW of fast.rs on the CPU. Two steps on one batch: the
    // first loss checks the forward, the gradient norms the backward, the second loss the update.
    let tc = TrainConfig {
        lr: 1e-3,
        weight_decay: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        ..Config::preset("smoke").unwrap().train
    };
    let data = random_rows(4, 25, cfg().vocab_size, 3);
    let x: Vec<Vec<u32>> = data.iter().map(|r| r[..24].to_vec()).collect();
    let y: Vec<Vec<u32>> = data.iter().map(|r| r[1..].to_vec()).collect();

    let w0 = init_weights(&cfg(), 11);
    let mut trainer = Engine::Candle(dev.clone()).trainer(&cfg(), &w0, &tc, 0).unwrap();
    let mut reference = Engine::Fast(Compute::fp32()).trainer(&cfg(), &w0, &tc, 0).unwrap();
    assert_eq!((trainer.name(), reference.name()), ("candle", "fast"));
    let (x, y) = (x.concat(), y.concat());

    let mut got = vec![];
    let mut want = vec![];
    for _ in 0..2 {
        let (l, n) = trainer.step(&x, &y, 4, 24, tc.lr, &tc).unwrap();
        got.extend([l as f32, n as f32]);
        let (l, n) = reference.step(&x, &y, 4, 24, tc.lr, &tc).unwrap();
        want.extend([l as f32, n as f32]);
    }
    assert_close("[loss 1, grad norm 1, loss 2, grad norm 2]", &got, &want);
    assert!(got[2] < got[0], "one AdamW step on a batch lowers its loss: {} then {}", got[0], got[2]);
    assert!((got[0] - 97f32.ln()).abs() < 0.1, "initial loss {} ≈ ln 97", got[0]);
}
test_device!(a_training_step_matches_the_cpu_reference);

fn sampling_matches_the_cpu(dev: &Device) {
    // Sampling at temperature 1 with per-prompt seeds, and beam search, give the CPU's tokens: the
    // logits agree to ~1e-6, far less than what it takes to move a sampled token.
    let prompts = random_rows(4, 8, cfg().vocab_size, 4);
    let refs: Vec<&[u32]> = prompts.iter().map(Vec::as_slice).collect();
    let seeds = [5, 6, 7, 8];
    for (name, decoding) in [
        ("sampling", Decoding { sampler: SamplerSettings::default(), beam: 0 }),
        (
            "sampling with top-p 0.9",
            Decoding { sampler: SamplerSettings { top_p: 0.9, ..Default::default() }, beam: 0 },
        ),
        ("beam search", Decoding { sampler: SamplerSettings::default(), beam: 3 }),
    ] {
        let got = generate(&model_on(dev, 13), &refs, 12, &decoding, &seeds).unwrap();
        let want =
            generate(&Model::Candle(candle_on(&Device::Cpu, 13)), &refs, 12, &decoding, &seeds).unwrap();
        assert_eq!(got, want, "{name}");
        assert!(got.iter().all(|r| r.len() == 12));
    }
}
test_device!(sampling_matches_the_cpu);

fn dropout_is_reproducible_from_the_seed(dev: &Device) {
    let c = ModelConfig { dropout: 0.5, ..cfg() };
    let model = Gpt::new(&c, &init_weights(&c, 0), dev).unwrap();
    let x = tensor(&random_rows(2, 10, c.vocab_size, 5), dev);
    let run = |seed: u64| {
        seed_device(dev, seed).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let out = model.forward(&x, Some(Dropout { p: 0.5, rng: &mut rng })).unwrap();
        out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap()
    };
    let plain = model.forward(&x, None).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(run(1), run(1), "same seed, same masks");
    assert_ne!(run(1), run(2), "another seed, other masks");
    assert_ne!(run(1), plain, "dropout changes the output");
}
test_device!(dropout_is_reproducible_from_the_seed);
