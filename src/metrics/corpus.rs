//! Word-level corpus metrics: diversity, tail coverage and distribution shape (each declared in
//! [`super::registry`], defined in README's Metrics section).
//!
//! Every metric here is computed on *words*: the whitespace-separated tokens of a text (wikitext-2 is
//! pre-tokenized, so punctuation, `@-@` and `<unk>` are words of their own). They do not depend on any
//! model tokenizer.
//!
//! Usage: build a [`Reference`] once per run from the words of the real train split, then call
//! [`corpus_metrics`] for each generation's corpus (and for the train split itself, the "real" row).
//!
//! Conventions, shared by all metrics:
//! - A corpus is one flat list of words. N-grams are taken over that list as it is, so they run across
//!   line and sequence boundaries; callers that want boundaries respected must measure pieces separately.
//! - A ratio whose denominator is zero (an empty corpus, no n-grams in a prefix, an empty `R_k`) is
//!   `NaN`, not 0, so "undefined" can never be mistaken for a measurement. `serde_json` writes `NaN` as
//!   `null`; [`CorpusMetrics`] reads `null` back as `NaN`.
//! - Rare/common n-gram recall compares corpora fairly only at equal size: truncate or subsample before
//!   calling. This module measures whatever it is given.
//!
//! # How it is computed
//! Words are interned to `u32` ids once (reference words keep their reference id; other corpus words
//! get fresh ids). Unigrams are counted in a vector indexed by id. Bigrams and trigrams are packed
//! into `u128` keys (32 bits per id), sorted, and run-length counted; the reference and a corpus are
//! then compared by one merge pass over the two sorted lists. Sorting is O(n log n) rather than the
//! O(n) of hash-map counting, but on 2 M trigrams it measured 4–5× faster here (a hash map misses the
//! cache on almost every insert), and the merge makes recall and novelty a single linear scan.
//! MATTR uses a sliding count vector: O(n).

use std::collections::HashMap;

use serde::{Deserialize, Deserializer, Serialize};

/// Splits a text into words (whitespace-separated tokens).
pub fn words(text: &str) -> Vec<&str> {
    text.split_whitespace().collect()
}

/// Word frequencies sorted in descending order (rank 1 first), for rank–frequency (Zipf) plots.
pub fn rank_frequency<S: AsRef<str>>(words: &[S]) -> Vec<u64> {
    let mut counts: HashMap<&str, u64> = HashMap::new();
    for word in words {
        *counts.entry(word.as_ref()).or_insert(0) += 1;
    }
    let mut frequencies: Vec<u64> = counts.into_values().collect();
    frequencies.sort_unstable_by(|a, b| b.cmp(a));
    frequencies
}

/// Knobs of [`corpus_metrics`]; `Default` gives the values the lab uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MetricOptions {
    /// N for `ttr_at_n` and `distinct_n`: only the first N words are used (capped to the corpus length).
    /// The lab uses the smaller of 100,000 and the real train words, fixed for the run.
    pub ttr_n: usize,
    /// MATTR window W (Covington & McFall 2010 use 100). A window of 0 gives `NaN`.
    pub mattr_window: usize,
    /// Rare n-grams: reference count in `1..=rare_k`.
    pub rare_k: u64,
    /// Common n-grams (the control): reference count `>= common_min`.
    pub common_min: u64,
}

impl Default for MetricOptions {
    fn default() -> Self {
        Self { ttr_n: 100_000, mattr_window: 100, rare_k: 5, common_min: 100 }
    }
}

/// The word metrics of one corpus against the reference; its field names are registry keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct CorpusMetrics {
    /// Number of words in the corpus.
    pub words: u64,
    /// The N actually used for `ttr_at_n` and `distinct_n`: `min(opts.ttr_n, words)`.
    pub ttr_n: u64,
    /// Types / tokens over the first `ttr_n` words.
    #[serde(deserialize_with = "f64_or_nan")]
    pub ttr_at_n: f64,
    /// Moving-average TTR: mean over all windows of W words of types / W (types / len if shorter than W).
    #[serde(deserialize_with = "f64_or_nan")]
    pub mattr: f64,
    /// Unique / total unigrams over the first `ttr_n` words (equal to `ttr_at_n`).
    #[serde(deserialize_with = "f64_or_nan")]
    pub distinct_1: f64,
    /// Unique / total bigrams over the first `ttr_n` words.
    #[serde(deserialize_with = "f64_or_nan")]
    pub distinct_2: f64,
    /// Unique / total trigrams over the first `ttr_n` words.
    #[serde(deserialize_with = "f64_or_nan")]
    pub distinct_3: f64,
    /// Share of the reference's rare unigrams (count `1..=k`) that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub rare_ngram_recall_1: f64,
    /// Share of the reference's rare bigrams that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub rare_ngram_recall_2: f64,
    /// Share of the reference's rare trigrams that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub rare_ngram_recall_3: f64,
    /// Share of the reference's common unigrams (count `>= common_min`) that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub common_ngram_recall_1: f64,
    /// Share of the reference's common bigrams that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub common_ngram_recall_2: f64,
    /// Share of the reference's common trigrams that occur in the corpus.
    #[serde(deserialize_with = "f64_or_nan")]
    pub common_ngram_recall_3: f64,
    /// Share of the corpus's trigram *occurrences* (tokens, not types) that never occur in the
    /// reference: a trigram repeated 10 times counts 10 times, so the rate is the chance that a trigram
    /// read at a random position of the corpus is novel.
    #[serde(deserialize_with = "f64_or_nan")]
    pub novel_trigram_rate: f64,
    /// Jensen–Shannon divergence (bits, in `[0, 1]`) between the reference and corpus unigram distributions.
    #[serde(deserialize_with = "f64_or_nan")]
    pub unigram_js: f64,
    /// Zipf exponent: minus the least-squares slope of ln(frequency) on ln(rank) over ranks
    /// `10..=min(10_000, vocabulary)`; `NaN` when that range holds fewer than 2 ranks (vocabulary < 11).
    #[serde(deserialize_with = "f64_or_nan")]
    pub zipf_alpha: f64,
    /// Shannon entropy (bits) of the corpus word unigram distribution.
    #[serde(deserialize_with = "f64_or_nan")]
    pub unigram_entropy: f64,
    /// Share of the first `ttr_n` words whose type is no word of the reference (or of its known
    /// words): invented words, which real text never has.
    #[serde(default = "nan", deserialize_with = "f64_or_nan")]
    pub nonword_rate: f64,
}

impl CorpusMetrics {
    /// Writes every field into `row` under the registry key of the same name (a field that is not
    /// a registered metric is an error, so a new metric cannot be forgotten in the registry).
    pub fn put(&self, row: &mut crate::metrics::registry::Row) -> anyhow::Result<()> {
        match serde_json::to_value(self)? {
            serde_json::Value::Object(map) => row.merge(&map).map_err(anyhow::Error::msg),
            _ => unreachable!("a struct serialises to an object"),
        }
    }
}

/// First and last rank (1-based, inclusive) of the Zipf fit.
const ZIPF_RANKS: (usize, usize) = (10, 10_000);

/// The real train split's words, interned and counted once per run.
#[derive(Debug, Clone)]
pub struct Reference {
    /// Word → id; ids are `0..vocab.len()`.
    vocab: HashMap<String, u32>,
    /// Word counts indexed by id.
    unigram_counts: Vec<u64>,
    /// The distinct unigrams, bigrams and trigrams with their counts.
    ngrams: [NgramCounts; 3],
    words: u64,
    /// Words of the language beyond these (e.g. the whole train split when the reference is a run's
    /// share of it): a corpus word is a non-word if it is neither a reference word nor one of these.
    known: std::collections::HashSet<String>,
}

impl Reference {
    /// Interns and counts the reference words (unigrams, bigrams, trigrams).
    pub fn new<S: AsRef<str>>(words: &[S]) -> Self {
        let mut vocab: HashMap<String, u32> = HashMap::new();
        let ids: Vec<u32> = words
            .iter()
            .map(|word| {
                let word = word.as_ref();
                match vocab.get(word) {
                    Some(&id) => id,
                    None => {
                        let id = id_for(vocab.len());
                        vocab.insert(word.to_owned(), id);
                        id
                    }
                }
            })
            .collect();
        let unigram_counts = count_ids(&ids, vocab.len());
        Self {
            ngrams: [
                NgramCounts::from_unigram_counts(&unigram_counts),
                NgramCounts::from_ids(&ids, 2),
                NgramCounts::from_ids(&ids, 3),
            ],
            vocab,
            unigram_counts,
            words: ids.len() as u64,
            known: Default::default(),
        }
    }

    /// The same reference, with `words` (e.g. every word of the whole train split) also counted as
    /// real words by `nonword_rate`.
    pub fn knowing<S: AsRef<str>>(mut self, words: &[S]) -> Self {
        self.known.extend(
            words.iter().map(|w| w.as_ref()).filter(|w| !self.vocab.contains_key(*w)).map(String::from),
        );
        self
    }

    /// Whether `word` is a word of the reference or of the known words.
    pub fn is_word(&self, word: &str) -> bool {
        self.vocab.contains_key(word) || self.known.contains(word)
    }

    /// Number of reference words (tokens).
    pub fn words(&self) -> u64 {
        self.words
    }

    /// Number of distinct reference words (types).
    pub fn vocab_size(&self) -> usize {
        self.vocab.len()
    }

    /// How often `word` occurs in the reference (0 if never): e.g. to split tokens into rare (≤ 10)
    /// and common (≥ 1000) words for `test_ppl_rare` / `test_ppl_common`.
    pub fn word_count(&self, word: &str) -> u64 {
        self.vocab.get(word).map_or(0, |&id| self.unigram_counts[id as usize])
    }

    /// Maps corpus words to ids: reference words keep their reference id, other words get fresh ids
    /// from `vocab_size()` upwards. Returns the ids and the number of ids in use.
    fn intern<'a, S: AsRef<str>>(&self, words: &'a [S]) -> (Vec<u32>, usize) {
        let mut unknown: HashMap<&'a str, u32> = HashMap::new();
        let ids = words
            .iter()
            .map(|word| {
                let word = word.as_ref();
                if let Some(&id) = self.vocab.get(word) {
                    return id;
                }
                let next = id_for(self.vocab.len() + unknown.len());
                *unknown.entry(word).or_insert(next)
            })
            .collect();
        (ids, self.vocab.len() + unknown.len())
    }
}

/// Computes every metric of [`CorpusMetrics`] for `corpus_words` against `reference`.
pub fn corpus_metrics<S: AsRef<str>>(
    reference: &Reference,
    corpus_words: &[S],
    opts: &MetricOptions,
) -> CorpusMetrics {
    let (ids, id_count) = reference.intern(corpus_words);
    let counts = count_ids(&ids, id_count);
    let corpus_ngrams = [
        NgramCounts::from_unigram_counts(&counts),
        NgramCounts::from_ids(&ids, 2),
        NgramCounts::from_ids(&ids, 3),
    ];
    let [unigrams, bigrams, trigrams] =
        std::array::from_fn(|i| Overlap::new(&reference.ngrams[i], &corpus_ngrams[i], opts));

    let n = opts.ttr_n.min(ids.len());
    let prefix = &ids[..n];
    let distinct = |order: usize| ratio(distinct_ngrams(prefix, order), ngram_total(n, order));
    let mut frequencies: Vec<u64> = counts.iter().copied().filter(|&c| c > 0).collect();
    frequencies.sort_unstable_by(|a, b| b.cmp(a));

    CorpusMetrics {
        words: ids.len() as u64,
        ttr_n: n as u64,
        ttr_at_n: distinct(1),
        mattr: mattr(&ids, id_count, opts.mattr_window),
        distinct_1: distinct(1),
        distinct_2: distinct(2),
        distinct_3: distinct(3),
        rare_ngram_recall_1: unigrams.rare_recall(),
        rare_ngram_recall_2: bigrams.rare_recall(),
        rare_ngram_recall_3: trigrams.rare_recall(),
        common_ngram_recall_1: unigrams.common_recall(),
        common_ngram_recall_2: bigrams.common_recall(),
        common_ngram_recall_3: trigrams.common_recall(),
        novel_trigram_rate: ratio(trigrams.novel_occurrences, ngram_total(ids.len(), 3)),
        unigram_js: jensen_shannon_bits(&reference.unigram_counts, &counts),
        zipf_alpha: zipf_alpha(&frequencies),
        unigram_entropy: entropy_bits(&counts),
        nonword_rate: ratio(
            corpus_words[..n].iter().filter(|w| !reference.is_word(w.as_ref())).count() as u64,
            n as u64,
        ),
    }
}

fn nan() -> f64 {
    f64::NAN
}

/// The distinct n-grams of one order, sorted by key, with how often each occurs.
#[derive(Debug, Clone, Default, PartialEq)]
struct NgramCounts {
    keys: Vec<u128>,
    counts: Vec<u64>,
}

impl NgramCounts {
    /// Counts the `order`-grams of `ids` by sorting their keys.
    fn from_ids(ids: &[u32], order: usize) -> Self {
        let mut result = Self::default();
        for key in sorted_keys(ids, order) {
            match (result.keys.last(), result.counts.last_mut()) {
                (Some(&last), Some(count)) if last == key => *count += 1,
                _ => {
                    result.keys.push(key);
                    result.counts.push(1);
                }
            }
        }
        result
    }

    /// The unigrams of a count vector indexed by id (already in key order).
    fn from_unigram_counts(counts: &[u64]) -> Self {
        let (keys, counts) = counts
            .iter()
            .enumerate()
            .filter(|&(_, &count)| count > 0)
            .map(|(id, &count)| (id as u128, count))
            .unzip();
        Self { keys, counts }
    }

    fn iter(&self) -> impl Iterator<Item = (u128, u64)> + '_ {
        self.keys.iter().copied().zip(self.counts.iter().copied())
    }
}

/// How a corpus's n-grams of one order overlap the reference's.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Overlap {
    /// Reference n-gram types with a count in `1..=rare_k`, and how many of them the corpus has.
    rare_types: u64,
    rare_found: u64,
    /// Reference n-gram types with a count `>= common_min`, and how many of them the corpus has.
    common_types: u64,
    common_found: u64,
    /// Corpus n-gram occurrences whose n-gram the reference never has.
    novel_occurrences: u64,
}

impl Overlap {
    /// One merge pass over the two sorted n-gram lists.
    fn new(reference: &NgramCounts, corpus: &NgramCounts, opts: &MetricOptions) -> Self {
        let mut overlap = Self::default();
        let mut corpus = corpus.iter().peekable();
        for (key, count) in reference.iter() {
            while let Some((_, novel)) = corpus.next_if(|&(corpus_key, _)| corpus_key < key) {
                overlap.novel_occurrences += novel;
            }
            let found = u64::from(corpus.next_if(|&(corpus_key, _)| corpus_key == key).is_some());
            if (1..=opts.rare_k).contains(&count) {
                overlap.rare_types += 1;
                overlap.rare_found += found;
            }
            if count >= opts.common_min {
                overlap.common_types += 1;
                overlap.common_found += found;
            }
        }
        overlap.novel_occurrences += corpus.map(|(_, count)| count).sum::<u64>();
        overlap
    }

    fn rare_recall(&self) -> f64 {
        ratio(self.rare_found, self.rare_types)
    }

    fn common_recall(&self) -> f64 {
        ratio(self.common_found, self.common_types)
    }
}

/// The keys of every `order`-gram of `ids` (`order` ≤ 3: 32 bits per id), sorted.
fn sorted_keys(ids: &[u32], order: usize) -> Vec<u128> {
    debug_assert!((1..=3).contains(&order));
    let mut keys: Vec<u128> = ids
        .windows(order)
        .map(|ngram| ngram.iter().fold(0, |key, &id| (key << 32) | u128::from(id)))
        .collect();
    keys.sort_unstable();
    keys
}

/// Number of distinct `order`-grams of `ids`.
fn distinct_ngrams(ids: &[u32], order: usize) -> u64 {
    let mut keys = sorted_keys(ids, order);
    keys.dedup();
    keys.len() as u64
}

/// Number of `order`-gram occurrences in `len` words.
fn ngram_total(len: usize, order: usize) -> u64 {
    (len + 1).saturating_sub(order) as u64
}

/// Counts per id.
fn count_ids(ids: &[u32], id_count: usize) -> Vec<u64> {
    let mut counts = vec![0; id_count];
    for &id in ids {
        counts[id as usize] += 1;
    }
    counts
}

/// Moving-average type/token ratio with a sliding count vector: O(len).
fn mattr(ids: &[u32], id_count: usize, window: usize) -> f64 {
    if window == 0 || ids.is_empty() {
        return f64::NAN;
    }
    let mut counts = vec![0_u32; id_count];
    let mut types = 0_u64;
    let first = window.min(ids.len());
    for &id in &ids[..first] {
        types += u64::from(counts[id as usize] == 0);
        counts[id as usize] += 1;
    }
    if ids.len() < window {
        return ratio(types, ids.len() as u64);
    }
    let mut type_sum = types;
    for (&leaving, &entering) in ids.iter().zip(&ids[window..]) {
        counts[leaving as usize] -= 1;
        types -= u64::from(counts[leaving as usize] == 0);
        types += u64::from(counts[entering as usize] == 0);
        counts[entering as usize] += 1;
        type_sum += types;
    }
    let windows = ids.len() - window + 1;
    type_sum as f64 / (windows as f64 * window as f64)
}

/// Jensen–Shannon divergence in bits between two count vectors indexed by the same ids (the shorter
/// one is zero past its end). `NaN` if either is empty.
fn jensen_shannon_bits(p_counts: &[u64], q_counts: &[u64]) -> f64 {
    let p_total: u64 = p_counts.iter().sum();
    let q_total: u64 = q_counts.iter().sum();
    if p_total == 0 || q_total == 0 {
        return f64::NAN;
    }
    let len = p_counts.len().max(q_counts.len());
    let mut divergence = 0.0;
    for id in 0..len {
        let p = p_counts.get(id).map_or(0.0, |&c| c as f64 / p_total as f64);
        let q = q_counts.get(id).map_or(0.0, |&c| c as f64 / q_total as f64);
        let m = 0.5 * (p + q);
        if p > 0.0 {
            divergence += 0.5 * p * (p / m).log2();
        }
        if q > 0.0 {
            divergence += 0.5 * q * (q / m).log2();
        }
    }
    // Rounding can leave a tiny negative value for identical distributions.
    divergence.clamp(0.0, 1.0)
}

/// Shannon entropy in bits of a count vector; `NaN` if it is empty.
fn entropy_bits(counts: &[u64]) -> f64 {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return f64::NAN;
    }
    -counts
        .iter()
        .filter(|&&c| c > 0)
        .map(|&c| {
            let p = c as f64 / total as f64;
            p * p.log2()
        })
        .sum::<f64>()
}

/// Minus the least-squares slope of ln(frequency) on ln(rank) over [`ZIPF_RANKS`]; `frequencies`
/// must be sorted descending (rank 1 first). `NaN` with fewer than 2 points in range.
fn zipf_alpha(frequencies: &[u64]) -> f64 {
    let (first, last) = ZIPF_RANKS;
    let points: Vec<(f64, f64)> = frequencies
        .iter()
        .enumerate()
        .skip(first - 1)
        .take(last + 1 - first)
        .map(|(index, &frequency)| (((index + 1) as f64).ln(), (frequency as f64).ln()))
        .collect();
    if points.len() < 2 {
        return f64::NAN;
    }
    let count = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / count;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / count;
    let covariance: f64 = points.iter().map(|(x, y)| (x - mean_x) * (y - mean_y)).sum();
    let variance: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    -covariance / variance
}

/// `numerator / denominator`, `NaN` when the denominator is 0.
fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        f64::NAN
    } else {
        numerator as f64 / denominator as f64
    }
}

/// The id of the `index`-th distinct word. A corpus with more than `u32::MAX` distinct words is far
/// beyond anything this lab reads, so running out of ids is a bug, not a data condition.
fn id_for(index: usize) -> u32 {
    u32::try_from(index).expect("more than u32::MAX distinct words")
}

/// Reads a float that `serde_json` may have written as `null` (its spelling of `NaN`).
fn f64_or_nan<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(deserializer)?.unwrap_or(f64::NAN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-12, "expected {expected}, got {actual}");
    }

    /// Reference "a b a c a b d" and corpus "a b a b a c" with small knobs, every value by hand.
    ///
    /// Reference counts: unigrams a3 b2 c1 d1; bigrams ab2 ba1 ac1 ca1 bd1;
    /// trigrams aba bac aca cab abd, each 1.
    #[test]
    fn nonword_rate_counts_words_outside_the_reference_and_known_words() {
        let reference = Reference::new(&words("a b c")).knowing(&words("d e"));
        // "a x d y" over the first 4 words: x and y are non-words (d is known).
        let opts = MetricOptions { ttr_n: 4, ..MetricOptions::default() };
        close(corpus_metrics(&reference, &words("a x d y z"), &opts).nonword_rate, 0.5);
        let real = corpus_metrics(&reference, &words("a b c"), &MetricOptions::default());
        close(real.nonword_rate, 0.0);
        assert!(corpus_metrics::<&str>(&reference, &[], &opts).nonword_rate.is_nan());
    }

    fn golden() -> CorpusMetrics {
        let reference = Reference::new(&words("a b a c a b d"));
        let opts = MetricOptions { ttr_n: 5, mattr_window: 3, rare_k: 1, common_min: 2 };
        corpus_metrics(&reference, &words("a b a b a c"), &opts)
    }

    #[test]
    fn golden_length_and_ttr() {
        let m = golden();
        assert_eq!(m.words, 6);
        assert_eq!(m.ttr_n, 5);
        // First 5 words "a b a b a": 2 types / 5 tokens.
        close(m.ttr_at_n, 2.0 / 5.0);
    }

    #[test]
    fn golden_mattr() {
        // Windows of 3 over "a b a b a c": aba (2 types), bab (2), aba (2), bac (3) → 9 / (4 · 3).
        close(golden().mattr, 9.0 / 12.0);
    }

    #[test]
    fn golden_distinct_n() {
        let m = golden();
        // First 5 words "a b a b a".
        close(m.distinct_1, 2.0 / 5.0); // {a, b} of 5 unigrams
        close(m.distinct_2, 2.0 / 4.0); // ab ba ab ba → {ab, ba} of 4
        close(m.distinct_3, 2.0 / 3.0); // aba bab aba → {aba, bab} of 3
    }

    #[test]
    fn golden_rare_and_common_recall() {
        let m = golden();
        // k = 1: rare unigrams {c, d}; the corpus has c → 1/2. Common (≥ 2) {a, b}: both → 1.
        close(m.rare_ngram_recall_1, 0.5);
        close(m.common_ngram_recall_1, 1.0);
        // Rare bigrams {ba, ac, ca, bd}; corpus bigrams {ab, ba, ac} → 2/4. Common {ab} → 1.
        close(m.rare_ngram_recall_2, 0.5);
        close(m.common_ngram_recall_2, 1.0);
        // Rare trigrams: all five; corpus trigrams {aba, bab, bac} hit aba, bac → 2/5.
        close(m.rare_ngram_recall_3, 0.4);
        // No reference trigram occurs twice: the common set is empty, recall undefined.
        assert!(m.common_ngram_recall_3.is_nan());
    }

    #[test]
    fn golden_novel_trigram_rate() {
        // Trigram occurrences aba bab aba bac; only bab is not in the reference → 1/4.
        close(golden().novel_trigram_rate, 0.25);
    }

    #[test]
    fn golden_unigram_js() {
        // P (reference) = a 3/7, b 2/7, c 1/7, d 1/7;  Q (corpus) = a 1/2, b 1/3, c 1/6, d 0.
        // M = (P + Q)/2 = a 13/28, b 13/42, c 13/84, d 1/14, so P/M = 12/13 for a, b, c and 2 for d,
        // and Q/M = 14/13 for a, b, c. JS = ½·[(6/7)·log2(12/13) + (1/7)·1] + ½·log2(14/13)
        // ≈ 0.0753959373497.
        let expected =
            0.5 * ((6.0 / 7.0) * (12.0_f64 / 13.0).log2() + 1.0 / 7.0) + 0.5 * (14.0_f64 / 13.0).log2();
        close(golden().unigram_js, expected);
        close(expected, 0.075_395_937_349_7);
    }

    #[test]
    fn golden_entropy() {
        // Q = 1/2, 1/3, 1/6: H = ½·1 + ⅓·log2 3 + ⅙·log2 6 ≈ 1.4591479170.
        let expected = 0.5 + 3.0_f64.log2() / 3.0 + 6.0_f64.log2() / 6.0;
        close(golden().unigram_entropy, expected);
        close(expected, 1.459_147_917_027_2);
    }

    #[test]
    fn golden_zipf_alpha_needs_rank_ten() {
        // Only 3 types: no ranks in 10..=10000.
        assert!(golden().zipf_alpha.is_nan());
    }

    #[test]
    fn zipf_alpha_two_points_by_hand() {
        // 9 words seen 4 times, a 10th seen 4 times, an 11th seen twice. Ranks 10 and 11 have
        // frequencies 4 and 2: slope = (ln 2 − ln 4)/(ln 11 − ln 10), alpha = ln 2 / ln 1.1 ≈ 7.2725.
        let mut corpus = Vec::new();
        for word in ["w1", "w2", "w3", "w4", "w5", "w6", "w7", "w8", "w9", "w10"] {
            corpus.extend([word; 4]);
        }
        corpus.extend(["w11"; 2]);
        let m = corpus_metrics(&Reference::new(&corpus), &corpus, &MetricOptions::default());
        close(m.zipf_alpha, 2.0_f64.ln() / 1.1_f64.ln());
    }

    #[test]
    fn zipf_alpha_of_a_power_law() {
        // Frequencies round(2e5 / r) for ranks 1..=2000: alpha ≈ 1 (rounding aside).
        let frequencies: Vec<u64> =
            (1..=2000_u32).map(|r| (200_000.0 / f64::from(r)).round() as u64).collect();
        assert!((zipf_alpha(&frequencies) - 1.0).abs() < 1e-3);
        // Only ranks 10..=10000 count: a different head changes nothing.
        let mut head_changed = frequencies.clone();
        head_changed[0] = 10_000_000;
        close(zipf_alpha(&head_changed), zipf_alpha(&frequencies));
    }

    #[test]
    fn rank_frequency_sorted_descending() {
        assert_eq!(rank_frequency(&words("a b a c a b")), vec![3, 2, 1]);
        assert!(rank_frequency::<&str>(&[]).is_empty());
    }

    #[test]
    fn words_split_on_any_whitespace() {
        assert_eq!(words("  a\tb \n c  "), vec!["a", "b", "c"]);
    }

    #[test]
    fn reference_against_itself() {
        let text = "the cat sat on the mat . the dog sat on the cat . a cat is a cat .";
        let reference = Reference::new(&words(text));
        let opts = MetricOptions { common_min: 2, ..MetricOptions::default() };
        let m = corpus_metrics(&reference, &words(text), &opts);
        for recall in [
            m.rare_ngram_recall_1,
            m.rare_ngram_recall_2,
            m.rare_ngram_recall_3,
            m.common_ngram_recall_1,
            m.common_ngram_recall_2,
            m.common_ngram_recall_3,
        ] {
            close(recall, 1.0);
        }
        close(m.unigram_js, 0.0);
        close(m.novel_trigram_rate, 0.0);
    }

    #[test]
    fn disjoint_vocabularies_diverge_by_one_bit() {
        let reference = Reference::new(&words("a b c a"));
        let m = corpus_metrics(&reference, &words("x y z x"), &MetricOptions::default());
        close(m.unigram_js, 1.0);
        close(m.novel_trigram_rate, 1.0);
        close(m.rare_ngram_recall_1, 0.0);
    }

    #[test]
    fn same_distribution_in_another_order_has_zero_js() {
        let reference = Reference::new(&words("a b b c c c"));
        let m = corpus_metrics(&reference, &words("c b c a c b"), &MetricOptions::default());
        close(m.unigram_js, 0.0);
    }

    #[test]
    fn short_corpus_caps_n_and_window() {
        // 4 words, N = 100_000 and W = 100 by default: N becomes 4, MATTR becomes types/len = 3/4.
        let reference = Reference::new(&words("a b"));
        let m = corpus_metrics(&reference, &words("a b a c"), &MetricOptions::default());
        assert_eq!(m.ttr_n, 4);
        close(m.ttr_at_n, 3.0 / 4.0);
        close(m.mattr, 3.0 / 4.0);
        close(m.distinct_2, 1.0); // ab ba ac: 3 of 3
    }

    #[test]
    fn mattr_matches_brute_force() {
        let text = "a b c a b a a d e f a b c d a b b b c a e";
        let ids: Vec<u32> = text.bytes().filter(|b| *b != b' ').map(u32::from).collect();
        for window in 1..=ids.len() {
            let brute: f64 = ids
                .windows(window)
                .map(|w| {
                    let mut sorted = w.to_vec();
                    sorted.sort_unstable();
                    sorted.dedup();
                    sorted.len() as f64 / window as f64
                })
                .sum::<f64>()
                / (ids.len() - window + 1) as f64;
            close(mattr(&ids, 256, window), brute);
        }
    }

    /// Brute-force counts of the `order`-grams of `ids`, as sorted (key, count) pairs.
    fn brute_force(ids: &[u32], order: usize) -> Vec<(u128, u64)> {
        let mut counts: HashMap<Vec<u32>, u64> = HashMap::new();
        for ngram in ids.windows(order) {
            *counts.entry(ngram.to_vec()).or_insert(0) += 1;
        }
        let mut pairs: Vec<(u128, u64)> = counts
            .into_iter()
            .map(|(ngram, count)| (ngram.iter().fold(0, |k, &id| (k << 32) | u128::from(id)), count))
            .collect();
        pairs.sort_unstable();
        pairs
    }

    #[test]
    fn ngram_counts_match_brute_force() {
        let ids: Vec<u32> = "abcabdabcaaeb".bytes().map(u32::from).collect();
        for order in 1..=3 {
            let counted: Vec<(u128, u64)> = NgramCounts::from_ids(&ids, order).iter().collect();
            assert_eq!(counted, brute_force(&ids, order), "order {order}");
        }
        let unigrams = NgramCounts::from_unigram_counts(&count_ids(&ids, 256));
        assert_eq!(unigrams, NgramCounts::from_ids(&ids, 1));
        // Ids that differ only in the high bits must not collide.
        let wide = [u32::MAX, 0, 1, u32::MAX, 0, 1, 0, u32::MAX];
        let counted: Vec<(u128, u64)> = NgramCounts::from_ids(&wide, 3).iter().collect();
        assert_eq!(counted, brute_force(&wide, 3));
    }

    #[test]
    fn overlap_matches_brute_force() {
        let reference: Vec<u32> = "abcabdabcaaebbbcab".bytes().map(u32::from).collect();
        let corpus: Vec<u32> = "xabcaabzzabcbcq".bytes().map(u32::from).collect();
        let opts = MetricOptions { rare_k: 1, common_min: 2, ..MetricOptions::default() };
        for order in 1..=3 {
            let overlap = Overlap::new(
                &NgramCounts::from_ids(&reference, order),
                &NgramCounts::from_ids(&corpus, order),
                &opts,
            );
            let reference_counts = brute_force(&reference, order);
            let corpus_counts = brute_force(&corpus, order);
            let in_corpus = |key: u128| corpus_counts.iter().any(|&(k, _)| k == key);
            let in_reference = |key: u128| reference_counts.iter().any(|&(k, _)| k == key);
            let mut expected = Overlap::default();
            for &(key, count) in &reference_counts {
                if count == 1 {
                    expected.rare_types += 1;
                    expected.rare_found += u64::from(in_corpus(key));
                }
                if count >= 2 {
                    expected.common_types += 1;
                    expected.common_found += u64::from(in_corpus(key));
                }
            }
            expected.novel_occurrences =
                corpus_counts.iter().filter(|&&(key, _)| !in_reference(key)).map(|&(_, count)| count).sum();
            assert_eq!(overlap, expected, "order {order}");
        }
    }

    #[test]
    fn empty_corpus_is_undefined_not_a_panic() {
        let reference = Reference::new(&words("a b c"));
        let m = corpus_metrics::<&str>(&reference, &[], &MetricOptions::default());
        assert_eq!((m.words, m.ttr_n), (0, 0));
        assert!(m.ttr_at_n.is_nan() && m.mattr.is_nan() && m.unigram_js.is_nan());
        assert!(m.novel_trigram_rate.is_nan() && m.unigram_entropy.is_nan());
        close(m.rare_ngram_recall_1, 0.0);
    }

    #[test]
    fn unknown_words_get_their_own_ids() {
        // "x" and "y" are not in the reference; they must not collide with each other or with "a".
        let reference = Reference::new(&words("a a"));
        let m = corpus_metrics(&reference, &words("x y x a"), &MetricOptions::default());
        close(m.ttr_at_n, 3.0 / 4.0);
        close(m.novel_trigram_rate, 1.0);
    }

    #[test]
    fn owned_strings_work_too() {
        let owned: Vec<String> = words("a b a c").iter().map(|w| w.to_string()).collect();
        let reference = Reference::new(&owned);
        assert_eq!(reference.words(), 4);
        assert_eq!(reference.vocab_size(), 3);
        assert_eq!(reference.word_count("a"), 2);
        assert_eq!(reference.word_count("zzz"), 0);
        let m = corpus_metrics(&reference, &owned, &MetricOptions::default());
        close(m.unigram_js, 0.0);
    }

    #[test]
    fn json_round_trip_keeps_nan() {
        let m = golden();
        let json = serde_json::to_string(&m).expect("serialize");
        assert!(json.contains("\"zipf_alpha\":null"));
        let back: CorpusMetrics = serde_json::from_str(&json).expect("deserialize");
        assert!(back.zipf_alpha.is_nan() && back.common_ngram_recall_3.is_nan());
        assert_eq!(back.words, m.words);
        close(back.unigram_js, m.unigram_js);
    }
}
