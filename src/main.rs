use clap::Parser;
use collapse_lab::{cli, config::UsageError};

fn main() {
    collapse_lab::tune_allocator();
    let args = cli::Cli::parse();
    // The work runs on a thread of rayon's pool: the kernels fork many short parallel loops (dozens
    // per decoding step), and forking them from inside the pool is cheaper than handing each one
    // over from an outside thread and waiting for it. The pool's threads get the main thread's
    // usual 8 MiB of stack, since the whole command now runs on one of them.
    let _ = rayon::ThreadPoolBuilder::new().stack_size(8 << 20).build_global();
    if let Err(err) = rayon::scope(|_| cli::run(args)) {
        eprintln!("error: {err:#}");
        let usage = err.chain().any(|e| e.downcast_ref::<UsageError>().is_some());
        std::process::exit(if usage { 2 } else { 1 });
    }
}
