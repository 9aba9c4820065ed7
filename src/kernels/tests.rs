//! Tests of every kernel path this CPU has against plain references (a path the CPU lacks prints
//! `skipped: ...` and returns).
//!
//! Tolerances. u = 2⁻²⁴ is the unit roundoff of f32; Σ|ab| = Σₖ |aᵢₖ·bₖⱼ| for one output.
//! - fp32 against an f64 reference: each f32 sum of k products is formed with at most k roundings
//!   along any path (FMAs or adds, in any order or blocking), so |ŝ − s| ≤ γₖ·Σ|ab| with
//!   γₖ = k·u/(1 − k·u); scaling and adding dst round twice more. Bound: (k + 4)·u·(|scale|·Σ|ab|
//!   + |dst|), slightly above γ for these k.
//! - bf16 kernels against [`matmul_bf16_reference`]: both round the inputs to bf16 identically and a
//!   product of two bf16 (8-bit significands) is exact in f32, so both sum the same k numbers pᵢ and
//!   differ only in the order of the f32 sum (and in the kernels' flushing of denormal products,
//!   below 2⁻¹²⁶ each). Each is within γₖ·Σ|p| of the exact Σp, so they are within 2γₖ·Σ|p| ≈
//!   k·2⁻²³·Σ|p| of each other; the scale and the dst addition add at most 2u(|scale|·Σ|p| + |dst|)
//!   on each side. Bound: (k + 2)·2⁻²³·(|scale|·Σ|p| + |dst|)·(1 + 2⁻¹⁰) + k·2⁻¹²⁶.
//! - bf16 kernels against the exact (f64) fp32 product: rounding a and b to bf16 changes each by a
//!   relative 2⁻⁹ at most, so each product by (2·2⁻⁹ + 2⁻¹⁸) = 2⁻⁸(1 + 2⁻¹⁰); with the f32 sum's
//!   k·u this stays below 2·2⁻⁸·Σ|ab| for k < 2¹⁵. The test also checks that the difference is
//!   not far below what rounding predicts (so the inputs really were rounded).
//! - Small integers (multiples of 1/8 below 4 in magnitude) are exact in bf16 and every partial sum
//!   of their products is exact in f32, so on such inputs every path must match exactly.

use super::bf16::{from_bf16, to_bf16};
use super::*;

/// xorshift64*: reproducible inputs without a dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in [-1, 1).
    fn f32(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// A multiple of 1/8 in [-4, 4).
    fn small(&mut self) -> f32 {
        ((self.next() >> 40) % 64) as f32 / 8.0 - 4.0
    }
}

/// How an operand is stored.
#[derive(Clone, Copy, Debug)]
enum Layout {
    /// Rows of `cols + 3` elements.
    RowMajor,
    /// Columns of `rows + 5` elements.
    Transposed,
    /// Neither stride 1: (i, j) at i·(2·cols + 3) + 2j.
    Strided,
}

/// A matrix in its own buffer, with the [`Mat`] that reads it.
struct Operand {
    buf: Vec<f32>,
    rows: usize,
    cols: usize,
    row: usize,
    col: usize,
}

impl Operand {
    fn new(rows: usize, cols: usize, layout: Layout, gen: &mut dyn FnMut() -> f32) -> Operand {
        let (row, col) = match layout {
            Layout::RowMajor => (cols + 3, 1),
            Layout::Transposed => (1, rows + 5),
            Layout::Strided => (2 * cols + 3, 2),
        };
        let len = if rows == 0 || cols == 0 { 1 } else { (rows - 1) * row + (cols - 1) * col + 1 };
        // Padding is NaN: a kernel that reads it poisons its output.
        let mut buf = vec![f32::NAN; len];
        for i in 0..rows {
            for j in 0..cols {
                buf[i * row + j * col] = gen();
            }
        }
        Operand { buf, rows, cols, row, col }
    }

    fn at(&self, i: usize, j: usize) -> f32 {
        assert!(i < self.rows && j < self.cols);
        self.buf[i * self.row + j * self.col]
    }

    fn mat(&self) -> Mat {
        Mat { ptr: self.buf.as_ptr(), row: self.row, col: self.col }
    }
}

/// One product to check.
#[derive(Clone, Copy, Debug)]
struct Case {
    m: usize,
    n: usize,
    k: usize,
    lhs: Layout,
    rhs: Layout,
    accumulate: bool,
    scale: f32,
}

/// Awkward shapes (nothing a multiple of a block), each with every layout pair in turn.
fn cases() -> Vec<Case> {
    let shapes = [
        (1, 1, 1),
        (1, 7, 17),
        (7, 1, 33),
        (17, 33, 7),
        (33, 17, 65),
        (65, 130, 33),
        (130, 65, 300),
        (300, 33, 130),
        (33, 300, 17),
        (7, 130, 300),
        (300, 300, 65),
        (65, 7, 1),
        (40, 50, 1100),
        (3, 5, 0),
    ];
    let layouts = [
        (Layout::RowMajor, Layout::Transposed),
        (Layout::RowMajor, Layout::RowMajor),
        (Layout::Transposed, Layout::RowMajor),
        (Layout::Transposed, Layout::Transposed),
        (Layout::Strided, Layout::Strided),
    ];
    let mut out = Vec::new();
    for (s, &(m, n, k)) in shapes.iter().enumerate() {
        for (l, &(lhs, rhs)) in layouts.iter().enumerate() {
            let i = s * layouts.len() + l;
            let scale = [1.0, 0.375, -2.0][i % 3];
            out.push(Case { m, n, k, lhs, rhs, accumulate: i % 2 == 1, scale });
        }
    }
    out
}

/// The operands and initial dst of a case (dst rows n + 2 apart, the padding NaN-free sentinels).
struct Inputs {
    a: Operand,
    b: Operand,
    dst: Vec<f32>,
    dst_row: usize,
}

fn inputs(c: &Case, rng: &mut Rng, small: bool) -> Inputs {
    let mut gen = || if small { rng.small() } else { rng.f32() };
    let a = Operand::new(c.m, c.k, c.lhs, &mut gen);
    let b = Operand::new(c.k, c.n, c.rhs, &mut gen);
    let dst_row = c.n + 2;
    let dst = (0..c.m * dst_row).map(|x| if x % dst_row < c.n { gen() } else { 1234.5 }).collect();
    Inputs { a, b, dst, dst_row }
}

/// Runs `matmul` on a copy of the case's dst.
fn run(kernels: Kernels, precision: Precision, c: &Case, x: &Inputs, parallel: bool) -> Vec<f32> {
    let shape = (c.m, c.n, c.k);
    // SAFETY: the operands hold m × k and k × n at their strides; dst holds m rows of dst_row ≥ n.
    unsafe {
        product(
            kernels,
            precision,
            shape,
            (&x.dst, x.dst_row, c.accumulate),
            x.a.mat(),
            x.b.mat(),
            c.scale,
            parallel,
        )
    }
}

/// `matmul` of (m, n, k) on a copy of `dst` (rows `dst_row` apart; added to when accumulating).
///
/// # Safety
/// As [`matmul`], dst holding m rows of dst_row ≥ n.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    kernels: Kernels,
    precision: Precision,
    (m, n, k): (usize, usize, usize),
    (dst, dst_row, accumulate): (&[f32], usize, bool),
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) -> Vec<f32> {
    assert!(dst.len() >= m * dst_row);
    let mut dst = dst.to_vec();
    // SAFETY: the caller's contract; dst is a copy of m rows of dst_row.
    unsafe {
        matmul(kernels, precision, m, n, k, dst.as_mut_ptr(), dst_row, accumulate, lhs, rhs, scale, parallel)
    };
    dst
}

/// For each (i, j): the exact (f64) value with the given input rounding, Σ|ab| of the rounded
/// inputs, and |dst| (0 when not accumulating).
fn exact(c: &Case, x: &Inputs, round: fn(f32) -> f32) -> Vec<(f64, f64, f64)> {
    let mut out = Vec::with_capacity(c.m * c.n);
    for i in 0..c.m {
        for j in 0..c.n {
            let (mut s, mut abs) = (0f64, 0f64);
            for p in 0..c.k {
                let prod = round(x.a.at(i, p)) as f64 * round(x.b.at(p, j)) as f64;
                s += prod;
                abs += prod.abs();
            }
            let d = if c.accumulate { x.dst[i * x.dst_row + j] as f64 } else { 0.0 };
            out.push((d + c.scale as f64 * s, abs, d.abs()));
        }
    }
    out
}

/// Checks `got` against per-element bounds; the padding of dst must be untouched.
fn check(what: &str, c: &Case, x: &Inputs, got: &[f32], want: impl Fn(usize, usize) -> (f64, f64)) {
    let mut worst = 0f64;
    for i in 0..c.m {
        for j in 0..x.dst_row {
            let g = got[i * x.dst_row + j];
            if j >= c.n {
                assert_eq!(g, 1234.5, "{what}: {c:?} wrote dst padding at ({i}, {j})");
                continue;
            }
            let (w, tol) = want(i, j);
            let err = (g as f64 - w).abs();
            assert!(err <= tol, "{what}: {c:?} at ({i}, {j}): got {g}, want {w} ± {tol:e} (off by {err:e})");
            worst = worst.max(err / tol.max(f64::MIN_POSITIVE));
        }
    }
    assert!(worst.is_finite(), "{what}: {c:?}: non-finite error");
}

fn identity(x: f32) -> f32 {
    x
}

fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

const U: f64 = 1.0 / (1u64 << 24) as f64;

/// fp32 path against the f64 product, for every case.
fn check_fp32(kernels: Kernels) {
    let mut rng = Rng(0x05EE_DF32);
    for c in cases() {
        let x = inputs(&c, &mut rng, false);
        let e = exact(&c, &x, identity);
        let got = run(kernels, Precision::F32, &c, &x, true);
        let what = format!("fp32 {}", kernels.describe());
        check(&what, &c, &x, &got, |i, j| {
            let (w, abs, d) = e[i * c.n + j];
            (w, (c.k as f64 + 4.0) * U * (c.scale.abs() as f64 * abs + d) * 1.01 + 1e-30)
        });
    }
}

/// bf16 path against the bf16 reference and against the exact product, for every case.
fn check_bf16(kernels: Kernels) {
    let mut rng = Rng(0x5EED_BF16);
    let what = format!("bf16 {}", kernels.describe());
    let mut worst_ratio = 0f64;
    for c in cases() {
        let x = inputs(&c, &mut rng, false);
        let got = run(kernels, Precision::Bf16, &c, &x, true);
        // Against the scalar bf16 reference (same rounding, another summation order).
        let mut reference = x.dst.clone();
        // SAFETY: as in `run`.
        unsafe {
            matmul_bf16_reference(
                c.m,
                c.n,
                c.k,
                reference.as_mut_ptr(),
                x.dst_row,
                c.accumulate,
                x.a.mat(),
                x.b.mat(),
                c.scale,
            )
        };
        let rounded = exact(&c, &x, round_bf16);
        check(&(what.clone() + " vs reference"), &c, &x, &got, |i, j| {
            let (_, abs, d) = rounded[i * c.n + j];
            let tol = (c.k as f64 + 2.0) * 2.0 * U * (c.scale.abs() as f64 * abs + d) * (1.0 + 1.0 / 1024.0)
                + c.k as f64 * 2f64.powi(-126);
            (reference[i * x.dst_row + j] as f64, tol)
        });
        // Against the exact fp32-input product: the bf16 input rounding, and no more.
        let e = exact(&c, &x, identity);
        check(&(what.clone() + " vs exact"), &c, &x, &got, |i, j| {
            let (w, abs, d) = e[i * c.n + j];
            (w, 2.0 * 2f64.powi(-8) * c.scale.abs() as f64 * abs + 4.0 * U * d + 1e-30)
        });
        if c.k >= 65 {
            for i in 0..c.m {
                for j in 0..c.n {
                    let (w, abs, _) = e[i * c.n + j];
                    let r = (got[i * x.dst_row + j] as f64 - w).abs() / (c.scale.abs() as f64 * abs);
                    worst_ratio = worst_ratio.max(r);
                }
            }
        }
    }
    // Rounding k ≥ 65 random inputs to 8-bit significands moves some sum by well over 2⁻¹⁶ of Σ|ab|;
    // an fp32 product (inputs not rounded) would stay near 2⁻²⁴.
    eprintln!("{what}: worst |bf16 − exact| / Σ|ab| = {worst_ratio:.3e} (bound 2·2⁻⁸ = 7.8e-3)");
    assert!(worst_ratio > 2f64.powi(-16), "{what}: the inputs do not look rounded to bf16");
}

/// On small integers every path is exact.
fn check_exact(kernels: Kernels, precision: Precision) {
    let mut rng = Rng(0x5EED_0001);
    for c in cases().into_iter().filter(|c| c.k <= 300) {
        let x = inputs(&c, &mut rng, true);
        let got = run(kernels, precision, &c, &x, true);
        let e = exact(&c, &x, identity);
        check(&format!("exact {precision:?} {}", kernels.describe()), &c, &x, &got, |i, j| {
            (e[i * c.n + j].0, 0.0)
        });
    }
}

/// The kernels that give this fp32 path, or None after printing why the test is skipped.
fn fp32_path(test: &str, want: Fp32Kernel) -> Option<Kernels> {
    let (value, lacks) = match want {
        Fp32Kernel::Avx2 => ("avx2", "AVX2+FMA"),
        Fp32Kernel::Avx512 => ("avx512", "AVX-512F"),
        Fp32Kernel::Portable => return Some(Kernels::portable()),
    };
    let k = Kernels::parse(value).unwrap();
    if k.fp32() == want {
        Some(k)
    } else {
        eprintln!("skipped: {test}: this CPU has no {lacks}");
        None
    }
}

/// The kernels that give this bf16 path, or None after printing why the test is skipped.
fn bf16_path(test: &str, want: Bf16Kernel) -> Option<Kernels> {
    let (value, lacks) = match want {
        Bf16Kernel::Avx512Bf16 => ("avx512", "AVX512_BF16 (with AVX-512F/BW)"),
        Bf16Kernel::Amx => ("auto", "usable AMX-BF16 (CPUID, XCR0 and arch_prctl permission)"),
    };
    let k = Kernels::parse(value).unwrap();
    if k.bf16() == Some(want) {
        Some(k)
    } else {
        eprintln!("skipped: {test}: this CPU has no {lacks}");
        None
    }
}

#[test]
fn fp32_avx2() {
    if let Some(k) = fp32_path("fp32_avx2", Fp32Kernel::Avx2) {
        check_fp32(k);
        check_exact(k, Precision::F32);
    }
}

#[test]
fn fp32_avx512() {
    if let Some(k) = fp32_path("fp32_avx512", Fp32Kernel::Avx512) {
        check_fp32(k);
        check_exact(k, Precision::F32);
    }
}

#[test]
fn fp32_portable_and_bf16_emulated() {
    let k = Kernels::portable();
    check_fp32(k);
    check_exact(k, Precision::F32);
    check_bf16(k);
    check_exact(k, Precision::Bf16);
}

#[test]
fn bf16_avx512bf16() {
    if let Some(k) = bf16_path("bf16_avx512bf16", Bf16Kernel::Avx512Bf16) {
        check_bf16(k);
        check_exact(k, Precision::Bf16);
    }
}

#[test]
fn bf16_amx() {
    if let Some(k) = bf16_path("bf16_amx", Bf16Kernel::Amx) {
        check_bf16(k);
        check_exact(k, Precision::Bf16);
    }
}

#[test]
fn bf16_emulated_on_avx2() {
    // COLLAPSE_LAB_KERNELS=avx2: no bf16 kernel, so bf16 products run on the fp32 AVX2 kernel.
    if let Some(k) = fp32_path("bf16_emulated_on_avx2", Fp32Kernel::Avx2) {
        assert_eq!(k.bf16(), None);
        check_bf16(k);
    }
}

/// The kernel caps (`COLLAPSE_LAB_KERNELS` values) and precisions of the non-portable paths.
pub(super) const CAPPED: [(&str, Precision); 4] = [
    ("avx2", Precision::F32),
    ("avx512", Precision::F32),
    ("avx512", Precision::Bf16),
    ("auto", Precision::Bf16),
];

/// Every distinct (kernels, precision) this CPU runs: the portable ones, then each capped set.
fn every_path() -> Vec<(Kernels, Precision)> {
    let mut paths = vec![(Kernels::portable(), Precision::F32), (Kernels::portable(), Precision::Bf16)];
    for (value, precision) in CAPPED {
        let k = Kernels::parse(value).unwrap();
        if !paths.contains(&(k, precision)) {
            paths.push((k, precision));
        }
    }
    paths
}

/// `matmul_rhs` with a bias gives, bit for bit, what `matmul` then adding the bias to each row gives, on
/// every path this CPU has (the bf16 kernels add it on the way out; the others after), on every
/// case with scale 1 and no accumulation; dst's padding is untouched.
#[test]
fn bias_on_the_way_out_is_adding_it_after() {
    let mut rng = Rng(0xB1A5_0001);
    let paths = every_path();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    for c in cases() {
        let c = Case { accumulate: false, scale: 1.0, ..c };
        let x = inputs(&c, &mut rng, false);
        let bias: Vec<f32> = (0..c.n).map(|_| rng.f32()).collect();
        for &(kernels, precision) in &paths {
            let mut want = run(kernels, precision, &c, &x, true);
            for row in want.chunks_mut(x.dst_row).take(c.m) {
                for (o, b) in row.iter_mut().zip(&bias) {
                    *o += b;
                }
            }
            let mut got = x.dst.clone();
            // SAFETY: as in `run`; the bias holds n floats.
            unsafe {
                let rhs = Rhs::new(kernels, precision, x.b.mat(), c.k, c.n, true);
                matmul_rhs(c.m, got.as_mut_ptr(), x.dst_row, false, x.a.mat(), &rhs, 1.0, Some(&bias), true)
            };
            if c.m > 0 && c.n > 0 && c.k > 0 {
                assert_ne!(
                    bits(&got),
                    bits(&x.dst),
                    "{precision:?} {}: {c:?} wrote nothing",
                    kernels.describe()
                );
            }
            assert_eq!(bits(&got), bits(&want), "{precision:?} {}: {c:?}", kernels.describe());
        }
    }
    for (kernels, precision) in paths {
        eprintln!("bias on the way out: {precision:?} {}", kernels.describe());
    }
}

/// A left operand prepared once ([`Lhs`]) gives, bit for bit, what [`matmul`] gives with the
/// matrix and with its transposed view on the left, on every path this CPU has (on the
/// `vdpbf16ps` kernel in bf16 both come from one packing pass, Mᵀ in B's pair layout), for every
/// case whose left operand has contiguous rows, whether M is given or computed row by row
/// ([`Lhs::from_rows`]); dst's padding is untouched.
#[test]
fn lhs_packed_both_ways_gives_the_bits_of_matmul() {
    let mut rng = Rng(0x1B5_0002);
    let paths = every_path();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    // Plus an M of more than 512 rows: Mᵀ's k then runs over several of the kernels' chunks of k.
    let tall = Case {
        m: 1100,
        n: 33,
        k: 70,
        lhs: Layout::RowMajor,
        rhs: Layout::RowMajor,
        accumulate: true,
        scale: 0.5,
    };
    for c in cases().into_iter().filter(|c| matches!(c.lhs, Layout::RowMajor)).chain([tall]) {
        let x = inputs(&c, &mut rng, false);
        // Mᵀ (k × m) times a second right operand (m × n), into a k × n dst.
        let b2 = Operand::new(c.m, c.n, c.rhs, &mut || rng.f32());
        let dst2: Vec<f32> =
            (0..c.k * x.dst_row).map(|i| if i % x.dst_row < c.n { rng.f32() } else { 1234.5 }).collect();
        for &(kernels, precision) in &paths {
            let what = format!("{precision:?} {}: {c:?}", kernels.describe());
            // M · B and Mᵀ · B2 by `matmul` on M (given at `m_at`, rows `row` apart), and through
            // `lhs`, each on a copy of its dst.
            let plain = |m_at: *const f32, row: usize| {
                let (a, at) = (Mat::row_major(m_at, row), Mat::transposed(m_at, row));
                let (s, acc) = (c.scale, c.accumulate);
                // SAFETY: M is m × k at (row, 1), its transpose k × m at (1, row); the right
                // operands k × n and m × n; dst m (dst2 k) rows of dst_row ≥ n.
                unsafe {
                    let d = product(
                        kernels,
                        precision,
                        (c.m, c.n, c.k),
                        (&x.dst, x.dst_row, acc),
                        a,
                        x.b.mat(),
                        s,
                        true,
                    );
                    let d2 = product(
                        kernels,
                        precision,
                        (c.k, c.n, c.m),
                        (&dst2, x.dst_row, acc),
                        at,
                        b2.mat(),
                        s,
                        true,
                    );
                    (bits(&d), bits(&d2))
                }
            };
            let through = |lhs: &Lhs| {
                let (mut d, mut d2) = (x.dst.clone(), dst2.clone());
                // SAFETY: as in `plain`; M outlives `lhs` (the callers' buffers).
                unsafe {
                    let (rhs, rhs2) = (
                        Rhs::new(kernels, precision, x.b.mat(), c.k, c.n, true),
                        Rhs::new(kernels, precision, b2.mat(), c.m, c.n, true),
                    );
                    lhs.matmul(false, &rhs, d.as_mut_ptr(), x.dst_row, c.accumulate, c.scale, None, true);
                    lhs.matmul(true, &rhs2, d2.as_mut_ptr(), x.dst_row, c.accumulate, c.scale, None, true);
                }
                (bits(&d), bits(&d2))
            };
            // M given.
            // SAFETY: x.a holds m × k with rows x.a.row apart.
            let got = through(&unsafe { Lhs::new(kernels, precision, x.a.mat(), c.m, c.k, true) });
            let want = plain(x.a.buf.as_ptr(), x.a.row);
            if c.m > 0 && c.n > 0 && c.k > 0 {
                assert_ne!(got.0, bits(&x.dst), "{what} wrote nothing");
                assert_ne!(got.1, bits(&dst2), "{what} (transposed) wrote nothing");
            }
            assert_eq!(got.0, want.0, "{what}");
            assert_eq!(got.1, want.1, "{what} (transposed)");
            if c.m > 0 && c.n > 0 && c.k > 0 {
                // With a bias (the forward product's epilogue): as matmul_rhs gives it.
                let bias: Vec<f32> = (0..c.n).map(|j| j as f32 * 0.25 - 1.0).collect();
                let (mut got, mut want) = (x.dst.clone(), x.dst.clone());
                // SAFETY: as in `through`; the bias holds n floats.
                unsafe {
                    let rhs = Rhs::new(kernels, precision, x.b.mat(), c.k, c.n, true);
                    let lhs = Lhs::new(kernels, precision, x.a.mat(), c.m, c.k, true);
                    lhs.matmul(false, &rhs, got.as_mut_ptr(), x.dst_row, false, 1.0, Some(&bias), true);
                    matmul_rhs(
                        c.m,
                        want.as_mut_ptr(),
                        x.dst_row,
                        false,
                        x.a.mat(),
                        &rhs,
                        1.0,
                        Some(&bias),
                        true,
                    );
                }
                assert_eq!(bits(&got), bits(&want), "{what} (with a bias)");
                // M kept as the right operand of X · M (`Lhs::into_rhs`: the pair layout packed
                // with it), against matmul with M on the right; X = B2ᵀ (n × m), dst n × k.
                // SAFETY: x.a holds m × k; B2ᵀ is n × m through the transposed view of B2.
                let lhs = unsafe { Lhs::new(kernels, precision, x.a.mat(), c.m, c.k, true) };
                let b2m = b2.mat();
                let xt = Mat { ptr: b2m.ptr, row: b2m.col, col: b2m.row };
                let packs = precision == Precision::Bf16 && kernels.bf16() == Some(Bf16Kernel::Avx512Bf16);
                match lhs.into_rhs() {
                    Some(kept) => {
                        assert_eq!(kept.shape(), (c.m, c.k), "{what}: kept shape");
                        let zeros = vec![0f32; c.n * c.k];
                        let mut got = zeros.clone();
                        // SAFETY: X is n × m, the kept M m × k (packed), dst n × k.
                        let want = unsafe {
                            matmul_rhs(c.n, got.as_mut_ptr(), c.k, false, xt, &kept, 1.0, None, true);
                            product(
                                kernels,
                                precision,
                                (c.n, c.k, c.m),
                                (&zeros, c.k, false),
                                xt,
                                x.a.mat(),
                                1.0,
                                true,
                            )
                        };
                        assert_eq!(bits(&got), bits(&want), "{what} (M kept as a right operand)");
                    }
                    None => assert!(!packs, "{what}: packed both ways, but nothing kept"),
                }
            }
            // The same M computed row by row into a buffer of its own (`Lhs::from_rows`, which
            // packs each group of rows as it is done), against matmul on that buffer (its rows k
            // apart: the fp32 kernels' order of summing may depend on the strides).
            let (mut buf, mut outs) = (vec![f32::NAN; c.m * c.k], vec![f32::NAN; c.m]);
            let row = |i: usize, r: &mut [f32], o: &mut f32| {
                r.iter_mut().enumerate().for_each(|(p, v)| *v = x.a.at(i, p));
                *o = i as f32;
            };
            // SAFETY: buf is not written while the Lhs lives.
            let lhs = unsafe { Lhs::from_rows(kernels, precision, (c.m, c.k), &mut buf, &mut outs, row) };
            let got = through(&lhs);
            drop(lhs);
            if c.k > 0 {
                assert!(outs.iter().enumerate().all(|(i, &o)| o == i as f32), "{what}: from_rows outputs");
                let same =
                    buf.iter().enumerate().all(|(j, &v)| v.to_bits() == x.a.at(j / c.k, j % c.k).to_bits());
                assert!(same, "{what}: from_rows rows");
            }
            let want = plain(buf.as_ptr(), c.k);
            assert_eq!(got.0, want.0, "{what} (from_rows)");
            assert_eq!(got.1, want.1, "{what} (from_rows, transposed)");
        }
    }
    for (kernels, precision) in paths {
        eprintln!("lhs packed both ways: {precision:?} {}", kernels.describe());
    }
}

/// Same bytes from two calls, and from 1 and 2 threads, for every path present.
#[test]
fn deterministic() {
    let c = Case {
        m: 200,
        n: 300,
        k: 700,
        lhs: Layout::Transposed,
        rhs: Layout::RowMajor,
        accumulate: true,
        scale: 0.5,
    };
    let x = inputs(&c, &mut Rng(0x05EE_DD37), false);
    let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
    let (one, two) = (pool(1), pool(2));
    let paths = every_path();
    for (k, precision) in paths {
        let a = one.install(|| run(k, precision, &c, &x, true));
        let b = two.install(|| run(k, precision, &c, &x, true));
        let again = two.install(|| run(k, precision, &c, &x, true));
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(&a), bits(&b), "{precision:?} {}: 1 vs 2 threads", k.describe());
        assert_eq!(bits(&b), bits(&again), "{precision:?} {}: two calls", k.describe());
        eprintln!("deterministic: {precision:?} {}", k.describe());
    }
}

#[test]
fn env_var_parsing() {
    let best = Kernels::detect();
    assert_eq!(Kernels::parse("auto").unwrap(), best);
    assert_eq!(Kernels::parse("").unwrap(), best);
    let avx2 = Kernels::parse("avx2").unwrap();
    assert_eq!(avx2.bf16(), None);
    assert_ne!(avx2.fp32(), Fp32Kernel::Avx512);
    let avx512 = Kernels::parse("avx512").unwrap();
    assert_ne!(avx512.bf16(), Some(Bf16Kernel::Amx));
    assert_eq!(avx512.fp32(), best.fp32());
    for bad in ["AVX2", "sse", "amx", "avx2,avx512"] {
        let e = Kernels::parse(bad).unwrap_err();
        assert!(e.contains(ENV_VAR) && e.contains("auto, avx512, avx2") && !e.contains('\n'), "{e}");
    }
    // from_env reads the variable as it is now (unset in a plain test run: the best kernels).
    let now = std::env::var(ENV_VAR).ok();
    assert_eq!(Kernels::from_env().ok(), Kernels::parse(now.as_deref().unwrap_or("")).ok());
    eprintln!(
        "kernels: auto = {}, avx512 = {}, avx2 = {}",
        best.describe(),
        avx512.describe(),
        avx2.describe()
    );
    assert!(best.describe().starts_with("fp32 "));
}

#[test]
fn bf16_rounding() {
    let cases: [(u32, u16); 11] = [
        (0x3F80_0000, 0x3F80), // 1
        (0x3F80_8000, 0x3F80), // tie, even below
        (0x3F81_8000, 0x3F82), // tie, even above
        (0x3F80_8001, 0x3F81), // above the tie
        (0x3F80_7FFF, 0x3F80), // below the tie
        (0x8000_0000, 0x8000), // -0
        (0x7F7F_FFFF, 0x7F80), // f32::MAX rounds to +inf
        (0xFF80_0000, 0xFF80), // -inf
        (0x0000_8001, 0x0000), // denormal: zero, as vcvtne2ps2bf16 makes it
        (0x8060_0000, 0x8000), // negative denormal: -0
        (0x7F80_0001, 0x7FC0), // signalling NaN with only low payload bits: stays NaN
    ];
    for (bits, want) in cases {
        assert_eq!(to_bf16(f32::from_bits(bits)), want, "{bits:#010x}");
    }
    assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
}

/// The AVX-512 rounding and packing match the scalar ones on arbitrary bit patterns (NaNs,
/// infinities, denormals, ties).
#[cfg(target_arch = "x86_64")]
#[test]
fn avx512_packing_matches_scalar() {
    if Kernels::parse("avx512").unwrap().bf16().is_none() {
        eprintln!("skipped: avx512_packing_matches_scalar: this CPU has no AVX512_BF16 (with AVX-512F/BW)");
        return;
    }
    let mut rng = Rng(0x5EED_0B17);
    let special =
        [0x7F80_0001u32, 0xFFC0_0000, 0x7F80_0000, 0x0000_8000, 0x3F80_8000, 0x3F81_8000, 0x0000_0001];
    let (rows, cols) = (37, 70);
    let data: Vec<f32> = (0..rows * cols)
        .map(|i| f32::from_bits(if i % 5 == 0 { special[i / 5 % special.len()] } else { rng.next() as u32 }))
        .collect();
    for mat in [Mat::row_major(data.as_ptr(), cols), Mat { ptr: data.as_ptr(), row: cols, col: 2 }] {
        let c = if mat.col == 1 { cols } else { cols / 2 };
        // A: rows × c packed row-major (k padded to a multiple of 32, rows to 32), and its transpose.
        for (a, m, k) in [(mat, rows, c), (Mat { ptr: mat.ptr, row: mat.col, col: mat.row }, c, rows)] {
            // SAFETY: the matrix lies inside `data`; the CPU has AVX512_BF16 and AVX-512F/BW.
            let (fast, slow) = unsafe {
                (
                    super::bf16::PackedA::new(a, m, k, true, false),
                    super::bf16::PackedA::new(a, m, k, false, false),
                )
            };
            assert_eq!(fast.data.as_slice(), slow.data.as_slice(), "pack_a {m} × {k}");
            let k_pad = k.next_multiple_of(32);
            for i in 0..m.next_multiple_of(32) {
                for p in 0..k_pad {
                    let want = if i < m && p < k {
                        // SAFETY: (i, p) inside the matrix.
                        to_bf16(unsafe { *a.ptr.add(i * a.row + p * a.col) })
                    } else {
                        0
                    };
                    assert_eq!(slow.data.as_slice()[i * k_pad + p], want, "pack_a ({i}, {p})");
                }
            }
        }
        // B: the same matrix as k × n, and its transpose.
        for (b, k, n) in [(mat, rows, c), (Mat { ptr: mat.ptr, row: mat.col, col: mat.row }, c, rows)] {
            // SAFETY: as above.
            let (fast, slow) = unsafe {
                (
                    super::bf16::PackedB::new(b, k, n, true, false),
                    super::bf16::PackedB::new(b, k, n, false, false),
                )
            };
            assert_eq!(fast.data.as_slice(), slow.data.as_slice(), "pack_b {k} × {n}");
        }
        // Both layouts at once (row-major M only): M as A, and Mᵀ as A in B's pair layout, which
        // is B's packing of M itself.
        if mat.col == 1 {
            for parallel in [false, true] {
                // SAFETY: as above.
                let ((a, at), (want_a, want_at)) = unsafe {
                    (
                        super::bf16::pack_both(mat, rows, c, parallel),
                        (
                            super::bf16::PackedA::new(mat, rows, c, false, false),
                            super::bf16::PackedB::new(mat, rows, c, false, false),
                        ),
                    )
                };
                assert_eq!(a.data.as_slice(), want_a.data.as_slice(), "pack_both rows");
                assert_eq!(at.data.as_slice(), want_at.data.as_slice(), "pack_both pairs");
                assert!(!a.tiled && at.tiled && (a.m, at.m, at.k_pad) == (rows, c, want_at.k_pad));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[test]
fn transpose16_transposes() {
    if !is_x86_feature_detected!("avx512f") {
        eprintln!("skipped: transpose16_transposes: this CPU has no AVX-512F");
        return;
    }
    use std::arch::x86_64::*;
    let m: Vec<f32> = (0..256).map(|x| x as f32).collect();
    // SAFETY: the CPU has AVX-512F; each load reads 16 of the 256 floats.
    let mut v: [__m512; 16] = std::array::from_fn(|i| unsafe { _mm512_loadu_ps(m[16 * i..].as_ptr()) });
    // SAFETY: the CPU has AVX-512F.
    unsafe { super::avx512::transpose16(&mut v) };
    let mut out = [0f32; 256];
    for (i, v) in v.iter().enumerate() {
        // SAFETY: writes 16 of the 256 floats.
        unsafe { _mm512_storeu_ps(out[16 * i..].as_mut_ptr(), *v) };
    }
    for i in 0..16 {
        for j in 0..16 {
            assert_eq!(out[16 * i + j], m[16 * j + i], "({i}, {j})");
        }
    }
}

/// All the packed-product paths: each kernel set this CPU has, both precisions, row counts on
/// both sides of every block and of the AMX threshold, awkward sizes (257 inputs: k in chunks).
/// The f32 SIMD kernels give exactly the bits of one FMA chain in k order.
#[test]
fn packed_products() {
    let mut sets = vec![("portable", Kernels::portable())];
    for value in ["avx2", "avx512", "auto"] {
        let k = Kernels::parse(value).unwrap();
        if sets.iter().any(|(_, s)| *s == k) {
            eprintln!("skipped: packed_products with COLLAPSE_LAB_KERNELS={value}: same kernels as a set already tested ({})", k.describe());
        } else {
            sets.push((value, k));
        }
    }
    let mut rng = Rng(0x5EED_9AC4);
    for (name, kernels) in sets {
        for (out, inp) in [(7, 5), (64, 33), (100, 257), (1030, 64)] {
            let w: Vec<f32> = (0..out * inp).map(|_| rng.f32()).collect();
            let bias: Vec<f32> = (0..out).map(|_| rng.f32()).collect();
            for precision in [Precision::F32, Precision::Bf16] {
                let packed = PackedWeights::new(kernels, &w, out, inp, precision);
                assert_eq!((packed.out(), packed.inp(), packed.precision()), (out, inp, precision));
                for rows in [1, 3, 6, 7, 9, 16, 17, 33, 64, 130] {
                    let x: Vec<f32> = (0..rows * inp).map(|_| rng.f32()).collect();
                    let with_bias = rows % 2 == 1;
                    let mut got = vec![f32::NAN; rows * out];
                    packed_matmul(&mut got, &x, &packed, with_bias.then_some(&bias[..]), rows);
                    let round = if precision == Precision::Bf16 { round_bf16 } else { identity };
                    for r in 0..rows {
                        for o in 0..out {
                            let b = if with_bias { bias[o] } else { 0.0 };
                            let (mut s, mut abs, mut f32_sum, mut chain) = (0f64, 0f64, 0f32, 0f32);
                            for i in 0..inp {
                                let p = round(x[r * inp + i]) * round(w[o * inp + i]);
                                chain = x[r * inp + i].mul_add(w[o * inp + i], chain);
                                f32_sum += p;
                                s += p as f64;
                                abs += p.abs() as f64;
                            }
                            let g = got[r * out + o];
                            if precision == Precision::F32 && name != "portable" {
                                // The SIMD kernels' promise, exactly: one FMA chain in k order
                                // (in chunks of k, wherever they keep the partial sums), then + b.
                                let chain = if with_bias { chain + b } else { chain };
                                assert_eq!(
                                    g.to_bits(),
                                    chain.to_bits(),
                                    "packed f32 {name} {out}×{inp}, {rows} rows, ({r}, {o}): got {g}, want {chain}"
                                );
                            }
                            let (want, tol) = match precision {
                                Precision::F32 => {
                                    (s + b as f64, (inp as f64 + 2.0) * U * (abs + b.abs() as f64))
                                }
                                // The bf16 reference: same rounding, k order; the kernel may sum in
                                // another order (derivation at the top of this file).
                                Precision::Bf16 => (
                                    (f32_sum + b) as f64,
                                    (inp as f64 + 2.0)
                                        * 2.0
                                        * U
                                        * (abs + b.abs() as f64)
                                        * (1.0 + 1.0 / 1024.0),
                                ),
                            };
                            assert!(
                                (g as f64 - want).abs() <= tol,
                                "packed {precision:?} {name} ({}) {out}×{inp}, {rows} rows, ({r}, {o}): got {g}, want {want} ± {tol:e}",
                                kernels.describe()
                            );
                        }
                    }
                }
            }
        }
        eprintln!("packed products checked: {name} ({})", kernels.describe());
    }
}

/// The packed products are the same bytes with 1 and 2 threads.
#[test]
fn packed_deterministic() {
    let (out, inp, rows) = (1000, 300, 40);
    let mut rng = Rng(0x5EED_9AC5);
    let w: Vec<f32> = (0..out * inp).map(|_| rng.f32()).collect();
    let x: Vec<f32> = (0..rows * inp).map(|_| rng.f32()).collect();
    let pool = |t| rayon::ThreadPoolBuilder::new().num_threads(t).build().unwrap();
    for kernels in [Kernels::detect(), Kernels::parse("avx512").unwrap(), Kernels::parse("avx2").unwrap()] {
        for precision in [Precision::F32, Precision::Bf16] {
            let packed = PackedWeights::new(kernels, &w, out, inp, precision);
            let go = |t| {
                pool(t).install(|| {
                    let mut o = vec![0f32; rows * out];
                    packed_matmul(&mut o, &x, &packed, None, rows);
                    o.iter().map(|v| v.to_bits()).collect::<Vec<_>>()
                })
            };
            assert_eq!(go(1), go(2), "packed {precision:?} {}", kernels.describe());
        }
    }
}
