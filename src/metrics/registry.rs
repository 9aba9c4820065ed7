//! Every metric the lab reports, declared once: its key (the JSON/CSV column), the short label of
//! the console table, a description, its unit, which way is healthier, and where it is shown (the
//! console table, the report's table and plots, `compare`). A measured generation is a typed
//! [`Row`] of [`Metric`] → [`Value`]; `metrics.jsonl`, `metrics.csv`, the tables, the plots, the
//! collapse-stage rules and `collapse-lab metrics --list` (what the scripts read) all come from here.

use serde_json::{Map, Number, Value as Json};
use std::collections::BTreeMap;

/// Which way a metric moves when a model is healthier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Higher,
    Lower,
    /// Neither: a count, a shape, or a distribution whose both halves matter.
    Neither,
}

/// The kind of value a metric holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A real number; `null` in JSON when undefined for the data.
    Float,
    /// A whole number.
    Count,
    /// Counts per histogram bin.
    Hist,
    /// A word (the collapse stage).
    Text,
}

/// The report's plots a metric appears in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Plot {
    /// Token perplexity on the real test split (log axis).
    TestPpl,
    /// Word perplexity with the n-gram references (log axis).
    WordPpl,
    /// Diversity of each generation's text.
    Diversity,
    /// Tails: rare n-gram recall, novelty, divergence.
    Tails,
}

/// One metric's declaration.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MetricDef {
    pub key: &'static str,
    /// Header in the console table (None: not in it).
    pub table: Option<&'static str>,
    pub description: &'static str,
    pub unit: &'static str,
    pub kind: Kind,
    pub better: Better,
    /// A column of report.html's table.
    pub report: bool,
    pub plot: Option<Plot>,
    /// Compared across runs by `compare`, on a log axis when `Some(true)`.
    pub compare: Option<bool>,
}

macro_rules! registry {
    ($($variant:ident: $key:literal, $table:expr, $kind:ident, $better:ident, $unit:literal, report $report:literal,
       plot $plot:expr, compare $compare:expr, $description:literal;)*) => {
        /// A metric of a row. Declared in the order of the columns of `metrics.jsonl`.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub enum Metric { $($variant),* }

        impl Metric {
            /// Every metric, in column order.
            pub const ALL: &'static [Metric] = &[$(Metric::$variant),*];

            pub fn def(self) -> MetricDef {
                match self {
                    $(Metric::$variant => MetricDef {
                        key: $key,
                        table: $table,
                        description: $description,
                        unit: $unit,
                        kind: Kind::$kind,
                        better: Better::$better,
                        report: $report,
                        plot: $plot,
                        compare: $compare,
                    }),*
                }
            }
        }
    };
}

registry! {
    TestPpl: "test_ppl", Some("test_ppl"), Float, Lower, "", report true, plot Some(Plot::TestPpl), compare Some(true),
        "token perplexity on the real test split, 64-token blocks each scored on its own";
    TestWordPpl: "test_word_ppl", Some("word_ppl"), Float, Lower, "", report true, plot Some(Plot::WordPpl), compare Some(true),
        "exp(test nats / test words): comparable across tokenizers";
    TestPplRare: "test_ppl_rare", Some("rare_ppl"), Float, Lower, "", report true, plot Some(Plot::TestPpl), compare Some(true),
        "token perplexity on tokens of words seen <= 10 times in the real train data";
    TestPplCommon: "test_ppl_common", None, Float, Lower, "", report false, plot Some(Plot::TestPpl), compare None,
        "token perplexity on tokens of words seen >= 1000 times in the real train data";
    ValidPpl: "valid_ppl", None, Float, Lower, "", report true, plot None, compare None,
        "token perplexity on the real validation split";
    ValidWordPpl: "valid_word_ppl", None, Float, Lower, "", report false, plot None, compare None,
        "word perplexity on the real validation split";
    Words: "words", None, Count, Neither, "words", report false, plot None, compare None,
        "words in the corpus";
    TtrN: "ttr_n", None, Count, Neither, "words", report false, plot None, compare None,
        "N of ttr_at_n and distinct_n (fixed per run)";
    TtrAtN: "ttr_at_n", Some("ttr"), Float, Higher, "", report true, plot Some(Plot::Diversity), compare Some(false),
        "types / tokens over the first N words";
    Mattr: "mattr", None, Float, Higher, "", report true, plot Some(Plot::Diversity), compare None,
        "moving-average type-token ratio, window 100";
    Distinct1: "distinct_1", None, Float, Higher, "", report false, plot Some(Plot::Diversity), compare Some(false),
        "unique / total unigrams over the first N words";
    Distinct2: "distinct_2", Some("distinct2"), Float, Higher, "", report true, plot Some(Plot::Diversity), compare Some(false),
        "unique / total bigrams over the first N words";
    Distinct3: "distinct_3", None, Float, Higher, "", report false, plot Some(Plot::Diversity), compare None,
        "unique / total trigrams over the first N words";
    RareNgramRecall1: "rare_ngram_recall_1", Some("rare_rec1"), Float, Higher, "", report true, plot Some(Plot::Tails), compare Some(false),
        "share of the real data's rare unigrams (seen 1-5 times) that occur";
    RareNgramRecall2: "rare_ngram_recall_2", None, Float, Higher, "", report false, plot Some(Plot::Tails), compare None,
        "share of the real data's rare bigrams that occur";
    RareNgramRecall3: "rare_ngram_recall_3", Some("rare_rec3"), Float, Higher, "", report true, plot Some(Plot::Tails), compare Some(false),
        "share of the real data's rare trigrams that occur";
    CommonNgramRecall1: "common_ngram_recall_1", None, Float, Higher, "", report true, plot Some(Plot::Tails), compare Some(false),
        "share of the real data's common unigrams (seen >= 100 times) that occur: the control";
    CommonNgramRecall2: "common_ngram_recall_2", None, Float, Higher, "", report false, plot Some(Plot::Tails), compare None,
        "share of the real data's common bigrams that occur";
    CommonNgramRecall3: "common_ngram_recall_3", None, Float, Higher, "", report false, plot None, compare None,
        "share of the real data's common trigrams that occur";
    NovelTrigramRate: "novel_trigram_rate", Some("novel3"), Float, Lower, "", report true, plot Some(Plot::Tails), compare Some(false),
        "share of trigram occurrences never seen in the real data";
    UnigramJs: "unigram_js", None, Float, Lower, "bits", report true, plot Some(Plot::Tails), compare None,
        "Jensen-Shannon divergence of the word unigram distributions, real vs corpus";
    ZipfAlpha: "zipf_alpha", None, Float, Neither, "", report false, plot None, compare Some(false),
        "Zipf exponent: minus the slope of log frequency on log rank, ranks 10-10,000";
    UnigramEntropy: "unigram_entropy", None, Float, Higher, "bits", report false, plot None, compare Some(false),
        "Shannon entropy of the word unigram distribution";
    NonwordRate: "nonword_rate", Some("nonword"), Float, Lower, "", report true, plot Some(Plot::Tails), compare Some(false),
        "share of the first N words that are no word of the real train split (invented words)";
    Gen0SeqPplP5: "gen0_seq_ppl_p5", None, Float, Neither, "", report false, plot None, compare Some(true),
        "5th percentile of each sequence's perplexity under generation 0";
    Gen0SeqPplP25: "gen0_seq_ppl_p25", None, Float, Neither, "", report false, plot None, compare None,
        "25th percentile of each sequence's perplexity under generation 0";
    Gen0SeqPplP50: "gen0_seq_ppl_p50", Some("gen0_p50"), Float, Neither, "", report true, plot None, compare Some(true),
        "median of each sequence's perplexity under generation 0";
    Gen0SeqPplP75: "gen0_seq_ppl_p75", None, Float, Neither, "", report false, plot None, compare None,
        "75th percentile of each sequence's perplexity under generation 0";
    Gen0SeqPplP95: "gen0_seq_ppl_p95", None, Float, Neither, "", report false, plot None, compare Some(true),
        "95th percentile of each sequence's perplexity under generation 0";
    Gen0SeqPplMean: "gen0_seq_ppl_mean", None, Float, Neither, "", report false, plot None, compare None,
        "mean of each sequence's perplexity under generation 0";
    Gen0SeqPplHist: "gen0_seq_ppl_hist", None, Hist, Neither, "sequences", report false, plot None, compare None,
        "histogram of the per-sequence perplexities, log-spaced bins 10^0..10^4, five per decade";
    Sequences: "sequences", None, Count, Neither, "sequences", report false, plot None, compare None,
        "sequences in the corpus";
    CorpusTokens: "corpus_tokens", None, Count, Neither, "tokens", report false, plot None, compare None,
        "tokens in the corpus";
    KnBigramTestWordPpl: "kn_bigram_test_word_ppl", None, Float, Lower, "", report false, plot Some(Plot::WordPpl), compare None,
        "word perplexity of an interpolated Kneser-Ney bigram of the real data (reference)";
    UnigramTestWordPpl: "unigram_test_word_ppl", None, Float, Lower, "", report false, plot Some(Plot::WordPpl), compare None,
        "word perplexity of an add-one unigram of the real data (reference)";
    TrainTokens: "train_tokens", None, Count, Neither, "tokens", report false, plot None, compare None,
        "tokens in the generation's training stream";
    TrainSteps: "train_steps", None, Count, Neither, "steps", report false, plot None, compare None,
        "optimiser steps taken";
    TrainEpochs: "train_epochs", None, Float, Neither, "epochs", report false, plot None, compare None,
        "tokens seen / training stream length";
    Stage: "stage", Some("stage"), Text, Neither, "", report true, plot None, compare None,
        "collapse stage against generation 0: none, early, late or catastrophic";
}

impl Metric {
    pub fn key(self) -> &'static str {
        self.def().key
    }

    /// The metric whose key is `key`.
    pub fn from_key(key: &str) -> Option<Metric> {
        Metric::ALL.iter().copied().find(|m| m.key() == key)
    }
}

/// Which row: the real data, the pretrained base (zero-shot), or a generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RowId {
    Real,
    Base,
    Generation(usize),
}

impl RowId {
    /// How the row is labelled: "real", "base" or the generation.
    pub fn label(self) -> String {
        match self {
            RowId::Real => "real".into(),
            RowId::Base => "base".into(),
            RowId::Generation(g) => g.to_string(),
        }
    }
}

/// A metric's value.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    /// NaN when undefined for the data.
    Float(f64),
    Count(u64),
    Hist(Vec<u64>),
    Text(String),
}

/// The measurements of one row of `metrics.jsonl`.
#[derive(Debug, Clone, PartialEq)]
pub struct Row {
    pub id: RowId,
    values: BTreeMap<Metric, Value>,
}

impl Row {
    pub fn new(id: RowId) -> Self {
        Self { id, values: BTreeMap::new() }
    }

    pub fn set(&mut self, m: Metric, v: f64) {
        debug_assert_eq!(m.def().kind, Kind::Float, "{} is not a float", m.key());
        self.values.insert(m, Value::Float(v));
    }

    pub fn set_count(&mut self, m: Metric, v: u64) {
        debug_assert_eq!(m.def().kind, Kind::Count, "{} is not a count", m.key());
        self.values.insert(m, Value::Count(v));
    }

    pub fn set_value(&mut self, m: Metric, v: Value) {
        self.values.insert(m, v);
    }

    pub fn value(&self, m: Metric) -> Option<&Value> {
        self.values.get(&m)
    }

    /// A number (a float or a count), if present and defined.
    pub fn get(&self, m: Metric) -> Option<f64> {
        match self.values.get(&m)? {
            Value::Float(x) if !x.is_nan() => Some(*x),
            Value::Count(n) => Some(*n as f64),
            _ => None,
        }
    }

    pub fn text(&self, m: Metric) -> Option<&str> {
        match self.values.get(&m)? {
            Value::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn hist(&self, m: Metric) -> Option<&[u64]> {
        match self.values.get(&m)? {
            Value::Hist(h) => Some(h),
            _ => None,
        }
    }

    pub fn generation(&self) -> Option<usize> {
        match self.id {
            RowId::Generation(g) => Some(g),
            RowId::Real | RowId::Base => None,
        }
    }

    /// The row as a JSON object: `generation` first, then the metrics in registry order.
    pub fn to_json(&self) -> Json {
        let mut m = Map::new();
        m.insert(
            "generation".into(),
            match self.id {
                RowId::Generation(g) => Json::from(g),
                other => Json::String(other.label()),
            },
        );
        for (metric, v) in &self.values {
            let j = match v {
                Value::Float(x) => Number::from_f64(*x).map_or(Json::Null, Json::Number),
                Value::Count(n) => Json::from(*n),
                Value::Hist(h) => Json::from(h.clone()),
                Value::Text(s) => Json::String(s.clone()),
            };
            m.insert(metric.key().into(), j);
        }
        Json::Object(m)
    }

    /// Parses one line of `metrics.jsonl`; a key the registry does not know, or a value of the wrong
    /// kind, is an error naming it.
    pub fn from_json(j: &Json) -> Result<Self, String> {
        let obj = j.as_object().ok_or("a row is not a JSON object")?;
        let id = match obj.get("generation") {
            Some(Json::String(s)) if s == "real" => RowId::Real,
            Some(Json::String(s)) if s == "base" => RowId::Base,
            Some(g) => RowId::Generation(
                g.as_u64().ok_or(format!("generation {g} is not \"real\" or a number"))? as usize,
            ),
            None => return Err("a row has no generation".into()),
        };
        let mut row = Row::new(id);
        let mut rest = obj.clone();
        rest.remove("generation");
        row.merge(&rest)?;
        Ok(row)
    }

    /// Adds the metrics of a JSON object whose keys are registry keys (e.g. a serialised struct of
    /// measurements); an unknown key or a value of the wrong kind is an error naming it.
    pub fn merge(&mut self, obj: &Map<String, Json>) -> Result<(), String> {
        for (k, v) in obj {
            let metric = Metric::from_key(k).ok_or(format!("unknown metric {k}"))?;
            let bad = || format!("{k}: {v} is not a {:?}", metric.def().kind);
            let value = match metric.def().kind {
                Kind::Float => {
                    Value::Float(if v.is_null() { f64::NAN } else { v.as_f64().ok_or_else(bad)? })
                }
                Kind::Count => Value::Count(v.as_u64().ok_or_else(bad)?),
                Kind::Hist => Value::Hist(
                    v.as_array()
                        .ok_or_else(bad)?
                        .iter()
                        .map(|x| x.as_u64().ok_or_else(bad))
                        .collect::<Result<_, _>>()?,
                ),
                Kind::Text => Value::Text(v.as_str().ok_or_else(bad)?.to_string()),
            };
            self.values.insert(metric, value);
        }
        Ok(())
    }
}

/// `metrics.csv`: the scalar metrics present in any row, in registry order, empty where a row lacks
/// one or it is undefined.
pub fn csv(rows: &[Row]) -> String {
    let cols: Vec<Metric> = Metric::ALL
        .iter()
        .copied()
        .filter(|m| m.def().kind != Kind::Hist && rows.iter().any(|r| r.values.contains_key(m)))
        .collect();
    let mut out = String::from("generation");
    for m in &cols {
        out.push(',');
        out.push_str(m.key());
    }
    out.push('\n');
    for r in rows {
        out.push_str(&r.id.label());
        for m in &cols {
            out.push(',');
            match r.values.get(m) {
                Some(Value::Float(x)) if !x.is_nan() => out.push_str(&Json::from(*x).to_string()),
                Some(Value::Count(n)) => out.push_str(&n.to_string()),
                Some(Value::Text(s)) => out.push_str(s),
                _ => {}
            }
        }
        out.push('\n');
    }
    out
}

/// One line per metric, tab-separated: key, unit, healthier, where shown, description (what
/// `collapse-lab metrics --list` prints and the scripts read).
pub fn listing() -> String {
    let mut out = String::from("key\tunit\thealthier\tshown in\tdescription\n");
    for m in Metric::ALL {
        let d = m.def();
        let mut shown = Vec::new();
        if d.table.is_some() {
            shown.push("table");
        }
        if d.report {
            shown.push("report");
        }
        if d.plot.is_some() {
            shown.push("plot");
        }
        if d.compare.is_some() {
            shown.push("compare");
        }
        let better = match d.better {
            Better::Higher => "higher",
            Better::Lower => "lower",
            Better::Neither => "-",
        };
        let shown = if shown.is_empty() { "-".to_string() } else { shown.join(",") };
        out.push_str(&format!(
            "{}\t{}\t{better}\t{shown}\t{}\n",
            d.key,
            if d.unit.is_empty() { "-" } else { d.unit },
            d.description
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_unique_and_parse_back() {
        for (i, a) in Metric::ALL.iter().enumerate() {
            assert_eq!(Metric::from_key(a.key()), Some(*a));
            assert!(Metric::ALL[i + 1..].iter().all(|b| b.key() != a.key()), "{} twice", a.key());
        }
    }

    #[test]
    fn rows_round_trip_through_json_in_registry_order() {
        let mut r = Row::new(RowId::Generation(2));
        r.set(Metric::TtrAtN, 0.25);
        r.set(Metric::TestPpl, 9.5);
        r.set(Metric::ZipfAlpha, f64::NAN);
        r.set_count(Metric::Words, 7);
        r.set_value(Metric::Gen0SeqPplHist, Value::Hist(vec![1, 2]));
        r.set_value(Metric::Stage, Value::Text("early".into()));
        let text = r.to_json().to_string();
        assert_eq!(
            text,
            r#"{"generation":2,"test_ppl":9.5,"words":7,"ttr_at_n":0.25,"zipf_alpha":null,"gen0_seq_ppl_hist":[1,2],"stage":"early"}"#
        );
        let back = Row::from_json(&serde_json::from_str(&text).unwrap()).unwrap();
        assert_eq!(back.to_json().to_string(), text);
        assert!(Row::from_json(&serde_json::json!({"generation": 0, "tset_ppl": 1.0}))
            .unwrap_err()
            .contains("tset_ppl"));
        assert!(Row::from_json(&serde_json::json!({"generation": 0, "words": "many"})).is_err());
    }

    #[test]
    fn csv_has_scalar_columns_in_registry_order() {
        let mut real = Row::new(RowId::Real);
        real.set(Metric::TtrAtN, 0.5);
        real.set_value(Metric::Gen0SeqPplHist, Value::Hist(vec![1, 2]));
        let mut g0 = Row::new(RowId::Generation(0));
        g0.set(Metric::TestPpl, 9.5);
        g0.set(Metric::TtrAtN, 0.25);
        assert_eq!(csv(&[real, g0]), "generation,test_ppl,ttr_at_n\nreal,,0.5\n0,9.5,0.25\n");
    }
}
