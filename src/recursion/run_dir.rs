//! The run directory and its formats: `run.json` (the resolved settings and what is complete: the
//! source of truth for `resume`), `gen-NN/corpus.jsonl` (what each generation wrote, with
//! provenance), `metrics.jsonl` and `metrics.csv` (one [`Row`] per measured generation). Every file
//! is written to a temporary name and renamed into place.

use crate::config::{usage, Config, SampleConfig};
use crate::data::DataSource;
use crate::files::{sha256_file, write_atomic, write_atomic_with, write_json};
use crate::metrics::registry::{self, Row};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

pub const RUN_JSON: &str = "run.json";
pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";
pub const CORPUS: &str = "corpus.jsonl";

/// The format of a run directory this build writes (`run.json`, and the `corpus.jsonl` and
/// `metrics.jsonl` beside it). Format 1 (collapse-lab 0.1.0) had no `format` key, no corpus record
/// and no base; every older format keeps opening, a newer one is refused.
pub const RUN_FORMAT: u32 = 2;

fn format_1() -> u32 {
    1
}

/// How far a generation has got. Ordered: each step needs the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Pending,
    Trained,
    Sampled,
    Measured,
}

/// One generation's entry in `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GenState {
    pub generation: usize,
    pub status: Status,
    /// Unix seconds when each step finished.
    pub trained_at: Option<u64>,
    pub sampled_at: Option<u64>,
    pub measured_at: Option<u64>,
    /// sha256 of each artifact of the generation, by file name.
    pub artifacts: BTreeMap<String, String>,
    /// Wall times and speeds (kept out of metrics.jsonl so that its bytes depend only on the seed).
    #[serde(default)]
    pub timings: BTreeMap<String, f64>,
}

impl GenState {
    pub fn pending(generation: usize) -> Self {
        Self {
            generation,
            status: Status::Pending,
            trained_at: None,
            sampled_at: None,
            measured_at: None,
            artifacts: BTreeMap::new(),
            timings: BTreeMap::new(),
        }
    }

    /// Records that step `status` finished now: its time, the sha256 of the files it wrote (in
    /// `dir`), and its timings.
    pub fn complete(
        &mut self,
        status: Status,
        dir: &Path,
        files: &[&str],
        timings: &[(&str, f64)],
    ) -> Result<()> {
        let at = Some(now());
        match status {
            Status::Trained => self.trained_at = at,
            Status::Sampled => self.sampled_at = at,
            Status::Measured => self.measured_at = at,
            Status::Pending => {}
        }
        for f in files {
            self.artifacts.insert(f.to_string(), sha256_file(&dir.join(f))?);
        }
        for (k, v) in timings {
            self.timings.insert(k.to_string(), *v);
        }
        self.status = status;
        Ok(())
    }
}

/// The pretrained base a run's generations start from (`recursion.init = base`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseRecord {
    /// The base's model directory.
    pub dir: PathBuf,
    /// sha256 of its `model.safetensors`: `resume` refuses a base whose bytes changed.
    pub weights_sha256: String,
    /// Whether this run pretrained it (false: found in the cache, or given with --base).
    #[serde(default)]
    pub pretrained_by_this_run: bool,
}

/// `run.json`: the resolved settings and what is complete. The source of truth for `resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    #[serde(default = "format_1")]
    pub format: u32,
    pub crate_version: String,
    #[serde(deserialize_with = "crate::config::saved")]
    pub config: Config,
    /// The corpus the run reads (None in format 1: those runs read `--data` or wikitext-2).
    #[serde(default)]
    pub data: Option<DataSource>,
    #[serde(default)]
    pub base: Option<BaseRecord>,
    pub tokenizer_sha256: String,
    /// N of `ttr_at_n` and `distinct_n`, fixed for the run.
    pub ttr_n: usize,
    pub real_measured: bool,
    /// The base's zero-shot row is measured (runs with `recursion.init = base`).
    #[serde(default)]
    pub base_measured: bool,
    /// sha256 of metrics.jsonl as last written.
    #[serde(default)]
    pub metrics_sha256: Option<String>,
    pub generations: Vec<GenState>,
}

impl RunState {
    /// Whether every generation and the real row are measured.
    pub fn is_complete(&self) -> bool {
        self.real_measured
            && (self.base.is_none() || self.base_measured)
            && self.generations.iter().all(|g| g.status == Status::Measured)
    }

    /// Everything `run` would check of these settings, and the consistency of the record: a
    /// `run.json` edited by hand or damaged is refused with a one-line error naming what is wrong.
    pub fn check(&self, path: &Path) -> Result<()> {
        let ours = env!("CARGO_PKG_VERSION");
        if self.format > RUN_FORMAT || newer_version(&self.crate_version, ours) {
            return usage(format!(
                "{} was written by collapse-lab {} (run format {}); this build ({ours}) reads formats up to {RUN_FORMAT}",
                path.display(),
                self.crate_version,
                self.format
            ));
        }
        self.config
            .validate()
            .map_err(|e| crate::config::UsageError(format!("{}: {e:#}", path.display())))?;
        let wanted = self.config.recursion.generations;
        if self.generations.len() != wanted {
            return usage(format!(
                "{}: {} generation entries for recursion.generations = {wanted} (to extend a run, use \
                 `collapse-lab resume RUN --generations N`)",
                path.display(),
                self.generations.len()
            ));
        }
        if let Some((i, g)) = self.generations.iter().enumerate().find(|(i, g)| g.generation != *i) {
            return usage(format!(
                "{}: entry {i} of generations is generation {}",
                path.display(),
                g.generation
            ));
        }
        let is_sha = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !is_sha(&self.tokenizer_sha256) || self.metrics_sha256.as_deref().is_some_and(|s| !is_sha(s)) {
            return usage(format!("{}: a recorded sha256 is not 64 hex digits", path.display()));
        }
        if self.ttr_n == 0 {
            return usage(format!("{}: ttr_n must be at least 1", path.display()));
        }
        if (self.config.recursion.init == crate::config::InitMode::Base) != self.base.is_some() {
            return usage(format!(
                "{}: recursion.init and the recorded base disagree (init {:?}, base {})",
                path.display(),
                self.config.recursion.init,
                if self.base.is_some() { "recorded" } else { "none" }
            ));
        }
        Ok(())
    }
}

/// Whether version `a` (major.minor.patch) is newer than `b`.
fn newer_version(a: &str, b: &str) -> bool {
    let parse = |v: &str| -> Vec<u64> { v.split('.').map(|x| x.parse().unwrap_or(u64::MAX)).collect() };
    parse(a) > parse(b)
}

/// One line of `corpus.jsonl`: a generated sequence with its provenance.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CorpusRecord {
    pub id: usize,
    pub generation: usize,
    /// The prompt's index: the block it continues (its lineage), or the sample's index in free mode.
    pub prompt_id: usize,
    pub prompt: String,
    pub text: String,
    pub tokens: Vec<u32>,
    pub sampler: SampleConfig,
    pub parent_model: String,
    /// Perplexity of `tokens` alone under the generation-0 model.
    pub gen0_ppl: f64,
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

/// The directory of generation g.
pub fn gen_dir(out: &Path, g: usize) -> PathBuf {
    out.join(format!("gen-{g:02}"))
}

pub fn save_state(out: &Path, state: &RunState) -> Result<()> {
    write_json(&out.join(RUN_JSON), state)
}

/// Reads `run.json` of a run directory and checks it ([`RunState::check`]).
pub fn load_state(out: &Path) -> Result<RunState> {
    let path = out.join(RUN_JSON);
    if !path.is_file() {
        return usage(format!("{} is not a run directory (no {RUN_JSON})", out.display()));
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| {
        crate::config::UsageError(format!("{} is not a valid {RUN_JSON}: {e}", path.display()))
    })?;
    state.check(&path)?;
    Ok(state)
}

pub fn write_corpus(path: &Path, records: &[CorpusRecord]) -> Result<()> {
    write_atomic_with(path, |tmp| {
        let mut f = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        for r in records {
            serde_json::to_writer(&mut f, r)?;
            f.write_all(b"\n")?;
        }
        f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
        Ok(())
    })
}

/// Reads a generation's `corpus.jsonl`.
pub fn read_corpus(path: &Path) -> Result<Vec<CorpusRecord>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not a corpus record", path.display(), i + 1))
        })
        .collect()
}

/// The rows of `metrics.jsonl` (none if it does not exist yet).
pub fn read_rows(out: &Path) -> Result<Vec<Row>> {
    let path = out.join(METRICS_JSONL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .enumerate()
        .map(|(i, l)| {
            let json: serde_json::Value = serde_json::from_str(l)
                .with_context(|| format!("{} line {}: not JSON", path.display(), i + 1))?;
            Row::from_json(&json).map_err(|e| anyhow::anyhow!("{} line {}: {e}", path.display(), i + 1))
        })
        .collect()
}

/// Writes `metrics.jsonl` and `metrics.csv` from all rows; returns the sha256 of metrics.jsonl.
pub fn write_rows(out: &Path, rows: &[Row]) -> Result<String> {
    let mut jsonl = String::new();
    for r in rows {
        jsonl.push_str(&serde_json::to_string(&r.to_json())?);
        jsonl.push('\n');
    }
    write_atomic(&out.join(METRICS_JSONL), jsonl.as_bytes())?;
    write_atomic(&out.join(METRICS_CSV), registry::csv(rows).as_bytes())?;
    Ok(crate::files::sha256_hex(jsonl.as_bytes()))
}
