//! Few-row products against a fixed weight matrix (the decode steps of sampling): the weights are
//! packed once into the layout the kernel streams, the threads take equal shares of them, and
//! each share is read once per 64 rows, all those rows multiplied while a panel sits in cache.
//!
//! f32 weights are stored in panels of 64 outputs ([`GROUP`]): panel g is the (inp × 64) block of
//! Wᵀ for outputs 64g..64g + 64, row-major, zero-padded past `out`, so that one k step reads one
//! contiguous 256-byte row and the whole product is one sequential stream per thread. bf16 weights
//! are stored as the B operand of the bf16 kernels (pair layout, see `bf16.rs`), half the bytes.

use super::bf16::{gemm_packed, round_bf16, Epilogue, Out, PackedA, PackedB, Schedule, SharedPtr, TILE_N};
use super::{Bf16Kernel, Fp32Kernel, Kernels, Mat, Precision};
use rayon::prelude::*;

/// Outputs per f32 panel: four 512-bit registers, or eight 256-bit ones.
const GROUP: usize = 64;
/// Steps of k per pass of the rows over an f32 panel: 128 × 64 floats, 32 KiB, stay in L1.
const KC: usize = 128;
/// Rows per pass over the f32 panels.
const ROW_CHUNK: usize = 64;
/// Products of at least this many rows go to the AMX kernel when there is one (it pads the rows
/// to 32, but is so much faster that it wins from 4 rows on: measured 8 rows of 1024 × 256 in
/// 12–39 µs against 56–62 µs); fewer go to `vdpbf16ps`, which computes only the rows asked for.
pub(super) const AMX_MIN_ROWS: usize = 4;

/// A weight matrix W (out × inp, row-major: out rows of inp weights, as in `y = x·Wᵀ + b`) packed
/// once for [`packed_matmul`], in f32 or rounded to bf16, for the kernels it was packed with.
pub struct PackedWeights {
    kernels: Kernels,
    out: usize,
    inp: usize,
    data: Data,
}

enum Data {
    /// Panels of [`GROUP`] outputs.
    F32(Vec<f32>),
    /// The B operand (inp × out) of the bf16 kernels.
    Bf16(PackedB),
}

impl PackedWeights {
    /// Packs W (`w`: out × inp, row-major) in `precision`, for products on `kernels`. The work is
    /// spread over rayon's threads. Panics if `w.len() != out · inp`.
    pub fn new(kernels: Kernels, w: &[f32], out: usize, inp: usize, precision: Precision) -> PackedWeights {
        assert_eq!(w.len(), out * inp, "PackedWeights::new: w is not out × inp");
        let data = match precision {
            Precision::F32 => {
                let mut panels = vec![0f32; out.div_ceil(GROUP) * GROUP * inp];
                if inp > 0 {
                    panels.par_chunks_mut(inp * GROUP).enumerate().for_each(|(g, panel)| {
                        for jj in 0..GROUP.min(out - g * GROUP) {
                            let row = &w[(g * GROUP + jj) * inp..][..inp];
                            for (k, &x) in row.iter().enumerate() {
                                panel[k * GROUP + jj] = x;
                            }
                        }
                    });
                }
                Data::F32(panels)
            }
            // SAFETY: Wᵀ (inp × out) read through a transposed view of `w`, which holds out·inp
            // floats; the AVX-512 packing only where a bf16 kernel (hence AVX-512F/BW) exists.
            Precision::Bf16 => Data::Bf16(unsafe {
                PackedB::new(Mat::transposed(w.as_ptr(), inp), inp, out, kernels.bf16().is_some(), true)
            }),
        };
        PackedWeights { kernels, out, inp, data }
    }

    /// Outputs (rows of W).
    pub fn out(&self) -> usize {
        self.out
    }

    /// Inputs (columns of W).
    pub fn inp(&self) -> usize {
        self.inp
    }

    /// The precision the weights were packed in.
    pub fn precision(&self) -> Precision {
        match self.data {
            Data::F32(_) => Precision::F32,
            Data::Bf16(_) => Precision::Bf16,
        }
    }
}

/// out (rows × w.out(), row-major) = inp (rows × w.inp(), row-major) · Wᵀ + bias, on the kernels
/// `w` was packed for, the panels split evenly between rayon's threads. In f32 each output is
/// summed over k in increasing order by one FMA chain. In bf16 the inputs are rounded to bf16 too
/// and the sum is that of [`super::matmul`]'s bf16 kernels (AMX from 4 rows on, where there is
/// AMX; `vdpbf16ps` below), so results depend on the kernels and, with AMX, on whether rows < 4;
/// never on the thread count, nor on the other rows. Panics if the slices do not have these shapes.
pub fn packed_matmul(out: &mut [f32], inp: &[f32], w: &PackedWeights, bias: Option<&[f32]>, rows: usize) {
    let (oc, ic) = (w.out, w.inp);
    assert!(inp.len() == rows * ic && out.len() == rows * oc, "packed_matmul: shapes");
    assert!(bias.is_none_or(|b| b.len() == oc), "packed_matmul: bias length");
    if rows == 0 || oc == 0 {
        return;
    }
    match &w.data {
        Data::F32(panels) => f32_product(w.kernels.fp32(), out, inp, panels, oc, ic, bias, rows),
        Data::Bf16(b) => bf16_product(w.kernels, out, inp, b, bias, rows),
    }
}

/// Splits `units` (panels or tiles) evenly between rayon's threads and runs `work` on each
/// thread's range.
fn split(units: usize, work: impl Fn(std::ops::Range<usize>) + Sync) {
    let threads = rayon::current_num_threads().clamp(1, units.max(1));
    if threads == 1 {
        return work(0..units);
    }
    (0..threads).into_par_iter().for_each(|th| work(th * units / threads..(th + 1) * units / threads));
}

#[allow(clippy::too_many_arguments)]
fn f32_product(
    kernel: Fp32Kernel,
    out: &mut [f32],
    inp: &[f32],
    panels: &[f32],
    oc: usize,
    ic: usize,
    bias: Option<&[f32]>,
    rows: usize,
) {
    let out_p = SharedPtr(out.as_mut_ptr());
    split(oc.div_ceil(GROUP), |groups| {
        // Up to ROW_CHUNK rows at a time, so that the rows written while a panel is in cache stay
        // few (more would touch too many pages of `out` per panel).
        for r0 in (0..rows).step_by(ROW_CHUNK) {
            let n = ROW_CHUNK.min(rows - r0);
            let (x, out) = (&inp[r0 * ic..(r0 + n) * ic], out_p.get().wrapping_add(r0 * oc));
            for g in groups.clone() {
                let panel = &panels[g * ic * GROUP..(g + 1) * ic * GROUP];
                let (j0, cols) = (g * GROUP, GROUP.min(oc - g * GROUP));
                let bias = bias.map(|b| &b[j0..j0 + cols]);
                // Columns j0..j0 + cols of rows r0..r0 + n of `out` (rows × oc) are this group's
                // alone; `x` is n × ic and `panel` ic × 64.
                match kernel {
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as said above; the CPU has AVX-512F (the kernel was detected).
                    Fp32Kernel::Avx512 => unsafe {
                        x86::group_avx512(x, ic, n, panel, out, oc, j0, cols, bias)
                    },
                    #[cfg(target_arch = "x86_64")]
                    // SAFETY: as said above; the CPU has AVX2 and FMA (the kernel was detected).
                    Fp32Kernel::Avx2 => unsafe { x86::group_avx2(x, ic, n, panel, out, oc, j0, cols, bias) },
                    // SAFETY: as said above.
                    _ => unsafe { group_scalar(x, ic, n, panel, out, oc, j0, cols, bias) },
                }
            }
        }
    });
}

/// One f32 panel times all rows, in plain Rust.
///
/// # Safety
/// `out` is rows × oc and columns j0..j0 + cols of it are the caller's to write.
#[allow(clippy::too_many_arguments)]
unsafe fn group_scalar(
    x: &[f32],
    ic: usize,
    rows: usize,
    panel: &[f32],
    out: *mut f32,
    oc: usize,
    j0: usize,
    cols: usize,
    bias: Option<&[f32]>,
) {
    for r in 0..rows {
        let mut acc = [0f32; GROUP];
        for (k, w) in panel.chunks_exact(GROUP).enumerate() {
            let xv = x[r * ic + k];
            for (a, w) in acc.iter_mut().zip(w) {
                *a += xv * w;
            }
        }
        for (c, a) in acc.iter().enumerate().take(cols) {
            // SAFETY: row r, column j0 + c is the caller's.
            unsafe { *out.add(r * oc + j0 + c) = a + bias.map_or(0.0, |b| b[c]) };
        }
    }
}

fn bf16_product(
    kernels: Kernels,
    out: &mut [f32],
    inp: &[f32],
    b: &PackedB,
    bias: Option<&[f32]>,
    rows: usize,
) {
    let (oc, ic) = (b.n, b.k);
    if let Some(kind) = kernels.bf16() {
        let kind = if kind == Bf16Kernel::Amx && rows < AMX_MIN_ROWS { Bf16Kernel::Avx512Bf16 } else { kind };
        // SAFETY: inp is rows × ic row-major; a bf16 kernel implies AVX512_BF16 and AVX-512F/BW.
        let a = unsafe { PackedA::new(Mat::row_major(inp.as_ptr(), ic), rows, ic, true, false) };
        let e =
            Epilogue { scale: 1.0, accumulate: false, bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()) };
        let out = Out { dst: SharedPtr(out.as_mut_ptr()), dst_row: oc, e };
        // SAFETY: `a` and `b` are packed for the same k; out is rows × oc; bias oc floats.
        unsafe { gemm_packed(kind, &a, b, out, Schedule::Columns) };
        return;
    }
    // No bf16 kernel: the inputs rounded to bf16 (kept as f32, k padded like B), the weights
    // widened to f32 on the fly, summed in k order.
    let mut x = vec![0f32; rows * b.k_pad];
    if ic > 0 {
        for (xr, ir) in x.chunks_exact_mut(b.k_pad).zip(inp.chunks_exact(ic)) {
            xr.iter_mut().zip(ir).for_each(|(x, &v)| *x = round_bf16(v));
        }
    }
    let out_p = SharedPtr(out.as_mut_ptr());
    let fp32 = kernels.fp32();
    split(oc.div_ceil(TILE_N), |tiles| {
        for t in tiles {
            let tile = &b.data.as_slice()[t * b.tile_len()..(t + 1) * b.tile_len()];
            let (j0, cols) = (t * TILE_N, TILE_N.min(oc - t * TILE_N));
            let bias = bias.map(|b| &b[j0..j0 + cols]);
            // Columns j0..j0 + cols of `out` are this tile's alone; x is rows × k_pad.
            #[cfg(target_arch = "x86_64")]
            if fp32 != Fp32Kernel::Portable {
                // SAFETY: as said above; AVX2 and FMA exist (an AVX2 or AVX-512 kernel was detected).
                unsafe { x86::widen_tile_avx2(&x, b.k_pad, rows, tile, out_p.get(), oc, j0, cols, bias) };
                continue;
            }
            let _ = fp32;
            // SAFETY: as said above.
            unsafe { widen_tile_scalar(&x, b.k_pad, rows, tile, out_p.get(), oc, j0, cols, bias) };
        }
    });
}

/// One bf16 tile (16 outputs) times all rows of the rounded inputs, widening in plain Rust.
///
/// # Safety
/// `out` is rows × oc and columns j0..j0 + cols of it are the caller's to write.
#[allow(clippy::too_many_arguments)]
unsafe fn widen_tile_scalar(
    x: &[f32],
    k_pad: usize,
    rows: usize,
    tile: &[u16],
    out: *mut f32,
    oc: usize,
    j0: usize,
    cols: usize,
    bias: Option<&[f32]>,
) {
    for r in 0..rows {
        let mut acc = [0f32; TILE_N];
        for (p, pair) in tile.chunks_exact(2 * TILE_N).enumerate() {
            let (xe, xo) = (x[r * k_pad + 2 * p], x[r * k_pad + 2 * p + 1]);
            for (j, a) in acc.iter_mut().enumerate() {
                *a += xe * super::bf16::from_bf16(pair[2 * j]);
                *a += xo * super::bf16::from_bf16(pair[2 * j + 1]);
            }
        }
        for (c, a) in acc.iter().enumerate().take(cols) {
            // SAFETY: row r, column j0 + c is the caller's.
            unsafe { *out.add(r * oc + j0 + c) = a + bias.map_or(0.0, |b| b[c]) };
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{GROUP, KC, TILE_N};
    use crate::kernels::avx512::mask16;
    use std::arch::x86_64::*;

    /// One f32 panel (64 outputs from j0, `cols` of them real) times all rows, 6 rows at a time,
    /// k in chunks of [`KC`] so that the chunk of the panel (KC × 64 floats, 32 KiB) stays in L1
    /// while every row passes over it: the partial sums wait in `out` between chunks, exactly, so
    /// each output is still one FMA chain in k order.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` is rows × oc and columns j0..j0 + cols are the caller's.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_avx512(
        x: &[f32],
        ic: usize,
        rows: usize,
        panel: &[f32],
        out: *mut f32,
        oc: usize,
        j0: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        assert!(x.len() >= rows * ic && panel.len() >= ic * GROUP);
        let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
        for k0 in (0..ic).step_by(KC) {
            let (kc, last) = (KC.min(ic - k0), k0 + KC >= ic);
            let w = panel[k0 * GROUP..].as_ptr();
            // The next chunk (or the next panel: they are contiguous) is requested while this one
            // is in use, a share of it in each pass, since its first pass would otherwise wait
            // for memory: decoding reads all the weights once per step.
            let (passes, lines) = (rows.div_ceil(6), KC * GROUP / 16);
            let next = w.wrapping_add(kc * GROUP);
            let mut r0 = 0;
            while r0 < rows {
                let r = (rows - r0).min(6);
                let pass = r0 / 6;
                let (from, to) = (pass * lines / passes, (pass + 1) * lines / passes);
                let chunk = Chunk {
                    kc,
                    resume: k0 > 0,
                    bias: if last { bias } else { std::ptr::null() },
                    prefetch: next.wrapping_add(from * 16),
                    prefetch_lines: to - from,
                };
                let (x, out) = (x[r0 * ic + k0..].as_ptr(), out.wrapping_add(r0 * oc + j0));
                // SAFETY: rows r0..r0 + r of x and out exist (checked above / contract); the
                // chunk's kc columns of x and rows of the panel start at k0.
                unsafe {
                    match r {
                        6 => rows_avx512::<6>(x, ic, w, out, oc, cols, chunk),
                        5 => rows_avx512::<5>(x, ic, w, out, oc, cols, chunk),
                        4 => rows_avx512::<4>(x, ic, w, out, oc, cols, chunk),
                        3 => rows_avx512::<3>(x, ic, w, out, oc, cols, chunk),
                        2 => rows_avx512::<2>(x, ic, w, out, oc, cols, chunk),
                        _ => rows_avx512::<1>(x, ic, w, out, oc, cols, chunk),
                    }
                }
                r0 += r;
            }
        }
    }

    /// Which part of the sum over k one call of [`rows_avx512`] forms.
    #[derive(Clone, Copy)]
    struct Chunk {
        /// Steps of k.
        kc: usize,
        /// Whether `out` holds the sums so far (else they start from zero).
        resume: bool,
        /// Null, or (on the last chunk) the `cols` floats of bias to add.
        bias: *const f32,
        /// Cache lines (16 floats each) to prefetch from here while the chunk is summed (any
        /// address: a prefetch never faults).
        prefetch: *const f32,
        prefetch_lines: usize,
    }

    /// R rows × 64 outputs over one chunk of k: 4R accumulators, one broadcast FMA per row and
    /// register per k.
    ///
    /// # Safety
    /// x: R rows (ic apart) of chunk.kc; panel: chunk.kc × 64; out: R rows (oc apart) of
    /// `cols` ≤ 64; chunk.bias null or `cols` floats.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn rows_avx512<const R: usize>(
        x: *const f32,
        ic: usize,
        panel: *const f32,
        out: *mut f32,
        oc: usize,
        cols: usize,
        chunk: Chunk,
    ) {
        let masks: [__mmask16; 4] = std::array::from_fn(|p| mask16(cols.saturating_sub(16 * p).min(16)));
        let mut acc = [[_mm512_setzero_ps(); 4]; R];
        if chunk.resume {
            for (i, acc) in acc.iter_mut().enumerate() {
                for (p, a) in acc.iter_mut().enumerate() {
                    // SAFETY: masked to the `cols` columns of row i that are the caller's (its partial sums).
                    *a = unsafe { _mm512_maskz_loadu_ps(masks[p], out.add(i * oc + 16 * p)) };
                }
            }
        }
        let per_k = chunk.prefetch_lines.div_ceil(chunk.kc);
        for k in 0..chunk.kc {
            for l in k * per_k..((k + 1) * per_k).min(chunk.prefetch_lines) {
                _mm_prefetch::<_MM_HINT_T0>(chunk.prefetch.wrapping_add(16 * l) as *const i8);
            }
            // SAFETY: row k of the panel and column k of the R rows are readable.
            unsafe {
                let w = panel.add(k * GROUP);
                let w = [
                    _mm512_loadu_ps(w),
                    _mm512_loadu_ps(w.add(16)),
                    _mm512_loadu_ps(w.add(32)),
                    _mm512_loadu_ps(w.add(48)),
                ];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm512_set1_ps(*x.add(i * ic + k));
                    for p in 0..4 {
                        acc[p] = _mm512_fmadd_ps(xv, w[p], acc[p]);
                    }
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (p, &a) in acc.iter().enumerate() {
                if masks[p] == 0 {
                    break;
                }
                // SAFETY: masked to the `cols` columns of row i that are the caller's (and of the bias).
                unsafe {
                    let v = if chunk.bias.is_null() {
                        a
                    } else {
                        _mm512_add_ps(a, _mm512_maskz_loadu_ps(masks[p], chunk.bias.add(16 * p)))
                    };
                    _mm512_mask_storeu_ps(out.add(i * oc + 16 * p), masks[p], v);
                }
            }
        }
    }

    /// [`group_avx512`] with 256-bit registers: the panel in four slices of 16 outputs, 4 rows at
    /// a time (8 accumulators of the 16 registers).
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; otherwise as [`group_avx512`].
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn group_avx2(
        x: &[f32],
        ic: usize,
        rows: usize,
        panel: &[f32],
        out: *mut f32,
        oc: usize,
        j0: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        assert!(x.len() >= rows * ic && panel.len() >= ic * GROUP);
        for q in 0..GROUP / 16 {
            let c = cols.saturating_sub(16 * q).min(16);
            if c == 0 {
                break;
            }
            let bias = bias.map(|b| &b[16 * q..16 * q + c]);
            let mut r0 = 0;
            while r0 < rows {
                let r = (rows - r0).min(4);
                let (xr, o) = (x[r0 * ic..].as_ptr(), out.wrapping_add(r0 * oc + j0 + 16 * q));
                let p = panel[16 * q..].as_ptr();
                // SAFETY: rows r0..r0 + r of x and out exist; the slice starts 16q into the panel.
                unsafe {
                    match r {
                        4 => rows_avx2::<4>(xr, ic, p, GROUP, o, oc, c, bias),
                        3 => rows_avx2::<3>(xr, ic, p, GROUP, o, oc, c, bias),
                        2 => rows_avx2::<2>(xr, ic, p, GROUP, o, oc, c, bias),
                        _ => rows_avx2::<1>(xr, ic, p, GROUP, o, oc, c, bias),
                    }
                }
                r0 += r;
            }
        }
    }

    /// R rows × 16 outputs with 256-bit FMAs; the weights of step k at w + k·w_stride.
    ///
    /// # Safety
    /// x: R rows of ic; w: ic rows of 16 (w_stride apart); out: R rows of `cols` ≤ 16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn rows_avx2<const R: usize>(
        x: *const f32,
        ic: usize,
        w: *const f32,
        w_stride: usize,
        out: *mut f32,
        oc: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for k in 0..ic {
            // SAFETY: step k of the weights and column k of the R rows are readable.
            unsafe {
                let wk = w.add(k * w_stride);
                let (w0, w1) = (_mm256_loadu_ps(wk), _mm256_loadu_ps(wk.add(8)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xv = _mm256_set1_ps(*x.add(i * ic + k));
                    acc[0] = _mm256_fmadd_ps(xv, w0, acc[0]);
                    acc[1] = _mm256_fmadd_ps(xv, w1, acc[1]);
                }
            }
        }
        // SAFETY: the first `cols` floats of each row are the caller's.
        unsafe { store_rows(&acc, out, oc, cols, bias) };
    }

    /// Writes R rows of 16 sums (the first `cols` of each) plus bias.
    ///
    /// # Safety
    /// out: R rows (oc apart) of `cols` ≤ 16 floats.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn store_rows<const R: usize>(
        acc: &[[__m256; 2]; R],
        out: *mut f32,
        oc: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        for (i, acc) in acc.iter().enumerate() {
            let mut tmp = [0f32; 16];
            // SAFETY: tmp holds 16 floats.
            unsafe {
                _mm256_storeu_ps(tmp.as_mut_ptr(), acc[0]);
                _mm256_storeu_ps(tmp.as_mut_ptr().add(8), acc[1]);
            }
            for (c, v) in tmp.iter().enumerate().take(cols) {
                // SAFETY: row i, column c < cols is the caller's.
                unsafe { *out.add(i * oc + c) = v + bias.map_or(0.0, |b| b[c]) };
            }
        }
    }

    /// One bf16 tile (16 outputs from j0) times all rows of the bf16-rounded inputs `x` (rows
    /// k_pad apart), widening the weights to f32 in registers: sums in k order, 4 rows at a time.
    ///
    /// # Safety
    /// The CPU has AVX2 and FMA; `out` is rows × oc and columns j0..j0 + cols are the caller's.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn widen_tile_avx2(
        x: &[f32],
        k_pad: usize,
        rows: usize,
        tile: &[u16],
        out: *mut f32,
        oc: usize,
        j0: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        assert!(x.len() >= rows * k_pad && tile.len() >= k_pad * TILE_N);
        let mut r0 = 0;
        while r0 < rows {
            let r = (rows - r0).min(4);
            let (xr, o) = (x[r0 * k_pad..].as_ptr(), out.wrapping_add(r0 * oc + j0));
            // SAFETY: rows r0..r0 + r of x and out exist.
            unsafe {
                match r {
                    4 => widen_rows_avx2::<4>(xr, k_pad, tile.as_ptr(), o, oc, cols, bias),
                    3 => widen_rows_avx2::<3>(xr, k_pad, tile.as_ptr(), o, oc, cols, bias),
                    2 => widen_rows_avx2::<2>(xr, k_pad, tile.as_ptr(), o, oc, cols, bias),
                    _ => widen_rows_avx2::<1>(xr, k_pad, tile.as_ptr(), o, oc, cols, bias),
                }
            }
            r0 += r;
        }
    }

    /// # Safety
    /// x: R rows of k_pad; tile: k_pad/2 rows of 32 bf16; out: R rows of `cols` ≤ 16.
    #[target_feature(enable = "avx2,fma")]
    #[inline]
    unsafe fn widen_rows_avx2<const R: usize>(
        x: *const f32,
        k_pad: usize,
        tile: *const u16,
        out: *mut f32,
        oc: usize,
        cols: usize,
        bias: Option<&[f32]>,
    ) {
        let high = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        for p in 0..k_pad / 2 {
            // SAFETY: pair-row p of the tile and columns 2p, 2p + 1 of the R rows are readable.
            unsafe {
                let d0 = _mm256_loadu_si256(tile.add(32 * p).cast());
                let d1 = _mm256_loadu_si256(tile.add(32 * p + 16).cast());
                let even = [
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(d0)),
                    _mm256_castsi256_ps(_mm256_slli_epi32::<16>(d1)),
                ];
                let odd = [
                    _mm256_castsi256_ps(_mm256_and_si256(d0, high)),
                    _mm256_castsi256_ps(_mm256_and_si256(d1, high)),
                ];
                for (i, acc) in acc.iter_mut().enumerate() {
                    let xe = _mm256_set1_ps(*x.add(i * k_pad + 2 * p));
                    let xo = _mm256_set1_ps(*x.add(i * k_pad + 2 * p + 1));
                    for h in 0..2 {
                        acc[h] = _mm256_fmadd_ps(xe, even[h], acc[h]);
                        acc[h] = _mm256_fmadd_ps(xo, odd[h], acc[h]);
                    }
                }
            }
        }
        // SAFETY: forwarded.
        unsafe { store_rows(&acc, out, oc, cols, bias) };
    }
}
