//! Measurements of a generation: model perplexities ([`perplexity`]), word-level corpus statistics
//! ([`corpus`]), the n-gram references ([`baseline`]), the distribution of per-sequence
//! perplexities under the generation-0 model, and the collapse stage of a generation; every metric
//! is declared once in [`registry`].

pub mod baseline;
pub mod corpus;
pub mod perplexity;
pub mod registry;

use registry::{Metric, Row, Value};
use serde::{Deserialize, Serialize};

/// Histogram bin edges of `gen0_seq_ppl`: log-spaced from 1 to 10⁴, five bins per decade.
pub fn ppl_bin_edges() -> Vec<f64> {
    (0..=20).map(|i| 10f64.powf(i as f64 / 5.0)).collect()
}

/// Quantiles and histogram of per-sequence perplexities (Shumailov's Fig. 1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PplDistribution {
    pub p5: f64,
    pub p25: f64,
    pub p50: f64,
    pub p75: f64,
    pub p95: f64,
    pub mean: f64,
    /// Counts over [`ppl_bin_edges`]; values below 1 count in the first bin, above 10⁴ in the last.
    pub hist: Vec<u64>,
}

/// The `q`-quantile of sorted values by linear interpolation between closest ranks (numpy's default).
pub fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let pos = q * (sorted.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo as f64)
}

impl PplDistribution {
    pub fn new(values: &[f64]) -> Self {
        let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
        sorted.sort_by(f64::total_cmp);
        let edges = ppl_bin_edges();
        let mut hist = vec![0u64; edges.len() - 1];
        for &v in &sorted {
            let bin = edges.partition_point(|&e| e <= v).clamp(1, hist.len()) - 1;
            hist[bin] += 1;
        }
        Self {
            p5: quantile(&sorted, 0.05),
            p25: quantile(&sorted, 0.25),
            p50: quantile(&sorted, 0.5),
            p75: quantile(&sorted, 0.75),
            p95: quantile(&sorted, 0.95),
            mean: sorted.iter().sum::<f64>() / sorted.len() as f64,
            hist,
        }
    }

    /// Writes the percentiles, the mean and the histogram into `row`.
    pub fn put(&self, row: &mut Row) {
        use Metric::*;
        for (m, v) in [
            (Gen0SeqPplP5, self.p5),
            (Gen0SeqPplP25, self.p25),
            (Gen0SeqPplP50, self.p50),
            (Gen0SeqPplP75, self.p75),
            (Gen0SeqPplP95, self.p95),
            (Gen0SeqPplMean, self.mean),
        ] {
            row.set(m, v);
        }
        row.set_value(Gen0SeqPplHist, Value::Hist(self.hist.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_like_numpy() {
        // numpy.quantile([1, 2, 3, 4, 5], [0.05, 0.25, 0.5]) = [1.2, 2.0, 3.0]
        let v = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((quantile(&v, 0.05) - 1.2).abs() < 1e-12);
        assert_eq!(quantile(&v, 0.25), 2.0);
        assert_eq!(quantile(&v, 0.5), 3.0);
    }

    #[test]
    fn histogram_bins_are_log_spaced() {
        // Edges 1, 1.585, 2.512, …: 0.5 clamps into bin 0, 1.2 is bin 0, 2.0 bin 1, 10 starts bin 5,
        // 50 000 clamps into the last bin (19).
        let d = PplDistribution::new(&[0.5, 1.2, 2.0, 10.0, 50_000.0]);
        assert_eq!(d.hist.len(), 20);
        assert_eq!((d.hist[0], d.hist[1], d.hist[5], d.hist[19]), (2, 1, 1, 1));
        assert_eq!(d.hist.iter().sum::<u64>(), 5);
        assert_eq!(d.p50, 2.0);
    }
}

/// The thresholds of [`collapse_stage`], all relative to generation 0. One place, documented in
/// the README.
pub mod stage_rules {
    /// Early (tail loss): rare-unigram recall falls by at least this share, or rare-word perplexity
    /// rises by at least this share…
    pub const RARE_DROP: f64 = 0.10;
    /// …while common-unigram recall stays within this share of generation 0's.
    pub const COMMON_KEPT: f64 = 0.05;
    /// Late (modes blur): distinct-2 or unigram entropy falls by at least this share…
    pub const DIVERSITY_DROP: f64 = 0.10;
    /// …or the 95th percentile of gen-0 perplexity grows by at least this factor (a high tail).
    pub const TAIL_GROWTH: f64 = 2.0;
    /// Catastrophic (repetition dominates): distinct-2 or MATTR falls below this share of
    /// generation 0's.
    pub const REPETITION: f64 = 0.5;
}

/// The collapse stage of a generation's row against generation 0's: "none", "early", "late" or
/// "catastrophic" (the most advanced stage whose rule holds). Generation 0 is "none".
pub fn collapse_stage(row: &Row, gen0: &Row) -> &'static str {
    use stage_rules::*;
    use Metric::*;
    let ratio = |m: Metric| match (row.get(m), gen0.get(m)) {
        (Some(a), Some(b)) if b != 0.0 => a / b,
        _ => f64::NAN,
    };
    if ratio(Distinct2) < REPETITION || ratio(Mattr) < REPETITION {
        "catastrophic"
    } else if ratio(Distinct2) <= 1.0 - DIVERSITY_DROP
        || ratio(UnigramEntropy) <= 1.0 - DIVERSITY_DROP
        || ratio(Gen0SeqPplP95) >= TAIL_GROWTH
    {
        "late"
    } else if (ratio(RareNgramRecall1) <= 1.0 - RARE_DROP || ratio(TestPplRare) >= 1.0 + RARE_DROP)
        && (ratio(CommonNgramRecall1) - 1.0).abs() <= COMMON_KEPT
    {
        "early"
    } else {
        "none"
    }
}

#[cfg(test)]
mod stage_tests {
    use super::registry::RowId;
    use super::*;

    fn row(values: [f64; 7]) -> Row {
        use Metric::*;
        let mut r = Row::new(RowId::Generation(1));
        let keys = [
            Distinct2,
            Mattr,
            UnigramEntropy,
            Gen0SeqPplP95,
            RareNgramRecall1,
            TestPplRare,
            CommonNgramRecall1,
        ];
        for (m, v) in keys.into_iter().zip(values) {
            r.set(m, v);
        }
        r
    }

    #[test]
    fn stages_follow_the_rules() {
        // distinct_2, mattr, unigram_entropy, gen0_seq_ppl_p95, rare_ngram_recall_1, test_ppl_rare,
        // common_ngram_recall_1
        let g0 = row([0.8, 0.7, 10.0, 300.0, 0.2, 500.0, 0.98]);
        assert_eq!(collapse_stage(&g0, &g0), "none");
        let early = row([0.79, 0.7, 9.9, 320.0, 0.17, 520.0, 0.97]);
        assert_eq!(collapse_stage(&early, &g0), "early"); // recall 0.17/0.2 = 0.85 ≤ 0.9; common 0.99 of gen 0
        let late = row([0.70, 0.6, 9.5, 320.0, 0.15, 600.0, 0.9]);
        assert_eq!(collapse_stage(&late, &g0), "late"); // distinct-2 0.70/0.8 = 0.875 ≤ 0.9
        let tail = row([0.8, 0.7, 10.0, 600.0, 0.2, 500.0, 0.98]);
        assert_eq!(collapse_stage(&tail, &g0), "late"); // p95 doubled
        let cat = row([0.3, 0.6, 6.0, 900.0, 0.05, 900.0, 0.7]);
        assert_eq!(collapse_stage(&cat, &g0), "catastrophic"); // distinct-2 0.3/0.8 < 0.5
    }
}
