//! Speed of every kernel path on the products of one config-A training step and of its decode
//! steps, with 2 threads. Ignored by default; run with
//! `cargo test --release kernels::bench -- --ignored --nocapture`. `KB_HEAD=ROWS,D,VOCAB` times a
//! one-layer model of that head instead (e.g. `KB_HEAD=252,128,33278 KERNELS_BENCH_SHAPE=head`, the
//! `shumailov` preset's head chunk). `peak_rates` measures the ceiling: one core's rate for
//! `vfmadd231ps` and `vdpbf16ps` alone.

use super::*;
use std::ops::Not;
use std::time::Instant;

/// Best of `reps` timings of `f` (after one warm-up call), in seconds.
fn best(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

/// CPU time of the calling thread, in seconds: unlike wall time it does not count the time the
/// thread waits for a core, so it measures the kernel on a machine shared with other work.
fn thread_cpu() -> f64 {
    let mut t = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 * 1e-9
}

/// Best of `reps` thread-CPU timings of `f` (after one warm-up call), in seconds; `f` must run
/// on the calling thread (a one-thread pool).
fn best_cpu(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..reps)
        .map(|_| {
            let t = thread_cpu();
            f();
            thread_cpu() - t
        })
        .fold(f64::INFINITY, f64::min)
}

fn reps() -> usize {
    std::env::var("KERNELS_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(5)
}

/// One product of the step: its name, m, n, k, the operands, accumulate, and how many times
/// a step does it.
struct Product {
    name: String,
    m: usize,
    n: usize,
    k: usize,
    lhs: Mat,
    rhs: Mat,
    accumulate: bool,
    per_step: usize,
    /// lhs is the transpose of a row-major matrix, taken through [`Lhs`] as the engine's d W
    /// products take it (on the `vdpbf16ps` kernel in bf16: packed in B's pair layout).
    via_lhs: bool,
}

/// What `collapse_lab::tune_allocator` does in the lab's binaries (keep freed large blocks
/// instead of unmapping them), so that the packing buffers are not page-faulted in at every call.
fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[test]
#[ignore]
fn matmul_speed() {
    tune_allocator();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    // Config A: 4 layers, d = 256, vocabulary 8192, 16 × 128 = 2048 rows.
    let (bt, d, vocab, layers) = match std::env::var("KB_HEAD") {
        Ok(v) => {
            let x: Vec<usize> = v.split(',').map(|t| t.parse().expect("KB_HEAD=ROWS,D,VOCAB")).collect();
            (x[0], x[1], x[2], 1)
        }
        Err(_) => (2048, 256, 8192, 4),
    };
    let linears = [
        ("qkv", 3 * d, d, layers),
        ("proj", d, d, layers),
        ("fc", 4 * d, d, layers),
        ("fcp", d, 4 * d, layers),
        ("head", vocab, d, 1),
    ];
    let big = bt * vocab;
    let fill = |n: usize, s: u32| {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect::<Vec<f32>>()
    };
    let (inp, dout, w) = (fill(bt * 4 * d, 1), fill(big, 2), fill(vocab * d, 3));
    let mut products = Vec::new();
    for (name, oc, ic, per_step) in linears {
        let (inp_rows, dout_rows) = (Mat::row_major(inp.as_ptr(), ic), Mat::row_major(dout.as_ptr(), oc));
        let product = |name: String, (m, n, k), lhs, rhs, accumulate, per_step, via_lhs| Product {
            name,
            m,
            n,
            k,
            lhs,
            rhs,
            accumulate,
            per_step,
            via_lhs,
        };
        // forward: out (bt × oc) = inp (bt × ic) · Wᵀ
        let (name_f, wt) = (format!("{name} fwd {bt}×{ic}·{ic}×{oc}"), Mat::transposed(w.as_ptr(), ic));
        products.push(product(name_f, (bt, oc, ic), inp_rows, wt, false, per_step, false));
        // dinp (bt × ic) = dout (bt × oc) · W (oc × ic)
        let (name_d, w_rows) = (format!("{name} dinp {bt}×{oc}·{oc}×{ic}"), Mat::row_major(w.as_ptr(), ic));
        products.push(product(name_d, (bt, ic, oc), dout_rows, w_rows, false, per_step, false));
        // dW (oc × ic) += doutᵀ (oc × bt) · inp (bt × ic): as the engine runs it (through Lhs),
        // and through `matmul` on the transposed view (not counted in the step).
        for via_lhs in [true, false] {
            let name_w = format!("{name} dW{} {oc}×{bt}·{bt}×{ic}", if via_lhs { "" } else { " (matmul)" });
            let dout_t = Mat::transposed(dout.as_ptr(), oc);
            let steps = if via_lhs { per_step } else { 0 };
            products.push(product(name_w, (oc, ic, bt), dout_t, inp_rows, true, steps, via_lhs));
        }
    }
    let mut dst = vec![0f32; big];
    let mut paths = Vec::new();
    for (value, precision) in super::tests::CAPPED {
        let k = Kernels::parse(value).unwrap();
        let present = match precision {
            Precision::F32 => value != "avx512" || k.fp32() == Fp32Kernel::Avx512,
            Precision::Bf16 => k.bf16().is_some() && !paths.contains(&(k, precision)),
        };
        if present {
            paths.push((k, precision));
        } else {
            eprintln!("skipped: {precision:?} with {value}: not on this CPU ({})", k.describe());
        }
    }
    let reps = reps();
    println!("matmul speed, best of {reps}: 2 threads (wall time) and 1 thread (its CPU time) (GFLOP/s):");
    for (kernels, precision) in paths {
        let label = match precision {
            Precision::F32 => format!("fp32 {:?}", kernels.fp32()),
            Precision::Bf16 => format!("bf16 {:?}", kernels.bf16().unwrap()),
        };
        if std::env::var("KERNELS_BENCH_ONLY").is_ok_and(|only| !label.contains(&only)) {
            continue;
        }
        let selected: Vec<&Product> = products
            .iter()
            .filter(|p| std::env::var("KERNELS_BENCH_SHAPE").is_ok_and(|only| !p.name.contains(&only)).not())
            .collect();
        let dst = dst.as_mut_ptr() as usize;
        let time = |p: &Product, pool: &rayon::ThreadPool, cpu: bool| {
            let go = || {
                // SAFETY: the buffers hold every operand at these shapes; dst is separate.
                unsafe {
                    let dst = dst as *mut f32;
                    if p.via_lhs {
                        let lhs = Lhs::new(
                            kernels,
                            precision,
                            Mat::row_major(p.lhs.ptr, p.lhs.col),
                            p.k,
                            p.m,
                            true,
                        );
                        let rhs = Rhs::new(kernels, precision, p.rhs, p.k, p.n, true);
                        lhs.matmul(true, &rhs, dst, p.n, p.accumulate, 1.0, None, true);
                    } else {
                        matmul(
                            kernels,
                            precision,
                            p.m,
                            p.n,
                            p.k,
                            dst,
                            p.n,
                            p.accumulate,
                            p.lhs,
                            p.rhs,
                            1.0,
                            true,
                        )
                    }
                }
            };
            pool.install(|| if cpu { best_cpu(reps, go) } else { best(reps, go) })
        };
        // All the 2-thread timings, then all the 1-thread ones: the idle threads of one pool spin
        // for a while after each product, which would disturb the other pool's timing.
        let two: Vec<f64> = selected.iter().map(|p| time(p, &pool, false)).collect();
        let single: Vec<f64> = selected.iter().map(|p| time(p, &one, true)).collect();
        let (mut flops, mut secs, mut secs1) = (0f64, 0f64, 0f64);
        for ((p, &t), &t1) in selected.iter().zip(&two).zip(&single) {
            let f = 2.0 * (p.m * p.n * p.k) as f64;
            println!(
                "  {label:<16} {:<32} 2 threads {:>7.1}  1 thread {:>7.1}  ({:.3} ms)",
                p.name,
                f / t / 1e9,
                f / t1 / 1e9,
                t * 1e3
            );
            flops += f * p.per_step as f64;
            secs += t * p.per_step as f64;
            secs1 += t1 * p.per_step as f64;
        }
        println!(
            "  {label:<16} {:<32} 2 threads {:>7.1}  1 thread {:>7.1}  ({:.1} ms per step)",
            "STEP (weighted)",
            flops / secs / 1e9,
            flops / secs1 / 1e9,
            secs * 1e3
        );
    }
}

/// The panel product fast.rs uses today (`panel_matmul`: panels of 16 outputs, 6 rows per
/// register block, left to the compiler's auto-vectorisation), copied here as the baseline.
mod baseline {
    use rayon::prelude::*;

    const PANEL: usize = 16;

    pub struct Panels {
        data: Vec<f32>,
        ic: usize,
        oc: usize,
    }

    impl Panels {
        pub fn new(w: &[f32], oc: usize, ic: usize) -> Self {
            let mut data = vec![0f32; oc.div_ceil(PANEL) * ic * PANEL];
            for (j, row) in w.chunks(ic).enumerate() {
                let (p, jj) = (j / PANEL, j % PANEL);
                for (k, &x) in row.iter().enumerate() {
                    data[(p * ic + k) * PANEL + jj] = x;
                }
            }
            Self { data, ic, oc }
        }
    }

    pub fn panel_matmul(out: &mut [f32], inp: &[f32], w: &Panels, n_rows: usize) {
        let (ic, oc) = (w.ic, w.oc);
        let n_panels = oc.div_ceil(PANEL);
        let threads = rayon::current_num_threads().clamp(1, n_panels.max(1));
        let out_p = out.as_mut_ptr() as usize;
        (0..threads).into_par_iter().for_each(|th| {
            for p in th * n_panels / threads..(th + 1) * n_panels / threads {
                let panel = &w.data[p * ic * PANEL..(p + 1) * ic * PANEL];
                let (j0, cols) = (p * PANEL, PANEL.min(oc - p * PANEL));
                let mut r0 = 0;
                while r0 < n_rows {
                    let rows = 6.min(n_rows - r0);
                    let acc = match rows {
                        6 => block::<6>(inp, r0, ic, panel),
                        5 => block::<5>(inp, r0, ic, panel),
                        4 => block::<4>(inp, r0, ic, panel),
                        3 => block::<3>(inp, r0, ic, panel),
                        2 => block::<2>(inp, r0, ic, panel),
                        _ => block::<1>(inp, r0, ic, panel),
                    };
                    for (i, a) in acc.iter().take(rows).enumerate() {
                        // SAFETY: this thread's panels own these columns of row r0 + i.
                        let o = unsafe {
                            std::slice::from_raw_parts_mut((out_p as *mut f32).add((r0 + i) * oc + j0), cols)
                        };
                        o.copy_from_slice(&a[..cols]);
                    }
                    r0 += rows;
                }
            }
        });
    }

    #[inline(always)]
    fn block<const R: usize>(inp: &[f32], r0: usize, ic: usize, panel: &[f32]) -> [[f32; PANEL]; 6] {
        let mut acc = [[0f32; PANEL]; R];
        let x: [&[f32]; R] = std::array::from_fn(|i| &inp[(r0 + i) * ic..(r0 + i + 1) * ic]);
        for (k, wk) in panel.chunks_exact(PANEL).enumerate() {
            for i in 0..R {
                let xv = x[i][k];
                for j in 0..PANEL {
                    acc[i][j] += xv * wk[j];
                }
            }
        }
        let mut out = [[0f32; PANEL]; 6];
        out[..R].copy_from_slice(&acc);
        out
    }
}

#[test]
#[ignore]
fn packed_speed() {
    tune_allocator();
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let reps = reps() * 4;
    println!("packed few-row products, 2 threads, best of {reps}:");
    for (out, inp) in [(8192, 256), (1024, 256), (768, 256), (256, 1024)] {
        let w: Vec<f32> = (0..out * inp).map(|i| (i % 97) as f32 / 97.0 - 0.5).collect();
        let bias: Vec<f32> = (0..out).map(|i| i as f32 * 1e-3).collect();
        for rows in [1, 8, 64, 256] {
            let x: Vec<f32> = (0..rows * inp).map(|i| (i % 89) as f32 / 89.0 - 0.5).collect();
            let mut y = vec![0f32; rows * out];
            let flops = 2.0 * (rows * out * inp) as f64;
            let report = |label: &str, bytes: usize, t: f64| {
                println!(
                    "  {out:>5}×{inp:<5} {rows:>3} rows  {label:<22} {:>7.1} µs  {:>6.1} GB/s of weights  {:>6.1} GFLOP/s",
                    t * 1e6,
                    bytes as f64 / t / 1e9,
                    flops / t / 1e9
                );
            };
            let panels = baseline::Panels::new(&w, out, inp);
            let t = pool.install(|| best(reps, || baseline::panel_matmul(&mut y, &x, &panels, rows)));
            report("fast.rs panel_matmul", out * inp * 4, t);
            for (value, precision) in [
                ("avx2", Precision::F32),
                ("auto", Precision::F32),
                ("avx512", Precision::Bf16),
                ("auto", Precision::Bf16),
            ] {
                let kernels = Kernels::parse(value).unwrap();
                let label = match precision {
                    Precision::F32 => format!("f32 {:?}", kernels.fp32()),
                    Precision::Bf16 => match kernels.bf16() {
                        Some(Bf16Kernel::Amx) if rows < super::packed::AMX_MIN_ROWS => {
                            "bf16 Avx512Bf16 (few rows)".to_string()
                        }
                        Some(b) => format!("bf16 {b:?}"),
                        None => continue,
                    },
                };
                let packed = PackedWeights::new(kernels, &w, out, inp, precision);
                let bytes = match precision {
                    Precision::F32 => out * inp * 4,
                    Precision::Bf16 => out * inp * 2,
                };
                let t = pool.install(|| best(reps, || packed_matmul(&mut y, &x, &packed, Some(&bias), rows)));
                report(&label, bytes, t);
            }
        }
    }
}

/// The bf16 kernels alone on operands packed beforehand, against packing and the whole
/// product, 1 thread (its CPU time): where a bf16 product's time goes.
#[test]
#[ignore]
fn bf16_compute_only() {
    use super::bf16::{gemm_packed, Epilogue, Out, PackedA, PackedB, Schedule, SharedPtr};
    tune_allocator();
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let reps = reps();
    println!("bf16 products, 1 thread (CPU time), best of {reps}:");
    for (m, n, k) in [(2048, 768, 256), (2048, 256, 1024), (256, 256, 2048), (2048, 8192, 256)] {
        let a: Vec<f32> = (0..m * k).map(|i| (i % 91) as f32 / 91.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| (i % 83) as f32 / 83.0 - 0.5).collect();
        let (lhs, rhs) = (Mat::row_major(a.as_ptr(), k), Mat::row_major(b.as_ptr(), n));
        let mut dst = vec![0f32; m * n];
        let d = SharedPtr(dst.as_mut_ptr());
        for value in ["avx512", "auto"] {
            let kernels = Kernels::parse(value).unwrap();
            let Some(kind) = kernels.bf16() else { continue };
            // SAFETY: lhs is m × k and rhs k × n, row-major in `a` and `b`; the CPU has AVX512_BF16.
            let pack =
                || unsafe { (PackedA::new(lhs, m, k, true, false), PackedB::new(rhs, k, n, true, false)) };
            let (pa, pb) = pack();
            let out = Out {
                dst: d,
                dst_row: n,
                e: Epilogue { scale: 1.0, accumulate: false, bias: std::ptr::null() },
            };
            let f = 2.0 * (m * n * k) as f64;
            // SAFETY: pa and pb are packed for the same k; dst is m × n.
            let compute =
                || unsafe { gemm_packed(kind, &pa, &pb, out, Schedule::Blocks { parallel: false }) };
            // SAFETY: as above.
            let whole = || unsafe {
                matmul(kernels, Precision::Bf16, m, n, k, d.get(), n, false, lhs, rhs, 1.0, true)
            };
            let t = one.install(|| best_cpu(reps, compute));
            let tp = one.install(|| best_cpu(reps, || drop(std::hint::black_box(pack()))));
            let tf = one.install(|| best_cpu(reps, whole));
            println!(
                "  {kind:<10?} {m}×{k}·{k}×{n}: kernels {:6.1} GFLOP/s ({:.3} ms), packing {:.3} ms, whole {:6.1} GFLOP/s ({:.3} ms)",
                f / t / 1e9,
                t * 1e3,
                tp * 1e3,
                f / tf / 1e9,
                tf * 1e3
            );
        }
    }
}

/// Packing speed of A (row-major and transposed) and B, 1 thread (its CPU time).
#[test]
#[ignore]
fn bf16_packing_speed() {
    use super::bf16::{pack_both, PackedA, PackedB};
    tune_allocator();
    if Kernels::detect().bf16().is_none() {
        eprintln!("skipped: bf16_packing_speed: no bf16 kernel");
        return;
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let (r, c) = (8192, 2048);
    let x: Vec<f32> = (0..r * c).map(|i| (i % 91) as f32 / 91.0 - 0.5).collect();
    let reps = reps();
    let gb = |t: f64| (r * c * 4) as f64 / t / 1e9;
    let (rows, cols) = (Mat::row_major(x.as_ptr(), c), Mat::transposed(x.as_ptr(), r));
    // SAFETY (every entry): x holds r × c floats, read row-major or transposed; the CPU has
    // AVX512_BF16.
    let packs: [(&str, &(dyn Fn() + Sync)); 5] = [
        ("pack A row-major", &|| {
            drop(std::hint::black_box(unsafe { PackedA::new(rows, r, c, true, false) }))
        }),
        ("pack A transposed", &|| {
            drop(std::hint::black_box(unsafe { PackedA::new(cols, r, c, true, false) }))
        }),
        ("pack B row-major", &|| {
            drop(std::hint::black_box(unsafe { PackedB::new(rows, r, c, true, false) }))
        }),
        ("pack B transposed", &|| {
            drop(std::hint::black_box(unsafe { PackedB::new(cols, r, c, true, false) }))
        }),
        // Both layouts of a row-major M at once: M as A, Mᵀ as A (B's layout of M).
        ("pack A and Aᵀ of row-major", &|| {
            drop(std::hint::black_box(unsafe { pack_both(rows, r, c, false) }))
        }),
    ];
    for (what, pack) in packs {
        let t = one.install(|| best_cpu(reps, pack));
        println!("  {what} {r}×{c}: {:.2} ms, {:.1} GB/s of f32", t * 1e3, gb(t));
    }
}

/// Not a speed: how the fp32 product (the gemm crate on this CPU) sums over k. For each shape,
/// how many outputs equal one `mul_add` chain in k order exactly: all of them while k fits in
/// gemm's block of k, which it sizes from the caches it detects; beyond it gemm adds the blocks'
/// partial sums. A hand-written kernel keeps training's bytes only where this says "all".
#[test]
#[ignore]
fn gemm_sum_order() {
    let kernels = Kernels::detect();
    println!("fp32 products on {}: outputs equal to one FMA chain in k order", kernels.describe());
    let fill = |n: usize, s: u32| {
        (0..n)
            .map(|i| {
                ((i as u32).wrapping_mul(2654435761).wrapping_add(s) >> 8) as f32 / (1 << 24) as f32 - 0.5
            })
            .collect::<Vec<f32>>()
    };
    for (m, n, k) in [
        (64, 96, 128),
        (64, 96, 256),
        (130, 70, 300),
        (64, 96, 512),
        (64, 96, 768),
        (64, 96, 1024),
        (40, 50, 2048),
    ] {
        let (a, b) = (fill(m * k, 1), fill(k * n, 2));
        let mut d = vec![0f32; m * n];
        // SAFETY: a is m × k and b k × n, row-major; d is m × n.
        unsafe {
            let (lhs, rhs) = (Mat::row_major(a.as_ptr(), k), Mat::row_major(b.as_ptr(), n));
            matmul(kernels, Precision::F32, m, n, k, d.as_mut_ptr(), n, false, lhs, rhs, 1.0, true)
        };
        let same = (0..m * n)
            .filter(|&o| {
                let (i, j) = (o / n, o % n);
                let chain = (0..k).fold(0f32, |c, p| a[i * k + p].mul_add(b[p * n + j], c));
                chain.to_bits() == d[o].to_bits()
            })
            .count();
        let all = if same == m * n { "all" } else { "not all" };
        println!("  {m:>4}×{k:<5}·{k:>5}×{n:<4} {same:>6} of {:<6} ({all})", m * n);
    }
}

/// The ceiling the kernels are measured against: one core's rate for the two instructions they
/// are built on: `vfmadd231ps` on 256-bit registers (fp32: gemm's AVX2 microkernels) and on 512-bit
/// ones (its AVX-512 microkernels), and `vdpbf16ps` on 512-bit ones (bf16); independent
/// accumulators (16, or 12 for AVX2's 16 registers), no memory operands, one thread, thread CPU
/// time, best of `reps`. Skips each with the reason where the CPU lacks it.
#[cfg(target_arch = "x86_64")]
#[test]
#[ignore]
fn peak_rates() {
    use std::arch::x86_64::*;
    const ROUNDS: usize = 5_000_000;
    // ROUNDS rounds of `step` on every accumulator, an empty instruction string between rounds so
    // that the compiler cannot merge them.
    macro_rules! rounds {
        ($acc:ident, $x:ident => $step:expr) => {
            for _ in 0..ROUNDS {
                for $x in $acc.iter_mut() {
                    *$x = $step;
                }
                // SAFETY: no instructions; it only stops the compiler merging rounds.
                unsafe { std::arch::asm!("", options(nomem, nostack, preserves_flags)) };
            }
        };
    }
    #[target_feature(enable = "avx2,fma")]
    fn fma256() -> f32 {
        // 12 accumulators: with a and b, 14 of AVX2's 16 registers (still more chains than the
        // FMA units' latency needs).
        let (a, b) = (_mm256_set1_ps(0.999_999), _mm256_set1_ps(1e-7));
        let mut acc = [_mm256_set1_ps(1.0); 12];
        rounds!(acc, x => _mm256_fmadd_ps(*x, a, b));
        // SAFETY: a 256-bit vector is 8 floats.
        acc.iter().map(|&x| unsafe { std::mem::transmute::<__m256, [f32; 8]>(x) }.iter().sum::<f32>()).sum()
    }
    #[target_feature(enable = "avx512f")]
    fn fma512() -> f32 {
        let (a, b) = (_mm512_set1_ps(0.999_999), _mm512_set1_ps(1e-7));
        let mut acc = [_mm512_set1_ps(1.0); 16];
        rounds!(acc, x => _mm512_fmadd_ps(*x, a, b));
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
    #[target_feature(enable = "avx512f,avx512bf16")]
    fn dp() -> f32 {
        // SAFETY (both transmutes): a vector of 32 bf16 is 64 bytes, any bits valid.
        let a: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3F80_3F80)) };
        let b: __m512bh = unsafe { std::mem::transmute(_mm512_set1_epi32(0x3380_3380)) };
        let mut acc = [_mm512_setzero_ps(); 16];
        rounds!(acc, x => _mm512_dpbf16_ps(*x, a, b));
        acc.iter().map(|&x| _mm512_reduce_add_ps(x)).sum()
    }
    let (avx2, avx512) = (
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma"),
        std::arch::is_x86_feature_detected!("avx512f"),
    );
    let bf16 = avx512 && std::arch::is_x86_feature_detected!("avx512bf16");
    type Loop = unsafe fn() -> f32;
    // (instruction, whether the CPU has it, what it lacks otherwise, flops per round, the loop)
    let paths: [(&str, bool, &str, f64, Loop); 3] = [
        ("vfmadd231ps ymm", avx2, "AVX2+FMA", 12.0 * 8.0 * 2.0, fma256),
        ("vfmadd231ps zmm", avx512, "AVX-512F", 16.0 * 16.0 * 2.0, fma512),
        ("vdpbf16ps zmm", bf16, "AVX512_BF16", 16.0 * 32.0 * 2.0, dp),
    ];
    let reps = reps();
    println!("peak rates, one core, best of {reps} (GFLOP/s):");
    for (name, present, lacks, flops, f) in paths {
        if !present {
            eprintln!("skipped: {name}: this CPU has no {lacks}");
            continue;
        }
        // SAFETY: the CPU has the loop's target features (checked just above).
        let secs = best_cpu(reps, || {
            std::hint::black_box(unsafe { f() });
        });
        println!("  {name:<16} {:>7.1}", flops * ROUNDS as f64 / secs / 1e9);
    }
}

/// The `vdpbf16ps` kernel on the weight-gradient products' shapes (d W = d outᵀ · inp, k = the
/// batch's rows) with A in the pair layout the step uses (`tiled`, from [`super::bf16::pack_both`])
/// against A row-major: operands packed beforehand and in cache, best of 7; 1 thread (its CPU
/// time) and 2 threads (wall time). Skipped with a reason without AVX512_BF16.
#[test]
#[ignore]
fn bf16_tiled_a_speed() {
    use super::bf16::{gemm_packed, pack_both, Epilogue, Out, PackedA, PackedB, Schedule, SharedPtr};
    if Kernels::parse("auto").unwrap().bf16() != Some(Bf16Kernel::Avx512Bf16) {
        eprintln!("skipped: bf16_tiled_a_speed needs the vdpbf16ps kernel (AVX512_BF16)");
        return;
    }
    let one = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
    let two = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    println!("d W products on vdpbf16ps, operands packed and in cache (GFLOP/s):");
    for (oc, ic, rows) in
        [(768, 256, 2048), (256, 256, 2048), (1024, 256, 2048), (256, 1024, 2048), (8192, 256, 1024)]
    {
        let dout: Vec<f32> = (0..rows * oc).map(|i| (i % 91) as f32 / 91.0 - 0.5).collect();
        let inp: Vec<f32> = (0..rows * ic).map(|i| (i % 83) as f32 / 83.0 - 0.5).collect();
        let mut dw = vec![0f32; oc * ic];
        let out = Out {
            dst: SharedPtr(dw.as_mut_ptr()),
            dst_row: ic,
            e: Epilogue { scale: 1.0, accumulate: true, bias: std::ptr::null() },
        };
        // SAFETY: dout is rows × oc and inp rows × ic, row-major; the CPU has AVX512_BF16 (checked).
        let (tiled, rows_a, b) = unsafe {
            (
                pack_both(Mat::row_major(dout.as_ptr(), oc), rows, oc, false).1,
                PackedA::new(Mat::transposed(dout.as_ptr(), oc), oc, rows, true, false),
                PackedB::new(Mat::row_major(inp.as_ptr(), ic), rows, ic, true, false),
            )
        };
        let flop = 2.0 * (oc * ic * rows) as f64;
        for (layout, a) in [("tiled", &tiled), ("row-major", &rows_a)] {
            // SAFETY: a and b are packed for the same k (rows); dw is oc × ic.
            let run = |parallel| unsafe {
                gemm_packed(Bf16Kernel::Avx512Bf16, a, &b, out, Schedule::Blocks { parallel })
            };
            let t1 = one.install(|| best_cpu(7, || run(false)));
            let t2 = two.install(|| best(7, || run(true)));
            println!(
                "  {oc}×{rows}·{rows}×{ic} A {layout:<9}  1 thread {:6.1}  2 threads {:6.1}",
                flop / t1 / 1e9,
                flop / t2 / 1e9
            );
        }
    }
}
