//! Fault injection for tests: `COLLAPSE_LAB_ABORT_AT=<point>` kills the process with SIGKILL when
//! it reaches `point` (e.g. `train:gen 1`, `sample:gen 0`, `measure:gen 2`), so tests can interrupt
//! a run anywhere and check that `resume` gives the same bytes as an uninterrupted run. Lives at
//! the bottom of the module tree so that every stage may call it.

/// Kills the process if `COLLAPSE_LAB_ABORT_AT` names `point`.
pub fn point(point: &str) {
    if std::env::var("COLLAPSE_LAB_ABORT_AT").is_ok_and(|p| p == point) {
        eprintln!("COLLAPSE_LAB_ABORT_AT: killing the process at {point}");
        // SAFETY: sending a signal to our own process has no memory-safety preconditions.
        unsafe {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
}
