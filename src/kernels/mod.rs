//! CPU matrix-multiplication kernels for the hand-written training and sampling engine.
//!
//! Self-contained (it uses nothing else in this crate), so that the engine can switch to it in
//! one place. Four things:
//!
//! - [`Kernels`]: which fp32 kernel (AVX-512F, AVX2+FMA, portable) and which bf16 kernel (AMX,
//!   AVX512_BF16, none) this CPU runs, detected once per process; [`Kernels::from_env`] lets the
//!   `COLLAPSE_LAB_KERNELS` variable force a slower path for testing.
//! - [`matmul`]: dst (m × n) = [dst +] scale · lhs (m × k) · rhs (k × n) over strided operands
//!   ([`Mat`]), in fp32 (the `gemm` crate's microkernels, instruction set chosen here) or in bf16
//!   (inputs rounded to bf16 while packing, products summed in f32: AMX tiles or `vdpbf16ps`).
//! - [`Rhs`] and [`Lhs`]: operands prepared once for several products: a right operand (the LM
//!   head's weights, for each chunk of rows), and a left one for a product with it and one with
//!   its transpose (a layer's d out, for d inp and d W), packed both ways in one pass, or as it is
//!   computed ([`Lhs::from_rows`]: the cross-entropy's gradient, packed while still in cache).
//! - [`PackedWeights`] and [`packed_matmul`]: few-row products (decoding) against a weight matrix
//!   packed once, in f32 or bf16.
//!
//! Every product is deterministic: each output is summed over k by one kernel call in a fixed
//! order, whatever the number of threads (k is never split between threads). The bf16 kernels
//! give the same bits for any blocking, too, as they carry partial sums between chunks of k in
//! f32 scratch blocks, which loses nothing.
//!
//! Speed notes (measured on the Sapphire Rapids development machine; details in the `bench`
//! tests): `vdpbf16ps` on that CPU retires about one 512-bit instruction every two cycles, so the
//! AVX512_BF16 kernel does half the flops of the fp32 AVX-512 one there (on AMD Zen 4 it does about
//! twice as many); AMX does several times the fp32 rate, and its products of the engine's shapes are
//! then bound by packing the f32 operands and writing the f32 results more than by the tiles.

#[cfg(target_arch = "x86_64")]
mod amx;
#[cfg(target_arch = "x86_64")]
mod avx512;
#[cfg(test)]
mod bench;
mod bf16;
mod detect;
mod fp32;
mod packed;
#[cfg(test)]
mod tests;

pub use bf16::matmul_bf16_reference;
pub use detect::{Bf16Kernel, Fp32Kernel, Kernels, ENV_VAR};
pub use packed::{packed_matmul, PackedWeights};
use rayon::prelude::*;

/// The arithmetic of a product.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    /// f32 inputs, f32 products and sums.
    F32,
    /// Inputs rounded to bf16 (to nearest, ties to even; NaN stays NaN), products summed in f32.
    Bf16,
}

/// A strided f32 matrix operand: element (i, j) is at `ptr + i·row + j·col`.
#[derive(Clone, Copy, Debug)]
pub struct Mat {
    /// Element (0, 0).
    pub ptr: *const f32,
    /// Distance between rows, in elements.
    pub row: usize,
    /// Distance between columns, in elements.
    pub col: usize,
}

// SAFETY: a Mat only describes memory; it is read only inside `unsafe fn`s whose callers vouch
// that the memory is valid and not written meanwhile, so sharing the description between the
// threads of one product is sound.
unsafe impl Send for Mat {}
// SAFETY: as for Send: the kernels only read through it.
unsafe impl Sync for Mat {}

impl Mat {
    /// A matrix stored row by row, rows `stride` elements apart.
    pub fn row_major(ptr: *const f32, stride: usize) -> Mat {
        Mat { ptr, row: stride, col: 1 }
    }

    /// The transpose of a matrix stored row by row (rows `stride` elements apart).
    pub fn transposed(ptr: *const f32, stride: usize) -> Mat {
        Mat { ptr, row: 1, col: stride }
    }
}

/// dst (m × n, rows `dst_row` elements apart, columns adjacent) = [dst +] scale · lhs (m × k) ·
/// rhs (k × n), with `accumulate` choosing whether dst is added to (otherwise it is only
/// written, never read). `parallel` spreads the work over rayon's threads.
///
/// [`Precision::F32`] runs gemm's microkernels for `kernels.fp32()`. [`Precision::Bf16`] rounds
/// both operands to bf16 while packing them and sums the (exact) products in f32 on
/// `kernels.bf16()`; each output is `scale · Σₖ lhsᵢₖ·rhsₖⱼ`, then `+ dst` when accumulating, like
/// [`matmul_bf16_reference`] up to the order of the f32 sum. Without a bf16 kernel the rounded
/// operands go through the fp32 kernel.
///
/// # Safety
/// `lhs` and `rhs` must be readable at every (i, k) and (k, j) of their shapes, `dst` readable and
/// writable at every (i, j), and `dst` must overlap neither input.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    kernels: Kernels,
    precision: Precision,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallel: bool,
) {
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: forwarded from this function's contract; `kernels` was detected on this CPU.
    unsafe {
        let rhs = Rhs::new(kernels, precision, rhs, k, n, parallel);
        matmul_rhs(m, dst, dst_row, accumulate, lhs, &rhs, scale, None, parallel)
    }
}

/// The right operand of products (k × n) on given kernels and precision, prepared once: in bf16
/// with a bf16 kernel it is rounded and packed here, so that several products with the same
/// right operand (the LM head's weights, one chunk of rows at a time) pack it once; otherwise it
/// is the matrix itself. A product through it gives the bits of [`matmul`] on the matrix.
pub struct Rhs {
    kernels: Kernels,
    precision: Precision,
    mat: Mat,
    k: usize,
    n: usize,
    packed: Option<bf16::PackedB>,
}

impl Rhs {
    /// B's shape, (k, n).
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `mat` (k × n) for products on `kernels` in `precision`; packed in parallel when `parallel`.
    ///
    /// # Safety
    /// `mat` must be readable at every (p, j) of k × n, and stay so and unchanged while the value
    /// is used.
    pub unsafe fn new(
        kernels: Kernels,
        precision: Precision,
        mat: Mat,
        k: usize,
        n: usize,
        parallel: bool,
    ) -> Rhs {
        let packed = (precision == Precision::Bf16 && kernels.bf16().is_some())
            // SAFETY: the contract; a bf16 kernel implies AVX512_BF16 and AVX-512F/BW.
            .then(|| unsafe { bf16::PackedB::new(mat, k, n, true, parallel) });
        Rhs { kernels, precision, mat, k, n, packed }
    }
}

/// A left operand M (m × k, rows contiguous) prepared once for a product with M on the left and
/// one with Mᵀ on the left: the two products of a layer's backward that share d out (d inp =
/// d out · W, d W += d outᵀ · inp). On the `vdpbf16ps` kernel in bf16 both are packed here in one
/// pass (`bf16::pack_both`), Mᵀ without transposing; otherwise it is the matrix itself. A
/// product through it gives the bits of [`matmul`] on the matrix (or its transposed view).
pub struct Lhs {
    mat: Mat,
    m: usize,
    k: usize,
    /// M and Mᵀ packed, for these kernels and precision.
    packed: Option<(bf16::PackedA, bf16::PackedA, Kernels, Precision)>,
}

impl Lhs {
    /// `mat` (m × k, `mat.col == 1`), packed for products on `kernels` in `precision` where that
    /// pays (in parallel when `parallel`).
    ///
    /// # Safety
    /// `mat` must be readable at every (i, p) of m × k, and stay so and unchanged while the value
    /// is used.
    pub unsafe fn new(
        kernels: Kernels,
        precision: Precision,
        mat: Mat,
        m: usize,
        k: usize,
        parallel: bool,
    ) -> Lhs {
        assert_eq!(mat.col, 1, "Lhs: rows must be contiguous");
        let dp = Lhs::packs(kernels, precision);
        #[cfg(target_arch = "x86_64")]
        // SAFETY: the contract; the vdpbf16ps kernel implies AVX512_BF16 and AVX-512F/BW.
        let packed = dp.then(|| {
            let (rows, pairs) = unsafe { bf16::pack_both(mat, m, k, parallel) };
            (rows, pairs, kernels, precision)
        });
        #[cfg(not(target_arch = "x86_64"))]
        let packed = {
            let _ = (dp, parallel);
            None
        };
        Lhs { mat, m, k, packed }
    }

    /// M (m × k, row-major in `buf`) computed a row at a time by `row(i, row i of buf, &mut
    /// out[i])`, spread over rayon's threads, and prepared as [`Lhs::new`] prepares it. Where
    /// that packs, each group of 32 rows is packed as soon as it is computed, while it is still
    /// in cache, instead of in a pass of its own over M afterwards; either way `buf` ends up
    /// holding M and the packed operands are the same.
    ///
    /// # Safety
    /// `buf` must stay valid and unchanged while the value is used (it is read by products on
    /// the plain path).
    pub unsafe fn from_rows(
        kernels: Kernels,
        precision: Precision,
        (m, k): (usize, usize),
        buf: &mut [f32],
        out: &mut [f32],
        row: impl Fn(usize, &mut [f32], &mut f32) + Sync,
    ) -> Lhs {
        assert!(buf.len() == m * k && out.len() == m, "Lhs::from_rows: buffers of another shape");
        let dp = Lhs::packs(kernels, precision);
        #[cfg(target_arch = "x86_64")]
        if dp && k > 0 {
            let (bufp, outp) = (bf16::SharedPtr(buf.as_mut_ptr()), bf16::SharedPtr(out.as_mut_ptr()));
            let mat = Mat::row_major(bufp.get(), k);
            let group = |g: usize| {
                let (r0, r1) = (g * bf16::ROW_ALIGN, m.min((g + 1) * bf16::ROW_ALIGN));
                // SAFETY: rows r0..r1 of buf (m × k) and out (m), written by this task alone:
                // the groups do not overlap.
                let (rows, outs) = unsafe {
                    (
                        std::slice::from_raw_parts_mut(bufp.get().add(r0 * k), (r1 - r0) * k),
                        std::slice::from_raw_parts_mut(outp.get().add(r0), r1 - r0),
                    )
                };
                for ((i, x), o) in rows.chunks_mut(k).enumerate().zip(outs) {
                    row(r0 + i, x, o);
                }
            };
            // SAFETY: each group's rows are computed before the group is packed, and buf is not
            // written again (contract); the vdpbf16ps kernel implies AVX512_BF16.
            let (rows, pairs) = unsafe { bf16::pack_both_on(mat, m, k, true, group) };
            return Lhs { mat, m, k, packed: Some((rows, pairs, kernels, precision)) };
        }
        let _ = dp;
        if k > 0 {
            buf.par_chunks_mut(k).zip(out.par_iter_mut()).enumerate().for_each(|(i, (x, o))| row(i, x, o));
        } else {
            out.par_iter_mut().enumerate().for_each(|(i, o)| row(i, &mut [], o));
        }
        // Taken after the rows are written, so that the pointer is the latest borrow of buf.
        let mat = Mat::row_major(buf.as_ptr(), k);
        // SAFETY: buf holds m × k (checked) and stays valid (contract).
        unsafe { Lhs::new(kernels, precision, mat, m, k, true) }
    }

    /// Whether M is packed (both ways) here: bf16 on the `vdpbf16ps` kernel, the one that reads
    /// A in B's pair layout.
    fn packs(kernels: Kernels, precision: Precision) -> bool {
        precision == Precision::Bf16 && kernels.bf16() == Some(Bf16Kernel::Avx512Bf16)
    }

    /// M's shape, (m, k).
    pub fn shape(&self) -> (usize, usize) {
        (self.m, self.k)
    }

    /// M as the right operand of a product X · M (k = M's m rows, n = its k columns) in the pair
    /// layout already packed here, when M is packed: the forward pass packs a layer's input
    /// once for its product and for the backward's d W = d outᵀ · input. None when nothing is
    /// packed here (then [`Rhs::new`] prepares M as usual).
    pub fn into_rhs(self) -> Option<Rhs> {
        let (_, pairs, kernels, precision) = self.packed?;
        let b = bf16::PackedB::from_tiled(pairs, self.m);
        Some(Rhs { kernels, precision, mat: self.mat, k: self.m, n: self.k, packed: Some(b) })
    }

    /// dst = [dst +] scale · op(M) · rhs [+ bias], op(M) being M (m × k) or, when `transposed`,
    /// Mᵀ (k × m), as [`matmul_rhs`].
    ///
    /// # Safety
    /// As [`matmul_rhs`]: dst holds op(M)'s rows × rhs's n at `dst_row`, overlapping neither
    /// operand; M and rhs's matrix still valid; rhs's k is op(M)'s columns.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn matmul(
        &self,
        transposed: bool,
        rhs: &Rhs,
        dst: *mut f32,
        dst_row: usize,
        accumulate: bool,
        scale: f32,
        bias: Option<&[f32]>,
        parallel: bool,
    ) {
        let (rows, cols) = if transposed { (self.k, self.m) } else { (self.m, self.k) };
        assert_eq!(rhs.k, cols, "Lhs::matmul: operands of different k");
        assert!(
            bias.is_none_or(|b| b.len() == rhs.n && scale == 1.0 && !accumulate),
            "a bias needs n floats, scale 1 and no accumulation"
        );
        if rows == 0 || rhs.n == 0 {
            return;
        }
        if let (Some((a, at, kernels, precision)), Some(b)) = (&self.packed, &rhs.packed) {
            if (*kernels, *precision) == (rhs.kernels, rhs.precision) {
                let kind = kernels.bf16().expect("packed for a bf16 kernel");
                let out = bf16::Out {
                    dst: bf16::SharedPtr(dst),
                    dst_row,
                    e: bf16::Epilogue {
                        scale,
                        accumulate,
                        bias: bias.map_or(std::ptr::null(), |b| b.as_ptr()),
                    },
                };
                // SAFETY: the operands pack op(M) and rhs for the same k (checked); dst is the
                // caller's (contract); the kernel was detected on this CPU.
                unsafe {
                    bf16::gemm_packed(
                        kind,
                        if transposed { at } else { a },
                        b,
                        out,
                        bf16::Schedule::Blocks { parallel },
                    )
                };
                return;
            }
        }
        let lhs = if transposed {
            Mat { ptr: self.mat.ptr, row: self.mat.col, col: self.mat.row }
        } else {
            self.mat
        };
        // SAFETY: forwarded; lhs reads M (or its transpose) inside its shape.
        unsafe { matmul_rhs(rows, dst, dst_row, accumulate, lhs, rhs, scale, bias, parallel) }
    }
}

/// dst (m × rhs's n, rows `dst_row` apart) = [dst +] scale · lhs (m × rhs's k) · rhs [+ bias],
/// as [`matmul`]. A bias requires scale 1 and no accumulation; the bf16 kernels add it on the way
/// out (one pass over dst fewer), the others after the product, with the same values either way.
///
/// # Safety
/// As [`matmul`]; `rhs`'s matrix still valid; `bias`, if any, holds n floats.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_rhs(
    m: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: &Rhs,
    scale: f32,
    bias: Option<&[f32]>,
    parallel: bool,
) {
    let (kernels, k, n) = (rhs.kernels, rhs.k, rhs.n);
    assert!(
        bias.is_none_or(|b| b.len() == n && scale == 1.0 && !accumulate),
        "a bias needs n floats, scale 1 and no accumulation"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY (every arm): forwarded from this function's contract; `kernels` was detected here.
    match (&rhs.packed, rhs.precision) {
        (Some(b), _) => {
            let kind = kernels.bf16().expect("packed for a bf16 kernel");
            // SAFETY: lhs is m × k; a bf16 kernel implies AVX512_BF16 and AVX-512F/BW; the bias
            // holds n floats.
            unsafe {
                bf16::matmul_packed_rhs(kind, m, dst, dst_row, accumulate, lhs, b, scale, bias, parallel)
            };
            return;
        }
        (None, Precision::F32) => unsafe {
            fp32::matmul_f32(kernels.fp32(), m, n, k, dst, dst_row, accumulate, lhs, rhs.mat, scale, parallel)
        },
        (None, Precision::Bf16) => unsafe {
            bf16::emulate(kernels, m, n, k, dst, dst_row, accumulate, lhs, rhs.mat, scale, parallel)
        },
    }
    let Some(bias) = bias else { return };
    let dst = bf16::SharedPtr(dst);
    let add = |i: usize| {
        // SAFETY: row i of dst, n floats, written by this task alone.
        let row = unsafe { std::slice::from_raw_parts_mut(dst.get().add(i * dst_row), n) };
        for (o, b) in row.iter_mut().zip(bias) {
            *o += b;
        }
    };
    if parallel {
        (0..m).into_par_iter().for_each(add);
    } else {
        (0..m).for_each(add);
    }
}
