//! Classical word-level baselines: an interpolated Kneser–Ney bigram model and an add-one unigram
//! model. They put the neural models' word perplexities in context (a small GPT should beat the
//! bigram model) and need no training beyond counting.
//!
//! # Units of prediction
//! Each line, trimmed, is a sentence; empty lines are skipped. A sentence of n words is read as
//! `<s> w1 … wn </s>`: the models predict `w1 … wn` and `</s>`, so it contributes n + 1 predictions
//! (one end-of-line token per non-empty line). `<s>` is only ever a history. The strings `<s>` and
//! `</s>` are reserved: a literal occurrence in the text is taken as the marker.
//!
//! # Vocabulary and unknown words
//! V is the number of distinct predicted types seen in training: the training words plus `</s>`.
//! Both models spread some mass over V + 1 outcomes, the extra one standing for every unknown word,
//! so no test word gets probability 0. Over the V known types plus the unknown outcome each model's
//! distribution sums to 1.
//!
//! # Interpolated Kneser–Ney bigram
//! With c(v, w) the bigram counts (including `<s> w1` and `wn </s>`), c(v) = Σ_w c(v, w),
//! N1+(v•) the number of distinct words after v, N1+(•w) the number of distinct histories before w,
//! N1+(••) the number of bigram types, and D = n1 / (n1 + 2·n2) from the bigram count-of-counts
//! (0.5 if no bigram type is seen exactly once):
//!
//! ```text
//! P(w | v)    = max(c(v,w) − D, 0) / c(v) + D · N1+(v•) / c(v) · P_cont'(w)    if c(v) > 0
//! P(w | v)    = P_cont'(w)                                                     if c(v) = 0 (unseen history)
//! P_cont'(w)  = max(N1+(•w) − D, 0) / N1+(••) + D · V / N1+(••) · 1 / (V + 1)
//! ```
//!
//! Every predicted training type has N1+(•w) ≥ 1, so the discounted continuation mass is exactly
//! D · V / N1+(••), and it is spread uniformly over the V + 1 outcomes. An unknown word gets
//! `D · V / N1+(••) / (V + 1)` (times the history's back-off weight). With no training data at all,
//! P_cont' is the uniform 1 / (V + 1).
//!
//! # Add-one unigram
//! P(w) = (c(w) + 1) / (N + V + 1), N the number of training predictions (words plus one `</s>` per
//! line); an unknown word gets 1 / (N + V + 1).
//!
//! On wikitext-2 (train → test) these give word perplexities of about 273 (KN bigram) and 929
//! (unigram) over 244,102 predictions.

use std::collections::HashMap;

use serde::Serialize;

/// Start-of-sentence marker (history only).
pub const BOS: &str = "<s>";
/// End-of-sentence marker, predicted once per non-empty line.
pub const EOS: &str = "</s>";

const EOS_ID: u32 = 0;
const BOS_ID: u32 = 1;

/// Total negative log-likelihood of a text and its perplexity.
#[derive(Debug, Clone, Serialize)]
pub struct Perplexity {
    /// Σ −ln P over all predictions.
    pub nats: f64,
    /// Number of predictions (words plus one `</s>` per non-empty line).
    pub predictions: u64,
    /// exp(nats / predictions); `NaN` when there are no predictions.
    pub ppl: f64,
}

impl Perplexity {
    fn new(nats: f64, predictions: u64) -> Self {
        let ppl = if predictions == 0 { f64::NAN } else { (nats / predictions as f64).exp() };
        Self { nats, predictions, ppl }
    }
}

/// Interpolated Kneser–Ney bigram model over words (see the module docs for the formulas).
#[derive(Debug, Clone)]
pub struct KneserNeyBigram {
    vocab: Vocab,
    /// c(v, w), keyed by [`bigram_key`].
    bigrams: HashMap<u64, u32>,
    /// Per history id: c(v) and N1+(v•).
    histories: Vec<History>,
    /// Per word id: N1+(•w).
    continuations: Vec<u32>,
    /// N1+(••).
    bigram_types: u64,
    /// V: distinct predicted types (words and `</s>`).
    predicted_types: u64,
    discount: f64,
}

#[derive(Debug, Clone, Copy, Default)]
struct History {
    count: u64,
    followers: u64,
}

impl KneserNeyBigram {
    /// Counts the bigrams of the non-empty lines of `lines`.
    pub fn train<S: AsRef<str>>(lines: &[S]) -> Self {
        let mut vocab = Vocab::new();
        let mut bigrams: HashMap<u64, u32> = HashMap::new();
        for sentence in sentences(lines) {
            let mut prev = BOS_ID;
            for word in sentence.split_whitespace() {
                let id = vocab.intern(word);
                *bigrams.entry(bigram_key(prev, id)).or_insert(0) += 1;
                prev = id;
            }
            *bigrams.entry(bigram_key(prev, EOS_ID)).or_insert(0) += 1;
        }

        let mut histories = vec![History::default(); vocab.len()];
        let mut continuations = vec![0_u32; vocab.len()];
        let (mut once, mut twice) = (0_u64, 0_u64);
        for (&key, &count) in &bigrams {
            let (prev, word) = split_key(key);
            let history = &mut histories[prev as usize];
            history.count += u64::from(count);
            history.followers += 1;
            continuations[word as usize] += 1;
            once += u64::from(count == 1);
            twice += u64::from(count == 2);
        }
        let discount = if once == 0 { 0.5 } else { once as f64 / (once + 2 * twice) as f64 };
        let predicted_types = continuations.iter().filter(|&&c| c > 0).count() as u64;
        Self {
            vocab,
            bigram_types: bigrams.len() as u64,
            bigrams,
            histories,
            continuations,
            predicted_types,
            discount,
        }
    }

    /// Natural-log probability of `word` after `prev` (`prev` may be [`BOS`], `word` may be [`EOS`];
    /// unknown words of either kind are allowed).
    pub fn log_prob(&self, prev: &str, word: &str) -> f64 {
        self.prob(self.vocab.get(prev), self.vocab.get(word)).ln()
    }

    /// Sums −ln P over every prediction of the non-empty lines of `lines`.
    pub fn evaluate<S: AsRef<str>>(&self, lines: &[S]) -> Perplexity {
        evaluate(&self.vocab, lines, |prev, word| self.prob(prev, word))
    }

    /// The absolute discount D = n1 / (n1 + 2·n2).
    pub fn discount(&self) -> f64 {
        self.discount
    }

    /// V: the number of distinct predicted types in training (words and `</s>`).
    pub fn vocab_size(&self) -> u64 {
        self.predicted_types
    }

    /// P_cont'(w): the continuation probability interpolated with the uniform distribution over V + 1.
    fn continuation_prob(&self, word: Option<u32>) -> f64 {
        let uniform = 1.0 / (self.predicted_types + 1) as f64;
        if self.bigram_types == 0 {
            return uniform;
        }
        let types = self.bigram_types as f64;
        let histories_before = word.and_then(|id| self.continuations.get(id as usize).copied()).unwrap_or(0);
        (f64::from(histories_before) - self.discount).max(0.0) / types
            + self.discount * self.predicted_types as f64 / types * uniform
    }

    fn prob(&self, prev: Option<u32>, word: Option<u32>) -> f64 {
        let continuation = self.continuation_prob(word);
        let Some((prev, history)) = prev
            .and_then(|id| Some((id, *self.histories.get(id as usize)?)))
            .filter(|(_, history)| history.count > 0)
        else {
            return continuation;
        };
        let count = history.count as f64;
        let bigram = word.and_then(|word| self.bigrams.get(&bigram_key(prev, word)).copied()).unwrap_or(0);
        (f64::from(bigram) - self.discount).max(0.0) / count
            + self.discount * history.followers as f64 / count * continuation
    }
}

/// Add-one (Laplace) unigram model over the V training types plus one unknown outcome.
#[derive(Debug, Clone)]
pub struct UnigramModel {
    vocab: Vocab,
    /// Per id: how often it was predicted in training.
    counts: Vec<u64>,
    /// N: the number of training predictions.
    total: u64,
    /// V: distinct predicted types.
    predicted_types: u64,
}

impl UnigramModel {
    /// Counts the words and end-of-line tokens of the non-empty lines of `lines`.
    pub fn train<S: AsRef<str>>(lines: &[S]) -> Self {
        let mut vocab = Vocab::new();
        let mut counts = vec![0_u64; vocab.len()];
        for sentence in sentences(lines) {
            for word in sentence.split_whitespace() {
                let id = vocab.intern(word) as usize;
                if id >= counts.len() {
                    counts.resize(id + 1, 0);
                }
                counts[id] += 1;
            }
            counts[EOS_ID as usize] += 1;
        }
        Self {
            total: counts.iter().sum(),
            predicted_types: counts.iter().filter(|&&c| c > 0).count() as u64,
            vocab,
            counts,
        }
    }

    /// Natural-log probability of `word` ([`EOS`] allowed; unknown words get the add-one share).
    pub fn log_prob(&self, word: &str) -> f64 {
        self.prob(self.vocab.get(word)).ln()
    }

    /// Sums −ln P over every prediction of the non-empty lines of `lines`.
    pub fn evaluate<S: AsRef<str>>(&self, lines: &[S]) -> Perplexity {
        evaluate(&self.vocab, lines, |_, word| self.prob(word))
    }

    /// V: the number of distinct predicted types in training (words and `</s>`).
    pub fn vocab_size(&self) -> u64 {
        self.predicted_types
    }

    fn prob(&self, word: Option<u32>) -> f64 {
        let count = word.and_then(|id| self.counts.get(id as usize).copied()).unwrap_or(0);
        (count + 1) as f64 / (self.total + self.predicted_types + 1) as f64
    }
}

/// Word → id, with `</s>` and `<s>` reserved as ids 0 and 1.
#[derive(Debug, Clone)]
struct Vocab {
    ids: HashMap<String, u32>,
}

impl Vocab {
    fn new() -> Self {
        let ids = HashMap::from([(EOS.to_owned(), EOS_ID), (BOS.to_owned(), BOS_ID)]);
        Self { ids }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn get(&self, word: &str) -> Option<u32> {
        self.ids.get(word).copied()
    }

    fn intern(&mut self, word: &str) -> u32 {
        if let Some(id) = self.get(word) {
            return id;
        }
        // More than u32::MAX distinct words cannot fit in memory here: a bug, not a data condition.
        let id = u32::try_from(self.ids.len()).expect("more than u32::MAX distinct words");
        self.ids.insert(word.to_owned(), id);
        id
    }
}

/// The non-empty trimmed lines: the sentences of both models.
fn sentences<S: AsRef<str>>(lines: &[S]) -> impl Iterator<Item = &str> {
    lines.iter().map(|line| line.as_ref().trim()).filter(|line| !line.is_empty())
}

/// Scores every word and the end-of-line token of each sentence with `prob(prev, word)`, where
/// `None` is a word outside `vocab`. Sums nats first and divides once.
fn evaluate<S: AsRef<str>>(
    vocab: &Vocab,
    lines: &[S],
    prob: impl Fn(Option<u32>, Option<u32>) -> f64,
) -> Perplexity {
    let mut nats = 0.0;
    let mut predictions = 0_u64;
    for sentence in sentences(lines) {
        let mut prev = Some(BOS_ID);
        for word in sentence.split_whitespace().map(|word| vocab.get(word)).chain([Some(EOS_ID)]) {
            nats -= prob(prev, word).ln();
            predictions += 1;
            prev = word;
        }
    }
    Perplexity::new(nats, predictions)
}

fn bigram_key(prev: u32, word: u32) -> u64 {
    (u64::from(prev) << 32) | u64::from(word)
}

fn split_key(key: u64) -> (u32, u32) {
    ((key >> 32) as u32, key as u32)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TRAIN: [&str; 3] = ["a b", "a c", "b c"];

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "expected {expected}, got {actual}");
    }

    // Hand computation for TRAIN = "a b", "a c", "b c", i.e. <s> a b </s>, <s> a c </s>, <s> b c </s>.
    //
    // Bigram counts: (<s>,a)=2 (c,</s>)=2 (a,b)=1 (a,c)=1 (b,</s>)=1 (<s>,b)=1 (b,c)=1: 9 tokens, 7 types.
    // n1 = 5, n2 = 2 → D = 5 / (5 + 4) = 5/9.  N1+(••) = 7.
    // N1+(•w): a 1 ({<s>}), b 2 ({a,<s>}), c 2 ({a,b}), </s> 2 ({b,c}); V = 4, V + 1 = 5.
    // Uniform share: D · V / N1+(••) / (V+1) = (5/9)(4/7)(1/5) = 4/63.
    // P_cont'(a) = (1 − 5/9)/7 + 4/63 = 4/63 + 4/63 = 8/63
    // P_cont'(b) = P_cont'(c) = P_cont'(</s>) = (2 − 5/9)/7 + 4/63 = 13/63 + 4/63 = 17/63
    // P_cont'(unknown) = 4/63.        (8 + 3·17 + 4 = 63.)
    // Histories: c(<s>)=3, N1+(<s>•)=2; c(a)=2, N1+=2; c(b)=2, N1+=2; c(c)=2, N1+=1.
    //
    // TEST = "a c", "c d" (d unknown) → 6 predictions:
    // P(a|<s>)  = (2 − 5/9)/3 + (5/9)(2/3)(8/63)  = 13/27 + 80/1701 = 899/1701
    // P(c|a)    = (1 − 5/9)/2 + (5/9)(2/2)(17/63) = 2/9 + 85/567   = 211/567
    // P(</s>|c) = (2 − 5/9)/2 + (5/9)(1/2)(17/63) = 13/18 + 85/1134 = 452/567
    // P(c|<s>)  = 0 + (5/9)(2/3)(17/63)           = 170/1701
    // P(d|c)    = 0 + (5/9)(1/2)(4/63)            = 10/567
    // P(</s>|d) = P_cont'(</s>) (unseen history)  = 17/63
    // Product = 2477869469200 / 33227552537453169 ≈ 7.4572735e-5,
    // nats = 9.503735600486072, ppl = exp(nats / 6) = 4.874199731894326.
    const TEST: [&str; 2] = ["a c", "c d"];

    #[test]
    fn kneser_ney_by_hand() {
        let model = KneserNeyBigram::train(&TRAIN);
        close(model.discount(), 5.0 / 9.0);
        assert_eq!(model.vocab_size(), 4);
        close(model.log_prob("<s>", "a").exp(), 899.0 / 1701.0);
        close(model.log_prob("c", "</s>").exp(), 452.0 / 567.0);
        close(model.log_prob("c", "d").exp(), 10.0 / 567.0);
        close(model.log_prob("d", "</s>").exp(), 17.0 / 63.0);

        let result = model.evaluate(&TEST);
        assert_eq!(result.predictions, 6);
        let probs: [f64; 6] =
            [899.0 / 1701.0, 211.0 / 567.0, 452.0 / 567.0, 170.0 / 1701.0, 10.0 / 567.0, 17.0 / 63.0];
        let nats: f64 = probs.iter().map(|p| -p.ln()).sum();
        close(result.nats, nats);
        close(result.nats, 9.503_735_600_486_072);
        close(result.ppl, 4.874_199_731_894_326);
    }

    /// Sum of P(w | prev) over the known predicted types and one unknown word.
    fn total_probability(model: &KneserNeyBigram, known: &[&str], prev: &str) -> f64 {
        known.iter().chain(&["</s>", "never-seen"]).map(|word| model.log_prob(prev, word).exp()).sum()
    }

    #[test]
    fn kneser_ney_sums_to_one_for_seen_and_unseen_histories() {
        let model = KneserNeyBigram::train(&TRAIN);
        for prev in ["<s>", "a", "b", "c", "never-seen", "</s>"] {
            close(total_probability(&model, &["a", "b", "c"], prev), 1.0);
        }
    }

    #[test]
    fn kneser_ney_sums_to_one_on_a_larger_corpus() {
        // A pseudo-random corpus over 30 words (a fixed LCG), 200 lines of 0–11 words.
        let words: Vec<String> = (0..30).map(|i| format!("w{i}")).collect();
        let mut state = 12_345_u64;
        let mut next = |bound: u64| {
            state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (state >> 33) % bound
        };
        let lines: Vec<String> = (0..200)
            .map(|_| {
                let len = next(12);
                let line: Vec<&str> = (0..len).map(|_| words[next(30) as usize].as_str()).collect();
                line.join(" ")
            })
            .collect();
        let model = KneserNeyBigram::train(&lines);
        let known: Vec<&str> = words.iter().map(String::as_str).collect();
        assert_eq!(model.vocab_size(), 31);
        for prev in known.iter().copied().chain(["<s>", "unseen"]) {
            close(total_probability(&model, &known, prev), 1.0);
        }
    }

    #[test]
    fn blank_lines_are_skipped_and_each_line_ends_once() {
        let model = KneserNeyBigram::train(&TRAIN);
        let result = model.evaluate(&["", "  a  b ", "   ", "c"]);
        // "a b" → a, b, </s>; "c" → c, </s>.
        assert_eq!(result.predictions, 5);
        assert!(model.evaluate::<&str>(&[]).ppl.is_nan());
    }

    #[test]
    fn empty_training_is_uniform() {
        let model = KneserNeyBigram::train::<&str>(&[]);
        // V = 0 (no </s> was ever predicted): the one unknown outcome gets everything.
        close(model.log_prob("<s>", "a").exp(), 1.0);
        let unigram = UnigramModel::train::<&str>(&[]);
        close(unigram.log_prob("a").exp(), 1.0);
    }

    // Add-one unigram on TRAIN: counts a 2, b 2, c 2, </s> 3; N = 9, V = 4 → P(w) = (c + 1) / 14.
    // TEST predictions a, c, </s>, c, d (unknown), </s>: 3/14, 3/14, 4/14, 3/14, 1/14, 4/14.
    // Product = 432 / 14^6, so ppl = 14 / 432^(1/6) ≈ 5.0875.
    #[test]
    fn unigram_by_hand() {
        let model = UnigramModel::train(&TRAIN);
        assert_eq!(model.vocab_size(), 4);
        let result = model.evaluate(&TEST);
        assert_eq!(result.predictions, 6);
        close(result.nats, -(432.0_f64 / 14.0_f64.powi(6)).ln());
        close(result.ppl, 14.0 / 432.0_f64.powf(1.0 / 6.0));
        let total: f64 =
            ["a", "b", "c", "</s>", "never-seen"].iter().map(|word| model.log_prob(word).exp()).sum();
        close(total, 1.0);
    }
}
