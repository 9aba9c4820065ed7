//! A model directory: `model.safetensors` (the selected weights), `model.json` (resolved config and
//! training summary) and `tokenizer.json` (the frozen tokenizer). Written by `train`, read by `eval`,
//! by sampling, and by every generation of a run.

use crate::config::Config;
use crate::model::{Gpt, ModelConfig};
use crate::run_dir::{write_atomic, write_json};
use crate::tokenizer::Tokenizer;
use crate::train::TrainSummary;
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::Path;

pub const WEIGHTS: &str = "model.safetensors";
pub const MODEL_JSON: &str = "model.json";
pub const TOKENIZER: &str = "tokenizer.json";

/// The contents of `model.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelInfo {
    pub crate_version: String,
    /// The architecture actually built (its vocabulary is the tokenizer's).
    pub model: ModelConfig,
    pub config: Config,
    pub tokenizer_sha256: String,
    pub training: TrainSummary,
}

/// Writes `model.json` and `tokenizer.json` beside the weights already saved in `dir`.
pub fn write_model_dir(dir: &Path, info: &ModelInfo, tok: &Tokenizer) -> Result<()> {
    write_atomic(&dir.join(TOKENIZER), tok.json().as_bytes())?;
    write_json(&dir.join(MODEL_JSON), info)
}

/// A trained model ready for inference (detached weights), its tokenizer and its record.
pub struct LoadedModel {
    pub model: Gpt,
    pub tokenizer: Tokenizer,
    pub info: ModelInfo,
}

/// Loads a model directory, checking that its pieces belong together.
pub fn load_model_dir(dir: &Path, dev: &Device) -> Result<LoadedModel> {
    if !dir.is_dir() {
        bail!(
            "model directory {} does not exist (expected the --out of `collapse-lab train`)",
            dir.display()
        );
    }
    let json_path = dir.join(MODEL_JSON);
    let text = std::fs::read_to_string(&json_path)
        .with_context(|| format!("cannot read {}", json_path.display()))?;
    let info: ModelInfo = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a valid model.json", json_path.display()))?;
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
    let model = load_weights(&info.model, &dir.join(WEIGHTS), dev)?;
    Ok(LoadedModel { model, tokenizer, info })
}

/// Builds an inference model from a safetensors file, naming it when it is missing, truncated or of
/// another shape.
pub fn load_weights(cfg: &ModelConfig, path: &Path, dev: &Device) -> Result<Gpt> {
    let what =
        || format!("cannot load weights {} (missing, truncated, or not this model's shapes)", path.display());
    let tensors = candle_core::safetensors::load(path, dev).with_context(what)?;
    let vb = VarBuilder::from_tensors(tensors, DType::F32, dev);
    Gpt::new(cfg, vb).with_context(what)
}
