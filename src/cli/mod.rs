//! The command line: clap derive structs (doc comments become `--help`) and one function per
//! subcommand that maps its arguments to library calls and prints the result. Settings are checked
//! in one place ([`Config::validate`]); [`table`] prints a run's rows as they come.

pub mod table;

use crate::checkpoint::{self, TrainJob};
use crate::config::{usage, Config, UsageError, FLAGS, PRESETS};
use crate::data::{self, default_data_dir, Corpus, Split};
use crate::files::{create_dir, write_atomic};
use crate::metrics::baseline::{KneserNeyBigram, UnigramModel};
use crate::model::engine::Engine;
use crate::model::score::stream_nats;
use crate::model::{init_weights, n_params, ModelConfig};
use crate::recursion::run_dir::{self, load_state, read_corpus, CorpusRecord, CORPUS};
use crate::recursion::{self, RunOptions};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use serde_json::json;
use std::path::{Path, PathBuf};

/// Reproduce model collapse on a laptop: train a small GPT on wikitext-2, sample from it, train the
/// next generation on the samples, and watch the tails of the distribution vanish.
#[derive(Debug, Parser)]
#[command(name = "collapse-lab", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Train the byte-level BPE tokenizer on the real train split and write tokenizer.json.
    Prepare(PrepareArgs),
    /// Train a GPT on wikitext-2 and keep the best-validation checkpoint.
    Train(TrainArgs),
    /// Pretrain (or find in the cache) the base model that `run --init base` fine-tunes from.
    Pretrain(PretrainArgs),
    /// Perplexity of a trained model on the real test (or validation) split.
    Eval(EvalArgs),
    /// Continue prompts of your own with a trained model (streamed for one prompt, JSONL for many).
    Generate(GenerateArgs),
    /// Write a model directory in another format (`--format hf`: a transformers GPT-2 directory).
    Export(ExportArgs),
    /// The interpolated Kneser–Ney word bigram (and a unigram): the reference a GPT must beat.
    Baseline(BaselineArgs),
    /// The recursion lab: train generation 0 on real data, sample, retrain, measure, repeat.
    Run(RunArgs),
    /// Continue an interrupted run from its last complete step.
    Resume(ResumeArgs),
    /// Write plots/*.svg and a self-contained report.html for a run (also done at the end of `run`).
    Report(ReportArgs),
    /// Read what a generation wrote, or one block's text across generations.
    Inspect(InspectArgs),
    /// Word-level corpus metrics of any text against a reference text, or `--list`: every metric.
    Metrics(MetricsArgs),
    /// Plots and tables of several runs, one curve per setting, seeds aggregated with 95 % bands.
    Compare(CompareArgs),
    /// A grid of runs (each resumable), then their comparison.
    Sweep(SweepArgs),
    /// Toy models of collapse that run in milliseconds.
    #[command(subcommand)]
    Toy(ToyCommand),
    /// Training-step and sampling speed on random tokens (compare with ../shared/bench/torch_gpt.py).
    Bench(BenchArgs),
}

/// What a command changes in its preset; shared by the commands that resolve a configuration.
#[derive(Debug, Args)]
pub struct Changes {
    /// A TOML or JSON file of differences from the preset
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Override one setting, e.g. --set train.lr=1e-3 (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

/// Where the data is and what to run on; shared by the commands that need them.
#[derive(Debug, Args)]
pub struct Common {
    /// The corpus: wikitext-2's directory, a directory of train/valid/test files (.txt, .tokens,
    /// .jsonl with a "text" field; .gz too), or one such file split by documents
    /// [default: the copy of wikitext-2 in data/wikitext-2]
    #[arg(long, value_name = "PATH")]
    pub data: Option<PathBuf>,
    /// cpu, cuda, cuda:N, or auto (CUDA when built with it and a GPU is present)
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

impl Common {
    /// The corpus of `--data` (wikitext-2 by default); a single file is split at `ratio`.
    fn corpus(&self, ratio: [f64; 3]) -> Result<Corpus> {
        Corpus::open(&self.data.clone().unwrap_or_else(default_data_dir), ratio)
    }
}

/// The base model of `--init base`.
#[derive(Debug, Args)]
pub struct BaseArgs {
    /// With --init base: fine-tune from this model directory instead of the cached base
    #[arg(long, value_name = "DIR")]
    pub base: Option<PathBuf>,
    /// Where pretrained bases are cached, one directory per content hash
    #[arg(long, value_name = "DIR", default_value = recursion::BASE_CACHE)]
    pub base_cache: PathBuf,
}

#[derive(Debug, Args)]
pub struct PrepareArgs {
    /// bpe (byte-level BPE) or word (one token per word)
    #[arg(long, value_enum, default_value = "bpe")]
    pub kind: crate::config::TokenizerKind,
    /// Vocabulary size, including the special tokens (and the 256 bytes of BPE); for word, 0 = every word
    #[arg(long, default_value_t = 4096)]
    pub vocab_size: usize,
    /// Use only the first N non-empty lines of the train split (0 = all)
    #[arg(long, default_value_t = 0)]
    pub train_lines: usize,
    /// Where to write the tokenizer
    #[arg(long, default_value = "tokenizer.json")]
    pub out: PathBuf,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct TrainArgs {
    /// Named configuration: smoke, lab, cpu, cpu-large, shumailov or paper (trained from scratch here)
    #[arg(long, default_value = "cpu")]
    pub preset: String,
    #[command(flatten)]
    pub changes: Changes,
    /// Seed for initialisation and batch order
    #[arg(long)]
    pub seed: Option<u64>,
    /// Use this tokenizer.json instead of training one
    #[arg(long, value_name = "FILE")]
    pub tokenizer: Option<PathBuf>,
    /// Output directory for model.safetensors, model.json and tokenizer.json
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct PretrainArgs {
    /// Named configuration (its model, train settings, tokenizer and data.train_lines decide the base)
    #[arg(long, default_value = "shumailov")]
    pub preset: String,
    #[command(flatten)]
    pub changes: Changes,
    /// The base's seed (base.seed)
    #[arg(long)]
    pub seed: Option<u64>,
    /// Where pretrained bases are cached
    #[arg(long, value_name = "DIR", default_value = recursion::BASE_CACHE)]
    pub base_cache: PathBuf,
    /// No progress bar
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct EvalArgs {
    /// A directory written by `collapse-lab train`
    #[arg(long, value_name = "DIR")]
    pub model: PathBuf,
    #[arg(long, value_enum, default_value = "test")]
    pub split: Split,
    /// Evaluate only the first N lines of the split (default: the model's data.eval_lines; 0 = all)
    #[arg(long)]
    pub lines: Option<usize>,
    /// Predicted tokens per evaluation block (default: the model's data.block_size; 64 for a
    /// Hugging Face model)
    #[arg(long)]
    pub block_size: Option<usize>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// A model directory (the lab's, or a Hugging Face GPT-2 directory)
    #[arg(long, value_name = "DIR", required_unless_present = "run", conflicts_with = "run")]
    pub model: Option<PathBuf>,
    /// A run directory: use the model of --generation G
    #[arg(long, value_name = "RUN", requires = "generation")]
    pub run: Option<PathBuf>,
    /// With --run: which generation's model
    #[arg(long, short)]
    pub generation: Option<usize>,
    /// The prompt (its text continues; it is preceded by the end-of-text token)
    #[arg(long, required_unless_present = "prompts", conflicts_with = "prompts")]
    pub prompt: Option<String>,
    /// A file of prompts, one per line (or .jsonl with a "text" field); the output is JSONL
    #[arg(long, value_name = "FILE")]
    pub prompts: Option<PathBuf>,
    /// New tokens per prompt
    #[arg(long, default_value_t = 64)]
    pub max_new_tokens: usize,
    /// Sampling temperature, 0 = greedy
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub temperature: f32,
    /// Keep the k most probable tokens, 0 = off
    #[arg(long, default_value_t = 0)]
    pub top_k: usize,
    /// Nucleus sampling threshold in (0, 1], 1 = off
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub top_p: f32,
    /// Penalty on tokens already in the context, 1 = off
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    pub repetition_penalty: f32,
    /// Beam search of this width instead of sampling (0 = off)
    #[arg(long, default_value_t = 0)]
    pub beam: usize,
    /// Prompt i is sampled from the stream of (seed, i)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// cpu, cuda, cuda:N, or auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum ExportFormat {
    /// A transformers GPT2LMHeadModel directory (config.json, model.safetensors, tokenizer files)
    Hf,
}

#[derive(Debug, Args)]
pub struct ExportArgs {
    #[arg(long, value_enum, default_value = "hf")]
    pub format: ExportFormat,
    /// The lab model directory to export
    pub model: PathBuf,
    /// The directory to write (new, empty, or a previous export)
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct BaselineArgs {
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct RunArgs {
    /// Named configuration: smoke, lab, cpu, cpu-large, shumailov (Shumailov's protocol: a cached pretrained base, every generation fine-tuned from it) or paper
    #[arg(long, default_value = "shumailov")]
    pub preset: String,
    #[command(flatten)]
    pub changes: Changes,
    /// Models to train: generation 0 (real data) to N − 1 [preset: 5]
    #[arg(long)]
    pub generations: Option<usize>,
    /// What generation g+1 trains on [preset: replace]
    #[arg(long, value_enum)]
    pub regime: Option<crate::config::Regime>,
    /// With --regime keep-real: the share of real blocks kept each generation [preset: 0.1]
    #[arg(long, allow_negative_numbers = true)]
    pub real_fraction: Option<f64>,
    /// Sampling temperature, 0 = greedy [preset: 1]
    #[arg(long, allow_negative_numbers = true)]
    pub temperature: Option<f32>,
    /// Keep the k most probable tokens, 0 = off [preset: 0]
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling threshold in (0, 1] [preset: 1]
    #[arg(long, allow_negative_numbers = true)]
    pub top_p: Option<f32>,
    /// Beam search of this width instead of sampling (the paper used 5) [preset: off]
    #[arg(long)]
    pub beam: Option<usize>,
    /// Penalty on tokens already in the context, 1 = off (the paper's code used 3) [preset: 1]
    #[arg(long, allow_negative_numbers = true)]
    pub repetition_penalty: Option<f32>,
    /// blocks: continue every block of the training set; free: unconditional samples
    #[arg(long, value_enum)]
    pub prompt_mode: Option<crate::config::PromptMode>,
    /// scratch: fresh weights each generation; previous: start from the previous generation's
    #[arg(long, value_enum)]
    pub init: Option<crate::config::InitMode>,
    /// The run's seed: every random stream derives from it
    #[arg(long)]
    pub seed: Option<u64>,
    /// Run name: the run goes to checkpoints/NAME [default: PRESET-REGIME-seedSEED]
    #[arg(long, conflicts_with = "out")]
    pub name: Option<String>,
    /// Run directory (instead of checkpoints/NAME)
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Start over in a directory that already holds a run
    #[arg(long)]
    pub force: bool,
    /// No progress bars or table
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct ResumeArgs {
    /// The run directory
    pub run: PathBuf,
    /// Extend the run to N generations (a finished run continues from where it ended)
    #[arg(long)]
    pub generations: Option<usize>,
    /// No progress bars or table
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Args)]
pub struct CompareArgs {
    /// Run directories
    #[arg(required = true, num_args = 1..)]
    pub runs: Vec<PathBuf>,
    /// Where compare.html and plots/ go
    #[arg(long, value_name = "DIR", default_value = "checkpoints/compare")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct SweepArgs {
    /// Temperatures to try, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1.0", allow_negative_numbers = true)]
    pub temperature: Vec<f32>,
    /// Top-p values to try, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "1.0", allow_negative_numbers = true)]
    pub top_p: Vec<f32>,
    /// Regimes to try, comma-separated
    #[arg(long, value_delimiter = ',', default_value = "replace")]
    pub regime: Vec<crate::config::Regime>,
    /// Seeds per grid point (0..S)
    #[arg(long, default_value_t = 1)]
    pub seeds: u64,
    #[arg(long, default_value = "shumailov")]
    pub preset: String,
    #[arg(long)]
    pub generations: Option<usize>,
    /// Any other setting to vary, e.g. --grid sample.beam=0,5 (repeatable; values as for --set)
    #[arg(long, value_name = "KEY=V1,V2")]
    pub grid: Vec<String>,
    /// Any other setting, as in `run --set` (repeatable)
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// The sweep directory: one run per grid point and seed, and compare/
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
    #[arg(long)]
    pub quiet: bool,
    #[command(flatten)]
    pub base: BaseArgs,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, Subcommand)]
pub enum ToyCommand {
    /// Fit a Gaussian to N samples, sample N from the fit, refit, repeat (Shumailov's theory).
    Gaussian(GaussianArgs),
}

#[derive(Debug, Args)]
pub struct GaussianArgs {
    /// Samples per generation
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    #[arg(long, default_value_t = 200)]
    pub generations: usize,
    #[arg(long, value_enum, default_value = "replace")]
    pub regime: crate::config::Regime,
    /// With --regime keep-real: the share of the original samples kept
    #[arg(long, default_value_t = 0.1)]
    pub real_fraction: f64,
    /// Independent repetitions (seeds 0..S)
    #[arg(long, default_value_t = 5)]
    pub seeds: u64,
    /// Write the variance and mean plots (SVG) into this directory
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Print JSON (one object per seed)
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct ReportArgs {
    /// The run directory
    pub run: PathBuf,
}

#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The run directory
    pub run: PathBuf,
    /// Show what this generation's model wrote
    #[arg(long, short, required_unless_present = "lineage", conflicts_with = "lineage")]
    pub generation: Option<usize>,
    /// How many sequences to show
    #[arg(short, default_value_t = 3)]
    pub n: usize,
    /// Show only the sequence continuing this prompt id
    #[arg(long)]
    pub prompt: Option<usize>,
    /// Show one block's text in every generation: real, gen 0, gen 1, …
    #[arg(long, value_name = "ID")]
    pub lineage: Option<usize>,
}

#[derive(Debug, Args)]
pub struct MetricsArgs {
    /// List every metric the lab reports (key, unit, which way is healthier, where shown) and exit
    #[arg(long, conflicts_with_all = ["reference", "corpus"])]
    pub list: bool,
    /// The reference text (e.g. data/wikitext-2/wiki.train.tokens)
    #[arg(long, value_name = "FILE")]
    pub reference: Option<PathBuf>,
    /// The text to measure
    #[arg(long, value_name = "FILE")]
    pub corpus: Option<PathBuf>,
    /// Print one JSON object
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A, B (the shapes of torch_gpt.py) or a preset name (smoke, lab, cpu, cpu-large, paper)
    #[arg(long, default_value = "A")]
    pub config: String,
    #[arg(long, value_enum, default_value = "train")]
    pub mode: BenchMode,
    /// Untimed iterations first
    #[arg(long, default_value_t = 3)]
    pub warmup: usize,
    /// Timed iterations (the median is reported)
    #[arg(long, default_value_t = 10)]
    pub iters: usize,
    /// Sampling: prompts generated at once
    #[arg(long, default_value_t = 64)]
    pub prompts: usize,
    /// Sampling: tokens per prompt
    #[arg(long, default_value_t = 64)]
    pub prompt_len: usize,
    /// Sampling: new tokens per prompt
    #[arg(long, default_value_t = 64)]
    pub new: usize,
    /// Print one JSON line `RESULT {...}`
    #[arg(long)]
    pub json: bool,
    /// cpu, cuda, cuda:N, or auto
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The arithmetic of training's products (and of sampling's, with --mode sample)
    #[arg(long, value_enum, default_value = "fp32")]
    pub precision: crate::config::Precision,
    /// Training: also print where the timed steps' time goes, phase by phase (the fast engine)
    #[arg(long)]
    pub profile: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum BenchMode {
    Train,
    Sample,
}

/// Runs one parsed command.
pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Prepare(a) => prepare(a),
        Command::Train(a) => train_cmd(a),
        Command::Pretrain(a) => pretrain(a),
        Command::Eval(a) => eval(a),
        Command::Generate(a) => generate(a),
        Command::Export(a) => export(a),
        Command::Baseline(a) => baseline(a),
        Command::Bench(a) => bench(a),
        Command::Run(a) => run_cmd(a),
        Command::Resume(a) => resume(a),
        Command::Inspect(a) => inspect(a),
        Command::Toy(ToyCommand::Gaussian(a)) => toy_gaussian(a),
        Command::Compare(a) => {
            // The same run named twice (e.g. `compare A A/`) counts once.
            let mut runs: Vec<PathBuf> = Vec::new();
            let mut seen = Vec::new();
            for r in &a.runs {
                load_state(r)?;
                let canonical = r.canonicalize().unwrap_or_else(|_| r.clone());
                if seen.contains(&canonical) {
                    eprintln!("note: {} is named more than once; comparing it once", r.display());
                    continue;
                }
                seen.push(canonical);
                runs.push(r.clone());
            }
            crate::files::create_dir(&a.out)?;
            let _lock = crate::files::DirLock::acquire(&a.out)?;
            crate::files::remove_stale_temps(&a.out, 1)?;
            crate::compare::compare(&runs, &a.out)?;
            println!("wrote {}", a.out.join("compare.html").display());
            Ok(())
        }
        Command::Sweep(a) => sweep(a),
        Command::Report(a) => {
            load_state(&a.run)?;
            let _lock = crate::files::DirLock::acquire(&a.run)?;
            crate::files::remove_stale_temps(&a.run, 1)?;
            crate::report::write_report(&a.run)?;
            println!("wrote {}", a.run.join("report.html").display());
            Ok(())
        }
        Command::Metrics(a) => metrics(a),
    }
}

/// Parses `--device` into the engine that runs on it.
pub fn engine(spec: &str) -> Result<Engine> {
    let cuda = |ordinal: usize| {
        if !cfg!(feature = "cuda") {
            return usage(format!(
                "--device {spec}: this build has no CUDA support (rebuild with `cargo build --release --features cuda`)"
            ));
        }
        Device::new_cuda(ordinal).with_context(|| format!("--device {spec}: no usable CUDA device {ordinal}"))
    };
    let device = match spec {
        "cpu" => Device::Cpu,
        "cuda" => cuda(0)?,
        "auto" => {
            if cfg!(feature = "cuda") {
                Device::new_cuda(0).unwrap_or(Device::Cpu)
            } else {
                Device::Cpu
            }
        }
        s => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => cuda(n)?,
            _ => return usage(format!("--device {s}: expected cpu, cuda, cuda:N or auto")),
        },
    };
    // COLLAPSE_LAB_KERNELS may force slower kernels (to test them on a machine that has faster ones).
    let kernels = crate::kernels::Kernels::from_env().map_err(UsageError)?;
    Engine::new(device).with(kernels, crate::config::Precision::Fp32)
}

/// A known preset, or a usage error listing them.
fn check_preset(preset: &str) -> Result<()> {
    if PRESETS.contains(&preset) {
        Ok(())
    } else {
        usage(format!("--preset: unknown preset '{preset}' (expected one of: {})", PRESETS.join(", ")))
    }
}

fn prepare(a: PrepareArgs) -> Result<()> {
    let max = crate::config::limits::VOCAB;
    if a.vocab_size > max {
        return usage(format!("--vocab-size must be at most {max}, got {}", a.vocab_size));
    }
    if a.kind == crate::config::TokenizerKind::Bpe && a.vocab_size < crate::config::limits::MIN_BPE_VOCAB {
        return usage(format!(
            "--vocab-size must be at least {} for BPE, got {}",
            crate::config::limits::MIN_BPE_VOCAB,
            a.vocab_size
        ));
    }
    let corpus = a.common.corpus(crate::config::SPLIT)?;
    let lines = corpus.head(Split::Train, a.train_lines);
    let tok = Tokenizer::train_kind(a.kind, lines, a.vocab_size)
        .map_err(|e| UsageError(format!("--vocab-size {}: {e:#}", a.vocab_size)))?;
    write_atomic(&a.out, tok.json().as_bytes())?;
    println!("wrote {} ({} tokens, sha256 {})", a.out.display(), tok.vocab_size(), tok.sha256());
    Ok(())
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    check_preset(&a.preset)?;
    let cfg = Config::resolve(&a.preset, a.changes.config.as_deref(), &a.changes.sets, a.seed)?;
    let engine = engine(&a.common.device)?.with_precision(cfg.train.precision)?;
    if a.out.join(run_dir::RUN_JSON).exists() {
        return usage(format!(
            "--out {}: that is a run directory (it holds run.json); `train` writes a model directory of its own",
            a.out.display()
        ));
    }
    let corpus = a.common.corpus(cfg.data.split_ratio)?;
    let train_lines = corpus.head(Split::Train, cfg.data.train_lines);
    let valid_lines = corpus.head(Split::Valid, cfg.data.eval_lines);
    let tok = match &a.tokenizer {
        Some(path) => {
            let tok = Tokenizer::load(path)?;
            if cfg.model.vocab_size != 0 && tok.vocab_size() != cfg.model.vocab_size {
                return usage(format!(
                    "--tokenizer {} has {} tokens but model.vocab_size is {} (pass --set model.vocab_size={})",
                    path.display(),
                    tok.vocab_size(),
                    cfg.model.vocab_size,
                    tok.vocab_size()
                ));
            }
            tok
        }
        None => recursion::train_tokenizer(&cfg, &corpus)?,
    };
    let model = ModelConfig { vocab_size: tok.vocab_size(), ..cfg.model.clone() };
    let (train, valid) = (tok.encode_lines(train_lines)?, tok.encode_lines(valid_lines)?);
    crate::files::check_memory(
        crate::model::training_bytes(&model, cfg.train.batch_size),
        &format!("training (train.batch_size {} × model.ctx {})", cfg.train.batch_size, model.ctx),
    )?;
    create_dir(&a.out)?; // only once every input has been read and checked
    let _lock = crate::files::DirLock::acquire(&a.out)?;
    crate::files::remove_stale_temps(&a.out, 0)?;
    let job = TrainJob {
        cfg: &cfg,
        train_cfg: &cfg.train,
        tok: &tok,
        model: &model,
        init: &init_weights(&model, cfg.seed),
        init_sha256: None,
        train: &train,
        valid: &valid,
        seed: cfg.seed,
        quiet: a.quiet,
        label: "train".into(),
    };
    let info = checkpoint::train_model_dir(&engine, &job, &a.out)?;
    let t = &info.training;
    println!(
        "trained {} parameters for {} steps ({:.2} epochs of {} tokens) in {:.1} s at {:.0} tokens/s",
        n_params(&info.model),
        t.steps,
        t.epochs,
        t.train_tokens,
        t.wall_s,
        t.tokens_per_s
    );
    println!(
        "best valid loss {:.4} (token perplexity {:.2}) at step {}; wrote {}",
        t.best_valid_loss,
        t.best_valid_loss.exp(),
        t.best_step,
        a.out.display()
    );
    Ok(())
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    check_preset(&a.preset)?;
    let mut sets = a.changes.sets.clone();
    if let Some(seed) = a.seed {
        sets.push(format!("base.seed={seed}"));
    }
    let cfg = Config::resolve(&a.preset, a.changes.config.as_deref(), &sets, None)?;
    let engine = engine(&a.common.device)?.with_precision(cfg.train.precision)?;
    let corpus = a.common.corpus(cfg.data.split_ratio)?;
    let tok = recursion::train_tokenizer(&cfg, &corpus)?;
    let base = recursion::base::for_run(&cfg, &corpus, &tok, &engine, &a.base_cache, a.quiet)?;
    let info = checkpoint::read_info(&base.dir)?;
    let t = &info.training;
    println!(
        "base {}: {} parameters, {} steps ({:.2} epochs of {} tokens){}; best valid loss {:.4} (token perplexity {:.2})",
        base.dir.display(),
        n_params(&info.model),
        t.steps,
        t.epochs,
        t.train_tokens,
        if base.pretrained_now { format!(" in {:.0} s at {:.0} tokens/s", t.wall_s, t.tokens_per_s) } else { String::new() },
        t.best_valid_loss,
        t.best_valid_loss.exp()
    );
    Ok(())
}

fn eval(a: EvalArgs) -> Result<()> {
    let engine = engine(&a.common.device)?;
    let loaded = checkpoint::load_model_dir(&a.model, &engine)?;
    let mut cfg = loaded.eval_config();
    if let Some(b) = a.block_size {
        cfg.data.block_size = b;
    }
    let ctx = loaded.model.cfg().ctx;
    if cfg.data.block_size == 0 || cfg.data.block_size > ctx {
        return usage(format!(
            "--block-size must be in [1, {ctx}] (the model's context), got {}",
            cfg.data.block_size
        ));
    }
    let cfg = &cfg;
    let limit = a.lines.unwrap_or(cfg.data.eval_lines);
    let corpus = a.common.corpus(cfg.data.split_ratio)?;
    let lines = corpus.head(a.split, limit);
    let stream = loaded.tokenizer.encode_lines(lines)?;
    let nats = stream_nats(&mut loaded.model.scorer(), &stream, cfg.data.block_size, 0, engine.is_gpu())?;
    let words = data::words_with_eol(lines) as u64;
    let split = format!("{:?}", a.split).to_lowercase();
    // The n-gram references, trained on the same train lines as the model, scored on the same text.
    let train_lines = corpus.head(Split::Train, cfg.data.train_lines);
    let kn = KneserNeyBigram::train(train_lines).evaluate(lines);
    let uni = UnigramModel::train(train_lines).evaluate(lines);
    if a.json {
        let result = json!({
            "split": split,
            format!("{split}_ppl"): nats.ppl(),
            format!("{split}_word_ppl"): nats.ppl_per(words),
            "kn_bigram_word_ppl": kn.ppl,
            "unigram_word_ppl": uni.ppl,
            "nats": nats.nats,
            "tokens": nats.predictions,
            "words": words,
            "lines": lines.len(),
            "block_size": cfg.data.block_size,
            "model": a.model.display().to_string(),
        });
        println!("{result}");
    } else {
        println!(
            "{split}: token perplexity {:.2} over {} tokens; word perplexity {:.2} over {} words ({}-token blocks)",
            nats.ppl(),
            nats.predictions,
            nats.ppl_per(words),
            words,
            cfg.data.block_size
        );
        println!(
            "references trained on the same {} train lines: Kneser-Ney bigram {:.2}, unigram {:.2} (word perplexity)",
            train_lines.len(),
            kn.ppl,
            uni.ppl
        );
    }
    Ok(())
}

/// The seed of prompt `i` of a `generate` call seeded with `seed`.
pub fn generate_seed(seed: u64, i: usize) -> u64 {
    recursion::derive_seed(seed, i, "generate")
}

fn generate(a: GenerateArgs) -> Result<()> {
    use crate::config::SamplerSettings;
    use crate::sample::{generate, generate_streaming, Decoding};
    use std::io::Write;
    let sampler = SamplerSettings {
        temperature: a.temperature,
        top_k: a.top_k,
        top_p: a.top_p,
        repetition_penalty: a.repetition_penalty,
    };
    sampler.validate().map_err(UsageError)?;
    let dir = match (&a.model, &a.run) {
        (Some(dir), _) => dir.clone(),
        (None, Some(run)) => {
            let state = load_state(run)?;
            let g = a.generation.expect("clap requires --generation with --run");
            if g >= state.generations.len() {
                return usage(format!(
                    "--generation {g}: the run has generations 0 to {}",
                    state.generations.len() - 1
                ));
            }
            run_dir::gen_dir(run, g)
        }
        (None, None) => unreachable!("clap requires --model or --run"),
    };
    let texts: Vec<String> = match (&a.prompt, &a.prompts) {
        (Some(p), _) => vec![p.clone()],
        (None, Some(file)) => data::read_text_lines(file)?,
        (None, None) => unreachable!("clap requires --prompt or --prompts"),
    };
    let engine = engine(&a.device)?;
    let loaded = checkpoint::load_model_dir(&dir, &engine)?;
    let (tok, model) = (&loaded.tokenizer, &loaded.model);
    let ctx = model.cfg().ctx;
    if a.max_new_tokens == 0 {
        return usage("--max-new-tokens must be at least 1");
    }
    if a.beam > crate::config::limits::BEAM.min(model.cfg().vocab_size) {
        return usage(format!(
            "--beam must be at most {}",
            crate::config::limits::BEAM.min(model.cfg().vocab_size)
        ));
    }
    let mut prompts = Vec::with_capacity(texts.len());
    for (i, text) in texts.iter().enumerate() {
        let ids = [vec![tok.eot], tok.encode(text)?].concat();
        if ids.len() + a.max_new_tokens - 1 > ctx {
            return usage(format!(
                "prompt {}: {} tokens plus --max-new-tokens {} exceed the model's context of {ctx} tokens",
                i + 1,
                ids.len(),
                a.max_new_tokens
            ));
        }
        prompts.push(ids);
    }
    let decoding = Decoding { sampler, beam: a.beam };
    if prompts.len() == 1 && a.beam <= 1 {
        // One prompt: stream the text as the tokens come.
        let mut out = std::io::stdout().lock();
        let (mut shown, mut ids) = (String::new(), Vec::new());
        write!(out, "{}", texts[0])?;
        let new = generate_streaming(
            model,
            &prompts[0],
            a.max_new_tokens,
            &sampler,
            generate_seed(a.seed, 0),
            &mut |t| {
                ids.push(t);
                let text = tok.decode(&ids);
                if text.len() > shown.len() && text.starts_with(&shown) {
                    let _ =
                        write!(out, "{}{}", if shown.is_empty() { " " } else { "" }, &text[shown.len()..]);
                    let _ = out.flush();
                    shown = text;
                }
            },
        )?;
        let text = tok.decode(&new);
        if text.len() > shown.len() {
            write!(out, "{}", &text[shown.len()..])?;
        }
        writeln!(out)?;
        return Ok(());
    }
    // Many prompts: one JSON line each, batched by prompt length.
    let mut order: Vec<usize> = (0..prompts.len()).collect();
    order.sort_by_key(|&i| prompts[i].len());
    let mut results: Vec<Vec<u32>> = vec![Vec::new(); prompts.len()];
    for group in order.chunk_by(|&x, &y| prompts[x].len() == prompts[y].len()) {
        for chunk in group.chunks(64) {
            let refs: Vec<&[u32]> = chunk.iter().map(|&i| prompts[i].as_slice()).collect();
            let seeds: Vec<u64> = chunk.iter().map(|&i| generate_seed(a.seed, i)).collect();
            for (&i, out) in chunk.iter().zip(generate(model, &refs, a.max_new_tokens, &decoding, &seeds)?) {
                results[i] = out;
            }
        }
    }
    let mut out = std::io::stdout().lock();
    for (i, tokens) in results.iter().enumerate() {
        let line = json!({"id": i, "prompt": texts[i], "text": tok.decode(tokens), "tokens": tokens, "seed": generate_seed(a.seed, i)});
        writeln!(out, "{line}")?;
    }
    Ok(())
}

fn export(a: ExportArgs) -> Result<()> {
    let ExportFormat::Hf = a.format;
    let loaded = checkpoint::load_model_dir(&a.model, &engine("cpu")?)?;
    let cfg = loaded.model.cfg();
    let tensors = crate::hf::tensors(cfg, &loaded.weights)?;
    crate::hf::export(
        cfg,
        &tensors,
        loaded.tokenizer.json(),
        loaded.tokenizer.eot,
        loaded.tokenizer.unk(),
        &a.out,
    )?;
    println!(
        "wrote {} (transformers GPT2LMHeadModel: from_pretrained(\"{}\"))",
        a.out.display(),
        a.out.display()
    );
    Ok(())
}

fn baseline(a: BaselineArgs) -> Result<()> {
    let corpus = a.common.corpus(crate::config::SPLIT)?;
    let (train, test) = (corpus.lines(Split::Train), corpus.lines(Split::Test));
    let kn = KneserNeyBigram::train(train).evaluate(test);
    let uni = UnigramModel::train(train).evaluate(test);
    if a.json {
        println!("{}", json!({"kn_bigram": kn, "unigram": uni, "split": "test"}));
    } else {
        println!("test word perplexity (one end-of-line token per non-empty line):");
        println!("  interpolated Kneser-Ney bigram {:8.2} over {} words", kn.ppl, kn.predictions);
        println!("  unigram                        {:8.2} over {} words", uni.ppl, uni.predictions);
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.iters == 0 {
        return usage("--iters must be at least 1");
    }
    if a.profile && matches!(a.mode, BenchMode::Sample) {
        return usage("--profile times the training step: it needs --mode train");
    }
    let engine = engine(&a.device)?.with_precision(a.precision)?;
    let shape = crate::bench::shape(&a.config)?;
    if !a.json {
        println!("{}", engine.describe());
    }
    match a.mode {
        BenchMode::Train => {
            let r = crate::bench::bench_train(&shape, a.warmup, a.iters, &engine, a.profile)?;
            if a.json {
                println!("RESULT {}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "train config {} ({} params, {} threads, {} engine): {:.0} tokens/s, median step {:.1} ms; \
                     loss {:.3} -> {:.3}",
                    r.shape.name,
                    r.params,
                    r.threads,
                    r.engine,
                    r.tokens_per_s,
                    r.median_step_s * 1e3,
                    r.first_loss,
                    r.last_loss
                );
                if let Some(phases) = &r.phases {
                    println!(
                        "where the time goes, per step (mean of the {} timed steps; own time of each phase):",
                        a.iters
                    );
                    print!("{}", crate::model::profile::table(phases, a.iters));
                }
            }
        }
        BenchMode::Sample => {
            let r = crate::bench::bench_sample(&shape, a.prompts, a.prompt_len, a.new, a.iters, &engine)?;
            if a.json {
                println!("RESULT {}", serde_json::to_string(&r)?);
            } else {
                println!(
                    "sample config {} ({} params, {} threads): {:.0} new tokens/s, {} prompts x {} + {} new, median {:.3} s",
                    r.shape.name, r.params, r.threads, r.new_tokens_per_s, r.prompts, r.prompt_len, r.new, r.median_s
                );
            }
        }
    }
    Ok(())
}

/// `run`'s own flags as `--set key=value` overrides (the keys of [`FLAGS`]), after the user's.
fn flag_sets(a: &RunArgs) -> Vec<String> {
    let values: [Option<serde_json::Value>; FLAGS.len()] = [
        a.generations.map(|x| json!(x)),
        a.regime.map(|x| json!(x)),
        a.real_fraction.map(|x| json!(x)),
        a.prompt_mode.map(|x| json!(x)),
        a.init.map(|x| json!(x)),
        a.temperature.map(|x| json!(x)),
        a.top_k.map(|x| json!(x)),
        a.top_p.map(|x| json!(x)),
        a.beam.map(|x| json!(x)),
        a.repetition_penalty.map(|x| json!(x)),
    ];
    let mut sets = a.changes.sets.clone();
    for ((_, key), v) in FLAGS.iter().zip(values) {
        if let Some(v) = v {
            sets.push(format!("{key}={v}"));
        }
    }
    sets
}

fn run_cmd(a: RunArgs) -> Result<()> {
    check_preset(&a.preset)?;
    let cfg = Config::resolve(&a.preset, a.changes.config.as_deref(), &flag_sets(&a), a.seed)?;
    let out = match (&a.out, &a.name) {
        (Some(out), _) => out.clone(),
        (None, Some(name)) => Path::new("checkpoints").join(check_name(name)?),
        (None, None) => {
            let regime = serde_json::to_value(cfg.recursion.regime)?;
            let regime = regime.as_str().unwrap_or("run");
            Path::new("checkpoints").join(format!("{}-{regime}-seed{}", cfg.preset, cfg.seed))
        }
    };
    let opts = RunOptions {
        out,
        data: a.common.data.clone(),
        quiet: a.quiet,
        engine: engine(&a.common.device)?,
        base: a.base.base.clone(),
        base_cache: a.base.base_cache.clone(),
    };
    let done = recursion::start_run(cfg, &opts, a.force, table::observer(a.quiet).as_mut())?;
    crate::report::write_report(&opts.out)?;
    drop(done.lock);
    Ok(())
}

/// A run name: one directory under checkpoints/, printable.
fn check_name(name: &str) -> Result<&str> {
    let ok = !name.is_empty()
        && name.len() <= 200
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.chars().any(char::is_control);
    if ok {
        Ok(name)
    } else {
        usage(format!(
            "--name {name:?}: expected a plain directory name (no '/', no control characters, at most 200 bytes); \
             use --out for a path"
        ))
    }
}

fn resume(a: ResumeArgs) -> Result<()> {
    // A directory that is not a run is a usage error; everything after is the run's own business.
    load_state(&a.run)?;
    let opts = RunOptions {
        out: a.run.clone(),
        data: a.common.data.clone(),
        quiet: a.quiet,
        engine: engine(&a.common.device)?,
        base: a.base.base.clone(),
        base_cache: a.base.base_cache.clone(),
    };
    let done = recursion::continue_run(&opts, a.generations, table::observer(a.quiet).as_mut())?;
    // A finished run that was only read stays untouched (it may be on a read-only medium).
    if done.changed || !opts.out.join("report.html").exists() {
        crate::report::write_report(&opts.out)?;
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    if a.n == 0 {
        return usage("-n must be at least 1 (how many sequences to show)");
    }
    let state = load_state(&a.run)?;
    let n_gen = state.generations.len();
    let corpus = |g: usize| -> Result<Vec<CorpusRecord>> {
        if g >= n_gen {
            return usage(format!("--generation {g}: the run has generations 0 to {}", n_gen - 1));
        }
        let path = run_dir::gen_dir(&a.run, g).join(CORPUS);
        if !path.exists() {
            bail!("generation {g} has not sampled its corpus yet ({} is missing)", path.display());
        }
        read_corpus(&path)
    };
    if let Some(id) = a.lineage {
        let first = corpus(0)?;
        let rec = first.iter().find(|r| r.prompt_id == id).ok_or_else(|| {
            UsageError(format!("--lineage {id}: no such prompt id (0 to {})", first.len().saturating_sub(1)))
        })?;
        println!("lineage of block {id}: the real block, then the text each generation's model wrote for it");
        println!("\n[real]\n{}", rec.prompt);
        // With a base model, what it wrote zero-shot for the same block.
        let base = a.run.join("base").join(CORPUS);
        if base.exists() {
            if let Some(r) = read_corpus(&base)?.iter().find(|r| r.prompt_id == id) {
                println!("\n[base] (gen-0 perplexity {:.1})\n{}", r.gen0_ppl, r.text);
            }
        }
        for g in 0..n_gen {
            let Ok(records) = corpus(g) else { break };
            if let Some(r) = records.iter().find(|r| r.prompt_id == id) {
                println!("\n[gen {g}] (gen-0 perplexity {:.1})\n{}", r.gen0_ppl, r.text);
            }
        }
        return Ok(());
    }
    let g = a.generation.expect("clap requires --generation without --lineage");
    let records = corpus(g)?;
    let shown: Vec<&CorpusRecord> = match a.prompt {
        Some(id) => records.iter().filter(|r| r.prompt_id == id).collect(),
        None => records.iter().take(a.n).collect(),
    };
    if shown.is_empty() {
        return usage(format!("--prompt {}: no such prompt id in generation {g}", a.prompt.unwrap_or(0)));
    }
    for r in shown {
        println!(
            "--- generation {g}, sequence {} (prompt {}, gen-0 perplexity {:.1})",
            r.id, r.prompt_id, r.gen0_ppl
        );
        println!("[prompt] {}", r.prompt.replace('\n', " / "));
        println!("[text]   {}\n", r.text.replace('\n', " / "));
    }
    Ok(())
}

fn metrics(a: MetricsArgs) -> Result<()> {
    use crate::metrics::corpus::{corpus_metrics, MetricOptions, Reference};
    if a.list {
        print!("{}", crate::metrics::registry::listing());
        return Ok(());
    }
    let (Some(reference), Some(corpus)) = (&a.reference, &a.corpus) else {
        return usage("metrics: give --reference FILE and --corpus FILE, or --list");
    };
    let reference = data::read_text_lines(reference)?;
    let corpus = data::read_text_lines(corpus)?;
    let rw: Vec<&str> = reference.iter().flat_map(|l| l.split_whitespace()).collect();
    let cw: Vec<&str> = corpus.iter().flat_map(|l| l.split_whitespace()).collect();
    let opts = MetricOptions { ttr_n: cw.len().min(rw.len()).min(100_000), ..MetricOptions::default() };
    let m = corpus_metrics(&Reference::new(&rw), &cw, &opts);
    if a.json {
        println!("{}", serde_json::to_string(&m)?);
    } else {
        let v = serde_json::to_value(&m)?;
        for (k, x) in v.as_object().into_iter().flatten() {
            println!("{k:24} {x}");
        }
    }
    Ok(())
}

fn toy_gaussian(a: GaussianArgs) -> Result<()> {
    if a.samples < 2 || a.generations == 0 || a.seeds == 0 {
        return usage("--samples must be at least 2, --generations and --seeds at least 1");
    }
    if !(0.0..=1.0).contains(&a.real_fraction) {
        return usage(format!("--real-fraction must be in [0, 1], got {}", a.real_fraction));
    }
    // accumulate keeps every sample of every generation; the others hold a few generations' worth.
    let kept =
        if matches!(a.regime, crate::config::Regime::Accumulate | crate::config::Regime::AccumulateSubsample)
        {
            a.generations as u64 + 2
        } else {
            4
        };
    crate::files::check_memory(
        (a.samples as u64).saturating_mul(8).saturating_mul(kept),
        &format!("toy gaussian (--samples {} × --generations {})", a.samples, a.generations),
    )?;
    let runs: Vec<Vec<crate::toy::Fit>> = (0..a.seeds)
        .map(|s| crate::toy::gaussian(a.samples, a.generations, a.regime, a.real_fraction, s))
        .collect();
    if a.json {
        for (seed, fits) in runs.iter().enumerate() {
            println!("{}", json!({"seed": seed, "regime": a.regime, "samples": a.samples, "fits": fits}));
        }
    } else {
        let step = (a.generations / 10).max(1);
        print!("{:>10}", "generation");
        for s in 0..a.seeds {
            print!(" {:>12} {:>9}", format!("var s{s}"), format!("mean s{s}"));
        }
        println!();
        for g in (0..a.generations).step_by(step).chain(std::iter::once(a.generations - 1)) {
            print!("{g:>10}");
            for fits in &runs {
                print!(" {:>12.4e} {:>9.4}", fits[g].variance, fits[g].mean);
            }
            println!();
        }
    }
    if let Some(dir) = &a.out {
        for path in crate::toy::write_plots(&runs, a.regime, a.samples, dir)? {
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}

fn sweep(a: SweepArgs) -> Result<()> {
    check_preset(&a.preset)?;
    if a.seeds == 0 {
        return usage("--seeds must be at least 1");
    }
    let mut axes: Vec<(String, Vec<String>)> = vec![
        ("sample.temperature".into(), a.temperature.iter().map(|t| json!(t).to_string()).collect()),
        ("sample.top_p".into(), a.top_p.iter().map(|p| json!(p).to_string()).collect()),
        ("recursion.regime".into(), a.regime.iter().map(|r| json!(r).to_string()).collect()),
    ];
    for g in &a.grid {
        let (key, values) = g
            .split_once('=')
            .ok_or_else(|| UsageError(format!("--grid {g}: expected key=v1,v2,… e.g. sample.beam=0,5")))?;
        axes.push((key.trim().to_string(), values.split(',').map(|v| v.trim().to_string()).collect()));
    }
    let mut sets = a.sets.clone();
    if let Some(g) = a.generations {
        sets.push(format!("recursion.generations={g}"));
    }
    let runs = crate::compare::sweep_runs(&a.preset, &sets, &axes, a.seeds)?;
    // A finished grid point is extended to --generations, never shortened: check them all before
    // any is touched, naming the one that has more.
    if let Some(n) = a.generations {
        for (name, _) in &runs {
            let dir = a.out.join(name);
            if dir.join(run_dir::RUN_JSON).exists() {
                let have = run_dir::load_state(&dir)?.generations.len();
                if have > n {
                    return usage(format!(
                        "--generations {n}: {} already has {have} generations (a run is extended, never shortened)",
                        dir.display()
                    ));
                }
            }
        }
    }
    let engine = engine(&a.common.device)?;
    let mut dirs = Vec::new();
    for (name, cfg) in runs {
        let opts = RunOptions {
            out: a.out.join(&name),
            data: a.common.data.clone(),
            quiet: a.quiet,
            engine: engine.clone(),
            base: a.base.base.clone(),
            base_cache: a.base.base_cache.clone(),
        };
        if !a.quiet {
            println!("== {name}");
        }
        // Each grid point is an ordinary run: a finished one is kept, an interrupted one resumed,
        // and either extended to --generations when that asks for more (as `resume --generations`).
        let mut obs = table::observer(a.quiet);
        let done = if opts.out.join(run_dir::RUN_JSON).exists() {
            recursion::continue_run(&opts, a.generations, obs.as_mut())?
        } else {
            recursion::start_run(cfg, &opts, false, obs.as_mut())?
        };
        if done.changed || !opts.out.join("report.html").exists() {
            crate::report::write_report(&opts.out)?;
        }
        drop(done.lock);
        dirs.push(opts.out);
    }
    let out = a.out.join("compare");
    crate::compare::compare(&dirs, &out)?;
    println!("wrote {}", out.join("compare.html").display());
    Ok(())
}
