//! Perplexity of a model over token streams, summing nats first and dividing once (SPEC §2).

use crate::data::eval_blocks;
use crate::model::Gpt;
use candle_core::{Device, Result, Tensor, D};
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

/// Negative log-likelihood of every target token of `seqs`, each sequence scored on its own
/// (its first token is context only). `out[i][j]` is the NLL of `seqs[i][j + 1]`. Sequences are
/// batched by length, `batch` at a time, through the detached model.
pub fn sequence_nlls(model: &Gpt, seqs: &[&[u32]], batch: usize, dev: &Device) -> Result<Vec<Vec<f32>>> {
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
            let shape = (chunk.len(), len - 1);
            let x = Tensor::from_vec(inputs, shape, dev)?; // (B, T)
            let y = Tensor::from_vec(targets, shape, dev)?; // (B, T)
            let logits = model.forward(&x, None)?; // (B, T, V)
            let logp = candle_nn::ops::log_softmax(&logits, D::Minus1)?; // (B, T, V)
            let nll = logp.gather(&y.unsqueeze(2)?, 2)?.squeeze(2)?.neg()?; // (B, T)
            for (&i, row) in chunk.iter().zip(nll.to_vec2::<f32>()?) {
                out[i] = row;
            }
        }
    }
    Ok(out)
}

/// Perplexity of a token stream cut into non-overlapping blocks of `block` predicted tokens, each
/// scored on its own (Shumailov's evaluation). `max_blocks` > 0 scores an evenly spaced subset.
pub fn stream_nats(
    model: &Gpt,
    stream: &[u32],
    block: usize,
    max_blocks: usize,
    dev: &Device,
) -> Result<Nats> {
    let blocks = eval_blocks(stream, block);
    let blocks: Vec<&[u32]> = if max_blocks > 0 && blocks.len() > max_blocks {
        let step = blocks.len() as f64 / max_blocks as f64;
        (0..max_blocks).map(|i| blocks[(i as f64 * step) as usize]).collect()
    } else {
        blocks
    };
    let mut total = Nats::default();
    for row in sequence_nlls(model, &blocks, 32, dev)? {
        total.add(row.iter().map(|&x| x as f64).sum(), row.len() as u64);
    }
    Ok(total)
}
