//! The recursion lab: train generation 0 on real wikitext-2, let it write a corpus, train
//! generation 1 on that corpus (under a regime), and so on, measuring every generation.
//!
//! Per generation g the steps are train → sample → measure, and `run.json` records which are done,
//! so an interrupted run continues where it stopped ([`continue_run`]). Every random choice comes
//! from a stream derived from (run seed, generation, purpose), so the numbers do not depend on where
//! a run was interrupted.
//!
//! Naming: `gen-0g/corpus.jsonl` is the text generation g's model wrote; it is the training data of
//! generation g+1 (Shumailov et al. call it the data of "generation g+1").

use crate::baseline::{KneserNeyBigram, UnigramModel};
use crate::checkpoint::{self, ModelInfo};
use crate::config::{Config, InitMode, PromptMode, Regime, SampleConfig};
use crate::data::{self, Split};
use crate::metrics::corpus::{corpus_metrics, MetricOptions, Reference};
use crate::metrics::perplexity::{sequence_ppls, split_perplexity, EvalSet};
use crate::metrics::PplDistribution;
use crate::model::{init_model, Gpt, ModelConfig};
use crate::run_dir::{create_dir, write_atomic, write_json};
use crate::sample::{generate, Decoding};
use crate::tokenizer::{hex, Tokenizer};
use crate::train::{self, load_weights, TrainTarget};
use anyhow::{bail, Context, Result};
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

pub const RUN_JSON: &str = "run.json";
pub const METRICS_JSONL: &str = "metrics.jsonl";
pub const METRICS_CSV: &str = "metrics.csv";
pub const CORPUS: &str = "corpus.jsonl";

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

/// `run.json`: the resolved settings and what is complete. The source of truth for `resume`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunState {
    pub crate_version: String,
    pub config: Config,
    pub tokenizer_sha256: String,
    /// N of `ttr_at_n` and `distinct_n`, fixed for the run.
    pub ttr_n: usize,
    pub real_measured: bool,
    /// sha256 of metrics.jsonl as last written.
    #[serde(default)]
    pub metrics_sha256: Option<String>,
    pub generations: Vec<GenState>,
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

/// Where a run lives and how it talks.
pub struct RunOptions {
    pub out: PathBuf,
    pub data_dir: PathBuf,
    pub quiet: bool,
    pub device: Device,
}

/// A seed for one purpose of one generation, derived from the run seed (SPEC §6).
pub fn derive_seed(seed: u64, generation: usize, purpose: &str) -> u64 {
    let digest = Sha256::digest(format!("{seed}/{generation}/{purpose}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn gen_dir(out: &Path, g: usize) -> PathBuf {
    out.join(format!("gen-{g:02}"))
}

fn sha256_file(path: &Path) -> Result<String> {
    let bytes = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    Ok(hex(&Sha256::digest(&bytes)))
}

fn save_state(out: &Path, state: &RunState) -> Result<()> {
    write_json(&out.join(RUN_JSON), state)
}

/// Reads `run.json` of a run directory.
pub fn load_state(out: &Path) -> Result<RunState> {
    let path = out.join(RUN_JSON);
    if !path.is_file() {
        bail!("{} is not a run directory (no {RUN_JSON})", out.display());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("{} is not a valid {RUN_JSON}", path.display()))
}

/// Starts a new run in `opts.out` (which must not hold one unless `force`).
pub fn start_run(cfg: Config, opts: &RunOptions, force: bool) -> Result<()> {
    if opts.out.join(RUN_JSON).exists() && !force {
        return crate::config::usage(format!(
            "{} already holds a run (use `collapse-lab resume {}` to continue it, or --force to start over)",
            opts.out.display(),
            opts.out.display()
        ));
    }
    // Every input is read and checked before anything is written.
    let train_lines = data::load_split(&opts.data_dir, Split::Train, cfg.data.train_lines)?;
    for split in [Split::Valid, Split::Test] {
        data::load_split(&opts.data_dir, split, cfg.data.eval_lines)?;
    }
    let tok = Tokenizer::train(&train_lines, cfg.model.vocab_size)?;
    create_dir(&opts.out)?;
    if force {
        for g in 0..64 {
            let d = gen_dir(&opts.out, g);
            if d.is_dir() {
                std::fs::remove_dir_all(&d).with_context(|| format!("cannot remove {}", d.display()))?;
            }
        }
        for f in [METRICS_JSONL, METRICS_CSV] {
            let _ = std::fs::remove_file(opts.out.join(f));
        }
    }
    write_atomic(&opts.out.join(checkpoint::TOKENIZER), tok.json().as_bytes())?;
    let real_words: usize = train_lines.iter().map(|l| l.split_whitespace().count()).sum();
    let state = RunState {
        crate_version: env!("CARGO_PKG_VERSION").to_string(),
        tokenizer_sha256: tok.sha256(),
        ttr_n: real_words.min(100_000),
        real_measured: false,
        metrics_sha256: None,
        generations: (0..cfg.recursion.generations)
            .map(|g| GenState {
                generation: g,
                status: Status::Pending,
                trained_at: None,
                sampled_at: None,
                measured_at: None,
                artifacts: BTreeMap::new(),
                timings: BTreeMap::new(),
            })
            .collect(),
        config: cfg,
    };
    save_state(&opts.out, &state)?;
    continue_run(opts)
}

/// Everything that stays fixed across the generations of a run.
struct Lab<'a> {
    cfg: &'a Config,
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
}

/// What generation g trains on, and which sequences it continues in blocks mode.
struct TrainingSet {
    stream: Vec<u32>,
    prompts: Vec<Vec<u32>>,
}

/// Checks every recorded artifact against its sha256. From the first generation whose model or
/// corpus is missing or changed, everything is redone; metrics that do not match are re-measured.
fn verify(out: &Path, state: &mut RunState) -> Result<Vec<Value>> {
    let n = state.generations.len();
    for g in 0..n {
        let dir = gen_dir(out, g);
        let gs = &state.generations[g];
        let intact = |f: &str| {
            gs.artifacts.get(f).is_some_and(|sum| sha256_file(&dir.join(f)).ok().as_ref() == Some(sum))
        };
        let level = if gs.status >= Status::Trained
            && !(intact(checkpoint::WEIGHTS) && intact(checkpoint::MODEL_JSON))
        {
            Status::Pending
        } else if gs.status >= Status::Sampled && !intact(CORPUS) {
            Status::Trained
        } else {
            gs.status
        };
        if level < gs.status {
            eprintln!(
                "note: an artifact of generation {g} is missing or changed; redoing generation {g} onwards"
            );
            if g == 0 && level == Status::Pending {
                state.real_measured = false; // the real row is scored by generation 0
            }
            for later in &mut state.generations[g..] {
                if later.generation > g || level == Status::Pending {
                    later.status = Status::Pending;
                    later.artifacts.clear();
                } else {
                    later.status = level;
                    later.artifacts.remove(CORPUS);
                }
            }
            break;
        }
    }
    let path = out.join(METRICS_JSONL);
    let metrics_intact = state.metrics_sha256.is_some() && sha256_file(&path).ok() == state.metrics_sha256;
    if !metrics_intact {
        if state.real_measured {
            eprintln!("note: {METRICS_JSONL} is missing or changed; measuring again");
        }
        state.real_measured = false;
        for gs in &mut state.generations {
            gs.status = gs.status.min(Status::Sampled);
        }
        return Ok(Vec::new());
    }
    let rows = read_rows(out)?;
    Ok(rows
        .into_iter()
        .filter(|r| match &r["generation"] {
            Value::String(_) => state.real_measured,
            v => v.as_u64().is_some_and(|g| {
                state.generations.get(g as usize).is_some_and(|gs| gs.status == Status::Measured)
            }),
        })
        .collect())
}

/// Test hook: `COLLAPSE_LAB_ABORT_AT=<point>` kills the process with SIGKILL when it reaches `point`
/// (e.g. `train:gen 1`, `sample:gen 0`, `measure:gen 2`), so tests can interrupt a run anywhere.
pub fn fault_point(point: &str) {
    if std::env::var("COLLAPSE_LAB_ABORT_AT").is_ok_and(|p| p == point) {
        eprintln!("COLLAPSE_LAB_ABORT_AT: killing the process at {point}");
        // SAFETY: sending a signal to our own process has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}

/// Free bytes on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and st a valid out-pointer.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// Continues the run in `opts.out` from its last complete step.
pub fn continue_run(opts: &RunOptions) -> Result<()> {
    let mut state = load_state(&opts.out)?;
    let cfg = state.config.clone();
    let tok = Tokenizer::load(&opts.out.join(checkpoint::TOKENIZER))?;
    if tok.sha256() != state.tokenizer_sha256 {
        bail!("{}: tokenizer.json does not match the sha256 recorded in {RUN_JSON}", opts.out.display());
    }
    let lab = Lab::new(&cfg, opts, tok)?;
    let mut rows = verify(&opts.out, &mut state)?;
    save_state(&opts.out, &state)?;
    if state.real_measured && state.generations.iter().all(|g| g.status == Status::Measured) {
        println!("{} is complete: {} generations measured", opts.out.display(), state.generations.len());
        return Ok(());
    }
    let mut corpora: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut gen0: Option<Gpt> = None;
    if !opts.quiet {
        print_header();
        for row in &rows {
            print_row(row);
        }
    }
    let save_rows = |state: &mut RunState, rows: &[Value]| -> Result<()> {
        write_rows(&opts.out, rows)?;
        state.metrics_sha256 = Some(sha256_file(&opts.out.join(METRICS_JSONL))?);
        Ok(())
    };
    for g in 0..cfg.recursion.generations {
        let set = lab.training_set(g, &corpora);
        let dir = gen_dir(&opts.out, g);
        if state.generations[g].status < Status::Trained {
            lab.check_disk_space(g, &set)?;
            create_dir(&dir)?;
            let info = lab.train_generation(g, &set, &dir)?;
            let gs = &mut state.generations[g];
            gs.status = Status::Trained;
            gs.trained_at = Some(now());
            gs.timings.insert("train_wall_s".into(), info.training.wall_s);
            gs.timings.insert("train_tokens_per_s".into(), info.training.tokens_per_s);
            for f in [checkpoint::WEIGHTS, checkpoint::MODEL_JSON] {
                gs.artifacts.insert(f.to_string(), sha256_file(&dir.join(f))?);
            }
            save_state(&opts.out, &state)?;
        }
        let model = checkpoint::load_weights(&lab.mcfg, &dir.join(checkpoint::WEIGHTS), &opts.device)?;
        if g == 0 {
            gen0 = Some(model.clone()); // tensors are shared, not copied
        }
        let gen0 = gen0.as_ref().expect("generation 0 is loaded first");
        if !state.real_measured {
            let row = lab.measure_real(gen0)?;
            rows.insert(0, row);
            save_rows(&mut state, &rows)?;
            state.real_measured = true;
            save_state(&opts.out, &state)?;
            if !opts.quiet {
                print_row(&rows[0]);
            }
        }
        let corpus_path = dir.join(CORPUS);
        let records = if state.generations[g].status < Status::Sampled {
            let started = Instant::now();
            let records = lab.sample_generation(g, &model, gen0, &set)?;
            write_corpus(&corpus_path, &records)?;
            let gs = &mut state.generations[g];
            gs.status = Status::Sampled;
            gs.sampled_at = Some(now());
            gs.timings.insert("sample_wall_s".into(), started.elapsed().as_secs_f64());
            gs.artifacts.insert(CORPUS.to_string(), sha256_file(&corpus_path)?);
            save_state(&opts.out, &state)?;
            records
        } else {
            read_corpus(&corpus_path)?
        };
        if state.generations[g].status < Status::Measured {
            let started = Instant::now();
            let info: ModelInfo =
                serde_json::from_str(&std::fs::read_to_string(dir.join(checkpoint::MODEL_JSON))?)?;
            let mut row = lab.measure_generation(g, &model, &records, &info, &state)?;
            let gen0_row = rows
                .iter()
                .find(|r| r["generation"] == 0)
                .cloned()
                .unwrap_or_else(|| Value::Object(row.clone()));
            let stage = crate::metrics::collapse_stage(&Value::Object(row.clone()), &gen0_row);
            row.insert("stage".into(), json!(stage));
            // Rows stay in generation order even when an earlier one was re-measured.
            let pos = rows
                .iter()
                .position(|r| r["generation"].as_u64().is_some_and(|x| x as usize > g))
                .unwrap_or(rows.len());
            rows.insert(pos, Value::Object(row));
            save_rows(&mut state, &rows)?;
            let gs = &mut state.generations[g];
            gs.status = Status::Measured;
            gs.measured_at = Some(now());
            gs.timings.insert("measure_wall_s".into(), started.elapsed().as_secs_f64());
            save_state(&opts.out, &state)?;
            if !opts.quiet {
                print_row(&rows[pos]);
            }
        }
        corpora.push(records.into_iter().map(|r| r.tokens).collect());
    }
    if !opts.quiet {
        println!("run complete: {}", opts.out.display());
    }
    Ok(())
}

impl<'a> Lab<'a> {
    fn new(cfg: &'a Config, opts: &'a RunOptions, tok: Tokenizer) -> Result<Self> {
        let train_lines = data::load_split(&opts.data_dir, Split::Train, cfg.data.train_lines)?;
        let valid_lines = data::load_split(&opts.data_dir, Split::Valid, cfg.data.eval_lines)?;
        let test_lines = data::load_split(&opts.data_dir, Split::Test, cfg.data.eval_lines)?;
        let words: Vec<&str> = train_lines.iter().flat_map(|l| l.split_whitespace()).collect();
        let reference = Reference::new(&words);
        let count = |w: &str| reference.word_count(w);
        let valid = EvalSet::new(&tok, &valid_lines, count)?;
        let test = EvalSet::new(&tok, &test_lines, count)?;
        let real_stream = tok.encode_lines(&train_lines)?;
        let block = cfg.data.block_size;
        let real_blocks: Vec<Vec<u32>> = real_stream.chunks_exact(block).map(<[u32]>::to_vec).collect();
        if real_blocks.is_empty() {
            bail!("the training data has fewer than data.block_size = {block} tokens");
        }
        let mcfg = ModelConfig { vocab_size: tok.vocab_size(), ..cfg.model.clone() };
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
        })
    }

    /// The training set of generation g under the run's regime; `corpora[i]` is what generation i
    /// wrote.
    fn training_set(&self, g: usize, corpora: &[Vec<Vec<u32>>]) -> TrainingSet {
        if g == 0 {
            return TrainingSet { stream: self.real_stream.clone(), prompts: self.real_blocks.clone() };
        }
        let latest = &corpora[g - 1];
        let mut rng = ChaCha8Rng::seed_from_u64(derive_seed(self.cfg.seed, g, "regime"));
        let r = &self.cfg.recursion;
        match r.regime {
            Regime::Replace => TrainingSet { stream: latest.concat(), prompts: latest.clone() },
            Regime::KeepReal => {
                let n_real = (r.real_fraction * self.real_blocks.len() as f64).round() as usize;
                let mut idx: Vec<usize> = (0..self.real_blocks.len()).collect();
                idx.shuffle(&mut rng);
                let mut keep = vec![false; self.real_blocks.len()];
                for &i in &idx[..n_real] {
                    keep[i] = true;
                }
                let blocks: Vec<Vec<u32>> =
                    match r.prompt_mode {
                        // Block i is either real block i or its synthetic descendant: lineages stay aligned.
                        PromptMode::Blocks => latest
                            .iter()
                            .enumerate()
                            .map(|(i, s)| {
                                if keep.get(i) == Some(&true) {
                                    self.real_blocks[i].clone()
                                } else {
                                    s.clone()
                                }
                            })
                            .collect(),
                        PromptMode::Free => {
                            let n_synth = ((1.0 - r.real_fraction) * latest.len() as f64).round() as usize;
                            let real = (0..self.real_blocks.len())
                                .filter(|&i| keep[i])
                                .map(|i| self.real_blocks[i].clone());
                            real.chain(latest[..n_synth].iter().cloned()).collect()
                        }
                    };
                TrainingSet { stream: blocks.concat(), prompts: blocks }
            }
            Regime::Accumulate => {
                let mut stream = self.real_stream.clone();
                for c in &corpora[..g] {
                    stream.extend(c.concat());
                }
                TrainingSet { stream, prompts: latest.clone() }
            }
            Regime::AccumulateSubsample => {
                let mut pool: Vec<&Vec<u32>> = self.real_blocks.iter().collect();
                pool.extend(corpora[..g].iter().flatten());
                pool.shuffle(&mut rng);
                let mut stream = Vec::with_capacity(self.real_stream.len());
                for s in pool {
                    if stream.len() >= self.real_stream.len() {
                        break;
                    }
                    stream.extend_from_slice(s);
                }
                TrainingSet { stream, prompts: latest.clone() }
            }
        }
    }

    /// Stops with a clear message when the disk cannot hold generation g's artifacts.
    fn check_disk_space(&self, g: usize, set: &TrainingSet) -> Result<()> {
        let weights = 2 * 4 * self.mcfg.n_params() as u64; // the checkpoint and its temporary twin
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

    fn train_generation(&self, g: usize, set: &TrainingSet, dir: &Path) -> Result<ModelInfo> {
        let dev = &self.opts.device;
        let seed = self.cfg.seed;
        let (model, varmap) = init_model(&self.mcfg, derive_seed(seed, g, "init"), dev)?;
        if g > 0 && self.cfg.recursion.init == InitMode::Previous {
            load_weights(&varmap, &gen_dir(&self.opts.out, g - 1).join(checkpoint::WEIGHTS))?;
        }
        let target = TrainTarget {
            checkpoint: &dir.join(checkpoint::WEIGHTS),
            quiet: self.opts.quiet,
            label: format!("gen {g}"),
        };
        let training = train::train(
            &model,
            &varmap,
            &self.cfg.train,
            &set.stream,
            &self.valid.stream,
            self.cfg.data.block_size,
            derive_seed(seed, g, "batches"),
            &target,
            dev,
        )?;
        let info = ModelInfo {
            crate_version: env!("CARGO_PKG_VERSION").to_string(),
            model: self.mcfg.clone(),
            config: self.cfg.clone(),
            tokenizer_sha256: self.tok.sha256(),
            training,
        };
        checkpoint::write_model_dir(dir, &info, &self.tok)?;
        Ok(info)
    }

    /// Generation g's corpus: a continuation of every prompt block, or free samples.
    fn sample_generation(
        &self,
        g: usize,
        model: &Gpt,
        gen0: &Gpt,
        set: &TrainingSet,
    ) -> Result<Vec<CorpusRecord>> {
        let sc = self.cfg.sample;
        let decoding = Decoding { sampler: sc.sampler(), beam: sc.beam };
        let block = self.cfg.data.block_size;
        let (prompts, new_tokens): (Vec<Vec<u32>>, usize) = match self.cfg.recursion.prompt_mode {
            PromptMode::Blocks => (set.prompts.clone(), block),
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
                    "gen {g} sample {{bar:30}} {{pos}}/{{len}} sequences | {{per_sec}} | ETA {{eta}}"
                ))
                .expect("valid template"),
            );
            bar
        };
        let mut texts = Vec::with_capacity(prompts.len());
        for (c, chunk) in prompts.chunks(sc.batch_size).enumerate() {
            let ids = c * sc.batch_size..c * sc.batch_size + chunk.len();
            let seeds: Vec<u64> =
                ids.map(|i| derive_seed(self.cfg.seed, g, &format!("sample/{i}"))).collect();
            let refs: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
            texts.extend(generate(model, &refs, new_tokens, &decoding, &seeds, &self.opts.device)?);
            bar.inc(chunk.len() as u64);
            fault_point(&format!("sample:gen {g}"));
        }
        bar.finish_and_clear();
        let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let gen0_ppl = sequence_ppls(gen0, &refs, self.tok.eot, &self.opts.device)?;
        let parent = format!("gen-{g:02}/{}", checkpoint::WEIGHTS);
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

    fn corpus_row(&self, words: &[&str], ttr_n: usize) -> Map<String, Value> {
        let n = words.len().min(self.reference.words() as usize);
        let opts = MetricOptions { ttr_n, ..MetricOptions::default() };
        to_map(&corpus_metrics(&self.reference, &words[..n], &opts))
    }

    /// The "real" row: the real training data's corpus metrics and its blocks under generation 0.
    fn measure_real(&self, gen0: &Gpt) -> Result<Value> {
        let words: Vec<&str> = self.train_lines.iter().flat_map(|l| l.split_whitespace()).collect();
        let mut row = Map::new();
        row.insert("generation".into(), json!("real"));
        row.extend(self.corpus_row(&words, words.len().min(100_000)));
        let refs: Vec<&[u32]> = self.real_blocks.iter().map(Vec::as_slice).collect();
        let ppls = sequence_ppls(gen0, &refs, self.tok.eot, &self.opts.device)?;
        row.extend(gen0_fields(&ppls));
        row.insert("sequences".into(), json!(refs.len()));
        row.insert("corpus_tokens".into(), json!(self.real_stream.len()));
        // The references a generation's test_word_ppl is read against: n-gram models of the same data.
        row.insert(
            "kn_bigram_test_word_ppl".into(),
            json!(KneserNeyBigram::train(&self.train_lines).evaluate(&self.test_lines).ppl),
        );
        row.insert(
            "unigram_test_word_ppl".into(),
            json!(UnigramModel::train(&self.train_lines).evaluate(&self.test_lines).ppl),
        );
        Ok(Value::Object(row))
    }

    fn measure_generation(
        &self,
        g: usize,
        model: &Gpt,
        records: &[CorpusRecord],
        info: &ModelInfo,
        state: &RunState,
    ) -> Result<Map<String, Value>> {
        let dev = &self.opts.device;
        let block = self.cfg.data.block_size;
        let test = split_perplexity(model, &self.test, block, dev)?;
        fault_point(&format!("measure:gen {g}"));
        let valid = split_perplexity(model, &self.valid, block, dev)?;
        let mut row = Map::new();
        row.insert("generation".into(), json!(g));
        row.insert("test_ppl".into(), json!(test.ppl));
        row.insert("test_word_ppl".into(), json!(test.word_ppl));
        row.insert("test_ppl_rare".into(), json!(test.ppl_rare));
        row.insert("test_ppl_common".into(), json!(test.ppl_common));
        row.insert("valid_ppl".into(), json!(valid.ppl));
        row.insert("valid_word_ppl".into(), json!(valid.word_ppl));
        let words: Vec<&str> = records.iter().flat_map(|r| r.text.split_whitespace()).collect();
        row.extend(self.corpus_row(&words, state.ttr_n));
        let ppls: Vec<f64> = records.iter().map(|r| r.gen0_ppl).collect();
        row.extend(gen0_fields(&ppls));
        row.insert("sequences".into(), json!(records.len()));
        row.insert("corpus_tokens".into(), json!(records.iter().map(|r| r.tokens.len()).sum::<usize>()));
        let t = &info.training;
        row.insert("train_tokens".into(), json!(t.train_tokens));
        row.insert("train_steps".into(), json!(t.steps));
        row.insert("train_epochs".into(), json!(t.epochs));
        Ok(row)
    }
}

fn to_map<T: Serialize>(v: &T) -> Map<String, Value> {
    match serde_json::to_value(v) {
        Ok(Value::Object(m)) => m,
        _ => Map::new(),
    }
}

fn gen0_fields(ppls: &[f64]) -> Map<String, Value> {
    let d = PplDistribution::new(ppls);
    let mut m = Map::new();
    for (k, v) in
        [("p5", d.p5), ("p25", d.p25), ("p50", d.p50), ("p75", d.p75), ("p95", d.p95), ("mean", d.mean)]
    {
        m.insert(format!("gen0_seq_ppl_{k}"), json!(v));
    }
    m.insert("gen0_seq_ppl_hist".into(), json!(d.hist));
    m
}

fn write_corpus(path: &Path, records: &[CorpusRecord]) -> Result<()> {
    crate::run_dir::write_atomic_with(path, |tmp| {
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

fn read_rows(out: &Path) -> Result<Vec<Value>> {
    let path = out.join(METRICS_JSONL);
    if !path.exists() {
        return Ok(Vec::new());
    }
    let text = std::fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    text.lines()
        .map(|l| serde_json::from_str(l).with_context(|| format!("{}: a line is not JSON", path.display())))
        .collect()
}

/// Writes `metrics.jsonl` and the flat `metrics.csv` (scalar fields only) from all rows.
fn write_rows(out: &Path, rows: &[Value]) -> Result<()> {
    let mut jsonl = String::new();
    for r in rows {
        jsonl.push_str(&serde_json::to_string(r)?);
        jsonl.push('\n');
    }
    write_atomic(&out.join(METRICS_JSONL), jsonl.as_bytes())?;
    write_atomic(&out.join(METRICS_CSV), metrics_csv(rows).as_bytes())
}

/// CSV of the scalar fields of `rows`: columns in first-seen order, empty where a row lacks one.
pub fn metrics_csv(rows: &[Value]) -> String {
    let mut cols: Vec<String> = Vec::new();
    for r in rows.iter().filter_map(Value::as_object) {
        for (k, v) in r {
            if !v.is_array() && !v.is_object() && !cols.contains(k) {
                cols.push(k.clone());
            }
        }
    }
    let mut csv = cols.join(",");
    csv.push('\n');
    for r in rows {
        let cells: Vec<String> = cols
            .iter()
            .map(|c| match r.get(c) {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Null) | None => String::new(),
                Some(v) => v.to_string(),
            })
            .collect();
        csv.push_str(&cells.join(","));
        csv.push('\n');
    }
    csv
}

const TABLE: [(&str, &str); 11] = [
    ("gen", "generation"),
    ("test_ppl", "test_ppl"),
    ("word_ppl", "test_word_ppl"),
    ("rare_ppl", "test_ppl_rare"),
    ("ttr", "ttr_at_n"),
    ("distinct2", "distinct_2"),
    ("rare_rec1", "rare_ngram_recall_1"),
    ("rare_rec3", "rare_ngram_recall_3"),
    ("novel3", "novel_trigram_rate"),
    ("gen0_p50", "gen0_seq_ppl_p50"),
    ("stage", "stage"),
];

fn print_header() {
    let cols: Vec<String> = TABLE.iter().map(|(h, _)| format!("{h:>10}")).collect();
    println!("{}", cols.join(" "));
}

/// One table row per generation, as the run prints it.
pub fn format_row(row: &Value) -> String {
    let cells: Vec<String> = TABLE
        .iter()
        .map(|(_, k)| match row.get(*k) {
            Some(Value::Number(n)) if n.is_f64() => {
                let x = n.as_f64().unwrap_or(f64::NAN);
                if x.abs() >= 100.0 {
                    format!("{x:>10.1}")
                } else {
                    format!("{x:>10.4}")
                }
            }
            Some(Value::String(s)) => format!("{s:>10}"),
            Some(v) if !v.is_null() => format!("{:>10}", v.to_string()),
            _ => format!("{:>10}", "-"),
        })
        .collect();
    cells.join(" ")
}

fn print_row(row: &Value) {
    let mut line = format_row(row);
    if let (Some(kn), Some(uni)) =
        (row["kn_bigram_test_word_ppl"].as_f64(), row["unigram_test_word_ppl"].as_f64())
    {
        line.push_str(&format!("   references: KN bigram word_ppl {kn:.1}, unigram {uni:.1}"));
    }
    println!("{line}");
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

    #[test]
    fn csv_has_scalar_columns_in_first_seen_order() {
        let rows = vec![
            json!({"generation": "real", "ttr": 0.5, "hist": [1, 2]}),
            json!({"generation": 0, "test_ppl": 9.5, "ttr": 0.25}),
        ];
        assert_eq!(metrics_csv(&rows), "generation,ttr,test_ppl\nreal,0.5,\n0,0.25,9.5\n");
    }
}
