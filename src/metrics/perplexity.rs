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
/// batched by length, `batch` at a time, through the fast CPU forward ([`crate::fast::Scorer`]) or,
/// on other devices or with `COLLAPSE_LAB_REFERENCE` set, the detached candle model.
pub fn sequence_nlls(model: &Gpt, seqs: &[&[u32]], batch: usize, dev: &Device) -> Result<Vec<Vec<f32>>> {
    let mut scorer = if dev.is_cpu() && std::env::var_os("COLLAPSE_LAB_REFERENCE").is_none() {
        Some(crate::fast::Scorer::new(model)?)
    } else {
        None
    };
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
            if let Some(scorer) = scorer.as_mut() {
                let nll = scorer.nlls(&inputs, &targets, chunk.len(), len - 1); // (B·T)
                for (&i, row) in chunk.iter().zip(nll.chunks(len - 1)) {
                    out[i] = row.to_vec();
                }
                continue;
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

/// Sequences scored at once: `cpu` on the CPU (cache-sized), 8× more on a GPU, which needs wide
/// batches to be busy. Each sequence is scored on its own, so the batch changes no value.
fn scoring_batch(dev: &Device, cpu: usize) -> usize {
    if dev.is_cpu() {
        cpu
    } else {
        8 * cpu
    }
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
    for row in sequence_nlls(model, &blocks, scoring_batch(dev, 32), dev)? {
        total.add(row.iter().map(|&x| x as f64).sum(), row.len() as u64);
    }
    Ok(total)
}

/// Which words a token belongs to, by the word's count in the real train split (SPEC §2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WordClass {
    /// count ≤ 10
    Rare,
    /// count ≥ 1000
    Common,
    Other,
    /// the end-of-line token, part of no word
    Boundary,
}

pub const RARE_MAX: u64 = 10;
pub const COMMON_MIN: u64 = 1000;

impl WordClass {
    pub fn of_count(count: u64) -> Self {
        if count <= RARE_MAX {
            WordClass::Rare
        } else if count >= COMMON_MIN {
            WordClass::Common
        } else {
            WordClass::Other
        }
    }
}

/// A real split ready for evaluation: its token stream (as `Tokenizer::encode_lines` makes it),
/// the word class of every stream position, and its word count (words + one end-of-line per line).
pub struct EvalSet {
    pub stream: Vec<u32>,
    pub classes: Vec<WordClass>,
    pub words: u64,
}

impl EvalSet {
    /// `count(word)` gives a word's count in the real train split.
    pub fn new<S: AsRef<str>>(
        tok: &crate::tokenizer::Tokenizer,
        lines: &[S],
        count: impl Fn(&str) -> u64,
    ) -> anyhow::Result<Self> {
        let mut stream = vec![tok.eot];
        let mut classes = vec![WordClass::Boundary];
        for line in lines.iter().map(|l| l.as_ref().trim()).filter(|l| !l.is_empty()) {
            let words: Vec<&str> = line.split_whitespace().collect();
            let word_class: Vec<WordClass> = words.iter().map(|w| WordClass::of_count(count(w))).collect();
            let (ids, word_of) = tok.encode_words(line)?;
            stream.extend(ids);
            classes.extend(word_of.into_iter().map(|w| word_class[w]));
            stream.push(tok.eot);
            classes.push(WordClass::Boundary);
        }
        Ok(Self { stream, classes, words: crate::data::words_with_eol(lines) as u64 })
    }
}

/// A model's perplexities on one real split.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct SplitPerplexity {
    pub ppl: f64,
    pub word_ppl: f64,
    pub ppl_rare: f64,
    pub ppl_common: f64,
    pub tokens: u64,
    pub words: u64,
}

/// Scores every block of `set` (non-overlapping blocks of `block` predicted tokens, each on its own)
/// and splits the nats by word class.
pub fn split_perplexity(model: &Gpt, set: &EvalSet, block: usize, dev: &Device) -> Result<SplitPerplexity> {
    let blocks = eval_blocks(&set.stream, block);
    let (mut all, mut rare, mut common) = (Nats::default(), Nats::default(), Nats::default());
    for (b, row) in sequence_nlls(model, &blocks, scoring_batch(dev, 32), dev)?.into_iter().enumerate() {
        for (j, nll) in row.into_iter().enumerate() {
            let nll = nll as f64;
            all.add(nll, 1);
            match set.classes[b * block + 1 + j] {
                WordClass::Rare => rare.add(nll, 1),
                WordClass::Common => common.add(nll, 1),
                _ => {}
            }
        }
    }
    Ok(SplitPerplexity {
        ppl: all.ppl(),
        word_ppl: all.ppl_per(set.words),
        ppl_rare: rare.ppl(),
        ppl_common: common.ppl(),
        tokens: all.predictions,
        words: set.words,
    })
}

/// Perplexity of each sequence on its own under `model`, the sequence preceded by the end-of-text
/// token so that every one of its tokens is predicted ("no prompt, the sequence alone").
pub fn sequence_ppls(model: &Gpt, seqs: &[&[u32]], eot: u32, dev: &Device) -> Result<Vec<f64>> {
    let with_bos: Vec<Vec<u32>> = seqs.iter().map(|s| [&[eot], *s].concat()).collect();
    let refs: Vec<&[u32]> = with_bos.iter().map(Vec::as_slice).collect();
    Ok(sequence_nlls(model, &refs, scoring_batch(dev, 64), dev)?
        .into_iter()
        .map(|row| (row.iter().map(|&x| x as f64).sum::<f64>() / row.len().max(1) as f64).exp())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, ModelConfig};

    /// The fast scorer and candle's forward give the same per-token NLLs (within f32 noise).
    #[test]
    fn fast_and_reference_scoring_agree() {
        let cfg = ModelConfig { vocab_size: 29, ctx: 16, d_model: 16, n_layer: 2, n_head: 2, dropout: 0.0 };
        let (model, _) = init_model(&cfg, 8, &Device::Cpu).unwrap();
        let model = model.detached();
        let seqs: Vec<Vec<u32>> =
            (0..5).map(|i| (0..(9 + i % 2)).map(|j| ((i * 7 + j * 3) % 29) as u32).collect()).collect();
        let refs: Vec<&[u32]> = seqs.iter().map(Vec::as_slice).collect();
        let fast = sequence_nlls(&model, &refs, 2, &Device::Cpu).unwrap();
        // The candle path, computed directly.
        for (s, row) in refs.iter().zip(&fast) {
            let x = Tensor::from_vec(s[..s.len() - 1].to_vec(), (1, s.len() - 1), &Device::Cpu).unwrap();
            let logp = candle_nn::ops::log_softmax(&model.forward(&x, None).unwrap(), D::Minus1).unwrap();
            let logp = logp.to_vec3::<f32>().unwrap().remove(0);
            for (j, nll) in row.iter().enumerate() {
                let want = -logp[j][s[j + 1] as usize];
                assert!((nll - want).abs() < 1e-4, "{nll} vs {want}");
            }
        }
    }
}
