//! What each generation trains on (the regimes of Shumailov et al., Gerstgrasser et al. and Kazdan
//! et al.), and which sequences it continues in blocks mode.

use crate::config::{PromptMode, RecursionConfig, Regime};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// What generation g trains on, and which sequences it continues in blocks mode.
pub struct TrainingSet {
    pub stream: Vec<u32>,
    pub prompts: Vec<Vec<u32>>,
}

/// The real training data of a run: its token stream and that stream cut into prompt blocks.
pub struct RealData<'a> {
    pub stream: &'a [u32],
    pub blocks: &'a [Vec<u32>],
}

/// The training set of generation g under `r`'s regime; `corpora[i]` is what generation i wrote
/// (one token sequence per prompt); `seed` seeds the regime's random choices for generation g.
pub fn training_set(
    r: &RecursionConfig,
    real: &RealData,
    g: usize,
    corpora: &[Vec<Vec<u32>>],
    seed: u64,
) -> TrainingSet {
    if g == 0 {
        return TrainingSet { stream: real.stream.to_vec(), prompts: real.blocks.to_vec() };
    }
    let latest = &corpora[g - 1];
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    match r.regime {
        Regime::Replace => TrainingSet { stream: latest.concat(), prompts: latest.clone() },
        Regime::KeepReal => {
            let n_real = (r.real_fraction * real.blocks.len() as f64).round() as usize;
            let mut idx: Vec<usize> = (0..real.blocks.len()).collect();
            idx.shuffle(&mut rng);
            let mut keep = vec![false; real.blocks.len()];
            for &i in &idx[..n_real] {
                keep[i] = true;
            }
            let blocks: Vec<Vec<u32>> = match r.prompt_mode {
                // Block i is either real block i or its synthetic descendant: lineages stay aligned.
                PromptMode::Blocks => latest
                    .iter()
                    .enumerate()
                    .map(|(i, s)| if keep.get(i) == Some(&true) { real.blocks[i].clone() } else { s.clone() })
                    .collect(),
                PromptMode::Free => {
                    let n_synth = ((1.0 - r.real_fraction) * latest.len() as f64).round() as usize;
                    let kept = (0..real.blocks.len()).filter(|&i| keep[i]).map(|i| real.blocks[i].clone());
                    kept.chain(latest[..n_synth].iter().cloned()).collect()
                }
            };
            TrainingSet { stream: blocks.concat(), prompts: blocks }
        }
        Regime::Accumulate => {
            let mut stream = real.stream.to_vec();
            for c in &corpora[..g] {
                stream.extend(c.concat());
            }
            TrainingSet { stream, prompts: latest.clone() }
        }
        Regime::AccumulateSubsample => {
            let mut pool: Vec<&Vec<u32>> = real.blocks.iter().collect();
            pool.extend(corpora[..g].iter().flatten());
            pool.shuffle(&mut rng);
            let mut stream = Vec::with_capacity(real.stream.len());
            for s in pool {
                if stream.len() >= real.stream.len() {
                    break;
                }
                stream.extend_from_slice(s);
            }
            TrainingSet { stream, prompts: latest.clone() }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(regime: Regime) -> RecursionConfig {
        RecursionConfig {
            generations: 3,
            regime,
            real_fraction: 0.5,
            prompt_mode: PromptMode::Blocks,
            init: crate::config::InitMode::Scratch,
            measure_valid: true,
        }
    }

    #[test]
    fn regimes_mix_real_and_synthetic_blocks_as_documented() {
        let blocks: Vec<Vec<u32>> = vec![vec![1, 1], vec![2, 2], vec![3, 3], vec![4, 4]];
        let stream = blocks.concat();
        let real = RealData { stream: &stream, blocks: &blocks };
        let gen0: Vec<Vec<u32>> = vec![vec![10, 10], vec![20, 20], vec![30, 30], vec![40, 40]];
        let corpora = vec![gen0.clone()];
        assert_eq!(training_set(&cfg(Regime::Replace), &real, 0, &corpora, 1).stream, stream);
        assert_eq!(training_set(&cfg(Regime::Replace), &real, 1, &corpora, 1).stream, gen0.concat());
        // Keep half the real blocks, each in its own lineage slot.
        let kept = training_set(&cfg(Regime::KeepReal), &real, 1, &corpora, 1).prompts;
        assert_eq!(kept.iter().filter(|b| b[0] < 10).count(), 2);
        for (i, b) in kept.iter().enumerate() {
            assert!(b == &blocks[i] || b == &gen0[i], "slot {i}");
        }
        let acc = training_set(&cfg(Regime::Accumulate), &real, 1, &corpora, 1).stream;
        assert_eq!(acc, [stream.clone(), gen0.concat()].concat());
        let sub = training_set(&cfg(Regime::AccumulateSubsample), &real, 1, &corpora, 1).stream;
        assert_eq!(sub.len(), stream.len(), "subsampled back to the real data's size");
    }
}
