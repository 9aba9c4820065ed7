//! What `resume` trusts: every artifact recorded in `run.json` is checked against its sha256. From
//! the first generation whose model or corpus is missing or changed, everything is redone; metrics
//! that do not match their recorded sha256 are measured again.

use super::run_dir::{gen_dir, read_rows, RunState, Status, CORPUS, METRICS_JSONL};
use crate::checkpoint;
use crate::files::sha256_file;
use crate::metrics::registry::{Row, RowId};
use anyhow::Result;
use std::path::Path;

/// Lowers the status of whatever is missing or changed (saying so on stderr) and returns the
/// metrics rows that are still valid.
pub fn verify(out: &Path, state: &mut RunState) -> Result<Vec<Row>> {
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
                // The real and base rows are scored by generation 0.
                state.real_measured = false;
                state.base_measured = false;
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
        state.base_measured = false;
        for gs in &mut state.generations {
            gs.status = gs.status.min(Status::Sampled);
        }
        return Ok(Vec::new());
    }
    let rows = read_rows(out)?;
    Ok(rows
        .into_iter()
        .filter(|r| match r.id {
            RowId::Real => state.real_measured,
            RowId::Base => state.base_measured,
            RowId::Generation(g) => state.generations.get(g).is_some_and(|gs| gs.status == Status::Measured),
        })
        .collect())
}
