//! The pretrained base model of Shumailov et al.'s protocol: every generation, generation 0
//! included, starts from it and is fine-tuned on its training set. It is the run's architecture
//! and tokenizer, pretrained once with the `train` settings on the train split's text after the
//! run's real data (cut where a document begins, so the two never share an article), and cached by
//! content: `checkpoints/bases/<key>/` holds a model directory and `base.json`, and `<key>` is a
//! hash of everything that determines the base's bytes ([`BaseSpec`]). A run that needs a base finds
//! it there, or pretrains it (with a progress bar) into a temporary directory renamed into place.

use crate::checkpoint::{self, TrainJob};
use crate::config::{Config, TrainConfig};
use crate::data::{Corpus, DataSource, Split};
use crate::files::{create_dir, sha256_file, sha256_hex, write_json, DirLock};
use crate::model::engine::Engine;
use crate::model::{init_weights, load_weights, ModelConfig, Weights};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

pub const BASE_JSON: &str = "base.json";
/// The format of a cached base; part of its key, so a new format never reuses an old base.
pub const BASE_FORMAT: u32 = 1;

/// Everything that determines a base's bytes. Its key is the sha256 of this record as JSON.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BaseSpec {
    pub format: u32,
    /// The architecture, with the tokenizer's vocabulary.
    pub model: ModelConfig,
    pub train: TrainConfig,
    /// Validation blocks (model selection on the real valid split, as every generation does).
    pub block_size: usize,
    pub seed: u64,
    pub tokenizer_sha256: String,
    /// sha256 of the pretraining lines (joined by newlines) and of the validation lines.
    pub text_sha256: String,
    pub valid_sha256: String,
    /// The engine's arithmetic (bases trained with other kernels differ in their bits).
    pub precision: String,
}

impl BaseSpec {
    /// The cache key: the first 16 hex digits of the sha256 of the spec.
    pub fn key(&self) -> String {
        sha256_hex(serde_json::to_string(self).expect("a spec serialises").as_bytes())[..16].to_string()
    }
}

/// `base.json`: the spec, where its text came from, and the sha256 of its weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseRecord {
    pub key: String,
    pub spec: BaseSpec,
    pub corpus: DataSource,
    /// The train lines it was pretrained on: `first_line..first_line + lines`.
    pub first_line: usize,
    pub lines: usize,
    pub weights_sha256: String,
}

/// A base model ready for use.
pub struct Base {
    pub dir: PathBuf,
    pub weights: Weights,
    pub weights_sha256: String,
    /// Pretrained by this call (not found in the cache).
    pub pretrained_now: bool,
}

/// The text a run's base pretrains on: the train split after the run's real lines, from the first
/// document boundary, at most `cfg.base.lines` lines (0 = all). Returns (index of its first line,
/// the lines).
pub fn pretraining_text<'a>(cfg: &Config, corpus: &'a Corpus) -> Result<(usize, &'a [String])> {
    let rest = corpus.rest_of_train(cfg.data.train_lines);
    if rest.is_empty() {
        bail!(
            "recursion.init = base needs text for the base beyond the run's real data: with \
             data.train_lines = {} the train split of {} leaves none (lower data.train_lines, or give --base DIR)",
            cfg.data.train_lines,
            corpus.source.name
        );
    }
    let first = corpus.lines(Split::Train).len() - rest.len();
    let lines = if cfg.base.lines > 0 { &rest[..cfg.base.lines.min(rest.len())] } else { rest };
    Ok((first, lines))
}

/// The spec of the base a run with settings `cfg` needs.
pub fn spec(
    cfg: &Config,
    model: &ModelConfig,
    tok: &Tokenizer,
    text: &[String],
    valid: &[String],
    engine: &Engine,
) -> BaseSpec {
    BaseSpec {
        format: BASE_FORMAT,
        model: model.clone(),
        // What the engine trains in, not what was asked: a fallback to fp32 is the fp32 base.
        train: TrainConfig { precision: engine.effective_precision(), ..cfg.train.clone() },
        block_size: cfg.data.block_size,
        seed: cfg.base.seed,
        tokenizer_sha256: tok.sha256(),
        text_sha256: sha256_hex(text.join("\n").as_bytes()),
        valid_sha256: sha256_hex(valid.join("\n").as_bytes()),
        precision: engine.precision_name().to_string(),
    }
}

/// What a base needs to be pretrained.
pub struct Pretraining<'a> {
    pub cfg: &'a Config,
    pub spec: BaseSpec,
    pub tok: &'a Tokenizer,
    pub corpus: &'a Corpus,
    pub first_line: usize,
    pub text: &'a [String],
    pub valid: &'a [String],
}

/// The base of `p` from the cache in `cache` (checked against its recorded sha256), or pretrained
/// into it. A damaged cached base is said so and pretrained again. Concurrent callers for the same
/// base wait for each other instead of pretraining it twice.
pub fn ensure(p: &Pretraining, cache: &Path, engine: &Engine, quiet: bool) -> Result<Base> {
    let key = p.spec.key();
    create_dir(cache)?;
    let _lock = DirLock::wait_for(&cache.join(format!(".{key}.lock")))?;
    let dir = cache.join(&key);
    if dir.exists() {
        match check_cached(&dir, &p.spec) {
            Ok((weights, sha)) => {
                if !quiet {
                    eprintln!("base: using {} (pretrained earlier; sha256 {})", dir.display(), &sha[..12]);
                }
                return Ok(Base { dir, weights, weights_sha256: sha, pretrained_now: false });
            }
            Err(e) => {
                eprintln!("note: the cached base {} is damaged ({e:#}); pretraining it again", dir.display());
                std::fs::remove_dir_all(&dir).with_context(|| format!("cannot remove {}", dir.display()))?;
            }
        }
    }
    // What a killed pretraining left behind is stale: we hold this base's lock.
    for entry in
        std::fs::read_dir(cache).with_context(|| format!("cannot list {}", cache.display()))?.flatten()
    {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!(".{key}.tmp-")) {
            std::fs::remove_dir_all(entry.path()).with_context(|| format!("cannot remove {name}"))?;
        }
    }
    if !quiet {
        eprintln!(
            "base: pretraining {} ({} lines of {} after the real data)",
            dir.display(),
            p.text.len(),
            p.corpus.source.name
        );
    }
    let tmp = cache.join(format!(".{key}.tmp-{}", std::process::id()));
    create_dir(&tmp)?;
    let model = &p.spec.model;
    let init = init_weights(model, p.spec.seed);
    let (train, valid) = (p.tok.encode_lines(p.text)?, p.tok.encode_lines(p.valid)?);
    let job = TrainJob {
        cfg: p.cfg,
        train_cfg: &p.spec.train,
        tok: p.tok,
        model,
        init: &init,
        init_sha256: None,
        train: &train,
        valid: &valid,
        seed: p.spec.seed,
        quiet,
        label: "base".into(),
    };
    checkpoint::train_model_dir(engine, &job, &tmp)?;
    let sha = sha256_file(&tmp.join(checkpoint::WEIGHTS))?;
    let record = BaseRecord {
        key: key.clone(),
        spec: p.spec.clone(),
        corpus: p.corpus.source.clone(),
        first_line: p.first_line,
        lines: p.text.len(),
        weights_sha256: sha.clone(),
    };
    write_json(&tmp.join(BASE_JSON), &record)?;
    std::fs::rename(&tmp, &dir)
        .with_context(|| format!("cannot move the new base into {}", dir.display()))?;
    let weights = load_weights(model, &dir.join(checkpoint::WEIGHTS))?;
    Ok(Base { dir, weights, weights_sha256: sha, pretrained_now: true })
}

/// The base a run with settings `cfg` needs, on `corpus` with the run's tokenizer `tok`: from the
/// cache in `cache`, or pretrained into it.
pub fn for_run(
    cfg: &Config,
    corpus: &Corpus,
    tok: &Tokenizer,
    engine: &Engine,
    cache: &Path,
    quiet: bool,
) -> Result<Base> {
    let model = ModelConfig { vocab_size: tok.vocab_size(), ..cfg.model.clone() };
    let (first_line, text) = pretraining_text(cfg, corpus)?;
    let valid = corpus.head(Split::Valid, cfg.data.eval_lines);
    let spec = spec(cfg, &model, tok, text, valid, engine);
    let p = Pretraining { cfg, spec, tok, corpus, first_line, text, valid };
    ensure(&p, cache, engine, quiet)
}

/// A cached base's weights, if its record matches `spec` and its weights their sha256.
fn check_cached(dir: &Path, spec: &BaseSpec) -> Result<(Weights, String)> {
    let text = std::fs::read_to_string(dir.join(BASE_JSON)).context("no readable base.json")?;
    let record: BaseRecord = serde_json::from_str(&text).context("base.json is not a base record")?;
    if &record.spec != spec {
        bail!("base.json describes another base");
    }
    let sha = sha256_file(&dir.join(checkpoint::WEIGHTS))?;
    if sha != record.weights_sha256 {
        bail!(
            "model.safetensors has sha256 {}, base.json recorded {}",
            &sha[..12],
            &record.weights_sha256[..12]
        );
    }
    Ok((load_weights(&spec.model, &dir.join(checkpoint::WEIGHTS))?, sha))
}

/// A base given by the user (`--base DIR`): a model directory of the lab whose architecture and
/// tokenizer are the run's. Returns its tokenizer, weights and the sha256 of its weights.
pub fn load_given(dir: &Path, cfg: &Config) -> Result<(Tokenizer, ModelConfig, Weights, String)> {
    // A Hugging Face GPT-2 directory is converted exactly (or refused); a lab directory read.
    let loaded = checkpoint::load_model_dir(dir, &Engine::Fast(crate::model::ops::Compute::fp32()))
        .with_context(|| format!("--base {}", dir.display()))?;
    let tok = loaded.tokenizer;
    let model = loaded.model.cfg().clone();
    let want = ModelConfig { vocab_size: model.vocab_size, ..cfg.model.clone() };
    if model != want || (cfg.model.vocab_size != 0 && cfg.model.vocab_size != model.vocab_size) {
        return crate::config::usage(format!(
            "--base {}: its model (vocabulary {}, ctx {}, d_model {}, {} layers, {} heads) is not the run's \
             (vocabulary {}, ctx {}, d_model {}, {} layers, {} heads)",
            dir.display(),
            model.vocab_size,
            model.ctx,
            model.d_model,
            model.n_layer,
            model.n_head,
            cfg.model.vocab_size,
            cfg.model.ctx,
            cfg.model.d_model,
            cfg.model.n_layer,
            cfg.model.n_head
        ));
    }
    let path = dir.join(checkpoint::WEIGHTS);
    Ok((tok, model, loaded.weights, sha256_file(&path)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> BaseSpec {
        let cfg = Config::preset("smoke").unwrap();
        BaseSpec {
            format: BASE_FORMAT,
            model: cfg.model.clone(),
            train: cfg.train.clone(),
            block_size: 16,
            seed: 0,
            tokenizer_sha256: "a".repeat(64),
            text_sha256: "b".repeat(64),
            valid_sha256: "c".repeat(64),
            precision: "fast-fp32".into(),
        }
    }

    /// Every setting that determines a base's bytes changes its key; the same spec keeps it.
    #[test]
    fn any_setting_that_determines_the_base_changes_its_key() {
        let key = spec().key();
        assert_eq!(key, spec().key());
        assert_eq!(key.len(), 16);
        type Change = Box<dyn Fn(&mut BaseSpec)>;
        let changes: Vec<Change> = vec![
            Box::new(|s| s.format += 1),
            Box::new(|s| s.model.d_model = 64),
            Box::new(|s| s.model.vocab_size += 1),
            Box::new(|s| s.model.n_layer = 3),
            Box::new(|s| s.model.ctx = 64),
            Box::new(|s| s.train.lr *= 2.0),
            Box::new(|s| s.train.epochs = 3.0),
            Box::new(|s| s.train.batch_size = 4),
            Box::new(|s| s.train.max_steps = 41),
            Box::new(|s| s.block_size = 8),
            Box::new(|s| s.seed = 1),
            Box::new(|s| s.tokenizer_sha256 = "d".repeat(64)),
            Box::new(|s| s.text_sha256 = "d".repeat(64)),
            Box::new(|s| s.valid_sha256 = "d".repeat(64)),
            Box::new(|s| s.precision = "fast-bf16".into()),
        ];
        for (i, change) in changes.iter().enumerate() {
            let mut s = spec();
            change(&mut s);
            assert_ne!(s.key(), key, "change {i} kept the key");
        }
    }
}
