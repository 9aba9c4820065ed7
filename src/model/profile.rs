//! Where the fast engine's training step spends its time: `collapse-lab bench --profile` times
//! each phase of the step (wall time on the thread that runs the phase, which waits for the phase's
//! parallel work) and prints the totals per step as a tree.
//!
//! Phases nest: a phase's time is its own, without the phases inside it, so the times of a tree
//! add up to the time spent in it. Off unless [`start`]ed: then a phase costs one relaxed atomic
//! load, and nothing changes what the step computes.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// One phase's totals since [`start`]: its path (the names from the outermost phase in), its own
/// time (without the phases inside it) and how many times it ran.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct PhaseTime {
    pub path: Vec<&'static str>,
    pub seconds: f64,
    pub calls: u64,
}

static ON: AtomicBool = AtomicBool::new(false);
/// The phases in the order they first finished (so a phase after those inside it): (path, own
/// time, calls).
static TOTALS: Mutex<Vec<(Vec<&'static str>, Duration, u64)>> = Mutex::new(Vec::new());

thread_local! {
    /// This thread's open phases, outermost first: name, start, time spent in the phases inside.
    static OPEN: RefCell<Vec<(&'static str, Instant, Duration)>> = const { RefCell::new(Vec::new()) };
}

/// Runs `f` as the phase `name` (inside whatever phase this thread is in).
#[inline]
pub fn phase<R>(name: &'static str, f: impl FnOnce() -> R) -> R {
    if !ON.load(Ordering::Relaxed) {
        return f();
    }
    OPEN.with_borrow_mut(|open| open.push((name, Instant::now(), Duration::ZERO)));
    // Closed when `f` returns or unwinds, so that a panic leaves no phase open.
    let _open = Open;
    f()
}

/// The phase this thread opened last, while it runs.
struct Open;

impl Drop for Open {
    fn drop(&mut self) {
        close();
    }
}

/// Closes this thread's innermost phase: its time goes to its totals, and to its parent's time
/// spent inside other phases.
fn close() {
    let (path, own) = OPEN.with_borrow_mut(|open| {
        let path: Vec<&'static str> = open.iter().map(|(n, ..)| *n).collect();
        let (_, t0, inner) = open.pop().expect("the phase opened above");
        let total = t0.elapsed();
        if let Some(parent) = open.last_mut() {
            parent.2 += total;
        }
        (path, total.saturating_sub(inner))
    });
    let mut totals = TOTALS.lock().unwrap_or_else(|e| e.into_inner());
    match totals.iter_mut().find(|(p, ..)| *p == path) {
        Some((_, t, n)) => {
            *t += own;
            *n += 1;
        }
        None => totals.push((path, own, 1)),
    }
}

/// Clears the totals and starts timing phases (on every thread).
pub fn start() {
    TOTALS.lock().unwrap_or_else(|e| e.into_inner()).clear();
    ON.store(true, Ordering::Relaxed);
}

/// Stops timing; returns the totals since [`start`], in the order the phases first finished (a
/// phase after those inside it; [`table`] puts each under its parent).
pub fn finish() -> Vec<PhaseTime> {
    ON.store(false, Ordering::Relaxed);
    let totals = std::mem::take(&mut *TOTALS.lock().unwrap_or_else(|e| e.into_inner()));
    totals.into_iter().map(|(path, t, calls)| PhaseTime { path, seconds: t.as_secs_f64(), calls }).collect()
}

/// The phases as an indented tree (each under the phase it ran in, in the order the phases first
/// ran), each line a phase's own time divided by `per` (the steps) in milliseconds, its share of
/// all the phases' time, and its calls; then that total.
pub fn table(phases: &[PhaseTime], per: usize) -> String {
    let total: f64 = phases.iter().map(|p| p.seconds).sum();
    let per = per.max(1) as f64;
    // A phase's place: for each of its ancestors and itself, where that path first ran.
    let first = |path: &[&str]| phases.iter().position(|p| p.path.starts_with(path)).unwrap_or(usize::MAX);
    let mut order: Vec<&PhaseTime> = phases.iter().collect();
    order.sort_by_key(|p| (1..=p.path.len()).map(|d| first(&p.path[..d])).collect::<Vec<_>>());
    let mut out = String::new();
    for p in order {
        let depth = p.path.len();
        let name = format!("{:indent$}{}", "", p.path[depth - 1], indent = 2 * depth);
        out.push_str(&format!(
            "{name:<40} {:>8.2} ms {:>5.1} %  ({} calls)\n",
            p.seconds * 1e3 / per,
            100.0 * p.seconds / total.max(f64::MIN_POSITIVE),
            p.calls
        ));
    }
    out.push_str(&format!("{:<40} {:>8.2} ms\n", "  all phases", total * 1e3 / per));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::sleep;

    /// One test for the global state, so that no other test of this module starts or stops it
    /// meanwhile (other modules' phases have other names and are left out of the checks).
    #[test]
    fn phases_nest_and_count_their_own_time() {
        let before = phase("profile-test-off", || 7);
        assert_eq!(before, 7);
        start();
        let wall = Instant::now();
        for _ in 0..2 {
            phase("profile-test-outer", || {
                sleep(Duration::from_millis(10));
                phase("profile-test-inner", || sleep(Duration::from_millis(60)));
                phase("profile-test-inner", || ());
            });
        }
        let wall = wall.elapsed().as_secs_f64();
        let got = phase("profile-test-value", || 41) + 1;
        // A phase that panics is closed on the way out: the next one is not inside it.
        let panicked = std::panic::catch_unwind(|| phase("profile-test-panics", || panic!("in a phase")));
        assert!(panicked.is_err());
        phase("profile-test-after-panic", || ());
        let phases = finish();
        assert_eq!(got, 42);
        let find = |path: &[&str]| phases.iter().find(|p| p.path == path).cloned();
        let outer = find(&["profile-test-outer"]).expect("outer");
        let inner = find(&["profile-test-outer", "profile-test-inner"]).expect("inner");
        assert_eq!((outer.calls, inner.calls), (2, 4));
        // Own times: the outer phase's without the inner one's, so at most the loop's wall time
        // less the inner phase's (which would fail by 0.12 s if the inner time were counted twice).
        assert!(outer.seconds >= 0.020 && inner.seconds >= 0.120, "{outer:?} {inner:?}");
        assert!(outer.seconds + inner.seconds <= wall + 1e-6, "{outer:?} {inner:?}, {wall} s in all");
        assert!(find(&["profile-test-off"]).is_none(), "a phase before start() is not timed");
        assert_eq!(find(&["profile-test-value"]).map(|p| p.calls), Some(1));
        assert_eq!(find(&["profile-test-panics"]).map(|p| p.calls), Some(1));
        assert_eq!(find(&["profile-test-after-panic"]).map(|p| p.calls), Some(1));
        // After finish(), nothing more is recorded.
        phase("profile-test-after", || ());
        start();
        assert!(finish().iter().all(|p| p.path[0] != "profile-test-after"));
    }

    #[test]
    fn the_table_nests_and_adds_up() {
        let p = |path: Vec<&'static str>, ms: f64, calls| PhaseTime { path, seconds: ms / 1e3, calls };
        let phases = vec![
            p(vec!["forward"], 2.0, 1),
            p(vec!["forward", "attention"], 6.0, 4),
            p(vec!["optimizer"], 1.0, 1),
            p(vec!["forward", "head"], 1.0, 1),
        ];
        let t = table(&phases, 2);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 5, "{t}");
        // Per step (two steps), in the order each parent first ran, children under parents.
        assert!(
            lines[0].starts_with("  forward ") && lines[0].contains("1.00 ms") && lines[0].contains("20.0 %")
        );
        assert!(
            lines[1].starts_with("    attention ")
                && lines[1].contains("3.00 ms")
                && lines[1].contains("(4 calls)")
        );
        assert!(lines[2].starts_with("    head ") && lines[2].contains("0.50 ms"));
        assert!(lines[3].starts_with("  optimizer ") && lines[3].contains("10.0 %"));
        assert!(lines[4].contains("all phases") && lines[4].contains("5.00 ms"));
    }
}
