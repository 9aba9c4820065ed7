//! collapse-lab: reproduce model collapse (Shumailov et al. 2024) on a laptop.
//!
//! The pipeline flows one way, one module per stage:
//! corpus ([`data`]) → [`tokenizer`] → batches and [`model`] → [`train`] → [`metrics`] → files
//! ([`checkpoint`], [`run_dir`]). [`cli`] is the command line; [`baseline`] the n-gram reference.

pub mod baseline;
pub mod bench;
pub mod checkpoint;
pub mod cli;
pub mod compare;
pub mod config;
pub mod data;
pub mod fast;
pub mod hf;
pub mod metrics;
pub mod model;
pub mod recursion;
pub mod report;
pub mod run_dir;
pub mod sample;
pub mod sampler;
pub mod tokenizer;
pub mod toy;
pub mod train;

/// Tells glibc to keep freed large blocks instead of returning them to the system with `munmap`.
/// candle allocates and frees many large tensors per training step; without this every step
/// page-faults them in again (SPEC §5 measured about 2× on training). Call once at start-up.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; it is called before any other thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}
