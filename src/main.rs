use clap::Parser;
use collapse_lab::{cli, config::UsageError};

fn main() {
    // Like other Unix tools (ripgrep among them), stop quietly when the reader of our output goes
    // away (`collapse-lab inspect … | head`) instead of panicking on a broken pipe.
    // SAFETY: restoring the default disposition of a signal before any thread starts.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // A user error stays one line even in a shell with RUST_BACKTRACE=1: library errors (candle's)
    // capture no backtrace unless RUST_LIB_BACKTRACE asks for one; panics still honour RUST_BACKTRACE.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    collapse_lab::tune_allocator();
    let args = cli::Cli::parse();
    // The work runs on a thread of rayon's pool: the kernels fork many short parallel loops (dozens
    // per decoding step), and forking them from inside the pool is cheaper than handing each one
    // over from an outside thread and waiting for it. The pool's threads get the main thread's
    // usual 8 MiB of stack, since the whole command now runs on one of them.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    if let Err(err) = rayon::scope(|_| cli::run(args)) {
        eprintln!("error: {}", one_line(&err));
        let usage = err.chain().any(|e| e.downcast_ref::<UsageError>().is_some());
        std::process::exit(if usage { 2 } else { 1 });
    }
}

/// The error and its causes on one line, each cause once (an I/O error wrapped by a library that
/// repeats its message as its source would otherwise print twice), newlines folded.
fn one_line(err: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in err.chain() {
        let text = cause.to_string();
        let text = text.lines().map(str::trim).filter(|l| !l.is_empty()).collect::<Vec<_>>().join(" ");
        if text.is_empty() || out.contains(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}
