//! collapse-lab: reproduce model collapse (Shumailov et al. 2024) on a laptop.
//!
//! The pipeline flows one way, one module per stage, and no module imports one below it in this
//! list (checked by `tests/layout.rs`):
//!
//! ```text
//! config, files, fault          settings; atomic files and hashes; test hooks (used by every stage)
//! data                          corpora: splits, lines, evaluation blocks
//! tokenizer                     the frozen BPE tokenizer
//! kernels                       CPU matrix products: fp32 (AVX2, AVX-512), bf16 (AMX, AVX512-BF16)
//! model, hf                     the GPT described once; candle reference, fast CPU engine, its ops;
//!                               Hugging Face GPT-2 directories in and out
//! train, checkpoint             the training loop; model directories
//! sampler, sample               token choice; batched generation and beam search
//! metrics                       perplexities, corpus metrics, n-gram baselines, the registry
//! recursion                     the generation loop, regimes, the run directory, resume
//! report, compare, toy          plots and HTML; comparisons and sweeps; the Gaussian toy
//! cli, bench                    the command line
//! ```

pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod data;
pub mod fault;
pub mod files;
pub mod hf;
pub mod kernels;
pub mod metrics;
pub mod model;
pub mod recursion;
pub mod report;
pub mod sample;
pub mod sampler;
pub mod tokenizer;
pub mod toy;
pub mod train;

/// Tells glibc to keep freed large blocks instead of returning them to the system with `munmap`.
/// candle allocates and frees many large tensors per training step; without this every step
/// page-faults them in again (measured about 2× on training). Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
