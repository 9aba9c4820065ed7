//! Perplexity of a model on the real splits (token, word, rare and common words) and of each
//! generated sequence on its own, built on [`crate::model::score`] (sum nats first, divide once).

use crate::data::eval_blocks;
use crate::model::engine::Model;
use crate::model::score::{scoring_batch, sequence_nlls, Nats};
use anyhow::Result;
use serde::{Deserialize, Serialize};

/// Which words a token belongs to, by the word's count in the real train split.
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
pub fn split_perplexity(model: &Model, set: &EvalSet, block: usize) -> Result<SplitPerplexity> {
    let blocks = eval_blocks(&set.stream, block);
    let (mut all, mut rare, mut common) = (Nats::default(), Nats::default(), Nats::default());
    let nlls = sequence_nlls(&mut model.scorer(), &blocks, scoring_batch(model.is_gpu(), 32))?;
    for (b, row) in nlls.into_iter().enumerate() {
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
pub fn sequence_ppls(model: &Model, seqs: &[&[u32]], eot: u32) -> Result<Vec<f64>> {
    let with_bos: Vec<Vec<u32>> = seqs.iter().map(|s| [&[eot], *s].concat()).collect();
    let refs: Vec<&[u32]> = with_bos.iter().map(Vec::as_slice).collect();
    Ok(sequence_nlls(&mut model.scorer(), &refs, scoring_batch(model.is_gpu(), 64))?
        .into_iter()
        .map(|row| (row.iter().map(|&x| x as f64).sum::<f64>() / row.len().max(1) as f64).exp())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{fast, init_weights, ModelConfig};

    /// Hand-checkable: a sequence's perplexity is exp(mean NLL of its tokens after the EOT), and
    /// the word classes split the nats of one split.
    #[test]
    fn per_sequence_perplexity_is_the_exp_of_the_mean_nll() {
        let cfg = ModelConfig { vocab_size: 13, ctx: 8, d_model: 8, n_layer: 1, n_head: 2, dropout: 0.0 };
        let model =
            Model::Fast(fast::Model::new(crate::model::ops::Compute::fp32(), &cfg, &init_weights(&cfg, 3)));
        let seq: &[u32] = &[3, 4, 5];
        let ppl = sequence_ppls(&model, &[seq], 0).unwrap()[0];
        let nll = sequence_nlls(&mut model.scorer(), &[&[0, 3, 4, 5]], 1).unwrap().remove(0);
        assert_eq!(nll.len(), 3);
        let want = (nll.iter().map(|&x| x as f64).sum::<f64>() / 3.0).exp();
        assert!((ppl - want).abs() < 1e-9 * want, "{ppl} vs {want}");
        // A random 13-way model: about 13.
        assert!(ppl > 5.0 && ppl < 30.0, "{ppl}");
    }
}
