//! The console table a run prints: one row per generation as it is measured, columns chosen by the
//! metric registry.

use crate::metrics::registry::{Metric, Row, Value};
use crate::recursion::Observer;
use std::path::Path;

/// The registry's table columns, in order.
fn columns() -> Vec<(Metric, &'static str)> {
    Metric::ALL.iter().filter_map(|&m| m.def().table.map(|h| (m, h))).collect()
}

/// The header line.
pub fn header() -> String {
    let mut cols = vec![format!("{:>10}", "gen")];
    cols.extend(columns().iter().map(|(_, h)| format!("{h:>10}")));
    cols.join(" ")
}

/// One row as the run prints it.
pub fn format_row(row: &Row) -> String {
    let id = row.id.label();
    let mut cells = vec![format!("{id:>10}")];
    for (m, _) in columns() {
        cells.push(match row.value(m) {
            Some(Value::Float(x)) if x.is_nan() => format!("{:>10}", "-"),
            Some(Value::Float(x)) if x.abs() >= 100.0 => format!("{x:>10.1}"),
            Some(Value::Float(x)) => format!("{x:>10.4}"),
            Some(Value::Count(n)) => format!("{n:>10}"),
            Some(Value::Text(s)) => format!("{s:>10}"),
            _ => format!("{:>10}", "-"),
        });
    }
    let mut line = cells.join(" ");
    if let (Some(kn), Some(uni)) = (row.get(Metric::KnBigramTestWordPpl), row.get(Metric::UnigramTestWordPpl))
    {
        line.push_str(&format!("   references: KN bigram word_ppl {kn:.1}, unigram {uni:.1}"));
    }
    line
}

/// Prints the header before the first row, then each row.
pub struct Table {
    header_done: bool,
}

impl Observer for Table {
    fn row(&mut self, row: &Row) {
        if !self.header_done {
            println!("{}", header());
            self.header_done = true;
        }
        println!("{}", format_row(row));
    }

    fn complete(&mut self, out: &Path, generations: usize) {
        println!("{} is complete: {generations} generations measured", out.display());
    }

    fn finished(&mut self, out: &Path) {
        println!("run complete: {}", out.display());
    }
}

/// The table, or silence with `--quiet` (a finished run still says it is complete).
pub fn observer(quiet: bool) -> Box<dyn Observer> {
    if quiet {
        Box::new(Quiet)
    } else {
        Box::new(Table { header_done: false })
    }
}

struct Quiet;

impl Observer for Quiet {
    fn complete(&mut self, out: &Path, generations: usize) {
        println!("{} is complete: {generations} generations measured", out.display());
    }
}
