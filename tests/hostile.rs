//! What a careless or hostile user does to the lab (issue 15): one regression test per defect,
//! named after it, plus a mutation loop over run.json and config files. Every bad input must give a
//! one-line error (no panic, no backtrace) with exit code 2 for usage errors and 1 for failures,
//! and must leave what it was pointed at unchanged.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

mod common;
use common::{assert_error, bin, read, run, snapshot, stderr};

fn smoke(out: &Path, extra: &[&str]) -> Output {
    let mut args = vec!["run", "--preset", "smoke", "--quiet", "--out", out.to_str().unwrap()];
    args.extend_from_slice(extra);
    let o = run(&args);
    assert!(o.status.success(), "run failed: {}", stderr(&o));
    o
}

/// A copy of wikitext-2 with a shorter train split (so that it differs from the default).
fn other_corpus(dir: &Path) -> PathBuf {
    let data = dir.join("corpus");
    std::fs::create_dir_all(&data).unwrap();
    let real = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2");
    let train = std::fs::read_to_string(real.join("wiki.train.tokens")).unwrap();
    let tail: String = train.lines().skip(20_000).take(3_000).map(|l| format!("{l}\n")).collect();
    std::fs::write(data.join("wiki.train.tokens"), tail).unwrap();
    for f in ["wiki.valid.tokens", "wiki.test.tokens"] {
        std::fs::copy(real.join(f), data.join(f)).unwrap();
    }
    data
}

/// A corpus of a few words per split: too small for any preset.
fn tiny_corpus(dir: &Path) -> PathBuf {
    let d = dir.join("tiny");
    std::fs::create_dir_all(&d).unwrap();
    for s in ["train", "valid", "test"] {
        std::fs::write(d.join(format!("{s}.txt")), "a few words only\n").unwrap();
    }
    d
}

/// Defect 1: `resume` read wikitext-2 when the run had used `--data`. It now reads the recorded
/// corpus, checks its bytes, and refuses a changed one.
#[test]
fn resume_uses_the_recorded_corpus() {
    use std::os::unix::process::ExitStatusExt;
    let tmp = tempfile::tempdir().unwrap();
    let data = other_corpus(tmp.path());
    let d = data.to_str().unwrap();
    let straight = tmp.path().join("straight");
    smoke(&straight, &["--data", d]);
    let killed = tmp.path().join("killed");
    let o = bin()
        .args(["run", "--preset", "smoke", "--quiet", "--data", d, "--out", killed.to_str().unwrap()])
        .env("COLLAPSE_LAB_ABORT_AT", "sample:gen 1")
        .output()
        .unwrap();
    assert_eq!(o.status.signal(), Some(9), "{}", stderr(&o));
    // No --data: the run's own corpus, not wikitext-2.
    let o = run(&["resume", killed.to_str().unwrap(), "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read(&straight.join("metrics.jsonl")) == read(&killed.join("metrics.jsonl")));
    let state: Value = serde_json::from_slice(&read(&killed.join("run.json"))).unwrap();
    assert_eq!(state["data"]["name"], "corpus");
    assert_eq!(state["data"]["files"][0]["name"], "wiki.train.tokens");
    assert_eq!(state["data"]["files"][0]["sha256"].as_str().unwrap().len(), 64);
    // A changed corpus, or another one passed with --data, is refused before anything is written.
    let before = snapshot(&killed);
    let wikitext = Path::new(env!("CARGO_MANIFEST_DIR")).join("data/wikitext-2");
    let o = run(&["resume", killed.to_str().unwrap(), "--data", wikitext.to_str().unwrap()]);
    assert_error(&o, 1, "the corpus changed: wiki.train.tokens");
    std::fs::write(data.join("wiki.valid.tokens"), "a changed valid split\n").unwrap();
    let o = run(&["resume", killed.to_str().unwrap()]);
    assert_error(&o, 1, "wiki.valid.tokens");
    assert!(snapshot(&killed) == before, "a refused resume changed the run");
}

/// Defect 2: `run --force` deleted a finished run, then failed its own validation. Now everything
/// is checked first.
#[test]
fn run_force_validates_before_deleting_anything() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    let before = snapshot(&out);
    let o_ = out.to_str().unwrap();
    let o = run(&["run", "--preset", "smoke", "--force", "--set", "data.train_lines=1", "--out", o_]);
    assert_error(&o, 2, "has only");
    let tiny = tiny_corpus(tmp.path());
    let few = [
        "run",
        "--preset",
        "smoke",
        "--force",
        "--set",
        "tokenizer.kind=\"word\"",
        "--set",
        "model.vocab_size=0",
    ];
    assert_error(
        &run(&[&few[..], &["--data", tiny.to_str().unwrap(), "--out", o_]].concat()),
        2,
        "is too small",
    );
    let o = run(&["run", "--preset", "smoke", "--force", "--temperature", "-1", "--out", o_]);
    assert_error(&o, 2, "--temperature");
    assert!(snapshot(&out) == before, "a refused --force deleted or changed the run");
}

/// Defect 3: two processes could write one run directory at once. The second now gets a one-line
/// error naming the holder (here the test process holds the lock).
#[test]
fn a_second_process_on_a_run_directory_is_refused() {
    use std::io::Write;
    use std::os::unix::io::AsRawFd;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    let mut lock = std::fs::OpenOptions::new().write(true).open(out.join(".lock")).unwrap();
    // SAFETY: flock on a descriptor this test owns.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    lock.set_len(0).unwrap();
    write!(lock, "pid 4242: collapse-lab run --preset smoke").unwrap();
    let o_ = out.to_str().unwrap();
    for args in [
        &["resume", o_][..],
        &["report", o_][..],
        &["run", "--preset", "smoke", "--force", "--seed", "1", "--out", o_][..],
    ] {
        assert_error(
            &run(args),
            1,
            "is in use by another process (pid 4242: collapse-lab run --preset smoke)",
        );
    }
    drop(lock);
    assert!(run(&["report", o_]).status.success(), "the lock is released with its holder");
}

/// Defect 4: raising `generations` in run.json made `resume` panic. `resume --generations N`
/// extends a finished run; the extended run equals one that had N generations from the start.
#[test]
fn resume_extends_a_finished_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (two, three) = (tmp.path().join("two"), tmp.path().join("three"));
    smoke(&two, &["--generations", "2"]);
    smoke(&three, &["--generations", "3"]);
    let o = run(&["resume", two.to_str().unwrap(), "--generations", "3", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(read(&two.join("metrics.jsonl")) == read(&three.join("metrics.jsonl")));
    let o = run(&["resume", two.to_str().unwrap(), "--generations", "2"]);
    assert_error(&o, 2, "--generations 2: the run already has 3 generations");
    // Editing the count by hand is refused, not a panic.
    let path = two.join("run.json");
    let mut state: Value = serde_json::from_slice(&read(&path)).unwrap();
    state["config"]["recursion"]["generations"] = 5.into();
    std::fs::write(&path, serde_json::to_vec_pretty(&state).unwrap()).unwrap();
    assert_error(
        &run(&["resume", two.to_str().unwrap()]),
        2,
        "3 generation entries for recursion.generations = 5",
    );
}

/// Defect 5: `resume` trusted run.json. It is now checked as `run` checks its flags.
#[test]
fn resume_refuses_an_invalid_run_json() {
    let tmp = tempfile::tempdir().unwrap();
    let good = tmp.path().join("good");
    smoke(&good, &["--generations", "2"]);
    let state: Value = serde_json::from_slice(&read(&good.join("run.json"))).unwrap();
    type Mutation = fn(&mut Value);
    let cases: [(&str, Mutation, &str); 6] = [
        ("n_head", |s| s["config"]["model"]["n_head"] = 3.into(), "multiple of model.n_head"),
        ("temperature", |s| s["config"]["sample"]["temperature"] = (-1.0).into(), "--temperature"),
        ("lowered", |s| s["config"]["recursion"]["generations"] = 1.into(), "2 generation entries"),
        ("empty", |s| s["generations"] = Value::Array(vec![]), "0 generation entries"),
        ("version", |s| s["crate_version"] = "99.0.0".into(), "written by collapse-lab 99.0.0"),
        ("format", |s| s["format"] = 99.into(), "run format 99"),
    ];
    for (name, mutate, culprit) in cases {
        let dir = tmp.path().join(name);
        copy_dir(&good, &dir);
        let mut s = state.clone();
        mutate(&mut s);
        std::fs::write(dir.join("run.json"), serde_json::to_vec_pretty(&s).unwrap()).unwrap();
        let before = snapshot(&dir);
        for cmd in ["resume", "report", "inspect"] {
            let mut args = vec![cmd, dir.to_str().unwrap()];
            if cmd == "inspect" {
                args.extend(["--generation", "0"]);
            }
            assert_error(&run(&args), 2, culprit);
        }
        assert!(snapshot(&dir) == before, "{name}: a refused command changed the run");
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let dest = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &dest);
        } else {
            std::fs::copy(&p, &dest).unwrap();
        }
    }
}

/// Defect 6: sizes with no upper bound aborted on allocation or were OOM-killed. They are now
/// refused before anything is allocated.
#[test]
fn sizes_beyond_memory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("r");
    let o_ = out.to_str().unwrap();
    for (args, culprit) in [
        (&["--generations", "1000000000"][..], "--generations (recursion.generations) must be in [1, 1000]"),
        (&["--beam", "1000000"][..], "--beam (sample.beam) must be in [0, 64]"),
        (&["--set", "model.ctx=100000"][..], "model.ctx must be in [1, 8192]"),
        (&["--set", "train.batch_size=100000000"][..], "train.batch_size must be in [1, 65536]"),
        (
            &["--set", "train.batch_size=65536", "--set", "model.ctx=4096"][..],
            "training (train.batch_size 65536",
        ),
    ] {
        let mut a = vec!["run", "--preset", "smoke", "--quiet", "--out", o_];
        a.extend_from_slice(args);
        assert_error(&run(&a), 2, culprit);
    }
    assert_error(
        &run(&["prepare", "--vocab-size", "1000000000", "--out", o_]),
        2,
        "--vocab-size must be at most",
    );
    assert_error(
        &run(&["toy", "gaussian", "--samples", "1000000000000"]),
        2,
        "toy gaussian (--samples 1000000000000",
    );
    assert!(!out.exists(), "nothing written");
}

/// Defect 7: `train --out <run dir>` overwrote the run's tokenizer.json.
#[test]
fn train_refuses_to_write_into_a_run_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    let before = snapshot(&out);
    let o = run(&[
        "train",
        "--preset",
        "smoke",
        "--quiet",
        "--set",
        "model.vocab_size=300",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_error(&o, 2, "that is a run directory");
    assert!(snapshot(&out) == before);
}

/// Defect 8: a failed start left run.json behind. Now nothing is written until validation passed.
#[test]
fn a_failed_start_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("new");
    let o_ = out.to_str().unwrap();
    let tiny = tiny_corpus(tmp.path());
    let few = ["run", "--preset", "smoke", "--set", "tokenizer.kind=\"word\"", "--set", "model.vocab_size=0"];
    assert_error(
        &run(&[&few[..], &["--data", tiny.to_str().unwrap(), "--out", o_]].concat()),
        2,
        "is too small",
    );
    assert!(!out.exists(), "a refused run created its directory");
    std::fs::create_dir(&out).unwrap();
    assert_error(
        &run(&["run", "--preset", "smoke", "--set", "model.vocab_size=50000", "--out", o_]),
        2,
        "has only",
    );
    assert_eq!(std::fs::read_dir(&out).unwrap().count(), 0, "an existing directory stays empty");
    // So the next run starts normally.
    smoke(&out, &["--generations", "1"]);
}

/// Defect 9: `compare A A` counted one run as two seeds (sweep's `1,1.0`: compare::tests).
#[test]
fn compare_counts_a_run_named_twice_once() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    let cmp = tmp.path().join("cmp");
    let with_slash = format!("{}/", out.display());
    let o = run(&["compare", out.to_str().unwrap(), &with_slash, "--out", cmp.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let md = std::fs::read_to_string(cmp.join("compare.md")).unwrap();
    assert!(md.contains("1 run(s)") && !md.contains("2 run(s)"), "{md}");
}

/// Defect 10: `inspect -n 0` named `--prompt 0`; an empty generations array printed a range up to
/// 2^64 − 1 (now refused when run.json is read: resume_refuses_an_invalid_run_json).
#[test]
fn inspect_n_zero_names_n() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    assert_error(
        &run(&["inspect", out.to_str().unwrap(), "--generation", "0", "-n", "0"]),
        2,
        "-n must be at least 1",
    );
    assert_error(
        &run(&["inspect", out.to_str().unwrap(), "--generation", "5"]),
        2,
        "the run has generations 0 to 0",
    );
}

/// Defect 11: messages that named the wrong thing, took several lines, or exited 1 for a usage error.
#[test]
fn messages_name_the_setting_on_one_line() {
    let tmp = tempfile::tempdir().unwrap();
    let o_ = tmp.path().join("o");
    let o_ = o_.to_str().unwrap();
    let o = run(&["run", "--preset", "smoke", "--set", "model.vocab_size=1", "--out", o_]);
    assert_error(&o, 2, "model.vocab_size must be at least 259");
    for (name, text, culprit) in [
        ("a.json", "[1, 2]", "expected an object of settings"),
        ("b.json", "null", "expected an object of settings"),
        ("c.toml", "[train]\nlr = = 3\n", "c.toml is not valid TOML at line 2"),
    ] {
        let f = tmp.path().join(name);
        std::fs::write(&f, text).unwrap();
        assert_error(
            &run(&["run", "--preset", "smoke", "--config", f.to_str().unwrap(), "--out", o_]),
            2,
            culprit,
        );
    }
    // Missing files are named.
    assert_error(&run(&["eval", "--model", "/nonexistent/m"]), 1, "/nonexistent/m");
    assert_error(
        &run(&["run", "--preset", "smoke", "--data", "/nonexistent/d", "--out", o_]),
        1,
        "/nonexistent/d",
    );
    assert_error(&run(&["report", "/nonexistent/r"]), 2, "/nonexistent/r");
}

/// Defect 12: temporary files of a killed process stayed in the run directory, and `resume` kept
/// them. They are removed on start.
#[test]
fn stale_temporary_files_are_removed_on_start() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    std::fs::write(out.join(".run.json.tmp-99999"), vec![b'x'; 1000]).unwrap();
    std::fs::write(out.join("gen-00/.model.json.tmp-99998"), b"{").unwrap();
    let o = run(&["resume", out.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!out.join(".run.json.tmp-99999").exists() && !out.join("gen-00/.model.json.tmp-99998").exists());
    std::fs::write(out.join("plots/.zipf.svg.tmp-99997"), b"<").unwrap();
    assert!(run(&["report", out.to_str().unwrap()]).status.success());
    assert!(!out.join("plots/.zipf.svg.tmp-99997").exists());
}

/// Defect 14: `resume` of a complete run rewrote run.json, so it failed on a read-only medium.
/// It now writes nothing (the lock file aside, which a read-only medium does without).
#[test]
fn resume_of_a_complete_run_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1"]);
    let before = snapshot(&out);
    let mtimes: Vec<_> =
        before.iter().map(|(p, _)| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    std::thread::sleep(std::time::Duration::from_millis(30));
    let o = run(&["resume", out.to_str().unwrap()]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("is complete"));
    assert!(snapshot(&out) == before);
    let after: Vec<_> =
        before.iter().map(|(p, _)| std::fs::metadata(p).unwrap().modified().unwrap()).collect();
    assert_eq!(mtimes, after, "no file was rewritten");
}

/// Defect 15: `--name ../x` wrote outside checkpoints/, a newline was accepted, and
/// `--set preset=cpu` relabelled a smoke run.
#[test]
fn run_names_stay_plain_and_the_preset_is_not_a_setting() {
    for name in ["../x", "a\nb", "", ".."] {
        assert_error(
            &run(&["run", "--preset", "smoke", "--name", name]),
            2,
            "expected a plain directory name",
        );
    }
    let tmp = tempfile::tempdir().unwrap();
    let o_ = tmp.path().join("o");
    let o = run(&["run", "--preset", "smoke", "--set", "preset=cpu", "--out", o_.to_str().unwrap()]);
    assert_error(&o, 2, "the preset is chosen with --preset");
}

/// Defect 16: silent clamps (a vocabulary the data cannot give, a tokenizer of another size, a beam
/// wider than the vocabulary).
#[test]
fn impossible_sizes_are_refused_not_clamped() {
    let tmp = tempfile::tempdir().unwrap();
    let o_ = tmp.path().join("o");
    let o_ = o_.to_str().unwrap();
    assert_error(
        &run(&["run", "--preset", "smoke", "--set", "model.vocab_size=50000", "--out", o_]),
        2,
        "has only",
    );
    let small = tmp.path().join("small.json");
    let o =
        run(&["prepare", "--vocab-size", "300", "--train-lines", "100", "--out", small.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = run(&["train", "--preset", "smoke", "--tokenizer", small.to_str().unwrap(), "--out", o_]);
    assert_error(&o, 2, "has 300 tokens but model.vocab_size is 384");
    let o = run(&["run", "--preset", "smoke", "--set", "model.vocab_size=300", "--beam", "301", "--out", o_]);
    assert_error(&o, 2, "--beam (sample.beam) must be in [0, 64]");
}

/// Defect 17: `--top-k 0` (off, as the help says) was refused; `inspect … | head` panicked on the
/// closed pipe; RUST_BACKTRACE=1 turned a load error into a 20-line backtrace.
#[test]
fn top_k_zero_pipes_and_backtraces_behave() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("run");
    smoke(&out, &["--generations", "1", "--top-k", "0"]);
    let mut child = bin()
        .args(["inspect", out.to_str().unwrap(), "--generation", "0", "-n", "100000"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take()); // the reader goes away, like `| head -0`
    let o = child.wait_with_output().unwrap();
    assert_ne!(o.status.code(), Some(101), "a panic: {}", stderr(&o));
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
    let broken = tmp.path().join("broken");
    std::fs::create_dir(&broken).unwrap();
    for f in ["model.json", "tokenizer.json"] {
        std::fs::copy(out.join("gen-00").join(f), broken.join(f)).unwrap();
    }
    std::fs::write(broken.join("model.safetensors"), b"garbage").unwrap();
    let o = bin()
        .args(["eval", "--model", broken.to_str().unwrap()])
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert_error(&o, 1, "model.safetensors");
}

/// A run written by collapse-lab 0.1.0 (before run files carried a format version) keeps opening.
#[test]
fn a_run_of_format_1_keeps_opening() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("old");
    copy_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-0.1.0"), &run_dir);
    let r = run_dir.to_str().unwrap();
    let before = snapshot(&run_dir);
    let o = run(&["resume", r]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(String::from_utf8_lossy(&o.stdout).contains("is complete: 2 generations measured"));
    let o = run(&["inspect", r, "--lineage", "3"]);
    assert!(o.status.success() && String::from_utf8_lossy(&o.stdout).contains("[gen 1]"), "{}", stderr(&o));
    let o = run(&["report", r]);
    assert!(o.status.success(), "{}", stderr(&o));
    let html = std::fs::read_to_string(run_dir.join("report.html")).unwrap();
    assert!(html.contains("<svg") && html.contains("stage"));
    let after: Vec<_> =
        snapshot(&run_dir).into_iter().filter(|(p, _)| before.iter().any(|(q, _)| q == p)).collect();
    assert!(after == before, "reading the old run changed it");
    // And extending it works: the new generation reads the (unrecorded, default) corpus.
    let o = run(&["resume", r, "--generations", "3", "--quiet"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("predates corpus records"), "{}", stderr(&o));
    let state: Value = serde_json::from_slice(&read(&run_dir.join("run.json"))).unwrap();
    assert_eq!(state["generations"][2]["status"], "measured");
    assert_eq!(state["data"]["name"], "wikitext-2");
}

/// Mutations of a valid run.json (a key dropped, a type changed, an unknown key added, a value out
/// of range): reading it never panics and never accepts the damage.
#[test]
fn run_json_mutations_never_panic_and_never_pass() {
    let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/run-0.1.0");
    let good: Value = serde_json::from_slice(&read(&fixture.join("run.json"))).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("r");
    std::fs::create_dir(&dir).unwrap();
    let mut leaves = Vec::new();
    collect_paths(&good, &mut Vec::new(), &mut leaves);
    let (mut tried, mut refused, mut dropped_ok) = (0, 0, Vec::new());
    for path in &leaves {
        let key = path.last().unwrap();
        // Timestamps, timings and artifact hashes are records, not settings: their values are free.
        if ["trained_at", "sampled_at", "measured_at"].contains(&key.as_str())
            || path.iter().any(|p| p == "timings" || p == "artifacts")
        {
            continue;
        }
        let mutations: [fn(&Value) -> Value; 4] = [
            |_| Value::String("not a value".into()),
            |v| if v.is_number() { Value::from(-1) } else { Value::Array(vec![]) },
            |v| if v.is_number() { Value::from(1e300) } else { Value::Null },
            |_| Value::Bool(true),
        ];
        for m in mutations {
            let mut s = good.clone();
            let slot = pointer_mut(&mut s, path);
            let new = m(slot);
            if &new == slot {
                continue;
            }
            // null is a legitimate value of an optional record ("not written yet").
            if key == "metrics_sha256" && new.is_null() {
                continue;
            }
            *slot = new;
            tried += 1;
            if !accepted(&dir, &s) {
                refused += 1;
            } else {
                // Accepted only if the setting may take that value (a bool or a seed of −1 cannot).
                panic!("run.json with {} = {} was accepted", path.join("."), pointer_mut(&mut s, path));
            }
        }
        // The key dropped.
        let mut s = good.clone();
        remove(&mut s, path);
        if accepted(&dir, &s) {
            dropped_ok.push(path.join("."));
        }
    }
    let mut s = good.clone();
    s["config"]["train"]["lrate"] = 1.into();
    assert!(!accepted(&dir, &s), "an unknown key is refused");
    assert!(tried > 100 && refused == tried, "{refused} of {tried} refused");
    // Only a key with a default for old files may be missing (metrics_sha256 came after 0.1.0's
    // first runs); every setting must be there.
    assert_eq!(dropped_ok, ["metrics_sha256"]);
}

/// Whether `state` written as run.json into `dir` is read as a valid run; a panic fails the test.
fn accepted(dir: &Path, state: &Value) -> bool {
    std::fs::write(dir.join("run.json"), serde_json::to_vec(state).unwrap()).unwrap();
    let result = std::panic::catch_unwind(|| collapse_lab::recursion::run_dir::load_state(dir).is_ok());
    result.unwrap_or_else(|_| panic!("reading run.json panicked"))
}

fn collect_paths(v: &Value, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    match v {
        Value::Object(m) => {
            for (k, c) in m {
                prefix.push(k.clone());
                collect_paths(c, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(a) if a.iter().any(|x| x.is_object()) => {
            for (i, c) in a.iter().enumerate() {
                prefix.push(i.to_string());
                collect_paths(c, prefix, out);
                prefix.pop();
            }
        }
        _ => out.push(prefix.clone()),
    }
}

fn pointer_mut<'a>(v: &'a mut Value, path: &[String]) -> &'a mut Value {
    path.iter().fold(v, |v, k| match v {
        Value::Array(a) => &mut a[k.parse::<usize>().unwrap()],
        other => &mut other[k.as_str()],
    })
}

fn remove(v: &mut Value, path: &[String]) {
    let (last, parent) = path.split_last().unwrap();
    match pointer_mut(v, parent) {
        Value::Object(m) => {
            m.remove(last);
        }
        Value::Array(a) => {
            a.remove(last.parse::<usize>().unwrap());
        }
        _ => {}
    }
}

/// Mutations of config files: never a panic, every invalid value a usage error.
#[test]
fn config_file_mutations_are_usage_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("c.json");
    let out = tmp.path().join("o");
    let cases = [
        r#"{"train": {"lr": "fast"}}"#,
        r#"{"train": {"lr": -1}}"#,
        r#"{"model": {"n_layer": 0}}"#,
        r#"{"model": {"d_model": 1e30}}"#,
        r#"{"sample": {"top_p": 2}}"#,
        r#"{"recursion": {"regime": 3}}"#,
        r#"{"data": {"split_ratio": [0.5, 0.5]}}"#,
        r#"{"data": {"split_ratio": [0.5, 0.6, -0.1]}}"#,
        r#"{"tokenizer": {"kind": "sentencepiece"}}"#,
        r#"{"finetune": {"lr": 0}}"#,
        r#"{"nonsense": 1}"#,
        r#"{"train": []}"#,
        r#"{"train": {"batch_size": null}}"#,
    ];
    for text in cases {
        std::fs::write(&f, text).unwrap();
        let o = run(&[
            "run",
            "--preset",
            "smoke",
            "--config",
            f.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
        ]);
        let err = stderr(&o);
        assert_eq!(o.status.code(), Some(2), "{text}: {err}");
        assert_eq!(err.trim_end().lines().count(), 1, "{text}: {err}");
        assert!(!out.exists(), "{text}: nothing may be written");
    }
}
