//! Next-token selection: sampling (temperature, top-k, top-p, repetition
//! penalty) and fixed-length beam search.
//!
//! Everything here is a pure function of a logits slice (or a [`StepModel`])
//! and, for sampling, an RNG passed in by the caller, in the style of llm.c.
//! Nothing depends on a tensor library, so the selection logic is testable
//! without a model and the same code serves the real KV-cached generator:
//!
//! * [`Sampler::choose`] (or the one-shot [`choose`]) picks one token from one
//!   row of logits. A `Sampler` keeps its scratch buffers between calls, so a
//!   batch of many rows × many steps allocates once.
//! * [`beam_step`] is one step of beam search on already-computed
//!   log-probabilities; it returns which beam each survivor extends and with
//!   which token, so a caller holding per-beam KV caches can reorder them.
//!   [`beam_search`] builds the whole search on it for any [`StepModel`].
//!
//! Conventions follow Hugging Face `generate`: the repetition penalty comes
//! first, then the temperature, then top-k, then top-p on the distribution
//! renormalised after top-k. In beam search the penalty applies to the
//! log-probabilities, as in Hugging Face's beam search (see
//! [`beam_logprobs`]).

use rand::Rng;
use std::cmp::Ordering;

pub use crate::config::SamplerSettings;

/// Numerically stable softmax, in place (the maximum is subtracted before
/// `exp`). All `-inf` gives the uniform distribution; `+inf` entries share
/// all the mass. An empty slice is left alone.
pub fn softmax_in_place(x: &mut [f32]) {
    exp_weights(x, 1.0);
    let total = lane_sum(x);
    if total > 0.0 {
        for v in x.iter_mut() {
            *v = (f64::from(*v) / total) as f32;
        }
    }
}

/// Numerically stable `log(softmax(x))`: `x - max - ln(sum(exp(x - max)))`.
/// All `-inf` gives the uniform distribution, like [`softmax_in_place`].
pub fn log_softmax(x: &[f32]) -> Vec<f32> {
    let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max.is_infinite() {
        // Same limits as `softmax_in_place`: uniform over the entries equal
        // to the infinite maximum, zero probability elsewhere.
        let count = x.iter().filter(|&&v| v == max).count();
        let log_p = -(count as f32).ln();
        return x.iter().map(|&v| if v == max { log_p } else { f32::NEG_INFINITY }).collect();
    }
    let sum: f64 = x.iter().map(|&v| f64::from((v - max).exp())).sum();
    let log_sum = sum.ln() as f32;
    x.iter().map(|&v| v - max - log_sum).collect()
}

/// Index of the largest logit; ties go to the lowest index and NaNs are
/// ignored. Returns 0 for an empty or all-NaN slice.
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    let mut best_value = f32::NEG_INFINITY;
    for (i, &v) in x.iter().enumerate() {
        if v > best_value {
            best = i;
            best_value = v;
        }
    }
    best as u32
}

/// CTRL / Hugging Face repetition penalty: every *distinct* token in
/// `previous` has its logit divided by `penalty` if positive and multiplied by
/// it otherwise, so a penalty above 1 always makes it less likely. A penalty
/// of exactly 1 does nothing.
///
/// # Panics
/// If a token in `previous` is not an index into `logits`.
pub fn apply_repetition_penalty(logits: &mut [f32], previous: &[u32], penalty: f32) {
    penalise(logits, previous, penalty, &mut Vec::new());
}

/// [`apply_repetition_penalty`] with a caller-owned buffer for deduplication.
fn penalise(logits: &mut [f32], previous: &[u32], penalty: f32, seen: &mut Vec<u32>) {
    if penalty == 1.0 || previous.is_empty() {
        return;
    }
    seen.clear();
    seen.extend_from_slice(previous);
    seen.sort_unstable();
    seen.dedup();
    for &token in seen.iter() {
        let logit = &mut logits[token as usize];
        *logit = if *logit > 0.0 { *logit / penalty } else { *logit * penalty };
    }
}

/// Picks one token from `logits` with a one-off [`Sampler`]; see
/// [`Sampler::choose`]. Use a `Sampler` in loops to reuse its buffers.
///
/// `settings` should have passed [`SamplerSettings::validate`] (checked in
/// debug builds); invalid settings give unspecified but safe results.
pub fn choose(logits: &mut [f32], settings: &SamplerSettings, previous: &[u32], rng: &mut impl Rng) -> u32 {
    debug_assert_eq!(settings.validate(), Ok(()));
    Sampler::unchecked(*settings).choose(logits, previous, rng)
}

/// Validated [`SamplerSettings`] plus scratch buffers reused across calls.
#[derive(Debug, Clone)]
pub struct Sampler {
    settings: SamplerSettings,
    /// Token ids that survive top-k / top-p.
    candidates: Vec<u32>,
    /// Deduplicated context for the repetition penalty.
    seen: Vec<u32>,
}

impl Sampler {
    /// Fails with [`SamplerSettings::validate`]'s message.
    pub fn new(settings: SamplerSettings) -> Result<Self, String> {
        settings.validate()?;
        Ok(Self::unchecked(settings))
    }

    fn unchecked(settings: SamplerSettings) -> Self {
        Self { settings, candidates: Vec::new(), seen: Vec::new() }
    }

    pub fn settings(&self) -> &SamplerSettings {
        &self.settings
    }

    /// Picks the next token from one row of `logits`, given the tokens
    /// already in the context (`previous`, prompt included, for the
    /// repetition penalty).
    ///
    /// Steps: repetition penalty; temperature 0 returns the argmax (lowest
    /// index on ties) without touching `rng`; otherwise softmax of
    /// `logits / temperature`, top-k, top-p, renormalise, and one uniform
    /// `f64` from `rng` walks the cumulative distribution. Tokens of
    /// probability 0 are never chosen.
    ///
    /// `logits` is used as scratch space and holds garbage afterwards.
    ///
    /// # Panics
    /// If `logits` is empty, or a token in `previous` is out of range.
    pub fn choose(&mut self, logits: &mut [f32], previous: &[u32], rng: &mut impl Rng) -> u32 {
        assert!(!logits.is_empty(), "cannot sample from an empty vocabulary");
        let settings = self.settings;
        penalise(logits, previous, settings.repetition_penalty, &mut self.seen);
        if settings.temperature == 0.0 {
            return argmax(logits);
        }
        exp_weights(logits, settings.temperature);
        let weights = &*logits;
        let u = rng.random::<f64>();
        if self.filter(weights) {
            walk_cdf(weights, self.candidates.iter().map(|&t| t as usize), u)
        } else {
            walk_cdf_all(weights, u)
        }
    }

    /// Fills `candidates` with the tokens that survive top-k and top-p.
    /// Returns `false`, without touching `candidates`, when neither is active.
    fn filter(&mut self, weights: &[f32]) -> bool {
        let SamplerSettings { top_k, top_p, .. } = self.settings;
        let top_k_active = top_k > 0 && top_k < weights.len();
        let top_p_active = top_p < 1.0;
        if !top_k_active && !top_p_active {
            return false;
        }
        self.candidates.clear();
        self.candidates.extend(0..weights.len() as u32);
        if top_k_active {
            keep_top(&mut self.candidates, top_k, weights);
        }
        if top_p_active {
            keep_nucleus(&mut self.candidates, top_p, weights);
        }
        true
    }
}

/// Replaces each logit `x` by `exp((x - max) / temperature)`. These weights
/// are proportional to the softmax; an all `-inf` row becomes all ones and
/// the `+inf` entries of a row become ones with everything else zero (the
/// limits of the softmax in those cases). NaNs are ignored by the maximum.
fn exp_weights(x: &mut [f32], temperature: f32) {
    let max = crate::model::ops::max(x);
    if max.is_infinite() {
        for v in x.iter_mut() {
            *v = if *v == max { 1.0 } else { 0.0 };
        }
    } else {
        // A product, not a quotient, per entry: division is the slow part of this loop (and at
        // temperature 1 the product is exact, so it changes nothing).
        crate::model::ops::exp_in_place(x, max, 1.0 / temperature);
    }
}

/// Orders numbers from largest to smallest, NaN last.
fn descending(a: f64, b: f64) -> Ordering {
    let key = |v: f64| if v.is_nan() { f64::NEG_INFINITY } else { v };
    key(b).total_cmp(&key(a))
}

/// Orders token ids by `values` from largest to smallest, then by id; a
/// total order, so every selection and sort below is deterministic.
fn by_value<'a>(values: &'a [f32]) -> impl Fn(&u32, &u32) -> Ordering + 'a {
    |&a, &b| {
        let value = |t: u32| f64::from(values[t as usize]);
        descending(value(a), value(b)).then(a.cmp(&b))
    }
}

/// Moves the `k` tokens with the largest `values` to the front of `tokens`,
/// in no particular order, in linear time.
fn move_top_to_front(tokens: &mut [u32], k: usize, values: &[f32]) {
    if k > 0 && k < tokens.len() {
        tokens.select_nth_unstable_by(k - 1, by_value(values));
    }
}

/// The ids of the `k` largest `values` in the order of [`by_value`] (NaN as −∞, ties to the lower
/// id), into `out`: the set [`keep_top`] keeps, found in one pass that compares most values with
/// the k-th best so far only (beam search does this for every beam over the whole vocabulary).
fn top_ids(values: &[f32], k: usize, out: &mut Vec<u32>) {
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    let mut best: Vec<(f32, u32)> = Vec::with_capacity(k + 1);
    for (id, &v) in values.iter().enumerate() {
        let v = key(v);
        // Ids come in increasing order, so a value equal to the k-th best loses to it.
        if best.len() == k && v.total_cmp(&best[k - 1].0) != Ordering::Greater {
            continue;
        }
        let at = best.iter().position(|&(b, _)| v.total_cmp(&b) == Ordering::Greater).unwrap_or(best.len());
        best.insert(at, (v, id as u32));
        best.truncate(k);
    }
    out.clear();
    out.extend(best.iter().map(|&(_, id)| id));
}

/// Top-k: keeps the `k >= 1` tokens of largest value.
fn keep_top(tokens: &mut Vec<u32>, k: usize, values: &[f32]) {
    debug_assert!(k > 0);
    move_top_to_front(tokens, k, values);
    tokens.truncate(k);
}

/// Top-p: keeps the smallest set of heaviest tokens whose weight is at least
/// `top_p` of the total weight of `tokens` (up to [`NUCLEUS_SLACK`]; at least
/// one token). Ties are ordered by id, so the set is the one a stable sort by
/// descending probability would give, but it is found in expected linear
/// time: a quickselect that recurses on mass instead of rank, with a sort of
/// only the last few candidates. The kept tokens end up heaviest-first only
/// roughly; sampling does not need them in order.
fn keep_nucleus(tokens: &mut Vec<u32>, top_p: f32, weights: &[f32]) {
    let weight = |t: &u32| f64::from(weights[*t as usize]);
    let threshold = nucleus_threshold(top_p, tokens.iter().map(weight).sum());
    // Invariant: every token in `..lo` outweighs every token in `lo..`,
    // `mass_before` is the weight of `..lo`, which is below `threshold`,
    // and the last kept token lies in `lo..hi`.
    let (mut lo, mut hi) = (0, tokens.len());
    let mut mass_before = 0.0;
    while hi - lo > NUCLEUS_SORT_BELOW {
        let mid = lo + (hi - lo) / 2;
        tokens[lo..hi].select_nth_unstable_by(mid - lo, by_value(weights));
        let mass_to_mid = mass_before + tokens[lo..mid].iter().map(weight).sum::<f64>();
        if mass_to_mid >= threshold {
            hi = mid;
        } else {
            (lo, mass_before) = (mid, mass_to_mid);
        }
    }
    tokens[lo..hi].sort_unstable_by(by_value(weights));
    let mut cumulative = mass_before;
    let last = tokens[lo..hi]
        .iter()
        .position(|t| {
            cumulative += weight(t);
            cumulative >= threshold
        })
        .map_or(hi - 1, |i| lo + i);
    tokens.truncate(last + 1);
}

/// Below this many candidates, [`keep_nucleus`] sorts instead of selecting.
const NUCLEUS_SORT_BELOW: usize = 32;

/// Probabilities come out of an `f32` softmax with relative errors around
/// 1e-7, so a cumulative probability that is mathematically exactly `top_p`
/// (0.5 + 0.3 for `top_p = 0.8`) can land just below it. Top-p therefore
/// accepts a cumulative probability within this much of `top_p`.
const NUCLEUS_SLACK: f64 = 1e-6;

/// The weight a nucleus must reach, out of `total`.
fn nucleus_threshold(top_p: f32, total: f64) -> f64 {
    (f64::from(top_p) - NUCLEUS_SLACK) * total
}

/// Inverse-CDF draw over the (unnormalised) `weights` of `tokens`, with
/// `u` uniform in `[0, 1)`. Zero-weight tokens are never returned; if
/// rounding leaves `u` past the end, the last positive-weight token is.
fn walk_cdf(weights: &[f32], tokens: impl Iterator<Item = usize> + Clone, u: f64) -> u32 {
    let total: f64 = tokens.clone().map(|t| f64::from(weights[t])).sum();
    let target = u * total;
    let mut cumulative = 0.0;
    let mut last_positive = None;
    for t in tokens {
        let w = f64::from(weights[t]);
        if w > 0.0 {
            cumulative += w;
            if target < cumulative {
                return t as u32;
            }
            last_positive = Some(t);
        }
    }
    last_positive.unwrap_or(0) as u32
}

/// [`walk_cdf`] over the whole vocabulary, fast: the total and the mass of each block of 64
/// tokens are summed in eight independent lanes, so the walk skips whole blocks and steps token by
/// token only inside the block where `u` lands (a sequential sum over 8,192 weights would be a
/// chain of 8,192 dependent additions, a good part of a sampling step). Same contract as
/// [`walk_cdf`] for weights ≥ 0 (what [`exp_weights`] gives); the sums differ from a sequential
/// sum only by rounding.
fn walk_cdf_all(weights: &[f32], u: f64) -> u32 {
    const BLOCK: usize = 64;
    let target = u * lane_sum(weights);
    let mut cumulative = 0.0;
    for (b, block) in weights.chunks(BLOCK).enumerate() {
        let mass = lane_sum(block);
        if target >= cumulative + mass {
            cumulative += mass;
            continue;
        }
        for (i, &w) in block.iter().enumerate() {
            if w > 0.0 {
                cumulative += f64::from(w);
                if target < cumulative {
                    return (b * BLOCK + i) as u32;
                }
            }
        }
        // Rounding: the block's sequential sum fell short of its lane sum; go on from there.
    }
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0) as u32
}

/// Σ weights in `f64`, in eight independent lanes.
fn lane_sum(weights: &[f32]) -> f64 {
    let mut acc = [0f64; 8];
    let chunks = weights.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&w| f64::from(w)).sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += f64::from(c[i]);
        }
    }
    acc.iter().sum::<f64>() + rest
}

/// A model as seen by [`beam_search`].
pub trait StepModel {
    /// Raw next-token **logits** (not log-probabilities) after each of
    /// `sequences` (prompt plus tokens generated so far), one row per
    /// sequence, each of vocabulary length. [`beam_search`] normalises them.
    fn next_logits(&mut self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>>;
}

/// One survivor of a [`beam_step`]: beam `parent` extended by `token`, with
/// cumulative score `score`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BeamCandidate {
    /// Index of the beam (row of `logprobs`) this one extends.
    pub parent: usize,
    pub token: u32,
    /// The parent's score plus the token's log-probability.
    pub score: f64,
}

/// Per-token scores for one beam: `log_softmax(logits)` with the
/// repetition penalty applied to the *log-probabilities*, as Hugging Face's
/// beam search does. Log-probabilities are `<= 0`, so each distinct token of
/// `previous` (prompt included) has its log-probability multiplied by
/// `penalty`; the row is not renormalised afterwards. With penalty 1 this is
/// exactly `log_softmax(logits)`.
pub fn beam_logprobs(logits: &[f32], previous: &[u32], penalty: f32) -> Vec<f32> {
    let mut logprobs = log_softmax(logits);
    apply_repetition_penalty(&mut logprobs, previous, penalty);
    logprobs
}

/// One step of beam search. Beam `i` has cumulative score `beam_scores[i]`
/// and next-token log-probabilities `logprobs[i]` (see [`beam_logprobs`]).
/// Every beam is extended by its `width` best tokens, and the `width` best
/// extensions overall are returned, best first. Ties are broken by parent
/// index, then by token id, so the result is deterministic.
///
/// # Panics
/// If `width` is 0 or the two slices differ in length.
pub fn beam_step<L: AsRef<[f32]>>(beam_scores: &[f64], logprobs: &[L], width: usize) -> Vec<BeamCandidate> {
    assert!(width > 0, "beam width must be at least 1");
    assert_eq!(beam_scores.len(), logprobs.len(), "one row of log-probabilities per beam");
    let mut candidates = Vec::with_capacity(beam_scores.len() * width);
    let mut tokens = Vec::new();
    for (parent, (&score, row)) in beam_scores.iter().zip(logprobs).enumerate() {
        let row = row.as_ref();
        top_ids(row, width, &mut tokens);
        candidates.extend(tokens.iter().map(|&token| BeamCandidate {
            parent,
            token,
            score: score + f64::from(row[token as usize]),
        }));
    }
    candidates.sort_unstable_by(|a, b| {
        descending(a.score, b.score).then(a.parent.cmp(&b.parent)).then(a.token.cmp(&b.token))
    });
    candidates.truncate(width);
    candidates
}

/// Fixed-length beam search: exactly `new_tokens` tokens are generated (no
/// early stop at an end token), keeping the `width` hypotheses of highest
/// cumulative log-probability (see [`beam_logprobs`] for the penalty).
/// Returns the new tokens of the best final beam, without the prompt. Since
/// every hypothesis has the same length, no length normalisation is needed.
///
/// # Panics
/// If `width` is 0, or the model returns the wrong number of rows.
pub fn beam_search(
    model: &mut impl StepModel,
    prompt: &[u32],
    new_tokens: usize,
    width: usize,
    repetition_penalty: f32,
) -> Vec<u32> {
    assert!(width > 0, "beam width must be at least 1");
    let mut sequences = vec![prompt.to_vec()];
    let mut scores = vec![0.0];
    for _ in 0..new_tokens {
        let logits = model.next_logits(&sequences);
        assert_eq!(logits.len(), sequences.len(), "one row of logits per beam");
        let logprobs: Vec<Vec<f32>> = logits
            .iter()
            .zip(&sequences)
            .map(|(row, sequence)| beam_logprobs(row, sequence, repetition_penalty))
            .collect();
        let survivors = beam_step(&scores, &logprobs, width);
        sequences = survivors
            .iter()
            .map(|c| {
                let mut sequence = Vec::with_capacity(prompt.len() + new_tokens);
                sequence.extend_from_slice(&sequences[c.parent]);
                sequence.push(c.token);
                sequence
            })
            .collect();
        scores = survivors.iter().map(|c| c.score).collect();
    }
    sequences.swap_remove(0).split_off(prompt.len())
}

#[cfg(test)]
mod tests {
    /// The one-pass top-k of beam search keeps the same tokens as the selection of top-k sampling,
    /// NaN, −∞ and ties included.
    #[test]
    fn one_pass_top_ids_match_the_selection() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for case in 0..300 {
            let n = 1 + case % 40;
            let values: Vec<f32> = (0..n)
                .map(|_| match rng.random_range(0..10) {
                    0 => f32::NAN,
                    1 => f32::NEG_INFINITY,
                    2 => -0.0,
                    3..=4 => rng.random_range(0..3) as f32, // ties, +0.0 among them
                    _ => rng.random::<f32>(),
                })
                .collect();
            for k in 1..=n + 1 {
                let mut want: Vec<u32> = (0..n as u32).collect();
                super::keep_top(&mut want, k, &values);
                want.sort_unstable();
                let mut got = Vec::new();
                super::top_ids(&values, k, &mut got);
                got.sort_unstable();
                assert_eq!(got, want, "{values:?} k {k}");
            }
        }
    }

    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// Logits whose softmax is exactly `probs` (up to rounding).
    fn logits_of(probs: &[f32]) -> Vec<f32> {
        probs.iter().map(|p| p.ln()).collect()
    }

    fn settings(temperature: f32, top_k: usize, top_p: f32) -> SamplerSettings {
        SamplerSettings { temperature, top_k, top_p, repetition_penalty: 1.0 }
    }

    /// Relative frequency of each token over `draws` draws from `logits`.
    fn frequencies(logits: &[f32], settings: SamplerSettings, draws: usize, seed: u64) -> Vec<f64> {
        let mut sampler = Sampler::new(settings).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut counts = vec![0usize; logits.len()];
        let mut scratch = Vec::new();
        for _ in 0..draws {
            scratch.clear();
            scratch.extend_from_slice(logits);
            counts[sampler.choose(&mut scratch, &[], &mut rng) as usize] += 1;
        }
        counts.iter().map(|&c| c as f64 / draws as f64).collect()
    }

    /// Over 10,000 draws the binomial standard deviation of a frequency is
    /// sqrt(p (1 - p) / n) <= sqrt(0.25 / 10,000) = 0.005, so 0.015 is at
    /// least three standard deviations (the seed is fixed, so the test is
    /// deterministic; the margin just keeps it meaningful for any seed).
    const DRAWS: usize = 10_000;
    const TOLERANCE: f64 = 0.015;

    fn assert_frequencies(actual: &[f64], expected: &[f64]) {
        assert_eq!(actual.len(), expected.len());
        for (i, (f, p)) in actual.iter().zip(expected).enumerate() {
            assert!(
                (f - p).abs() < TOLERANCE,
                "token {i}: frequency {f} vs probability {p} (all: {actual:?})"
            );
        }
    }

    const PROBS: [f32; 4] = [0.5, 0.3, 0.15, 0.05];

    #[test]
    fn greedy_is_argmax_with_lowest_index_on_ties_and_leaves_rng_alone() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let untouched = rng.clone();
        let mut logits = vec![0.1, 2.0, -3.0, 2.0, 1.9];
        assert_eq!(choose(&mut logits, &SamplerSettings::GREEDY, &[], &mut rng), 1);
        assert_eq!(rng, untouched, "greedy must not consume randomness");
        assert_eq!(argmax(&[f32::NAN, -1.0, 5.0, f32::NAN]), 2);
    }

    #[test]
    fn top_k_one_is_argmax_whatever_the_seed() {
        let logits = [0.3, -1.0, 4.0, 3.9, 0.0];
        for seed in 0..200 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let token = choose(&mut logits.clone(), &settings(1.5, 1, 1.0), &[], &mut rng);
            assert_eq!(token, 2, "seed {seed}");
        }
    }

    #[test]
    fn frequencies_match_softmax() {
        let f = frequencies(&logits_of(&PROBS), SamplerSettings::default(), DRAWS, 1);
        assert_frequencies(&f, &[0.5, 0.3, 0.15, 0.05]);
    }

    #[test]
    fn temperature_sharpens_the_distribution() {
        // T = 0.5 squares the probabilities: [0.25, 0.09, 0.0225, 0.0025] / 0.365.
        let f = frequencies(&logits_of(&PROBS), settings(0.5, 0, 1.0), DRAWS, 2);
        assert_frequencies(&f, &[0.25 / 0.365, 0.09 / 0.365, 0.0225 / 0.365, 0.0025 / 0.365]);
    }

    #[test]
    fn top_k_renormalises_over_the_k_best() {
        // Keeps {0, 1}: 0.5 / 0.8 and 0.3 / 0.8.
        let f = frequencies(&logits_of(&PROBS), settings(1.0, 2, 1.0), DRAWS, 3);
        assert_frequencies(&f, &[0.625, 0.375, 0.0, 0.0]);
    }

    #[test]
    fn top_p_never_leaves_the_nucleus() {
        // p = 0.8: 0.5 < 0.8 <= 0.5 + 0.3, so the nucleus is {0, 1}.
        let f = frequencies(&logits_of(&PROBS), settings(1.0, 0, 0.8), DRAWS, 4);
        assert_eq!((f[2], f[3]), (0.0, 0.0), "drew outside the nucleus: {f:?}");
        assert_frequencies(&f, &[0.625, 0.375, 0.0, 0.0]);
        // p = 0.81 needs the third token too; p = 0.45 only the first.
        let f = frequencies(&logits_of(&PROBS), settings(1.0, 0, 0.81), DRAWS, 5);
        assert_eq!(f[3], 0.0);
        assert_frequencies(&f, &[0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0.0]);
        let f = frequencies(&logits_of(&PROBS), settings(1.0, 0, 0.45), 1000, 6);
        assert_eq!(f, [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn top_p_applies_to_the_distribution_left_by_top_k() {
        // Top-3 leaves [0.5, 0.3, 0.15] / 0.95; 0.5 / 0.95 = 0.526 >= 0.52.
        let f = frequencies(&logits_of(&PROBS), settings(1.0, 3, 0.52), 1000, 8);
        assert_eq!(f, [1.0, 0.0, 0.0, 0.0]);
    }

    #[test]
    fn zero_probability_tokens_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        let f = frequencies(&logits, SamplerSettings::default(), DRAWS, 9);
        assert_eq!((f[0], f[2]), (0.0, 0.0));
        assert_frequencies(&f, &[0.0, 0.5, 0.0, 0.5]);
    }

    fn draw_many(seed: u64, settings: SamplerSettings) -> Vec<u32> {
        let logits: Vec<f32> = (0..16).map(|i| (i % 5) as f32 * 0.1).collect();
        let mut sampler = Sampler::new(settings).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..64).map(|_| sampler.choose(&mut logits.clone(), &[], &mut rng)).collect()
    }

    #[test]
    fn same_seed_same_tokens_different_seed_different_tokens() {
        for s in [SamplerSettings::default(), settings(0.8, 10, 0.9)] {
            assert_eq!(draw_many(42, s), draw_many(42, s));
            assert_ne!(draw_many(42, s), draw_many(43, s));
        }
    }

    #[test]
    fn top_k_at_least_vocab_is_off() {
        let off = draw_many(11, SamplerSettings::default());
        assert_eq!(draw_many(11, settings(1.0, 16, 1.0)), off);
        assert_eq!(draw_many(11, settings(1.0, 1000, 1.0)), off);
    }

    #[test]
    fn reused_sampler_matches_one_shot_choose() {
        let s = settings(0.7, 50, 0.9);
        let previous = [3, 3, 17];
        let mut sampler = Sampler::new(s).unwrap();
        let mut logits_rng = ChaCha8Rng::seed_from_u64(0);
        let (mut a, mut b) = (ChaCha8Rng::seed_from_u64(1), ChaCha8Rng::seed_from_u64(1));
        for _ in 0..100 {
            let logits: Vec<f32> = (0..300).map(|_| logits_rng.random::<f32>() * 6.0).collect();
            let reused = sampler.choose(&mut logits.clone(), &previous, &mut a);
            let one_shot = choose(&mut logits.clone(), &s, &previous, &mut b);
            assert_eq!(reused, one_shot);
        }
    }

    /// Reference filter: a full stable sort by probability, then the
    /// definitions of top-k and top-p applied literally (with the same
    /// rounding slack).
    fn naive_filter(probs: &[f32], top_k: usize, top_p: f32) -> Vec<u32> {
        let mut order: Vec<u32> = (0..probs.len() as u32).collect();
        order.sort_by(|&a, &b| probs[b as usize].total_cmp(&probs[a as usize]));
        if top_k > 0 {
            order.truncate(top_k);
        }
        let total: f64 = order.iter().map(|&t| f64::from(probs[t as usize])).sum();
        let mut cumulative = 0.0;
        let mut keep = order.len();
        for (i, &t) in order.iter().enumerate() {
            cumulative += f64::from(probs[t as usize]);
            if cumulative >= nucleus_threshold(top_p, total) {
                keep = i + 1;
                break;
            }
        }
        order.truncate(keep);
        order.sort_unstable();
        order
    }

    #[test]
    fn filters_match_a_full_sort_reference() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let mut checked_large_nucleus = false;
        for case in 0..300 {
            let vocab = [1, 2, 7, 100, 1000][case % 5];
            // Peaked or flat rows, so nuclei range from 1 token to most of the vocab.
            let scale = [0.1, 1.0, 8.0][case % 3];
            let mut weights: Vec<f32> = (0..vocab).map(|_| rng.random::<f32>() * scale).collect();
            let top_k = [0, 1, 5, 64, 2000][case % 7 % 5];
            let top_p = [1.0, 0.999, 0.9, 0.5, 0.01][case % 11 % 5];
            exp_weights(&mut weights, 1.0);
            let mut sampler = Sampler::new(settings(1.0, top_k, top_p)).unwrap();
            let mut kept = if sampler.filter(&weights) {
                sampler.candidates.clone()
            } else {
                (0..vocab as u32).collect()
            };
            kept.sort_unstable();
            let expected = naive_filter(&weights, top_k, top_p);
            checked_large_nucleus |= expected.len() > NUCLEUS_SORT_BELOW * 4;
            assert_eq!(kept, expected, "case {case}: vocab {vocab} k {top_k} p {top_p}");
        }
        assert!(checked_large_nucleus, "the quickselect path went untested");
    }

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_once_per_token() {
        let mut logits = [2.0, -1.0, 0.5, 3.0, 0.0];
        // Token 1 appears twice but is penalised once; token 4 stays 0.
        apply_repetition_penalty(&mut logits, &[0, 1, 1, 4], 2.0);
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0, 0.0]);
        apply_repetition_penalty(&mut logits, &[0, 1, 3], 1.0);
        assert_eq!(logits, [1.0, -2.0, 0.5, 3.0, 0.0]);
    }

    #[test]
    fn repetition_penalty_changes_the_greedy_choice() {
        let s = SamplerSettings { repetition_penalty: 2.0, ..SamplerSettings::GREEDY };
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        // 3.0 / 2 = 1.5 < 2.0, so token 1 wins once token 0 has been seen.
        assert_eq!(choose(&mut [3.0, 2.0, 0.0], &s, &[], &mut rng), 0);
        assert_eq!(choose(&mut [3.0, 2.0, 0.0], &s, &[0], &mut rng), 1);
    }

    #[test]
    fn validate_accepts_defaults_and_rejects_bad_values_naming_the_flag() {
        assert_eq!(SamplerSettings::default().validate(), Ok(()));
        assert_eq!(SamplerSettings::GREEDY.validate(), Ok(()));
        assert_eq!(settings(0.7, 40, 0.95).validate(), Ok(()));
        let d = SamplerSettings::default();
        let err = |s: SamplerSettings| s.validate().unwrap_err();
        assert_eq!(
            err(SamplerSettings { temperature: -1.0, ..d }),
            "--temperature (sample.temperature) must be in [0, 100] (0 = greedy), got -1"
        );
        assert!(err(SamplerSettings { temperature: f32::NAN, ..d }).starts_with("--temperature "));
        assert!(err(SamplerSettings { temperature: f32::INFINITY, ..d }).starts_with("--temperature "));
        assert!(err(SamplerSettings { top_p: 0.0, ..d }).starts_with("--top-p "));
        assert!(err(SamplerSettings { top_p: 1.5, ..d }).starts_with("--top-p "));
        assert!(err(SamplerSettings { top_p: f32::NAN, ..d }).starts_with("--top-p "));
        let penalty = |p| SamplerSettings { repetition_penalty: p, ..d };
        assert!(err(penalty(0.0)).starts_with("--repetition-penalty "));
        assert!(err(penalty(-1.0)).starts_with("--repetition-penalty "));
        assert!(err(penalty(f32::NAN)).starts_with("--repetition-penalty "));
        assert!(Sampler::new(penalty(0.0)).is_err());
    }

    #[test]
    fn softmax_is_stable_and_log_softmax_agrees() {
        let mut x = [1000.0, 1000.0, f32::NEG_INFINITY];
        softmax_in_place(&mut x);
        assert_eq!(x, [0.5, 0.5, 0.0]);

        let logits = [1.0, 2.0, 3.0];
        let mut p = logits;
        softmax_in_place(&mut p);
        // e^1, e^2, e^3 over their sum 30.1929...
        let expected = [0.090_030_57, 0.244_728_48, 0.665_240_94];
        for ((a, b), lp) in p.iter().zip(expected).zip(log_softmax(&logits)) {
            assert!((a - b).abs() < 1e-6, "{p:?}");
            assert!((lp - b.ln()).abs() < 1e-6);
        }

        let mut all_masked = [f32::NEG_INFINITY; 4];
        softmax_in_place(&mut all_masked);
        assert_eq!(all_masked, [0.25; 4]);
        assert_eq!(log_softmax(&[f32::NEG_INFINITY; 2]), [-(2f32.ln()); 2]);
    }

    // ---------------------------------------------------------------- beams

    const A: u32 = 0;
    const B: u32 = 1;
    const C: u32 = 2;

    /// A two-step model over {A, B, C}. First token: A 0.6, B 0.35, C 0.05.
    /// After A the next token is nearly flat (best 0.4, total 0.24); after B
    /// it is peaked (B 0.9, total 0.315); after C it is uniform. Greedy takes
    /// A; the best sequence is B B.
    struct TwoStep {
        prompt_len: usize,
        calls: usize,
    }

    impl TwoStep {
        fn probs(&self, generated: &[u32]) -> [f32; 3] {
            match generated.first() {
                None => [0.6, 0.35, 0.05],
                Some(&A) => [0.4, 0.3, 0.3],
                Some(&B) => [0.05, 0.9, 0.05],
                Some(_) => [1.0 / 3.0; 3],
            }
        }

        fn sequence_logprob(&self, generated: &[u32]) -> f64 {
            (0..generated.len())
                .map(|i| f64::from(self.probs(&generated[..i])[generated[i] as usize]).ln())
                .sum()
        }
    }

    impl StepModel for TwoStep {
        fn next_logits(&mut self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
            self.calls += 1;
            sequences.iter().map(|s| logits_of(&self.probs(&s[self.prompt_len..]))).collect()
        }
    }

    fn greedy(model: &mut impl StepModel, prompt: &[u32], new_tokens: usize) -> Vec<u32> {
        let mut sequence = prompt.to_vec();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        for _ in 0..new_tokens {
            let mut logits = model.next_logits(std::slice::from_ref(&sequence)).remove(0);
            sequence.push(choose(&mut logits, &SamplerSettings::GREEDY, &[], &mut rng));
        }
        sequence.split_off(prompt.len())
    }

    #[test]
    fn beam_search_finds_the_most_probable_sequence_where_greedy_does_not() {
        let prompt = [C, A];
        let mut model = TwoStep { prompt_len: prompt.len(), calls: 0 };
        let greedy_tokens = greedy(&mut model, &prompt, 2);
        let beam_tokens = beam_search(&mut model, &prompt, 2, 2, 1.0);
        assert_eq!(greedy_tokens, [A, A]);
        assert_eq!(beam_tokens, [B, B]);

        let best = (0..3)
            .flat_map(|x| (0..3).map(move |y| [x, y]))
            .map(|s| model.sequence_logprob(&s))
            .fold(f64::NEG_INFINITY, f64::max);
        let beam_logprob = model.sequence_logprob(&beam_tokens);
        assert!((beam_logprob - best).abs() < 1e-12);
        assert!((beam_logprob - 0.315f64.ln()).abs() < 1e-6);
        assert!(model.sequence_logprob(&greedy_tokens) < best - 0.1);
    }

    #[test]
    fn beam_search_has_fixed_length_and_width_one_is_greedy() {
        let mut model = TwoStep { prompt_len: 0, calls: 0 };
        let tokens = beam_search(&mut model, &[], 5, 3, 1.0);
        assert_eq!(tokens.len(), 5);
        assert_eq!(model.calls, 5);
        assert_eq!(beam_search(&mut model, &[], 2, 1, 1.0), greedy(&mut model, &[], 2));
        assert_eq!(beam_search(&mut model, &[], 0, 3, 1.0), Vec::<u32>::new());
    }

    /// Always [0.5, 0.3, 0.2], whatever the context.
    struct Fixed;

    impl StepModel for Fixed {
        fn next_logits(&mut self, sequences: &[Vec<u32>]) -> Vec<Vec<f32>> {
            vec![logits_of(&[0.5, 0.3, 0.2]); sequences.len()]
        }
    }

    #[test]
    fn beam_search_repetition_penalty_counts_prompt_and_generated_tokens() {
        assert_eq!(beam_search(&mut Fixed, &[], 3, 1, 1.0), [0, 0, 0]);
        // Penalty 3 on log-probs: ln 0.5 * 3 = -2.08 < ln 0.3 = -1.20, and
        // ln 0.3 * 3 = -3.61 < ln 0.2 = -1.61; so 0, then 1, then 2.
        assert_eq!(beam_search(&mut Fixed, &[], 3, 1, 3.0), [0, 1, 2]);
        // Token 0 in the prompt is penalised from the first step on.
        assert_eq!(beam_search(&mut Fixed, &[0], 1, 1, 3.0), [1]);
    }

    #[test]
    fn beam_logprobs_penalises_log_probabilities() {
        let lp = beam_logprobs(&logits_of(&[0.5, 0.25, 0.25]), &[1, 1], 2.0);
        let expected = [0.5f32.ln(), 2.0 * 0.25f32.ln(), 0.25f32.ln()];
        for (a, b) in lp.iter().zip(expected) {
            assert!((a - b).abs() < 1e-6, "{lp:?}");
        }
    }

    #[test]
    fn beam_step_keeps_the_best_extensions_overall() {
        let scores = [0.0, -1.0];
        let logprobs = [vec![-0.1, -2.0, -3.0], vec![-0.05, -0.5, -4.0]];
        let step = beam_step(&scores, &logprobs, 3);
        let picked: Vec<(usize, u32)> = step.iter().map(|c| (c.parent, c.token)).collect();
        // Candidates: (0,0) -0.1, (1,0) -1.05, (1,1) -1.5, (0,1) -2.0, ...
        assert_eq!(picked, [(0, 0), (1, 0), (1, 1)]);
        for (c, expected) in step.iter().zip([-0.1, -1.05, -1.5]) {
            assert!((c.score - expected).abs() < 1e-6, "{step:?}");
        }
    }

    #[test]
    fn beam_step_breaks_ties_by_parent_then_token() {
        let step = beam_step(&[0.0, 0.0], &[vec![-1.0; 3], vec![-1.0; 3]], 4);
        let picked: Vec<(usize, u32)> = step.iter().map(|c| (c.parent, c.token)).collect();
        assert_eq!(picked, [(0, 0), (0, 1), (0, 2), (1, 0)]);
        // Fewer candidates than the width: all of them, still best first.
        let step = beam_step(&[0.0], &[vec![-2.0, -1.0]], 5);
        let picked: Vec<u32> = step.iter().map(|c| c.token).collect();
        assert_eq!(picked, [1, 0]);
    }

    #[test]
    fn block_walk_picks_what_the_token_walk_picks() {
        // Weights with zeros (never chosen) and a length that is not a multiple of the block.
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for vocab in [1, 7, 64, 65, 1000, 8192] {
            // Softmax-like weights over nine orders of magnitude: their f64 sums are not exact, so the
            // block sums and the token-by-token sums round differently.
            let weights: Vec<f32> = (0..vocab)
                .map(|i| if i % 3 == 1 { 0.0 } else { (-20.0 * rng.random::<f32>()).exp() })
                .collect();
            for _ in 0..200 {
                let u = rng.random::<f64>();
                let t = walk_cdf_all(&weights, u);
                assert_eq!(t, walk_cdf(&weights, 0..vocab, u), "vocab {vocab}, u {u}");
                assert!(weights[t as usize] > 0.0 || weights.iter().all(|&w| w == 0.0));
            }
        }
        // Hand-checked: weights 1, 0, 3 (total 4): u < 0.25 → 0, then token 2; u → 1 stays on 2.
        let w = [1.0, 0.0, 3.0];
        assert_eq!([0.0, 0.24, 0.25, 0.9999].map(|u| walk_cdf_all(&w, u)), [0, 0, 2, 2]);
        // All zero: token 0, as walk_cdf.
        assert_eq!(walk_cdf_all(&[0.0; 5], 0.5), 0);
    }
}
