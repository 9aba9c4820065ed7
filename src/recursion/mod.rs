//! The recursion lab: train generation 0 on real wikitext-2, let it write a corpus, train
//! generation 1 on that corpus (under a regime), and so on, measuring every generation.
//!
//! Per generation g the steps are train → sample → measure, and `run.json` records which are done,
//! so an interrupted run continues where it stopped ([`continue_run`]). Every random choice comes
//! from a stream derived from (run seed, generation, purpose) ([`derive_seed`]), so the numbers do
//! not depend on where a run was interrupted.
//!
//! Naming: `gen-0g/corpus.jsonl` is the text generation g's model wrote; it is the training data of
//! generation g+1 (Shumailov et al. call it the data of "generation g+1").
//!
//! Modules: [`run_dir`] (the files of a run), [`regime`] (what each generation trains on),
//! [`verify`] (what `resume` trusts). This module is the loop; it reports rows to an [`Observer`]
//! (the command line prints them as a table).

pub mod base;
pub mod regime;
pub mod run_dir;
pub mod verify;

use crate::checkpoint::{self, ModelInfo, TrainJob};
use crate::config::{Config, InitMode, PromptMode, TokenizerCorpus, TrainConfig};
use crate::data::{Corpus, Split};
use crate::files::{
    check_memory, create_dir, free_bytes, remove_stale_temps, sha256_file, write_atomic, DirLock,
};
use crate::metrics::baseline::{KneserNeyBigram, UnigramModel};
use crate::metrics::corpus::{corpus_metrics, MetricOptions, Reference};
use crate::metrics::perplexity::{sequence_ppls, split_perplexity, EvalSet};
use crate::metrics::registry::{Metric, Row, RowId, Value};
use crate::metrics::{collapse_stage, PplDistribution};
use crate::model::engine::{Engine, Model};
use crate::model::{
    init_weights, load_weights, n_params, sampling_bytes, training_bytes, ModelConfig, Weights,
};
use crate::sample::{generate, Decoding};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use regime::{training_set, RealData, TrainingSet};
use run_dir::{
    gen_dir, load_state, read_corpus, save_state, write_corpus, write_rows, CorpusRecord, GenState, RunState,
    Status, CORPUS, METRICS_CSV, METRICS_JSONL, RUN_FORMAT, RUN_JSON,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a run lives and what runs it.
pub struct RunOptions {
    pub out: PathBuf,
    /// `--data`: the corpus of a new run; for `resume`, another path to the run's recorded corpus
    /// (its bytes must match the record). None: wikitext-2 for a new run, the recorded path on resume.
    pub data: Option<PathBuf>,
    pub quiet: bool,
    pub engine: Engine,
    /// `--base DIR`: the base model to fine-tune from instead of the cached one.
    pub base: Option<PathBuf>,
    /// Where pretrained bases are cached (`checkpoints/bases`).
    pub base_cache: PathBuf,
}

/// The default cache of pretrained bases.
pub const BASE_CACHE: &str = "checkpoints/bases";

/// What a run reports as it goes (the command line prints a table; tests and sweeps may stay quiet).
pub trait Observer {
    /// The rows already measured when a run continues, then each new one.
    fn row(&mut self, _row: &Row) {}
    /// The run had nothing left to do.
    fn complete(&mut self, _out: &Path, _generations: usize) {}
    /// The run finished.
    fn finished(&mut self, _out: &Path) {}
    /// Something worth a line on stderr (a redone step, a corpus without a record).
    fn note(&mut self, msg: &str) {
        eprintln!("note: {msg}");
    }
}

/// Reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// A run that went as far as it could: its directory stays locked until this is dropped (the
/// caller writes the report under the lock); `changed` says whether anything was written.
pub struct Done {
    pub lock: DirLock,
    pub changed: bool,
}

/// A seed for one purpose of one generation, derived from the run seed.
pub fn derive_seed(seed: u64, generation: usize, purpose: &str) -> u64 {
    let digest = Sha256::digest(format!("{seed}/{generation}/{purpose}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// The lines a run's tokenizer is trained on.
fn tokenizer_lines<'a>(cfg: &Config, corpus: &'a Corpus) -> &'a [String] {
    match cfg.tokenizer.corpus {
        TokenizerCorpus::Real => corpus.head(Split::Train, cfg.data.train_lines),
        TokenizerCorpus::Train => corpus.lines(Split::Train),
    }
}

/// The tokenizer of a new run (or model) with settings `cfg` on `corpus`.
pub fn train_tokenizer(cfg: &Config, corpus: &Corpus) -> Result<Tokenizer> {
    Tokenizer::train_kind(cfg.tokenizer.kind, tokenizer_lines(cfg, corpus), cfg.model.vocab_size)
}

/// Starts a new run in `opts.out` (which must not hold one unless `force`). Everything is read,
/// built and checked first; only then is the directory created (or, with `force`, emptied).
pub fn start_run(cfg: Config, opts: &RunOptions, force: bool, obs: &mut dyn Observer) -> Result<Done> {
    if opts.out.join(RUN_JSON).exists() && !force {
        return already_a_run(&opts.out);
    }
    let data_path = opts.data.clone().unwrap_or_else(crate::data::default_data_dir);
    let corpus = Corpus::open(&data_path, cfg.data.split_ratio)?;
    let uses_base = cfg.recursion.init == InitMode::Base;
    let given = match (&opts.base, uses_base) {
        (Some(dir), true) => Some(base::load_given(dir, &cfg)?),
        (Some(_), false) => {
            return crate::config::usage("--base needs --init base (recursion.init = \"base\")")
        }
        _ => None,
    };
    let tok = match &given {
        Some((tok, ..)) => Tokenizer::from_json(tok.json())?,
        None => train_tokenizer(&cfg, &corpus)?,
    };
    let mut lab = Lab::new(cfg, &corpus, tok, opts)?;
    // The base, found, given or pretrained, before the run directory is touched.
    let base_record = if uses_base {
        let (dir, weights, sha, pretrained) = match given {
            Some((_, _, weights, sha)) => (opts.base.clone().expect("given"), weights, sha, false),
            None => {
                let b =
                    base::for_run(&lab.cfg, &corpus, &lab.tok, &lab.engine, &opts.base_cache, opts.quiet)?;
                (b.dir, b.weights, b.weights_sha256, b.pretrained_now)
            }
        };
        let dir = dir.canonicalize().unwrap_or(dir);
        lab.base = Some((weights, sha.clone()));
        Some(run_dir::BaseRecord { dir, weights_sha256: sha, pretrained_by_this_run: pretrained })
    } else {
        None
    };
    // Nothing has been written yet; now the directory, locked.
    let existed = opts.out.exists();
    create_dir(&opts.out)?;
    let lock = match DirLock::acquire(&opts.out) {
        Ok(lock) => lock,
        Err(e) => {
            if !existed {
                let _ = std::fs::remove_dir_all(&opts.out);
            }
            return Err(e);
        }
    };
    if opts.out.join(RUN_JSON).exists() && !force {
        return already_a_run(&opts.out); // another process started one meanwhile
    }
    remove_stale_temps(&opts.out, 1)?;
    if force {
        let entries =
            std::fs::read_dir(&opts.out).with_context(|| format!("cannot list {}", opts.out.display()))?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let path = entry.path();
            let generated = (name.starts_with("gen-") && path.is_dir()) || name == "plots";
            if generated {
                std::fs::remove_dir_all(&path)
                    .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", path.display()))?;
            }
        }
        for f in [METRICS_JSONL, METRICS_CSV, "report.html"] {
            let _ = std::fs::remove_file(opts.out.join(f));
        }
    }
    write_atomic(&opts.out.join(checkpoint::TOKENIZER), lab.tok.json().as_bytes())?;
    let real_words: usize = lab.train_lines.iter().map(|l| l.split_whitespace().count()).sum();
    let mut state = RunState {
        format: RUN_FORMAT,
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        data: Some(corpus.source.clone()),
        base: base_record,
        base_measured: false,
        tokenizer_sha256: lab.tok.sha256(),
        ttr_n: real_words.min(100_000),
        real_measured: false,
        metrics_sha256: None,
        generations: (0..lab.cfg.recursion.generations).map(GenState::pending).collect(),
        config: lab.cfg.clone(),
    };
    save_state(&opts.out, &state)?;
    lab.run(&mut state, Vec::new(), obs)?;
    Ok(Done { lock, changed: true })
}

fn already_a_run<T>(out: &Path) -> Result<T> {
    crate::config::usage(format!(
        "{} already holds a run (use `collapse-lab resume {}` to continue it, or --force to start over)",
        out.display(),
        out.display()
    ))
}

/// Continues the run in `opts.out` from its last complete step; `generations` extends a run to
/// that many generations (never fewer than it has).
pub fn continue_run(opts: &RunOptions, generations: Option<usize>, obs: &mut dyn Observer) -> Result<Done> {
    let lock = DirLock::acquire(&opts.out)?;
    if !lock.read_only() {
        remove_stale_temps(&opts.out, 1)?; // what a killed process left
    }
    let mut state = load_state(&opts.out)?;
    let mut changed = false;
    if let Some(n) = generations {
        let have = state.generations.len();
        if n < have {
            return crate::config::usage(format!(
                "--generations {n}: the run already has {have} generations (a run is extended, never shortened)"
            ));
        }
        if n > have {
            state.config.recursion.generations = n;
            state.config.validate()?;
            state.generations.extend((have..n).map(GenState::pending));
            changed = true;
        }
    }
    let corpus = match &state.data {
        Some(recorded) => Corpus::reopen(recorded, opts.data.as_deref())?,
        None => {
            let path = opts.data.clone().unwrap_or_else(crate::data::default_data_dir);
            obs.note(&format!(
                "this run predates corpus records; reading {} (pass --data if it used another corpus)",
                path.display()
            ));
            Corpus::open(&path, state.config.data.split_ratio)?
        }
    };
    let tok = Tokenizer::load(&opts.out.join(checkpoint::TOKENIZER))?;
    if tok.sha256() != state.tokenizer_sha256 {
        bail!("{}: tokenizer.json does not match the sha256 recorded in {RUN_JSON}", opts.out.display());
    }
    let mut lab = Lab::new(state.config.clone(), &corpus, tok, opts)?;
    if let Some(rec) = &state.base {
        let dir = opts.base.clone().unwrap_or_else(|| rec.dir.clone());
        let (_, _, weights, sha) =
            base::load_given(&dir, &state.config).map_err(|e| anyhow::anyhow!("the run's base: {e:#}"))?;
        if sha != rec.weights_sha256 {
            bail!(
                "the run's base {} changed: model.safetensors has sha256 {}, the run recorded {} \
                 (restore it, or pass --base with the original)",
                dir.display(),
                &sha[..12],
                &rec.weights_sha256[..12]
            );
        }
        lab.base = Some((weights, sha));
    }
    let rows = verify::verify(&opts.out, &mut state)?;
    if state.is_complete() && !changed {
        obs.complete(&opts.out, state.generations.len());
        return Ok(Done { lock, changed: false });
    }
    if state.data.is_none() {
        state.data = Some(corpus.source.clone());
    }
    save_state(&opts.out, &state)?;
    lab.run(&mut state, rows, obs)?;
    Ok(Done { lock, changed: true })
}

/// Everything that stays fixed across the generations of a run: its settings, tokenizer, real data
/// and evaluation sets, built (and checked) before a run writes anything.
struct Lab<'a> {
    cfg: Config,
    opts: &'a RunOptions,
    tok: Tokenizer,
    mcfg: ModelConfig,
    train_lines: Vec<String>,
    test_lines: Vec<String>,
    real_stream: Vec<u32>,
    real_blocks: Vec<Vec<u32>>,
    valid: EvalSet,
    test: EvalSet,
    reference: Reference,
    /// The base's weights and their sha256 (`recursion.init = base`).
    base: Option<(Weights, String)>,
    /// The engine, training in the run's `train.precision`.
    engine: Engine,
    /// The base's pretraining text (empty without a base): the n-gram references see it too.
    base_text: Vec<String>,
}

impl<'a> Lab<'a> {
    fn new(cfg: Config, corpus: &Corpus, tok: Tokenizer, opts: &'a RunOptions) -> Result<Self> {
        let train_lines = corpus.head(Split::Train, cfg.data.train_lines).to_vec();
        let base_text = match cfg.recursion.init {
            InitMode::Base => {
                base::pretraining_text(&cfg, corpus).map(|(_, t)| t.to_vec()).unwrap_or_default()
            }
            _ => Vec::new(),
        };
        let valid_lines = corpus.head(Split::Valid, cfg.data.eval_lines);
        let test_lines = corpus.head(Split::Test, cfg.data.eval_lines).to_vec();
        let words: Vec<&str> = train_lines.iter().flat_map(|l| l.split_whitespace()).collect();
        // Non-words are words of no part of the train split (the run's share of it is `words`).
        let all_train: Vec<&str> =
            corpus.lines(Split::Train).iter().flat_map(|l| l.split_whitespace()).collect();
        let reference = Reference::new(&words).knowing(&all_train);
        let count = |w: &str| reference.word_count(w);
        let valid = EvalSet::new(&tok, valid_lines, count)?;
        let test = EvalSet::new(&tok, &test_lines, count)?;
        let real_stream = tok.encode_lines(&train_lines)?;
        let block = cfg.data.block_size;
        let real_blocks: Vec<Vec<u32>> = real_stream.chunks_exact(block).map(<[u32]>::to_vec).collect();
        let source = &corpus.source.name;
        if real_blocks.is_empty() || real_stream.len() < cfg.model.ctx + 1 {
            return crate::config::usage(format!(
                "the real data ({source}: {} train lines, {} tokens) is too small: it needs at least \
                 data.block_size = {block} and model.ctx + 1 = {} tokens",
                train_lines.len(),
                real_stream.len(),
                cfg.model.ctx + 1
            ));
        }
        for (name, set) in [("valid", &valid), ("test", &test)] {
            if set.stream.len() < 2 {
                return crate::config::usage(format!("the {name} split of {source} is too small to score"));
            }
        }
        let mcfg = ModelConfig { vocab_size: tok.vocab_size(), ..cfg.model.clone() };
        if cfg.sample.beam > mcfg.vocab_size {
            return crate::config::usage(format!(
                "--beam (sample.beam) must be at most the vocabulary, {} word types in {source}, got {}",
                mcfg.vocab_size, cfg.sample.beam
            ));
        }
        let engine = opts.engine.clone().with_precision(cfg.train.precision)?;
        let rows = cfg.sample.batch_size * cfg.sample.beam.max(1);
        check_memory(
            training_bytes(&mcfg, cfg.train.batch_size),
            &format!("training (train.batch_size {} × model.ctx {})", cfg.train.batch_size, mcfg.ctx),
        )?;
        check_memory(
            sampling_bytes(&mcfg, rows),
            &format!(
                "sampling (sample.batch_size {} × beam {})",
                cfg.sample.batch_size,
                cfg.sample.beam.max(1)
            ),
        )?;
        Ok(Self {
            cfg,
            opts,
            tok,
            mcfg,
            train_lines,
            test_lines,
            real_stream,
            real_blocks,
            valid,
            test,
            reference,
            base: None,
            engine,
            base_text,
        })
    }

    /// Trains, samples and measures every generation that is not done yet, given the rows still
    /// valid; `state` is saved after each step.
    fn run(&self, state: &mut RunState, mut rows: Vec<Row>, obs: &mut dyn Observer) -> Result<()> {
        let out = &self.opts.out;
        for row in &rows {
            obs.row(row);
        }
        let mut corpora: Vec<Vec<Vec<u32>>> = Vec::new();
        let mut gen0: Option<Model> = None;
        let seed = self.cfg.seed;
        for g in 0..self.cfg.recursion.generations {
            let set =
                training_set(&self.cfg.recursion, &self.real(), g, &corpora, derive_seed(seed, g, "regime"));
            let dir = gen_dir(out, g);
            if state.generations[g].status < Status::Trained {
                self.check_disk_space(g, &set)?;
                create_dir(&dir)?;
                let info = self.train_generation(g, &set, &dir)?;
                let t = &info.training;
                let timings = [("train_wall_s", t.wall_s), ("train_tokens_per_s", t.tokens_per_s)];
                let files = [checkpoint::WEIGHTS, checkpoint::MODEL_JSON];
                state.generations[g].complete(Status::Trained, &dir, &files, &timings)?;
                save_state(out, state)?;
            }
            let model = self
                .opts
                .engine
                .load(&self.mcfg, &load_weights(&self.mcfg, &dir.join(checkpoint::WEIGHTS))?)?;
            if g == 0 {
                gen0 = Some(model.clone());
            }
            let gen0 = gen0.as_ref().expect("generation 0 is loaded first");
            if !state.real_measured {
                rows.insert(0, self.measure_real(gen0)?);
                state.metrics_sha256 = Some(write_rows(out, &rows)?);
                state.real_measured = true;
                save_state(out, state)?;
                obs.row(&rows[0]);
            }
            if state.base.is_some() && !state.base_measured {
                let at = usize::from(rows.first().is_some_and(|r| r.id == RowId::Real));
                rows.insert(at, self.measure_base(gen0, state)?);
                state.metrics_sha256 = Some(write_rows(out, &rows)?);
                state.base_measured = true;
                save_state(out, state)?;
                obs.row(&rows[at]);
            }
            let records = if state.generations[g].status < Status::Sampled {
                let started = Instant::now();
                let records = self.sample_generation(g, &model, gen0, &set)?;
                write_corpus(&dir.join(CORPUS), &records)?;
                let timings = [("sample_wall_s", started.elapsed().as_secs_f64())];
                state.generations[g].complete(Status::Sampled, &dir, &[CORPUS], &timings)?;
                save_state(out, state)?;
                records
            } else {
                read_corpus(&dir.join(CORPUS))?
            };
            if state.generations[g].status < Status::Measured {
                let started = Instant::now();
                let info = checkpoint::read_info(&dir)?;
                let mut row = self.measure_generation(g, &model, &records, &info, state)?;
                let stage = match rows.iter().find(|r| r.id == RowId::Generation(0)) {
                    Some(gen0_row) => collapse_stage(&row, gen0_row),
                    None => collapse_stage(&row, &row),
                };
                row.set_value(Metric::Stage, Value::Text(stage.into()));
                // Rows stay in generation order even when an earlier one was re-measured.
                let pos =
                    rows.iter().position(|r| r.generation().is_some_and(|x| x > g)).unwrap_or(rows.len());
                rows.insert(pos, row);
                state.metrics_sha256 = Some(write_rows(out, &rows)?);
                let timings = [("measure_wall_s", started.elapsed().as_secs_f64())];
                state.generations[g].complete(Status::Measured, &dir, &[], &timings)?;
                save_state(out, state)?;
                obs.row(&rows[pos]);
            }
            corpora.push(records.into_iter().map(|r| r.tokens).collect());
        }
        obs.finished(out);
        Ok(())
    }

    fn real(&self) -> RealData<'_> {
        RealData { stream: &self.real_stream, blocks: &self.real_blocks }
    }

    /// Stops with a clear message when the disk cannot hold generation g's artifacts.
    fn check_disk_space(&self, g: usize, set: &TrainingSet) -> Result<()> {
        let weights = 2 * 4 * n_params(&self.mcfg) as u64; // the checkpoint and its temporary twin
        let corpus = 2 * 24 * set.stream.len().max(self.real_stream.len()) as u64; // JSON text + tokens
        let need = weights + corpus + (16 << 20);
        if let Some(free) = free_bytes(&self.opts.out) {
            if free < need {
                bail!(
                    "not enough free disk space in {} for generation {g}: about {} MiB needed, {} MiB free",
                    self.opts.out.display(),
                    need >> 20,
                    free >> 20
                );
            }
        }
        Ok(())
    }

    /// The weights generation g starts from, the sha256 of their file (None when fresh), and the
    /// training settings it uses.
    fn start_of(&self, g: usize) -> Result<(Weights, Option<String>, TrainConfig)> {
        let cfg = &self.cfg;
        Ok(match cfg.recursion.init {
            InitMode::Previous if g > 0 => {
                let path = gen_dir(&self.opts.out, g - 1).join(checkpoint::WEIGHTS);
                (load_weights(&self.mcfg, &path)?, Some(sha256_file(&path)?), cfg.train.clone())
            }
            InitMode::Base => {
                let (weights, sha) = self.base.as_ref().expect("a run with init base has its base loaded");
                let ft = &cfg.finetune;
                let tc = TrainConfig {
                    epochs: ft.epochs,
                    lr: ft.lr,
                    min_lr: ft.min_lr,
                    warmup_steps: ft.warmup_steps,
                    eval_interval: ft.eval_interval,
                    ..cfg.train.clone()
                };
                (weights.clone(), Some(sha.clone()), tc)
            }
            _ => (init_weights(&self.mcfg, derive_seed(cfg.seed, g, "init")), None, cfg.train.clone()),
        })
    }

    fn train_generation(&self, g: usize, set: &TrainingSet, dir: &Path) -> Result<ModelInfo> {
        let seed = self.cfg.seed;
        let (init, init_sha256, train_cfg) = self.start_of(g)?;
        let job = TrainJob {
            cfg: &self.cfg,
            train_cfg: &train_cfg,
            tok: &self.tok,
            model: &self.mcfg,
            init: &init,
            init_sha256,
            train: &set.stream,
            valid: &self.valid.stream,
            seed: derive_seed(seed, g, "batches"),
            quiet: self.opts.quiet,
            label: format!("gen {g}"),
        };
        checkpoint::train_model_dir(&self.engine, &job, dir)
    }

    /// Generation g's corpus: a continuation of every prompt block, or free samples.
    fn sample_generation(
        &self,
        g: usize,
        model: &Model,
        gen0: &Model,
        set: &TrainingSet,
    ) -> Result<Vec<CorpusRecord>> {
        let parent = format!("gen-{g:02}/{}", checkpoint::WEIGHTS);
        self.sample_corpus(&format!("gen {g}"), g, "sample", model, gen0, &set.prompts, parent)
    }

    /// A corpus written by `model` from `prompts` (blocks mode) or from nothing (free mode), each
    /// sequence scored under generation 0. `g` and `purpose` seed the sampling streams; `label`
    /// names the progress bar; `parent` is recorded as the model that wrote it.
    #[allow(clippy::too_many_arguments)]
    fn sample_corpus(
        &self,
        label: &str,
        g: usize,
        purpose: &str,
        model: &Model,
        gen0: &Model,
        block_prompts: &[Vec<u32>],
        parent: String,
    ) -> Result<Vec<CorpusRecord>> {
        let sc = self.cfg.sample;
        let decoding = Decoding { sampler: sc.sampler(), beam: sc.beam };
        let block = self.cfg.data.block_size;
        let (prompts, new_tokens): (Vec<Vec<u32>>, usize) = match self.cfg.recursion.prompt_mode {
            PromptMode::Blocks => (block_prompts.to_vec(), block),
            PromptMode::Free => {
                let len = self.mcfg.ctx - 1;
                let n = self.real_stream.len().div_ceil(len);
                (vec![vec![self.tok.eot]; n], len)
            }
        };
        let bar = if self.opts.quiet {
            ProgressBar::hidden()
        } else {
            let bar = ProgressBar::new(prompts.len() as u64);
            bar.set_style(
                ProgressStyle::with_template(&format!(
                    "{label} sample {{bar:30}} {{pos}}/{{len}} sequences | {{rate}} | ETA {{eta}}"
                ))
                .expect("valid template")
                // Whole sequences per second (indicatif's {per_sec} prints four decimals).
                .with_key(
                    "rate",
                    |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                        let _ = write!(w, "{:.0}/s", s.per_sec());
                    },
                ),
            );
            bar
        };
        let mut texts = Vec::with_capacity(prompts.len());
        for (c, chunk) in prompts.chunks(sc.batch_size).enumerate() {
            let ids = c * sc.batch_size..c * sc.batch_size + chunk.len();
            let seeds: Vec<u64> =
                ids.map(|i| derive_seed(self.cfg.seed, g, &format!("{purpose}/{i}"))).collect();
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            texts.extend(generate(model, &refs, new_tokens, &decoding, &seeds)?);
            bar.inc(chunk.len() as u64);
            crate::fault::point(&format!("sample:{label}"));
        }
        bar.finish_and_clear();
        let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let gen0_ppl = sequence_ppls(gen0, &refs, self.tok.eot)?;
        Ok(texts
            .into_iter()
            .zip(prompts)
            .zip(gen0_ppl)
            .enumerate()
            .map(|(i, ((tokens, prompt), ppl))| CorpusRecord {
                id: i,
                generation: g,
                prompt_id: i,
                prompt: self.tok.decode(&prompt),
                text: self.tok.decode(&tokens),
                tokens,
                sampler: sc,
                parent_model: parent.clone(),
                gen0_ppl: ppl,
            })
            .collect())
    }

    /// The corpus metrics of `words` (at most as many as the reference has) into `row`.
    fn corpus_metrics(&self, row: &mut Row, words: &[&str], ttr_n: usize) -> Result<()> {
        let n = words.len().min(self.reference.words() as usize);
        let opts = MetricOptions { ttr_n, ..MetricOptions::default() };
        corpus_metrics(&self.reference, &words[..n], &opts).put(row)
    }

    /// The "real" row: the real training data's corpus metrics and its blocks under generation 0.
    fn measure_real(&self, gen0: &Model) -> Result<Row> {
        let words: Vec<&str> = self.train_lines.iter().flat_map(|l| l.split_whitespace()).collect();
        let mut row = Row::new(RowId::Real);
        self.corpus_metrics(&mut row, &words, words.len().min(100_000))?;
        let refs: Vec<&[u32]> = self.real_blocks.iter().map(Vec::as_slice).collect();
        PplDistribution::new(&sequence_ppls(gen0, &refs, self.tok.eot)?).put(&mut row);
        row.set_count(Metric::Sequences, refs.len() as u64);
        row.set_count(Metric::CorpusTokens, self.real_stream.len() as u64);
        // The references a generation's test_word_ppl is read against: n-gram models of the text the
        // models saw (the real data, and the base's pretraining text when there is a base).
        let seen: Vec<&str> = self.train_lines.iter().chain(&self.base_text).map(String::as_str).collect();
        row.set(Metric::KnBigramTestWordPpl, KneserNeyBigram::train(&seen).evaluate(&self.test_lines).ppl);
        row.set(Metric::UnigramTestWordPpl, UnigramModel::train(&seen).evaluate(&self.test_lines).ppl);
        Ok(row)
    }

    /// A model's perplexities on the real test and validation splits, and its corpus's metrics.
    fn measure(&self, id: RowId, model: &Model, records: &[CorpusRecord], state: &RunState) -> Result<Row> {
        let block = self.cfg.data.block_size;
        let test = split_perplexity(model, &self.test, block)?;
        crate::fault::point(&format!(
            "measure:{}",
            match id {
                RowId::Generation(g) => format!("gen {g}"),
                other => other.label(),
            }
        ));
        let mut row = Row::new(id);
        row.set(Metric::TestPpl, test.ppl);
        row.set(Metric::TestWordPpl, test.word_ppl);
        row.set(Metric::TestPplRare, test.ppl_rare);
        row.set(Metric::TestPplCommon, test.ppl_common);
        if self.cfg.recursion.measure_valid {
            let valid = split_perplexity(model, &self.valid, block)?;
            row.set(Metric::ValidPpl, valid.ppl);
            row.set(Metric::ValidWordPpl, valid.word_ppl);
        }
        let words: Vec<&str> = records.iter().flat_map(|r| r.text.split_whitespace()).collect();
        self.corpus_metrics(&mut row, &words, state.ttr_n)?;
        let ppls: Vec<f64> = records.iter().map(|r| r.gen0_ppl).collect();
        PplDistribution::new(&ppls).put(&mut row);
        row.set_count(Metric::Sequences, records.len() as u64);
        row.set_count(Metric::CorpusTokens, records.iter().map(|r| r.tokens.len() as u64).sum());
        Ok(row)
    }

    /// The base's zero-shot row: its perplexities, and the metrics of what it writes from the real
    /// blocks (kept in `base/corpus.jsonl`, the lineages' first step), scored under generation 0.
    fn measure_base(&self, gen0: &Model, state: &RunState) -> Result<Row> {
        let (weights, sha) = self.base.as_ref().expect("a run with a base has it loaded");
        let model = self.engine.load(&self.mcfg, weights)?;
        let parent = format!("base {}", &sha[..12]);
        let records =
            self.sample_corpus("base", 0, "base-sample", &model, gen0, &self.real_blocks, parent)?;
        let dir = self.opts.out.join("base");
        create_dir(&dir)?;
        write_corpus(&dir.join(CORPUS), &records)?;
        self.measure(RowId::Base, &model, &records, state)
    }

    fn measure_generation(
        &self,
        g: usize,
        model: &Model,
        records: &[CorpusRecord],
        info: &ModelInfo,
        state: &RunState,
    ) -> Result<Row> {
        let mut row = self.measure(RowId::Generation(g), model, records, state)?;
        let t = &info.training;
        row.set_count(Metric::TrainTokens, t.train_tokens);
        row.set_count(Metric::TrainSteps, t.steps as u64);
        row.set(Metric::TrainEpochs, t.epochs);
        Ok(row)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_seeds_differ_by_purpose_and_generation() {
        let a = derive_seed(0, 1, "init");
        assert_eq!(a, derive_seed(0, 1, "init"));
        assert_ne!(a, derive_seed(0, 2, "init"));
        assert_ne!(a, derive_seed(0, 1, "batches"));
        assert_ne!(a, derive_seed(1, 1, "init"));
    }
}
