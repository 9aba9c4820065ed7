//! bf16 products: operands rounded to bf16 while they are packed, exact products summed in f32.
//!
//! Layouts (shared by the AMX and `vdpbf16ps` kernels, and by [`super::PackedWeights`]):
//! - A (the m × k left operand) is packed row-major, k padded with zeros to a multiple of
//!   [`K_ALIGN`] and the rows to a multiple of the kernel's row block: one AMX A tile is 16 rows
//!   of 64 bytes, read straight from it with the row stride.
//! - B (k × n) is packed in tiles of 16 columns. Tile t is k_pad/2 rows of 16 dwords; dword j of
//!   row r holds (B[2r][16t + j], B[2r+1][16t + j]), the even k in the low half: the "VNNI" pair
//!   layout `tdpbf16ps` wants for its B tile (16 pair-rows of 64 bytes, 1 KiB) and `vdpbf16ps`
//!   wants for its second operand. n is padded to a multiple of [`N_ALIGN`] with zero columns.
//!
//! Work is split between threads by blocks of output rows and columns only; every output is the
//! sum over all of k in one kernel call, so the result does not depend on the thread count.

use super::{Bf16Kernel, Kernels, Mat};
use rayon::prelude::*;

/// k is padded to a multiple of this (one AMX tile row holds 32 bf16).
pub(super) const K_ALIGN: usize = 32;
/// Columns of one B tile.
pub(super) const TILE_N: usize = 16;
/// n is padded to a multiple of this: both kernels take B two tiles at a time.
pub(super) const N_ALIGN: usize = 32;
/// Output rows per task of a strided product (A block packed once per task).
const ROW_BLOCK: usize = 64;

/// Rounds an f32 to bf16 (the high 16 bits of an f32): to nearest, ties to even; a NaN stays a
/// (quiet) NaN, infinities stay infinite, finite values past the largest bf16 become infinite.
#[inline]
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits | 0x0040_0000) >> 16) as u16;
    }
    (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline]
pub(super) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to the nearest bf16, as an f32.
#[inline]
pub(super) fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// The plain scalar bf16 product the kernels are tested against: dst (m × n, rows `dst_row`
/// apart) = [dst +] scale · Σₖ bf16(lhsᵢₖ) · bf16(rhsₖⱼ), each product exact in f32 and the sum
/// taken in f32 in increasing k; then `scale ·` and, when accumulating, `dst +`.
///
/// # Safety
/// As [`super::matmul`].
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul_bf16_reference(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0f32;
            for p in 0..k {
                // SAFETY: (i, p) and (p, j) are inside the operands' shapes (caller's contract).
                let (a, b) = unsafe {
                    (*lhs.ptr.add(i * lhs.row + p * lhs.col), *rhs.ptr.add(p * rhs.row + j * rhs.col))
                };
                acc += round_bf16(a) * round_bf16(b);
            }
            let v = scale * acc;
            // SAFETY: (i, j) is inside dst (caller's contract).
            unsafe {
                let d = dst.add(i * dst_row + j);
                *d = if accumulate { *d + v } else { v };
            }
        }
    }
}

/// B packed for the bf16 kernels (layout in the module doc).
pub(super) struct PackedB {
    pub(super) data: Vec<u16>,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) k_pad: usize,
}

impl PackedB {
    /// u16 elements in one tile of 16 columns.
    pub(super) fn tile_len(&self) -> usize {
        self.k_pad * TILE_N
    }

    /// rhs (k × n) rounded to bf16 and packed; the tiles are split between rayon's threads when
    /// `parallel`. Uses the AVX-512 packing when the CPU has it, else plain Rust (same result).
    ///
    /// # Safety
    /// rhs must be readable at every (p, j) of k × n.
    pub(super) unsafe fn new(rhs: Mat, k: usize, n: usize, avx512: bool, parallel: bool) -> PackedB {
        let (k_pad, n_pad) = (k.next_multiple_of(K_ALIGN), n.next_multiple_of(N_ALIGN));
        let mut b = PackedB { data: vec![0u16; k_pad * n_pad], k, n, k_pad };
        let tile_len = b.tile_len();
        if tile_len == 0 {
            return b;
        }
        let work = |(t, tile): (usize, &mut [u16])| {
            #[cfg(target_arch = "x86_64")]
            if avx512 {
                // SAFETY: rhs is readable on k × n (caller's contract); the CPU has AVX-512F/BW
                // (the caller checked); `tile` is tile t, k_pad·16 elements.
                unsafe { super::avx512::pack_b_tile(rhs, k, n, t, tile) };
                return;
            }
            let _ = avx512;
            // SAFETY: as above.
            unsafe { pack_b_tile_scalar(rhs, k, n, t, tile) };
        };
        if parallel && b.data.len() >= 1 << 16 {
            b.data.par_chunks_mut(tile_len).enumerate().for_each(work);
        } else {
            b.data.chunks_mut(tile_len).enumerate().for_each(work);
        }
        b
    }
}

/// Tile t of [`PackedB`] in plain Rust.
///
/// # Safety
/// rhs must be readable at every (p, j) of k × n; `tile` has k_pad·16 elements.
pub(super) unsafe fn pack_b_tile_scalar(rhs: Mat, k: usize, n: usize, t: usize, tile: &mut [u16]) {
    for (r, row) in tile.chunks_exact_mut(2 * TILE_N).enumerate() {
        for j in 0..TILE_N {
            let col = t * TILE_N + j;
            for h in 0..2 {
                let p = 2 * r + h;
                row[2 * j + h] = if p < k && col < n {
                    // SAFETY: (p, col) is inside k × n.
                    to_bf16(unsafe { *rhs.ptr.add(p * rhs.row + col * rhs.col) })
                } else {
                    0
                };
            }
        }
    }
}

/// What happens to the f32 sums of a block on their way to dst: v = scale·sum, then dst + v when
/// accumulating, then v + bias[j] when there is a bias.
#[derive(Clone, Copy)]
pub(super) struct Epilogue {
    pub(super) scale: f32,
    pub(super) accumulate: bool,
    /// Null for none, else n floats.
    pub(super) bias: *const f32,
}

/// The left operand of [`gemm_packed`].
#[derive(Clone, Copy)]
pub(super) enum ASource<'a> {
    /// Packed block by block, by each task, from this strided matrix.
    Strided(Mat),
    /// Already packed (rows padded to a multiple of 32).
    Packed(&'a [u16]),
}

/// A raw pointer the tasks of one product may share: each writes its own block of the output.
#[derive(Clone, Copy)]
pub(super) struct SharedPtr<T>(pub(super) *mut T);
// SAFETY: used only to hand the output to the tasks of one product, which write disjoint blocks.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as for Send.
unsafe impl<T> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    /// The pointer (a method, so that closures capture the wrapper and not the raw field).
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

// SAFETY: the bias pointer is only read, by the tasks of one product, while the caller's slice lives.
unsafe impl Send for Epilogue {}
// SAFETY: as for Send.
unsafe impl Sync for Epilogue {}

/// `super::matmul` for [`super::Precision::Bf16`].
///
/// # Safety
/// As [`super::matmul`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_bf16(
    kernels: Kernels,
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
    let Some(kind) = kernels.bf16() else {
        // SAFETY: forwarded.
        return unsafe { emulate(kernels, m, n, k, dst, dst_row, accumulate, lhs, rhs, scale, parallel) };
    };
    // SAFETY: forwarded; a bf16 kernel implies AVX-512F/BW (Kernels::detect).
    let b = unsafe { PackedB::new(rhs, k, n, true, parallel) };
    let e = Epilogue { scale, accumulate, bias: std::ptr::null() };
    // SAFETY: forwarded; `b` packs rhs.
    unsafe { gemm_packed(kind, m, ASource::Strided(lhs), &b, dst, dst_row, e, parallel) };
}

/// bf16 without a bf16 kernel: round both operands into f32 copies and use the fp32 kernel.
///
/// # Safety
/// As [`super::matmul`].
#[allow(clippy::too_many_arguments)]
unsafe fn emulate(
    kernels: Kernels,
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
    // SAFETY (both): (i, p) in m × k and (p, j) in k × n are inside the operands.
    let a: Vec<f32> =
        (0..m * k).map(|x| round_bf16(unsafe { *lhs.ptr.add(x / k * lhs.row + x % k * lhs.col) })).collect();
    let b: Vec<f32> =
        (0..k * n).map(|x| round_bf16(unsafe { *rhs.ptr.add(x / n * rhs.row + x % n * rhs.col) })).collect();
    // SAFETY: the copies are m × k and k × n row-major; dst is forwarded.
    unsafe {
        super::fp32::matmul_f32(
            kernels.fp32(),
            m,
            n,
            k,
            dst,
            dst_row,
            accumulate,
            Mat::row_major(a.as_ptr(), k),
            Mat::row_major(b.as_ptr(), n),
            scale,
            parallel,
        );
    }
}

/// dst (m × b.n, rows `dst_row` apart) ← the epilogue of A (m × b.k) · B on a bf16 kernel.
/// Tasks are (block of rows) × (block of column pairs): [`ROW_BLOCK`] rows for a strided A
/// (packed by the task), all m rows for a packed one (then the columns are split evenly between
/// the threads, each reading its own share of B).
///
/// # Safety
/// A strided A must be readable on m × b.k, a packed one hold m rounded up to 32 rows of b.k_pad;
/// dst writable (and readable when accumulating) on m × b.n, not overlapping A or B; the bias, if
/// any, b.n floats; the CPU must have `kind`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn gemm_packed(
    kind: Bf16Kernel,
    m: usize,
    a: ASource,
    b: &PackedB,
    dst: *mut f32,
    dst_row: usize,
    e: Epilogue,
    parallel: bool,
) {
    if m == 0 || b.n == 0 {
        return;
    }
    let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
    let row_pad = match kind {
        Bf16Kernel::Amx => 32,
        Bf16Kernel::Avx512Bf16 => 8,
    };
    let row_block = match a {
        ASource::Strided(_) => ROW_BLOCK,
        ASource::Packed(p) => {
            assert!(p.len() >= m.next_multiple_of(32) * b.k_pad, "packed A too short");
            m
        }
    };
    let row_blocks = m.div_ceil(row_block);
    let pairs = b.n.div_ceil(N_ALIGN);
    let col_blocks = match a {
        _ if threads == 1 => 1,
        ASource::Packed(_) => threads.min(pairs),
        ASource::Strided(_) => (4 * threads).div_ceil(row_blocks).clamp(1, pairs),
    };
    let dst = SharedPtr(dst);
    let task = |id: usize| {
        let (ib, jb) = (id / col_blocks, id % col_blocks);
        let (i0, rows) = (ib * row_block, row_block.min(m - ib * row_block));
        let (p0, p1) = (jb * pairs / col_blocks, (jb + 1) * pairs / col_blocks);
        let mut buf = Vec::new();
        let a_rows: *const u16 = match a {
            ASource::Strided(lhs) => {
                buf = vec![0u16; rows.next_multiple_of(row_pad) * b.k_pad];
                // SAFETY: lhs is readable on m × k (contract) and the CPU has AVX-512F/BW (kind).
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    super::avx512::pack_a(lhs, i0, rows, b.k, b.k_pad, &mut buf)
                };
                buf.as_ptr()
            }
            // SAFETY: row i0 of a buffer of at least m rows of k_pad.
            ASource::Packed(p) => unsafe { p.as_ptr().add(i0 * b.k_pad) },
        };
        // SAFETY: dst rows i0..i0 + rows, columns of pairs p0..p1 belong to this task alone.
        let d = unsafe { dst.get().add(i0 * dst_row) };
        #[cfg(target_arch = "x86_64")]
        // SAFETY: a_rows holds `rows` rows (padded to row_pad) of k_pad; the CPU has `kind`.
        unsafe {
            match kind {
                Bf16Kernel::Amx => super::amx::block(a_rows, rows, b, 2 * p0, 2 * p1, d, dst_row, e),
                Bf16Kernel::Avx512Bf16 => {
                    super::avx512::dp_block(a_rows, rows, b, 2 * p0, 2 * p1, d, dst_row, e)
                }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        let _ = (a_rows, d, e);
        drop(buf);
    };
    if parallel && row_blocks * col_blocks > 1 {
        (0..row_blocks * col_blocks).into_par_iter().for_each(task);
    } else {
        (0..row_blocks * col_blocks).for_each(task);
    }
}
