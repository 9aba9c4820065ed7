use clap::Parser;
use collapse_lab::{cli, config::UsageError};

fn main() {
    collapse_lab::tune_allocator();
    let args = cli::Cli::parse();
    if let Err(err) = cli::run(args) {
        eprintln!("error: {err:#}");
        let usage = err.chain().any(|e| e.downcast_ref::<UsageError>().is_some());
        std::process::exit(if usage { 2 } else { 1 });
    }
}
