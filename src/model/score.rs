//! What evaluation asks of a model: the negative log-likelihood of token sequences, each scored on
//! its own, summed in nats first and divided once (nanochat's way). Training's validation loss,
//! the test perplexities and the per-sequence perplexities under generation 0 are all built on it.

use super::engine::Scorer;
use crate::data::eval_blocks;
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Total negative log-likelihood over a number of predictions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Nats {
    pub nats: f64,
    pub predictions: u64,
}

impl Nats {
    /// Mean nats per prediction.
    pub fn mean(&self) -> f64 {
        self.nats / self.predictions as f64
    }

    /// exp(total nats / predictions).
    pub fn ppl(&self) -> f64 {
        self.mean().exp()
    }

    /// exp(total nats / `units`): e.g. word perplexity with units = number of words.
    pub fn ppl_per(&self, units: u64) -> f64 {
        (self.nats / units as f64).exp()
    }

    pub fn add(&mut self, nats: f64, predictions: u64) {
        self.nats += nats;
        self.predictions += predictions;
    }
}

/// Sequences scored at once: `cpu` on the CPU (cache-sized), 8× more on a GPU, which needs wide
/// batches to be busy. Each sequence is scored on its own, so the batch changes no value.
pub fn scoring_batch(gpu: bool, cpu: usize) -> usize {
    if gpu {
        8 * cpu
    } else {
        cpu
    }
}

/// Negative log-likelihood of every target token of `seqs`, each sequence scored on its own (its
/// first token is context only). `out[i][j]` is the NLL of `seqs[i][j + 1]`. Sequences are batched
/// by length, `batch` at a time.
pub fn sequence_nlls(scorer: &mut Scorer, seqs: &[&[u32]], batch: usize) -> Result<Vec<Vec<f32>>> {
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); seqs.len()];
    // Group indices by length so every batch is rectangular.
    let mut order: Vec<usize> = (0..seqs.len()).filter(|&i| seqs[i].len() >= 2).collect();
    order.sort_by_key(|&i| seqs[i].len());
    for group in order.chunk_by(|&a, &b| seqs[a].len() == seqs[b].len()) {
        for chunk in group.chunks(batch.max(1)) {
            let len = seqs[chunk[0]].len();
            let mut inputs = Vec::with_capacity(chunk.len() * (len - 1));
            let mut targets = Vec::with_capacity(chunk.len() * (len - 1));
            for &i in chunk {
                inputs.extend_from_slice(&seqs[i][..len - 1]);
                targets.extend_from_slice(&seqs[i][1..]);
            }
            let nll = scorer.nlls(&inputs, &targets, chunk.len(), len - 1)?; // (B·T)
            for (&i, row) in chunk.iter().zip(nll.chunks(len - 1)) {
                out[i] = row.to_vec();
            }
        }
    }
    Ok(out)
}

/// Nats of a token stream cut into non-overlapping blocks of `block` predicted tokens, each scored
/// on its own (Shumailov's evaluation). `max_blocks` > 0 scores an evenly spaced subset.
pub fn stream_nats(
    scorer: &mut Scorer,
    stream: &[u32],
    block: usize,
    max_blocks: usize,
    gpu: bool,
) -> Result<Nats> {
    let blocks = eval_blocks(stream, block);
    let blocks: Vec<&[u32]> = if max_blocks > 0 && blocks.len() > max_blocks {
        let step = blocks.len() as f64 / max_blocks as f64;
        (0..max_blocks).map(|i| blocks[(i as f64 * step) as usize]).collect()
    } else {
        blocks
    };
    let mut total = Nats::default();
    for row in sequence_nlls(scorer, &blocks, scoring_batch(gpu, 32))? {
        total.add(row.iter().map(|&x| x as f64).sum(), row.len() as u64);
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::candle::Gpt;
    use crate::model::engine::{Engine, Model};
    use crate::model::{init_weights, ModelConfig};
    use candle_core::{Device, Tensor, D};

    /// The fast scorer and candle's forward give the same per-token NLLs (within f32 noise).
    #[test]
    fn fast_and_reference_scoring_agree() {
        let cfg = ModelConfig { vocab_size: 29, ctx: 16, d_model: 16, n_layer: 2, n_head: 2, dropout: 0.0 };
        let w = init_weights(&cfg, 8);
        let model = Model::Fast(crate::model::fast::Model::new(crate::model::ops::Compute::fp32(), &cfg, &w));
        let gpt = Gpt::new(&cfg, &w, &Device::Cpu).unwrap();
        let seqs: Vec<Vec<u32>> =
            (0..5).map(|i| (0..(9 + i % 2)).map(|j| ((i * 7 + j * 3) % 29) as u32).collect()).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let fast = sequence_nlls(&mut model.scorer(), &refs, 2).unwrap();
        let candle = sequence_nlls(&mut Model::Candle(gpt.clone()).scorer(), &refs, 3).unwrap();
        for ((s, row), crow) in refs.iter().zip(&fast).zip(&candle) {
            let x = Tensor::from_vec(s[..s.len() - 1].to_vec(), (1, s.len() - 1), &Device::Cpu).unwrap();
            let logp = candle_nn::ops::log_softmax(&gpt.forward(&x, None).unwrap(), D::Minus1).unwrap();
            let logp = logp.to_vec3::<f32>().unwrap().remove(0);
            for (j, (nll, cn)) in row.iter().zip(crow).enumerate() {
                let want = -logp[j][s[j + 1] as usize];
                assert!((nll - want).abs() < 1e-4 && (cn - want).abs() < 1e-5, "{nll} {cn} vs {want}");
            }
        }
        assert!(matches!(Engine::new(Device::Cpu), Engine::Fast(_) | Engine::Candle(_)));
    }

    #[test]
    fn nats_sum_first_and_divide_once() {
        let mut n = Nats::default();
        n.add(2.0, 1);
        n.add(4.0, 3);
        assert_eq!(n.mean(), 1.5);
        assert!((n.ppl_per(2) - 3f64.exp()).abs() < 1e-12);
    }
}
