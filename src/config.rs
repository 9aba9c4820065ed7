//! Configuration: named presets, then a file of differences (TOML or JSON), then `--set key=value`
//! overrides, as nanoGPT layers them. Every key must already exist in the preset (an unknown key is an
//! error) and every value must have the key's type; errors name the key and where it came from.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// A mistake in what the user asked for (exit code 2), as opposed to a failure while running.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UsageError(pub String);

/// Shorthand for returning a [`UsageError`].
pub fn usage<T>(msg: impl Into<String>) -> Result<T> {
    Err(UsageError(msg.into()).into())
}

/// The architecture. `vocab_size` is the tokenizer's; `ctx` the longest sequence the model sees.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelConfig {
    pub vocab_size: usize,
    pub ctx: usize,
    pub d_model: usize,
    pub n_layer: usize,
    pub n_head: usize,
    /// Dropout on attention output, MLP output and embeddings while training (0 = off).
    pub dropout: f64,
}

/// Upper bounds on sizes: beyond them a run cannot fit in memory or finish, and an allocation
/// would abort the process instead of giving a message.
pub mod limits {
    pub const VOCAB: usize = 1 << 20;
    pub const CTX: usize = 8192;
    pub const D_MODEL: usize = 16384;
    pub const N_LAYER: usize = 256;
    pub const BATCH: usize = 1 << 16;
    pub const GENERATIONS: usize = 1000;
    pub const BEAM: usize = 64;
    pub const EPOCHS: f64 = 1e4;
    pub const STEPS: usize = 1 << 30;
    /// The smallest BPE vocabulary: the 256 bytes, the two special tokens and one merge.
    pub const MIN_BPE_VOCAB: usize = 256 + 2 + 1;
}

impl ModelConfig {
    /// Ranges, with messages that name the key.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let sizes = [
            ("model.vocab_size", self.vocab_size, limits::VOCAB),
            ("model.ctx", self.ctx, limits::CTX),
            ("model.d_model", self.d_model, limits::D_MODEL),
            ("model.n_layer", self.n_layer, limits::N_LAYER),
            ("model.n_head", self.n_head, self.d_model.max(1)),
        ];
        for (name, v, max) in sizes {
            if !(1..=max).contains(&v) {
                return Err(must(name, &format!("in [1, {max}]"), v));
            }
        }
        if !self.d_model.is_multiple_of(self.n_head) {
            return Err(format!(
                "model.d_model ({}) must be a multiple of model.n_head ({})",
                self.d_model, self.n_head
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(must("model.dropout", "in [0, 1)", self.dropout));
        }
        Ok(())
    }
}

/// How one token is chosen from a row of logits (see [`crate::sampler`]).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct SamplerSettings {
    /// Softmax temperature; `0` means greedy (argmax, no randomness).
    pub temperature: f32,
    /// Keep only the `top_k` most probable tokens; `0` (or `>= vocab`) is off.
    pub top_k: usize,
    /// Nucleus sampling: keep the smallest set of most probable tokens whose
    /// probability adds up to at least `top_p`; `1` is off.
    pub top_p: f32,
    /// CTRL-style penalty on tokens already in the context; `1` is off.
    pub repetition_penalty: f32,
}

impl Default for SamplerSettings {
    /// Plain ancestral sampling: temperature 1, no filtering, no penalty.
    fn default() -> Self {
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0 }
    }
}

impl SamplerSettings {
    /// Greedy decoding: always the most probable token.
    pub const GREEDY: Self = Self { temperature: 0.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0 };

    /// Checks the ranges; the error names the setting and its flag, e.g.
    /// `--temperature (sample.temperature) must be >= 0, got -1`.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let Self {
            temperature,
            top_k: _, // every usize is valid: 0 is off, >= vocab is off
            top_p,
            repetition_penalty,
        } = *self;
        if !(0.0..=100.0).contains(&temperature) {
            return Err(must("sample.temperature", "in [0, 100] (0 = greedy)", temperature));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(must("sample.top_p", "in (0, 1] (1 = off)", top_p));
        }
        if !(repetition_penalty > 0.0 && repetition_penalty <= 100.0) {
            return Err(must("sample.repetition_penalty", "in (0, 100] (1 = off)", repetition_penalty));
        }
        Ok(())
    }
}

/// The settings that have a command-line flag of their own, (flag, key): `run` turns the flags
/// into these keys, and errors name both.
pub const FLAGS: [(&str, &str); 10] = [
    ("--generations", "recursion.generations"),
    ("--regime", "recursion.regime"),
    ("--real-fraction", "recursion.real_fraction"),
    ("--prompt-mode", "recursion.prompt_mode"),
    ("--init", "recursion.init"),
    ("--temperature", "sample.temperature"),
    ("--top-k", "sample.top_k"),
    ("--top-p", "sample.top_p"),
    ("--beam", "sample.beam"),
    ("--repetition-penalty", "sample.repetition_penalty"),
];

/// How messages name a setting: `--flag (key)` when it has a flag, else the key.
pub fn setting_name(key: &str) -> String {
    match FLAGS.iter().find(|(_, k)| *k == key) {
        Some((flag, _)) => format!("{flag} ({key})"),
        None => key.to_string(),
    }
}

/// "`setting` must be `expected`, got `got`".
fn must(key: &str, expected: &str, got: impl std::fmt::Display) -> String {
    format!("{} must be {expected}, got {got}", setting_name(key))
}

/// The checks a learning-rate schedule's keys share (`train.*` and `finetune.*`): (key, passed,
/// what was expected, the value). With `decay` (train.weight_decay, for fine-tuning's rate), the rate
/// must also keep lr·decay below 1 (decoupled weight decay multiplies the weights by 1 − lr·decay).
fn schedule_checks(
    section: &str,
    lr: f64,
    min_lr: f64,
    epochs: f64,
    decay: Option<f64>,
) -> [(String, bool, String, f64); 3] {
    let (lr_ok, lr_expected) = match decay {
        Some(wd) => (lr * wd < 1.0, format!("in (0, 1e9] and below 1 / train.weight_decay = {}", 1.0 / wd)),
        None => (true, "in (0, 1e9]".to_string()),
    };
    [
        (format!("{section}.lr"), lr > 0.0 && lr <= 1e9 && lr_ok, lr_expected, lr),
        (
            format!("{section}.min_lr"),
            min_lr >= 0.0 && min_lr <= lr,
            format!("in [0, {section}.lr = {lr}]"),
            min_lr,
        ),
        (
            format!("{section}.epochs"),
            epochs > 0.0 && epochs <= limits::EPOCHS,
            format!("in (0, {}]", limits::EPOCHS),
            epochs,
        ),
    ]
}

/// Which part of wikitext-2 is used, and how it is cut.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Use only the first N non-empty lines of the train split (0 = all).
    pub train_lines: usize,
    /// Use only the first N non-empty lines of the valid and test splits (0 = all).
    pub eval_lines: usize,
    /// Evaluation blocks and sampling prompts are this many tokens (64 in Shumailov et al.).
    pub block_size: usize,
    /// With one text file as `--data`: the shares of its documents in train, valid and test.
    pub split_ratio: [f64; 3],
}

/// Which tokenizer a run trains; every model of the run (and its base) shares it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerKind {
    /// Byte-level BPE of `model.vocab_size` tokens: any text, but a small model writes non-words.
    Bpe,
    /// One token per word type (`<unk>` for the rest): wikitext-2's classic closed vocabulary. It
    /// cannot write a word the training text lacks. `model.vocab_size` caps the vocabulary (0 = every
    /// word type).
    Word,
}

/// What the tokenizer is trained on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum TokenizerCorpus {
    /// The run's real train lines (`data.train_lines`).
    Real,
    /// The whole train split (what a base model, pretrained on the rest of it, needs).
    Train,
}

/// The tokenizer of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenizerConfig {
    pub kind: TokenizerKind,
    pub corpus: TokenizerCorpus,
}

/// How a generation is fine-tuned from the base model (`recursion.init = base`): its own budget and
/// schedule; the rest (batch size, AdamW, clipping, evaluation, selection) is `train`'s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FinetuneConfig {
    /// Passes over the generation's training set.
    pub epochs: f64,
    pub lr: f64,
    /// The cosine schedule decays to this learning rate.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// Evaluate on the validation split every N steps (and at the end) to select the checkpoint.
    pub eval_interval: usize,
}

/// The base model that `recursion.init = base` fine-tunes every generation from: the run's
/// architecture, pretrained with `train`'s settings on the train split's text after the real data
/// (cut at a document boundary), cached by content in `checkpoints/bases/`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseConfig {
    /// Use only the first N lines of that text (0 = all of it).
    pub lines: usize,
    /// The base's seed (its own, so that runs of several seeds share one base).
    pub seed: u64,
}

/// Optimisation and model selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    /// Sequences per step; each is a random window of `model.ctx` + 1 tokens of the training stream.
    pub batch_size: usize,
    /// Training budget in passes over the training stream (tokens seen / stream length).
    pub epochs: f64,
    /// If > 0, train exactly this many steps instead of `epochs`.
    pub max_steps: usize,
    pub lr: f64,
    /// The cosine schedule decays to this learning rate.
    pub min_lr: f64,
    pub warmup_steps: usize,
    /// AdamW decay, applied to weight matrices and embeddings only (not to biases or LayerNorm).
    pub weight_decay: f64,
    pub beta1: f64,
    pub beta2: f64,
    /// Clip the global gradient norm to this value (0 = off).
    pub grad_clip: f64,
    /// Evaluate on the validation split every N steps (and at the end).
    pub eval_interval: usize,
    /// Evaluate on at most this many validation blocks during training (0 = all).
    pub eval_blocks: usize,
    /// Stop after this many evaluations without a better validation loss (0 = never).
    pub patience: usize,
    /// The inputs of the matrix products: fp32, or bf16 (products summed in f32; f32 master
    /// weights and AdamW state) on CPUs with AMX-BF16 or AVX512-BF16, or fp32-bf16-head-grad (only
    /// the head's two backward products in bf16, where the CPU has a bf16 kernel; fp32 elsewhere).
    /// Measurements are f32.
    pub precision: Precision,
}

/// The arithmetic of training's matrix products.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Precision {
    Fp32,
    Bf16,
    /// fp32, but the head's gradient products (most of a step's backward FLOPs with a word-sized
    /// vocabulary) in bf16: the forward, so the loss and every perplexity, stays f32.
    Fp32Bf16HeadGrad,
}

/// How a generation samples its corpus.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    /// Softmax temperature (0 = greedy).
    pub temperature: f32,
    /// Keep the k most probable tokens (0 = off).
    pub top_k: usize,
    /// Nucleus: keep the most probable tokens up to this cumulative probability (1 = off).
    pub top_p: f32,
    /// CTRL-style penalty on tokens already in the context (1 = off; Shumailov's code used 3.0).
    pub repetition_penalty: f32,
    /// Beam search of this width instead of sampling (0 = off; the paper used 5).
    pub beam: usize,
    /// Prompts generated at once.
    pub batch_size: usize,
}

impl SampleConfig {
    pub fn sampler(&self) -> SamplerSettings {
        SamplerSettings {
            temperature: self.temperature,
            top_k: self.top_k,
            top_p: self.top_p,
            repetition_penalty: self.repetition_penalty,
        }
    }
}

/// What generation g+1 trains on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Regime {
    /// Only generation g's corpus.
    Replace,
    /// A fresh random `real_fraction` of the real blocks, the rest from generation g's corpus.
    KeepReal,
    /// The real data plus every synthetic corpus so far.
    Accumulate,
    /// Accumulate, then subsample to the real data's size.
    AccumulateSubsample,
}

/// Where the prompts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum PromptMode {
    /// Continue every block of the training set by one block (Shumailov et al.).
    Blocks,
    /// Unconditional samples from the end-of-text token (Gerstgrasser et al.).
    Free,
}

/// How each generation's model starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum InitMode {
    /// Fresh random weights (seeded from the run seed and the generation).
    Scratch,
    /// The previous generation's selected weights (fine-tuning).
    Previous,
    /// The pretrained base model's weights, every generation (Shumailov et al.'s protocol).
    Base,
}

/// The recursion: how many generations, on what data.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecursionConfig {
    /// Models trained: generation 0 (on real data) to generations − 1.
    pub generations: usize,
    pub regime: Regime,
    /// With `keep-real`: the share of real blocks in each generation's training set.
    pub real_fraction: f64,
    pub prompt_mode: PromptMode,
    pub init: InitMode,
    /// Measure every row's perplexity on the real validation split too (`valid_ppl`,
    /// `valid_word_ppl`); the test split is measured always. Off, a row costs one split less to score.
    pub measure_valid: bool,
}

/// Everything a training run needs. Saved, resolved, in `model.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub preset: String,
    pub seed: u64,
    pub data: DataConfig,
    pub tokenizer: TokenizerConfig,
    pub model: ModelConfig,
    pub train: TrainConfig,
    pub finetune: FinetuneConfig,
    pub base: BaseConfig,
    pub sample: SampleConfig,
    pub recursion: RecursionConfig,
}

/// The default shares of documents in train, valid and test when one file is split.
pub const SPLIT: [f64; 3] = [0.9, 0.05, 0.05];

/// The presets, smallest first.
pub const PRESETS: [&str; 6] = ["smoke", "lab", "cpu", "cpu-large", "shumailov", "paper"];

impl Config {
    /// A named preset.
    pub fn preset(name: &str) -> Result<Self> {
        let base = TrainConfig {
            batch_size: 32,
            epochs: 1.0,
            max_steps: 0,
            lr: 3e-3,
            min_lr: 3e-4,
            warmup_steps: 100,
            weight_decay: 0.1,
            beta1: 0.9,
            beta2: 0.95,
            grad_clip: 1.0,
            eval_interval: 200,
            eval_blocks: 200,
            patience: 0,
            precision: Precision::Fp32,
        };
        let small = |vocab, d, layers, heads| ModelConfig {
            vocab_size: vocab,
            ctx: 128,
            d_model: d,
            n_layer: layers,
            n_head: heads,
            dropout: 0.0,
        };
        let sample = SampleConfig {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            beam: 0,
            batch_size: 64,
        };
        let bpe = TokenizerConfig { kind: TokenizerKind::Bpe, corpus: TokenizerCorpus::Real };
        let finetune =
            FinetuneConfig { epochs: 1.0, lr: 1e-3, min_lr: 1e-4, warmup_steps: 20, eval_interval: 50 };
        let based = BaseConfig { lines: 0, seed: 0 };
        let recursion = RecursionConfig {
            generations: 5,
            regime: Regime::Replace,
            real_fraction: 0.1,
            prompt_mode: PromptMode::Blocks,
            init: InitMode::Scratch,
            measure_valid: true,
        };
        let cfg = match name {
            // Seconds: what the tests use.
            "smoke" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 150, eval_lines: 60, block_size: 16, split_ratio: SPLIT },
                tokenizer: bpe.clone(),
                finetune: finetune.clone(),
                base: based.clone(),
                model: ModelConfig { ctx: 32, ..small(384, 32, 2, 2) },
                train: TrainConfig {
                    batch_size: 8,
                    max_steps: 40,
                    warmup_steps: 5,
                    eval_interval: 20,
                    eval_blocks: 20,
                    ..base.clone()
                },
                sample: SampleConfig { batch_size: 128, ..sample },
                recursion: RecursionConfig { generations: 3, ..recursion },
            },
            // The experiment scripts' preset: a generation in well under a minute on 2 cores, so that
            // grids of seeds × regimes × 10 generations fit in hours (EXPERIMENTS.md).
            "lab" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 1500, eval_lines: 0, block_size: 64, split_ratio: SPLIT },
                tokenizer: bpe.clone(),
                finetune: finetune.clone(),
                base: based.clone(),
                model: small(2048, 96, 2, 4),
                train: TrainConfig { epochs: 3.0, ..base.clone() },
                sample,
                recursion,
            },
            // Minutes on 2 cores: a fifth of the train split, a 1 M-parameter model.
            "cpu" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 4000, eval_lines: 0, block_size: 64, split_ratio: SPLIT },
                tokenizer: bpe.clone(),
                finetune: finetune.clone(),
                base: based.clone(),
                model: small(4096, 128, 2, 4),
                train: TrainConfig { epochs: 2.0, ..base.clone() },
                sample,
                recursion,
            },
            // The patient CPU user's model: the whole train split, beats the KN bigram.
            "cpu-large" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 0, eval_lines: 0, block_size: 64, split_ratio: SPLIT },
                tokenizer: bpe.clone(),
                finetune: finetune.clone(),
                base: based.clone(),
                model: small(4096, 128, 2, 4),
                train: TrainConfig { epochs: 4.0, eval_interval: 250, ..base.clone() },
                sample,
                recursion,
            },
            // Shumailov et al.'s protocol on 2 CPU cores: a word-level base model pretrained once on the
            // train split after the real data, every generation fine-tuned from it.
            "shumailov" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 1000, eval_lines: 0, block_size: 64, split_ratio: SPLIT },
                tokenizer: TokenizerConfig { kind: TokenizerKind::Word, corpus: TokenizerCorpus::Train },
                finetune: FinetuneConfig {
                    epochs: 1.0,
                    lr: 1e-3,
                    min_lr: 1e-4,
                    warmup_steps: 20,
                    eval_interval: 50,
                },
                base: based.clone(),
                model: small(0, 128, 2, 4),
                // The head's gradient in bf16 where the CPU has a bf16 kernel (fp32 elsewhere): the
                // base pretrains about 20 % faster with the same test perplexity (BENCHMARKS.md).
                train: TrainConfig {
                    epochs: 1.25,
                    eval_interval: 250,
                    precision: Precision::Fp32Bf16HeadGrad,
                    ..base.clone()
                },
                // Decoding 256 rows at once reads the 33 k-word head once for 4× more rows.
                sample: SampleConfig { batch_size: 256, ..sample },
                // The test split is the measurement; scoring the validation split too would make
                // each row a third dearer (fine-tuning already selects on real validation loss).
                recursion: RecursionConfig { init: InitMode::Base, measure_valid: false, ..recursion },
            },
            // GPU scale.
            "paper" => Config {
                preset: name.into(),
                seed: 0,
                data: DataConfig { train_lines: 0, eval_lines: 0, block_size: 64, split_ratio: SPLIT },
                tokenizer: bpe.clone(),
                finetune: finetune.clone(),
                base: based.clone(),
                model: ModelConfig { dropout: 0.1, ..small(8192, 384, 6, 6) },
                train: TrainConfig {
                    batch_size: 64,
                    epochs: 10.0,
                    lr: 1e-3,
                    min_lr: 1e-4,
                    warmup_steps: 500,
                    eval_interval: 1000,
                    eval_blocks: 0,
                    patience: 4,
                    ..base
                },
                // A GPU samples many prompts at once; each prompt has its own RNG stream, so the
                // batch changes no text.
                sample: SampleConfig { batch_size: 512, ..sample },
                recursion: RecursionConfig { generations: 10, ..recursion },
            },
            other => {
                return usage(format!("unknown preset '{other}' (expected one of: {})", PRESETS.join(", ")))
            }
        };
        Ok(cfg)
    }

    /// preset → optional file → `--set` overrides → validation.
    pub fn resolve(preset: &str, file: Option<&Path>, sets: &[String], seed: Option<u64>) -> Result<Self> {
        let mut value = serde_json::to_value(Config::preset(preset)?)?;
        if let Some(path) = file {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config file {}", path.display()))?;
            let overlay: Value = if path.extension().is_some_and(|e| e == "json") {
                serde_json::from_str(&text)
                    .map_err(|e| UsageError(format!("{} is not valid JSON: {e}", path.display())))?
            } else {
                let t: toml::Value = toml::from_str(&text).map_err(|e| {
                    // One line: the message and where, not toml's multi-line excerpt.
                    let at = e.span().map(|sp| {
                        let line = text[..sp.start.min(text.len())].matches('\n').count() + 1;
                        format!(" at line {line}")
                    });
                    UsageError(format!(
                        "{} is not valid TOML{}: {}",
                        path.display(),
                        at.unwrap_or_default(),
                        e.message().trim()
                    ))
                })?;
                serde_json::to_value(t)?
            };
            if !overlay.is_object() {
                return usage(format!(
                    "{}: expected an object of settings (e.g. {{\"train\": {{\"lr\": 0.001}}}}), got {}",
                    path.display(),
                    match overlay {
                        Value::Array(_) => "an array",
                        Value::Null => "null",
                        _ => "a single value",
                    }
                ));
            }
            let mut leaves = Vec::new();
            flatten("", &overlay, &mut leaves);
            for (key, v) in leaves {
                set_key(&mut value, &key, v, &format!("{}: key '{key}'", path.display()))?;
            }
        }
        for s in sets {
            let (key, raw) = s
                .split_once('=')
                .ok_or_else(|| UsageError(format!("--set {s}: expected key=value, e.g. train.lr=1e-3")))?;
            let v = serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()));
            set_key(&mut value, key.trim(), v, &format!("--set {s}"))?;
        }
        if let Some(seed) = seed {
            value["seed"] = Value::from(seed);
        }
        let cfg: Config = serde_json::from_value(value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Range checks that serde's types cannot express, one message per mistake naming the setting
    /// (and its flag when it has one). The only place settings are checked: `run`'s flags, `--set`,
    /// config files and `run.json` all come through here.
    pub fn validate(&self) -> Result<()> {
        if !PRESETS.contains(&self.preset.as_str()) {
            return usage(format!("preset must be one of {}, got {:?}", PRESETS.join(", "), self.preset));
        }
        match self.tokenizer.kind {
            // Every word type of the tokenizer's corpus: the size comes from the text.
            TokenizerKind::Word if self.model.vocab_size == 0 => {
                ModelConfig { vocab_size: 1, ..self.model.clone() }.validate().map_err(UsageError)?
            }
            _ => self.model.validate().map_err(UsageError)?,
        }
        if self.tokenizer.kind == TokenizerKind::Bpe && self.model.vocab_size < limits::MIN_BPE_VOCAB {
            return usage(must(
                "model.vocab_size",
                &format!(
                    "at least {} for a BPE tokenizer (256 bytes, 2 special tokens, a merge)",
                    limits::MIN_BPE_VOCAB
                ),
                self.model.vocab_size,
            ));
        }
        let ft = &self.finetune;
        let ft_checks =
            schedule_checks("finetune", ft.lr, ft.min_lr, ft.epochs, Some(self.train.weight_decay));
        for (name, ok, expected, got) in ft_checks {
            if !ok {
                return usage(must(&name, &expected, got));
            }
        }
        let r = &self.data.split_ratio;
        if r.iter().any(|x| !(x.is_finite() && *x > 0.0)) || (r.iter().sum::<f64>() - 1.0).abs() > 1e-9 {
            return usage(must(
                "data.split_ratio",
                "three positive shares of train, valid and test adding up to 1",
                format!("{r:?}"),
            ));
        }
        let t = &self.train;
        let sizes = [
            ("train.batch_size", t.batch_size, 1, limits::BATCH),
            ("train.eval_interval", t.eval_interval, 1, limits::STEPS),
            ("finetune.eval_interval", self.finetune.eval_interval, 1, limits::STEPS),
            ("train.max_steps", t.max_steps, 0, limits::STEPS),
            ("train.warmup_steps", t.warmup_steps, 0, limits::STEPS),
            ("data.block_size", self.data.block_size, 1, limits::CTX),
            ("sample.batch_size", self.sample.batch_size, 1, limits::BATCH),
            // A word-level vocabulary of every type (vocab_size 0) is checked once it is built.
            (
                "sample.beam",
                self.sample.beam,
                0,
                match self.model.vocab_size {
                    0 => limits::BEAM,
                    v => limits::BEAM.min(v),
                },
            ),
            ("recursion.generations", self.recursion.generations, 1, limits::GENERATIONS),
        ];
        for (name, v, min, max) in sizes {
            if !(min..=max).contains(&v) {
                return usage(must(name, &format!("in [{min}, {max}]"), v));
            }
        }
        for (name, ok, expected, got) in schedule_checks("train", t.lr, t.min_lr, t.epochs, None) {
            if !ok {
                return usage(must(&name, &expected, got));
            }
        }
        let checks = [
            (
                "train.weight_decay",
                t.weight_decay >= 0.0 && t.lr * t.weight_decay < 1.0,
                format!("in [0, 1 / train.lr = {})", 1.0 / t.lr),
                t.weight_decay,
            ),
            ("train.beta1", (0.0..1.0).contains(&t.beta1), "in [0, 1)".into(), t.beta1),
            ("train.beta2", (0.0..1.0).contains(&t.beta2), "in [0, 1)".into(), t.beta2),
            (
                "train.grad_clip",
                (0.0..=1e6).contains(&t.grad_clip),
                "in [0, 1e6] (0 = off)".into(),
                t.grad_clip,
            ),
            (
                "recursion.real_fraction",
                (0.0..=1.0).contains(&self.recursion.real_fraction),
                "in [0, 1]".into(),
                self.recursion.real_fraction,
            ),
        ];
        for (name, ok, expected, got) in checks {
            if !ok {
                return usage(must(name, &expected, got));
            }
        }
        self.sample.sampler().validate().map_err(UsageError)?;
        if 2 * self.data.block_size > self.model.ctx + 1 {
            return usage(format!(
                "data.block_size ({}) is too large for model.ctx ({}): a prompt block and its continuation must fit",
                self.data.block_size, self.model.ctx
            ));
        }
        Ok(())
    }
}

/// Settings added after the first run format, with the values that reproduce what runs did before
/// they existed. A config saved by an older build lacks them and gets these ([`saved`]).
fn legacy_defaults() -> Value {
    serde_json::json!({
        "data": {"split_ratio": SPLIT},
        "tokenizer": {"kind": "bpe", "corpus": "real"},
        "train": {"precision": "fp32"},
        "finetune": {"epochs": 1.0, "lr": 1e-3, "min_lr": 1e-4, "warmup_steps": 20, "eval_interval": 50},
        "base": {"lines": 0, "seed": 0},
        "recursion": {"measure_valid": true},
    })
}

/// Fills the keys `value` lacks from `defaults` (recursively); present keys are kept as they are.
fn fill_missing(value: &mut Value, defaults: &Value) {
    if let (Value::Object(v), Value::Object(d)) = (value, defaults) {
        for (k, dv) in d {
            match v.get_mut(k) {
                Some(vv) => fill_missing(vv, dv),
                None => {
                    v.insert(k.clone(), dv.clone());
                }
            }
        }
    }
}

/// Reads a config saved in `run.json` or `model.json` by this build or an older one (for serde's
/// `deserialize_with`): settings added since are filled with the values older runs used.
pub fn saved<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Config, D::Error> {
    let mut value = Value::deserialize(d)?;
    if !value.is_object() {
        return Err(serde::de::Error::custom("config: expected an object of settings"));
    }
    fill_missing(&mut value, &legacy_defaults());
    serde_json::from_value(value).map_err(serde::de::Error::custom)
}

/// Dotted paths of every leaf of a JSON object.
fn flatten(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                let key = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
                flatten(&key, child, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

/// Replaces the leaf at dotted `key`; the key must exist and the new value must keep the config
/// deserialisable (so a wrong type is reported here, with `origin` naming where it came from).
fn set_key(root: &mut Value, key: &str, new: Value, origin: &str) -> Result<()> {
    if key == "preset" {
        return usage(format!("{origin}: the preset is chosen with --preset, not set"));
    }
    let known = known_keys(root);
    let mut slot = &mut *root;
    for part in key.split('.') {
        slot = match slot.get_mut(part) {
            Some(s) => s,
            None => return usage(format!("{origin}: unknown key '{key}' (known keys: {known})")),
        };
    }
    if slot.is_object() {
        return usage(format!("{origin}: '{key}' is a section, not a value"));
    }
    *slot = new;
    if let Err(e) = serde_json::from_value::<Config>(root.clone()) {
        return usage(format!("{origin}: {e}"));
    }
    Ok(())
}

fn known_keys(root: &Value) -> String {
    let mut leaves = Vec::new();
    flatten("", root, &mut leaves);
    leaves.into_iter().map(|(k, _)| k).collect::<Vec<_>>().join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for p in PRESETS {
            Config::preset(p).unwrap().validate().unwrap();
        }
        assert!(Config::preset("huge").unwrap_err().to_string().contains("unknown preset 'huge'"));
    }

    #[test]
    fn overrides_are_strict_and_typed() {
        let c = Config::resolve("smoke", None, &["train.lr=0.01".into(), "model.d_model=64".into()], Some(7))
            .unwrap();
        assert_eq!((c.train.lr, c.model.d_model, c.seed), (0.01, 64, 7));
        let e = Config::resolve("smoke", None, &["train.lrr=1".into()], None).unwrap_err().to_string();
        assert!(e.contains("unknown key 'train.lrr'"), "{e}");
        let e = Config::resolve("smoke", None, &["model.d_model=big".into()], None).unwrap_err().to_string();
        assert!(e.contains("model.d_model=big") && e.contains("expected usize"), "{e}");
        let e = Config::resolve("smoke", None, &["model.d_model=31".into()], None).unwrap_err().to_string();
        assert!(e.contains("multiple of model.n_head"), "{e}");
    }

    #[test]
    fn toml_file_layers_between_preset_and_set() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.toml");
        std::fs::write(&f, "[train]\nlr = 0.02\nbatch_size = 4\n").unwrap();
        let c = Config::resolve("smoke", Some(&f), &["train.batch_size=2".into()], None).unwrap();
        assert_eq!((c.train.lr, c.train.batch_size), (0.02, 2));
        std::fs::write(&f, "[train]\nlearning_rate = 0.02\n").unwrap();
        let e = Config::resolve("smoke", Some(&f), &[], None).unwrap_err().to_string();
        assert!(e.contains("c.toml") && e.contains("unknown key 'train.learning_rate'"), "{e}");
    }
}
