//! Generation with a trained model: batched KV-cache sampling and beam search over many prompts at
//! once. The per-token choice is [`crate::sampler`]'s pure functions; this module feeds them logits.
//!
//! Every prompt has its own RNG stream (seeded from the run seed, the generation and the prompt id),
//! so a sequence's text does not depend on which other prompts share its batch.

use crate::model::{Gpt, KvCache};
use crate::sampler::{beam_logprobs, beam_step, Sampler, SamplerSettings};
use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// How a generation's text is produced.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Decoding {
    #[serde(flatten)]
    pub sampler: SamplerSettings,
    /// Beam width; 0 or 1 = sample token by token with `sampler` instead.
    pub beam: usize,
}

impl Decoding {
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.sampler.validate()
    }
}

fn tensor(rows: &[&[u32]], dev: &Device) -> Result<Tensor> {
    let t = rows[0].len();
    if rows.iter().any(|r| r.len() != t) {
        bail!("all prompts of a batch must have the same length");
    }
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Ok(Tensor::from_vec(flat, (rows.len(), t), dev)?)
}

/// Continues every prompt (all of one length) by exactly `new_tokens` tokens. `seeds[i]` seeds the
/// RNG of prompt i (unused by greedy decoding and beam search, which are deterministic).
pub fn generate(
    model: &Gpt,
    prompts: &[&[u32]],
    new_tokens: usize,
    decoding: &Decoding,
    seeds: &[u64],
    dev: &Device,
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let need = prompts[0].len() + new_tokens - 1;
    if need > model.cfg.ctx {
        bail!(
            "a prompt of {} tokens plus {new_tokens} new tokens needs a context of {need}, the model has {}",
            prompts[0].len(),
            model.cfg.ctx
        );
    }
    if decoding.beam > 1 {
        beam_generate(model, prompts, new_tokens, decoding, dev)
    } else {
        sample_generate(model, prompts, new_tokens, &decoding.sampler, seeds, dev)
    }
}

fn sample_generate(
    model: &Gpt,
    prompts: &[&[u32]],
    new_tokens: usize,
    settings: &SamplerSettings,
    seeds: &[u64],
    dev: &Device,
) -> Result<Vec<Vec<u32>>> {
    let mut sampler = Sampler::new(*settings).map_err(anyhow::Error::msg)?;
    let mut rngs: Vec<ChaCha8Rng> = seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect();
    // Context of each row (prompt + generated so far), for the repetition penalty.
    let mut context: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut cache = KvCache::new(model.cfg.n_layer);
    let mut logits = model.forward_cached(&tensor(prompts, dev)?, &mut cache)?; // (B, V)
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(new_tokens); prompts.len()];
    for step in 0..new_tokens {
        let rows = logits.to_vec2::<f32>()?;
        let mut next = Vec::with_capacity(prompts.len());
        for (i, mut row) in rows.into_iter().enumerate() {
            let tok = sampler.choose(&mut row, &context[i], &mut rngs[i]);
            context[i].push(tok);
            out[i].push(tok);
            next.push(tok);
        }
        if step + 1 < new_tokens {
            let x = Tensor::from_vec(next, (prompts.len(), 1), dev)?; // (B, 1)
            logits = model.forward_cached(&x, &mut cache)?;
        }
    }
    Ok(out)
}

/// Fixed-length beam search for every prompt at once: B prompts × W beams are the rows of one
/// batch, and the KV cache is reordered after each step to follow the surviving beams.
fn beam_generate(
    model: &Gpt,
    prompts: &[&[u32]],
    new_tokens: usize,
    decoding: &Decoding,
    dev: &Device,
) -> Result<Vec<Vec<u32>>> {
    let (b, w) = (prompts.len(), decoding.beam);
    let penalty = decoding.sampler.repetition_penalty;
    let mut cache = KvCache::new(model.cfg.n_layer);
    let first = model.forward_cached(&tensor(prompts, dev)?, &mut cache)?.to_vec2::<f32>()?; // (B, V)
                                                                                             // beams[p] = (score, context tokens) of prompt p's live beams.
    let mut beams: Vec<Vec<(f64, Vec<u32>)>> = prompts.iter().map(|p| vec![(0.0, p.to_vec())]).collect();
    let mut rows_logits: Vec<Vec<Vec<f32>>> = first.into_iter().map(|r| vec![r]).collect();
    for step in 0..new_tokens {
        let mut parents = Vec::with_capacity(b * w); // cache row each new row continues
        let mut last = Vec::with_capacity(b * w);
        let mut row_base = 0usize;
        for p in 0..b {
            let scores: Vec<f64> = beams[p].iter().map(|(s, _)| *s).collect();
            let logprobs: Vec<Vec<f32>> = rows_logits[p]
                .iter()
                .zip(&beams[p])
                .map(|(l, (_, ctx))| beam_logprobs(l, ctx, penalty))
                .collect();
            let cands = beam_step(&scores, &logprobs, w);
            let next: Vec<(f64, Vec<u32>)> = cands
                .iter()
                .map(|c| {
                    let mut ctx = beams[p][c.parent].1.clone();
                    ctx.push(c.token);
                    (c.score, ctx)
                })
                .collect();
            for c in &cands {
                parents.push((row_base + c.parent) as u32);
                last.push(c.token);
            }
            row_base += beams[p].len();
            beams[p] = next;
        }
        if step + 1 == new_tokens {
            break;
        }
        let rows = parents.len();
        cache.select_rows(&Tensor::from_vec(parents, rows, dev)?)?;
        let logits = model.forward_cached(&Tensor::from_vec(last, (rows, 1), dev)?, &mut cache)?;
        let mut it = logits.to_vec2::<f32>()?.into_iter();
        rows_logits = beams.iter().map(|bs| it.by_ref().take(bs.len()).collect()).collect();
    }
    // beam_step returns candidates best first, so beam 0 is the most probable sequence.
    Ok(beams
        .into_iter()
        .zip(prompts)
        .map(|(bs, p)| bs.into_iter().next().map(|(_, ctx)| ctx[p.len()..].to_vec()).unwrap_or_default())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, ModelConfig};
    use crate::sampler::StepModel;

    fn model() -> Gpt {
        let cfg = ModelConfig { vocab_size: 13, ctx: 12, d_model: 16, n_layer: 1, n_head: 2, dropout: 0.0 };
        init_model(&cfg, 9, &Device::Cpu).unwrap().0.detached()
    }

    /// The real model as a [`StepModel`] without a cache: the reference the batched code must match.
    struct Uncached<'a>(&'a Gpt);

    impl StepModel for Uncached<'_> {
        fn next_logits(&mut self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
            sequences
                .iter()
                .map(|s| {
                    let x = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
                    let l = self.0.forward(&x, None).unwrap().to_vec3::<f32>().unwrap();
                    l[0][s.len() - 1].clone()
                })
                .collect()
        }
    }

    #[test]
    fn batched_sampling_does_not_depend_on_batch_mates() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings::default(), beam: 0 };
        let (p1, p2): (&[u32], &[u32]) = (&[1, 2, 3], &[4, 5, 6]);
        let both = generate(&m, &[p1, p2], 6, &d, &[11, 12], &Device::Cpu).unwrap();
        let alone = generate(&m, &[p2], 6, &d, &[12], &Device::Cpu).unwrap();
        assert_eq!(both[1], alone[0]);
        assert_eq!(both[0].len(), 6);
        let again = generate(&m, &[p1, p2], 6, &d, &[11, 12], &Device::Cpu).unwrap();
        assert_eq!(both, again, "same seeds, same tokens");
    }

    #[test]
    fn greedy_generation_follows_the_uncached_argmax() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings { temperature: 0.0, ..Default::default() }, beam: 0 };
        let got = generate(&m, &[&[7, 3]], 5, &d, &[0], &Device::Cpu).unwrap();
        let mut seq = vec![7u32, 3];
        let mut reference = Uncached(&m);
        for _ in 0..5 {
            let l = reference.next_logits(std::slice::from_ref(&seq)).remove(0);
            seq.push(crate::sampler::argmax(&l));
        }
        assert_eq!(got[0], seq[2..]);
    }

    #[test]
    fn batched_beam_search_matches_the_reference_search() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings::default(), beam: 3 };
        let prompts: [&[u32]; 2] = [&[1, 2], &[9, 4]];
        let got = generate(&m, &prompts, 5, &d, &[0, 0], &Device::Cpu).unwrap();
        for (p, g) in prompts.iter().zip(&got) {
            let want = crate::sampler::beam_search(&mut Uncached(&m), p, 5, 3, 1.0);
            assert_eq!(g, &want, "prompt {p:?}");
        }
    }
}
