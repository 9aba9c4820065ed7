//! Generation with a trained model: batched KV-cache sampling and beam search over many prompts at
//! once. The per-token choice is [`crate::sampler`]'s pure functions; this module feeds them logits.
//!
//! Every prompt has its own RNG stream (seeded from the run seed, the generation and the prompt id),
//! so a sequence's text does not depend on which other prompts share its batch.

use crate::model::engine::{Decoder, Model};
use crate::sampler::{beam_logprobs, beam_step, Sampler, SamplerSettings};
use anyhow::{bail, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
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

/// Continues every prompt (all of one length) by exactly `new_tokens` tokens. `seeds[i]` seeds the
/// RNG of prompt i (unused by greedy decoding and beam search, which are deterministic).
pub fn generate(
    model: &Model,
    prompts: &[&[u32]],
    new_tokens: usize,
    decoding: &Decoding,
    seeds: &[u64],
) -> Result<Vec<Vec<u32>>> {
    if prompts.is_empty() || new_tokens == 0 {
        return Ok(vec![Vec::new(); prompts.len()]);
    }
    let cfg = model.cfg();
    let need = prompts[0].len() + new_tokens - 1;
    if need > cfg.ctx {
        bail!(
            "a prompt of {} tokens plus {new_tokens} new tokens needs a context of {need}, the model has {}",
            prompts[0].len(),
            cfg.ctx
        );
    }
    if prompts.iter().any(|p| p.len() != prompts[0].len()) {
        bail!("all prompts of a batch must have the same length");
    }
    let vocab = cfg.vocab_size;
    if decoding.beam > 1 {
        beam_generate(&mut model.decoder(prompts.len()), vocab, prompts, new_tokens, decoding)
    } else {
        let mut decoder = model.decoder(prompts.len());
        sample_generate(&mut decoder, vocab, prompts, new_tokens, &decoding.sampler, seeds, &mut |_| {})
    }
}

/// Samples a continuation of one prompt (as [`generate`] would with `seed`), calling `on_token`
/// with each token as it is chosen: what `collapse-lab generate` streams to a terminal.
pub fn generate_streaming(
    model: &Model,
    prompt: &[u32],
    new_tokens: usize,
    sampler: &SamplerSettings,
    seed: u64,
    on_token: &mut dyn FnMut(u32),
) -> Result<Vec<u32>> {
    let ctx = model.cfg().ctx;
    let need = prompt.len() + new_tokens.max(1) - 1;
    if prompt.is_empty() || need > ctx {
        bail!("a prompt of {} tokens plus {new_tokens} new tokens needs a context of {need}, the model has {ctx}", prompt.len());
    }
    let vocab = model.cfg().vocab_size;
    let mut decoder = model.decoder(1);
    let out = sample_generate(&mut decoder, vocab, &[prompt], new_tokens, sampler, &[seed], &mut |s| {
        on_token(s[0])
    })?;
    Ok(out.into_iter().next().unwrap_or_default())
}

fn sample_generate(
    dec: &mut Decoder,
    vocab: usize,
    prompts: &[&[u32]],
    new_tokens: usize,
    settings: &SamplerSettings,
    seeds: &[u64],
    on_step: &mut dyn FnMut(&[u32]),
) -> Result<Vec<Vec<u32>>> {
    let sampler = Sampler::new(*settings).map_err(anyhow::Error::msg)?;
    let mut rngs: Vec<ChaCha8Rng> = seeds.iter().map(|&s| ChaCha8Rng::seed_from_u64(s)).collect();
    // Context of each row (prompt + generated so far), for the repetition penalty.
    let mut context: Vec<Vec<u32>> = prompts.iter().map(|p| p.to_vec()).collect();
    let mut logits = dec.forward(prompts)?; // (B, V)
    let mut out: Vec<Vec<u32>> = vec![Vec::with_capacity(new_tokens); prompts.len()];
    for step in 0..new_tokens {
        // Rows are independent (each has its own RNG stream), so they are chosen in parallel.
        let chosen: Vec<u32> = logits
            .par_chunks_mut(vocab)
            .zip(context.par_iter_mut())
            .zip(rngs.par_iter_mut())
            .map_init(
                || sampler.clone(),
                |s, ((row, ctx), rng)| {
                    let tok = s.choose(row, ctx, rng);
                    ctx.push(tok);
                    tok
                },
            )
            .collect();
        let mut next = Vec::with_capacity(prompts.len());
        for (o, &tok) in out.iter_mut().zip(&chosen) {
            o.push(tok);
            next.push([tok]);
        }
        on_step(&chosen);
        if step + 1 < new_tokens {
            let rows: Vec<&[u32]> = next.iter().map(|t| &t[..]).collect(); // (B, 1)
            logits = dec.forward(&rows)?;
        }
    }
    Ok(out)
}

/// Fixed-length beam search for every prompt at once: B prompts × W beams are the rows of one
/// batch, and the KV cache is reordered after each step to follow the surviving beams.
fn beam_generate(
    dec: &mut Decoder,
    vocab: usize,
    prompts: &[&[u32]],
    new_tokens: usize,
    decoding: &Decoding,
) -> Result<Vec<Vec<u32>>> {
    let (b, w) = (prompts.len(), decoding.beam);
    let penalty = decoding.sampler.repetition_penalty;
    let first: Vec<Vec<f32>> = dec.forward(prompts)?.chunks(vocab).map(<[f32]>::to_vec).collect(); // (B, V)
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
                parents.push(row_base + c.parent);
                last.push(c.token);
            }
            row_base += beams[p].len();
            beams[p] = next;
        }
        if step + 1 == new_tokens {
            break;
        }
        dec.select_rows(&parents)?;
        let last: Vec<[u32; 1]> = last.into_iter().map(|t| [t]).collect();
        let rows: Vec<&[u32]> = last.iter().map(|t| &t[..]).collect();
        let logits = dec.forward(&rows)?;
        let mut it = logits.chunks(vocab).map(<[f32]>::to_vec);
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
    use crate::model::candle::Gpt;
    use crate::model::{fast, init_weights, ModelConfig};
    use crate::sampler::StepModel;
    use candle_core::{Device, Tensor};

    fn cfg() -> ModelConfig {
        ModelConfig { vocab_size: 13, ctx: 12, d_model: 16, n_layer: 1, n_head: 2, dropout: 0.0 }
    }

    fn model() -> Model {
        Model::Fast(fast::Model::new(crate::model::ops::Compute::fp32(), &cfg(), &init_weights(&cfg(), 9)))
    }

    fn reference() -> Gpt {
        Gpt::new(&cfg(), &init_weights(&cfg(), 9), &Device::Cpu).unwrap()
    }

    /// The candle model as a [`StepModel`] without a cache: the reference the batched code must match.
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
        let both = generate(&m, &[p1, p2], 6, &d, &[11, 12]).unwrap();
        let alone = generate(&m, &[p2], 6, &d, &[12]).unwrap();
        assert_eq!(both[1], alone[0]);
        assert_eq!(both[0].len(), 6);
        let again = generate(&m, &[p1, p2], 6, &d, &[11, 12]).unwrap();
        assert_eq!(both, again, "same seeds, same tokens");
    }

    #[test]
    fn greedy_generation_follows_the_uncached_argmax() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings { temperature: 0.0, ..Default::default() }, beam: 0 };
        let got = generate(&m, &[&[7, 3]], 5, &d, &[0]).unwrap();
        let mut seq = vec![7u32, 3];
        let gpt = reference();
        let mut reference = Uncached(&gpt);
        for _ in 0..5 {
            let l = reference.next_logits(std::slice::from_ref(&seq)).remove(0);
            seq.push(crate::sampler::argmax(&l));
        }
        assert_eq!(got[0], seq[2..]);
    }

    #[test]
    fn fast_and_candle_decoders_sample_the_same_tokens() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings::default(), beam: 0 };
        let prompts: [&[u32]; 3] = [&[1, 2, 3], &[4, 5, 6], &[7, 8, 9]];
        let fast = generate(&m, &prompts, 8, &d, &[1, 2, 3]).unwrap();
        let reference = generate(&Model::Candle(reference()), &prompts, 8, &d, &[1, 2, 3]).unwrap();
        assert_eq!(fast, reference);
    }

    #[test]
    fn batched_beam_search_matches_the_reference_search() {
        let m = model();
        let d = Decoding { sampler: SamplerSettings::default(), beam: 3 };
        let prompts: [&[u32]; 2] = [&[1, 2], &[9, 4]];
        let got = generate(&m, &prompts, 5, &d, &[0, 0]).unwrap();
        let gpt = reference();
        for (p, g) in prompts.iter().zip(&got) {
            let want = crate::sampler::beam_search(&mut Uncached(&gpt), p, 5, 3, 1.0);
            assert_eq!(g, &want, "prompt {p:?}");
        }
    }
}
