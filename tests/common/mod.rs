//! Helpers shared by the end-to-end tests: the real binary, its stderr, what a clean error looks
//! like, and a snapshot of a directory to check that a failed command changed nothing.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_collapse-lab"))
}

pub fn run(args: &[&str]) -> Output {
    bin().args(args).output().expect("the binary runs")
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

pub fn read(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A bad input: non-zero exit, one line of error naming `culprit`, no panic or backtrace.
pub fn assert_clean_error(o: &Output, culprit: &str) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success; stderr: {err}");
    assert!(err.contains(culprit), "stderr should name {culprit:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one-line error expected: {err}");
    assert!(!err.contains("panicked") && !err.contains("backtrace"), "{err}");
}

/// A clean error (see `assert_clean_error`) with exit `code`.
pub fn assert_error(o: &Output, code: i32, culprit: &str) {
    assert_eq!(o.status.code(), Some(code), "exit code; stderr: {}", stderr(o));
    assert_clean_error(o, culprit);
}

/// Every file under `dir` but the lock file (left by design) with its bytes, sorted by path.
pub fn snapshot(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = vec![];
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.file_name().is_some_and(|n| n != ".lock") {
                let bytes = std::fs::read(&p).unwrap();
                out.push((p, bytes));
            }
        }
    }
    out.sort();
    out
}
