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

pub mod regime;
pub mod run_dir;
pub mod verify;

use crate::checkpoint::{self, ModelInfo, TrainJob};
use crate::config::{Config, InitMode, PromptMode};
use crate::data::{self, Split};
use crate::files::{create_dir, free_bytes, write_atomic};
use crate::metrics::baseline::{KneserNeyBigram, UnigramModel};
use crate::metrics::corpus::{corpus_metrics, MetricOptions, Reference};
use crate::metrics::perplexity::{sequence_ppls, split_perplexity, EvalSet};
use crate::metrics::registry::{Metric, Row, RowId, Value};
use crate::metrics::{collapse_stage, PplDistribution};
use crate::model::engine::{Engine, Model};
use crate::model::{init_weights, load_weights, n_params, ModelConfig};
use crate::sample::{generate, Decoding};
use crate::tokenizer::Tokenizer;
use anyhow::{bail, Result};
use indicatif::{ProgressBar, ProgressStyle};
use regime::{training_set, RealData, TrainingSet};
use run_dir::{
    gen_dir, load_state, read_corpus, save_state, write_corpus, write_rows, CorpusRecord, GenState, RunState,
    Status, CORPUS, METRICS_CSV, METRICS_JSONL, RUN_JSON,
};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// Where a run lives and what runs it.
pub struct RunOptions {
    pub out: PathBuf,
    pub data_dir: PathBuf,
    pub quiet: bool,
    pub engine: Engine,
}

/// What a run reports as it goes (the command line prints a table; tests and sweeps may stay quiet).
pub trait Observer {
    /// The rows already measured when a run continues, then each new one.
    fn row(&mut self, _row: &Row) {}
    /// The run had nothing left to do.
    fn complete(&mut self, _out: &Path, _generations: usize) {}
    /// The run finished.
    fn finished(&mut self, _out: &Path) {}
}

/// Reports nothing.
pub struct Silent;
impl Observer for Silent {}

/// A seed for one purpose of one generation, derived from the run seed.
pub fn derive_seed(seed: u64, generation: usize, purpose: &str) -> u64 {
    let digest = Sha256::digest(format!("{seed}/{generation}/{purpose}").as_bytes());
    u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"))
}

/// Starts a new run in `opts.out` (which must not hold one unless `force`).
pub fn start_run(cfg: Config, opts: &RunOptions, force: bool, obs: &mut dyn Observer) -> Result<()> {
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
                std::fs::remove_dir_all(&d)
                    .map_err(|e| anyhow::anyhow!("cannot remove {}: {e}", d.display()))?;
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
        generations: (0..cfg.recursion.generations).map(GenState::pending).collect(),
        config: cfg,
    };
    save_state(&opts.out, &state)?;
    continue_run(opts, obs)
}

/// Continues the run in `opts.out` from its last complete step.
pub fn continue_run(opts: &RunOptions, obs: &mut dyn Observer) -> Result<()> {
    let mut state = load_state(&opts.out)?;
    let cfg = state.config.clone();
    let tok = Tokenizer::load(&opts.out.join(checkpoint::TOKENIZER))?;
    if tok.sha256() != state.tokenizer_sha256 {
        bail!("{}: tokenizer.json does not match the sha256 recorded in {RUN_JSON}", opts.out.display());
    }
    let lab = Lab::new(&cfg, opts, tok)?;
    let mut rows = verify::verify(&opts.out, &mut state)?;
    save_state(&opts.out, &state)?;
    if state.is_complete() {
        obs.complete(&opts.out, state.generations.len());
        return Ok(());
    }
    for row in &rows {
        obs.row(row);
    }
    let mut corpora: Vec<Vec<Vec<u32>>> = Vec::new();
    let mut gen0: Option<Model> = None;
    for g in 0..cfg.recursion.generations {
        let set = training_set(&cfg.recursion, &lab.real(), g, &corpora, derive_seed(cfg.seed, g, "regime"));
        let dir = gen_dir(&opts.out, g);
        if state.generations[g].status < Status::Trained {
            lab.check_disk_space(g, &set)?;
            create_dir(&dir)?;
            let info = lab.train_generation(g, &set, &dir)?;
            let t = &info.training;
            let timings = [("train_wall_s", t.wall_s), ("train_tokens_per_s", t.tokens_per_s)];
            state.generations[g].complete(
                Status::Trained,
                &dir,
                &[checkpoint::WEIGHTS, checkpoint::MODEL_JSON],
                &timings,
            )?;
            save_state(&opts.out, &state)?;
        }
        let model = opts.engine.load(&lab.mcfg, &load_weights(&lab.mcfg, &dir.join(checkpoint::WEIGHTS))?)?;
        if g == 0 {
            gen0 = Some(model.clone());
        }
        let gen0 = gen0.as_ref().expect("generation 0 is loaded first");
        if !state.real_measured {
            rows.insert(0, lab.measure_real(gen0)?);
            state.metrics_sha256 = Some(write_rows(&opts.out, &rows)?);
            state.real_measured = true;
            save_state(&opts.out, &state)?;
            obs.row(&rows[0]);
        }
        let records = if state.generations[g].status < Status::Sampled {
            let started = Instant::now();
            let records = lab.sample_generation(g, &model, gen0, &set)?;
            write_corpus(&dir.join(CORPUS), &records)?;
            let timings = [("sample_wall_s", started.elapsed().as_secs_f64())];
            state.generations[g].complete(Status::Sampled, &dir, &[CORPUS], &timings)?;
            save_state(&opts.out, &state)?;
            records
        } else {
            read_corpus(&dir.join(CORPUS))?
        };
        if state.generations[g].status < Status::Measured {
            let started = Instant::now();
            let info = checkpoint::read_info(&dir)?;
            let mut row = lab.measure_generation(g, &model, &records, &info, &state)?;
            let stage = match rows.iter().find(|r| r.id == RowId::Generation(0)) {
                Some(gen0_row) => collapse_stage(&row, gen0_row),
                None => collapse_stage(&row, &row),
            };
            row.set_value(Metric::Stage, Value::Text(stage.into()));
            // Rows stay in generation order even when an earlier one was re-measured.
            let pos = rows.iter().position(|r| r.generation().is_some_and(|x| x > g)).unwrap_or(rows.len());
            rows.insert(pos, row);
            state.metrics_sha256 = Some(write_rows(&opts.out, &rows)?);
            let timings = [("measure_wall_s", started.elapsed().as_secs_f64())];
            state.generations[g].complete(Status::Measured, &dir, &[], &timings)?;
            save_state(&opts.out, &state)?;
            obs.row(&rows[pos]);
        }
        corpora.push(records.into_iter().map(|r| r.tokens).collect());
    }
    obs.finished(&opts.out);
    Ok(())
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

    fn train_generation(&self, g: usize, set: &TrainingSet, dir: &Path) -> Result<ModelInfo> {
        let seed = self.cfg.seed;
        let init = if g > 0 && self.cfg.recursion.init == InitMode::Previous {
            load_weights(&self.mcfg, &gen_dir(&self.opts.out, g - 1).join(checkpoint::WEIGHTS))?
        } else {
            init_weights(&self.mcfg, derive_seed(seed, g, "init"))
        };
        let job = TrainJob {
            cfg: self.cfg,
            tok: &self.tok,
            model: &self.mcfg,
            init: &init,
            train: &set.stream,
            valid: &self.valid.stream,
            seed: derive_seed(seed, g, "batches"),
            quiet: self.opts.quiet,
            label: format!("gen {g}"),
        };
        checkpoint::train_model_dir(&self.opts.engine, &job, dir)
    }

    /// Generation g's corpus: a continuation of every prompt block, or free samples.
    fn sample_generation(
        &self,
        g: usize,
        model: &Model,
        gen0: &Model,
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
            texts.extend(generate(model, &refs, new_tokens, &decoding, &seeds)?);
            bar.inc(chunk.len() as u64);
            crate::fault::point(&format!("sample:gen {g}"));
        }
        bar.finish_and_clear();
        let refs: Vec<&[u32]> = texts.iter().map(Vec::as_slice).collect();
        let gen0_ppl = sequence_ppls(gen0, &refs, self.tok.eot)?;
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
        // The references a generation's test_word_ppl is read against: n-gram models of the same data.
        row.set(
            Metric::KnBigramTestWordPpl,
            KneserNeyBigram::train(&self.train_lines).evaluate(&self.test_lines).ppl,
        );
        row.set(
            Metric::UnigramTestWordPpl,
            UnigramModel::train(&self.train_lines).evaluate(&self.test_lines).ppl,
        );
        Ok(row)
    }

    fn measure_generation(
        &self,
        g: usize,
        model: &Model,
        records: &[CorpusRecord],
        info: &ModelInfo,
        state: &RunState,
    ) -> Result<Row> {
        let block = self.cfg.data.block_size;
        let test = split_perplexity(model, &self.test, block)?;
        crate::fault::point(&format!("measure:gen {g}"));
        let valid = split_perplexity(model, &self.valid, block)?;
        let mut row = Row::new(RowId::Generation(g));
        row.set(Metric::TestPpl, test.ppl);
        row.set(Metric::TestWordPpl, test.word_ppl);
        row.set(Metric::TestPplRare, test.ppl_rare);
        row.set(Metric::TestPplCommon, test.ppl_common);
        row.set(Metric::ValidPpl, valid.ppl);
        row.set(Metric::ValidWordPpl, valid.word_ppl);
        let words: Vec<&str> = records.iter().flat_map(|r| r.text.split_whitespace()).collect();
        self.corpus_metrics(&mut row, &words, state.ttr_n)?;
        let ppls: Vec<f64> = records.iter().map(|r| r.gen0_ppl).collect();
        PplDistribution::new(&ppls).put(&mut row);
        row.set_count(Metric::Sequences, records.len() as u64);
        row.set_count(Metric::CorpusTokens, records.iter().map(|r| r.tokens.len() as u64).sum());
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
