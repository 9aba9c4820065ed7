//! A model directory: `model.safetensors` (the selected weights), `model.json` (resolved config and
//! training summary) and `tokenizer.json` (the frozen tokenizer). Written by [`train_model_dir`]
//! (the `train` command and every generation of a run), read by `eval`, sampling and `resume`.

use crate::config::{Config, TrainConfig};
use crate::files::{write_atomic, write_json};
use crate::model::engine::{Engine, Model};
use crate::model::{load_weights, ModelConfig, Weights};
use crate::tokenizer::Tokenizer;
use crate::train::{self, TrainSummary, TrainTarget};
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const WEIGHTS: &str = "model.safetensors";
pub const MODEL_JSON: &str = "model.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// The format of `model.json` this build writes; older ones keep opening, newer ones are refused.
/// Format 1 (0.1.0) had no `format` key and no record of the weights a model started from.
pub const MODEL_FORMAT: u32 = 2;

fn format_1() -> u32 {
    1
}

/// The contents of `model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    #[serde(default = "format_1")]
    pub format: u32,
    pub crate_version: String,
    /// The architecture actually built (its vocabulary is the tokenizer's).
    pub model: ModelConfig,
    #[serde(deserialize_with = "crate::config::saved")]
    pub config: Config,
    pub tokenizer_sha256: String,
    /// sha256 of the weights training started from, when they were not fresh (a base model or the
    /// previous generation).
    #[serde(default)]
    pub init_sha256: Option<String>,
    pub training: TrainSummary,
}

/// Writes `model.json` and `tokenizer.json` beside the weights already saved in `dir`.
pub fn write_model_dir(dir: &Path, info: &ModelInfo, tok: &Tokenizer) -> Result<()> {
    write_atomic(&dir.join(TOKENIZER), tok.json().as_bytes())?;
    write_json(&dir.join(MODEL_JSON), info)
}

/// What to train into a model directory.
pub struct TrainJob<'a> {
    pub cfg: &'a Config,
    /// The training settings this job uses: `cfg.train` from scratch, a fine-tuning variant of it
    /// from a base model.
    pub train_cfg: &'a TrainConfig,
    pub tok: &'a Tokenizer,
    /// The architecture (the config's, with the tokenizer's vocabulary).
    pub model: &'a ModelConfig,
    pub init: &'a Weights,
    /// sha256 of the file `init` was read from (None for fresh weights).
    pub init_sha256: Option<String>,
    pub train: &'a [u32],
    pub valid: &'a [u32],
    /// Seeds the batch order (and dropout).
    pub seed: u64,
    pub quiet: bool,
    /// Prefix of progress messages and errors, e.g. "gen 2".
    pub label: String,
}

/// Trains `job` and writes the model directory `dir` (which must exist): the best-validation
/// weights, `model.json` and `tokenizer.json`. Returns the `model.json` record.
pub fn train_model_dir(engine: &Engine, job: &TrainJob, dir: &Path) -> Result<ModelInfo> {
    let target = TrainTarget { checkpoint: &dir.join(WEIGHTS), quiet: job.quiet, label: job.label.clone() };
    let training = train::train(
        engine,
        job.model,
        job.init,
        job.train_cfg,
        job.train,
        job.valid,
        job.cfg.data.block_size,
        job.seed,
        &target,
    )?;
    let info = ModelInfo {
        format: MODEL_FORMAT,
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        model: job.model.clone(),
        config: job.cfg.clone(),
        tokenizer_sha256: job.tok.sha256(),
        init_sha256: job.init_sha256.clone(),
        training,
    };
    write_model_dir(dir, &info, job.tok)?;
    Ok(info)
}

/// A trained model ready for inference, its tokenizer and its record.
pub struct LoadedModel {
    pub model: Model,
    pub tokenizer: Tokenizer,
    /// The lab's record (None for a Hugging Face directory).
    pub info: Option<ModelInfo>,
    /// The weights, on the host (what `export` writes).
    pub weights: Weights,
    /// Where the model came from, for messages and records.
    pub source: String,
}

impl LoadedModel {
    /// The settings it was trained with, or (for a Hugging Face model) the defaults evaluation
    /// uses: 64-token blocks (fewer if the context is shorter) on the whole splits.
    pub fn eval_config(&self) -> Config {
        match &self.info {
            Some(info) => info.config.clone(),
            None => {
                let mut cfg = Config::preset("shumailov").expect("a known preset");
                cfg.data.train_lines = 0;
                cfg.data.block_size = cfg.data.block_size.min(self.model.cfg().ctx);
                cfg
            }
        }
    }
}

/// Reads a directory's `model.json`.
pub fn read_info(dir: &Path) -> Result<ModelInfo> {
    let json_path = dir.join(MODEL_JSON);
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("cannot read {}", json_path.display()))?;
    let info: ModelInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid model.json", json_path.display()))?;
    if info.format > MODEL_FORMAT {
        bail!(
            "{} was written by collapse-lab {} (model format {}); this build reads formats up to {MODEL_FORMAT}",
            json_path.display(),
            info.crate_version,
            info.format
        );
    }
    Ok(info)
}

/// Loads a model directory on `engine` (the lab's, or a Hugging Face GPT-2 directory, converted
/// exactly or refused), checking that its pieces belong together.
pub fn load_model_dir(dir: &Path, engine: &Engine) -> Result<LoadedModel> {
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist (expected the --out of `collapse-lab train`, or a Hugging Face GPT-2 directory)",
            dir.display()
        );
    }
    if crate::hf::is_hf_dir(dir) {
        let imported = crate::hf::import(dir, &candle_core::Device::Cpu)?;
        let weights = crate::hf::weights(&imported.config, &imported.tensors)?;
        let tokenizer = Tokenizer::from_json(&imported.tokenizer_json)?;
        let model = engine.load(&imported.config, &weights)?;
        return Ok(LoadedModel { model, tokenizer, info: None, weights, source: imported.source });
    }
    let info = read_info(dir)?;
    let tokenizer = Tokenizer::load(&dir.join(TOKENIZER))?;
    if tokenizer.vocab_size() != info.model.vocab_size {
        bail!(
            "{}: the model's vocabulary ({}) does not match {}'s ({})",
            dir.display(),
            info.model.vocab_size,
            TOKENIZER,
            tokenizer.vocab_size()
        );
    }
    if tokenizer.sha256() != info.tokenizer_sha256 {
        bail!(
            "{}: {TOKENIZER} is not the tokenizer recorded in {MODEL_JSON} (its sha256 differs)",
            dir.display()
        );
    }
    let weights = load_weights(&info.model, &dir.join(WEIGHTS))?;
    let model = engine.load(&info.model, &weights)?;
    let source = dir.display().to_string();
    Ok(LoadedModel { model, tokenizer, info: Some(info), weights, source })
}
