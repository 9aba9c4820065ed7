//! Measurements of a generation: model perplexities ([`perplexity`]), word-level corpus statistics
//! ([`corpus`]), and the distribution of per-sequence perplexities under the generation-0 model.

pub mod corpus;
pub mod perplexity;

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
