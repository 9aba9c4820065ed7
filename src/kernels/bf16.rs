//! bf16 products: operands rounded to bf16 while they are packed, exact products summed in f32.
//!
//! Both operands are packed into 64-byte-aligned buffers (in parallel; once per product, or once
//! for several through `super::Rhs` and `super::Lhs`), then the product runs as independent tasks
//! over blocks of the output:
//! - A (the m × k left operand) is packed row-major, k padded with zeros to a multiple of
//!   [`K_ALIGN`], rows padded with zero rows to a multiple of [`ROW_ALIGN`]: one AMX A tile is
//!   16 rows of 64 bytes, loaded straight from it with the row stride. For the `vdpbf16ps`
//!   kernel, A may instead be in B's pair layout (below, tiles of 16 rows; [`PackedA`]'s
//!   `tiled`): that is how the transpose of a row-major matrix packs without transposing
//!   ([`pack_both`]).
//! - B (k × n) is packed in tiles of 16 columns. Tile t is k_pad/2 rows of 16 dwords; dword j of
//!   row r holds (B[2r][16t + j], B[2r+1][16t + j]), the even k in the low half: the "VNNI" pair
//!   layout `tdpbf16ps` wants for its B tile (16 pair-rows of 64 bytes, 1 KiB) and `vdpbf16ps`
//!   for its second operand. n is padded to a multiple of [`N_ALIGN`] with zero columns.
//!
//! A task computes a block of rows × columns over all of k, [`KC`] at a time: the kernels start
//! from the partial sums of the previous chunk (kept in f32 in a scratch block, which loses
//! nothing), so every output is one f32 sum in a fixed order, whatever the blocking or the number
//! of threads. Before the last chunk of a block its destination lines are prefetched for writing,
//! so that the stores that follow do not wait for memory.

use super::{Bf16Kernel, Kernels, Mat};
use rayon::prelude::*;
use std::cell::RefCell;

/// k is padded to a multiple of this (one AMX tile row holds 32 bf16).
pub(super) const K_ALIGN: usize = 32;
/// Columns of one B tile.
pub(super) const TILE_N: usize = 16;
/// n is padded to a multiple of this: both kernels take B two tiles at a time.
pub(super) const N_ALIGN: usize = 32;
/// Rows of packed A are padded to a multiple of this (the AMX kernel's row block).
pub(super) const ROW_ALIGN: usize = 32;
/// k per kernel call: a pair of B tiles (32 KiB) and 32 rows of A (32 KiB), mostly in L1; the C
/// tiles go through the scratch block once per 512 k. (256, which keeps both in L1, was slower in
/// config A's bf16 training: 9 % in the pairwise median of two sets of alternating pairs, 2 % and
/// 7 % in their medians; the sums are the same.)
pub(super) const KC: usize = 512;
/// Columns per task block (and per scratch block): 8 pairs of B tiles.
const NC: usize = 256;

// pack_pair_rows lays out B's pair layout and the tiled A with one routine: the paddings agree.
const _: () = assert!(K_ALIGN == N_ALIGN && N_ALIGN == ROW_ALIGN && TILE_N == 16);

/// Rounds an f32 to bf16 (the high 16 bits of an f32) as `vcvtne2ps2bf16` does: to nearest, ties
/// to even; a NaN stays a (quiet) NaN; infinities stay infinite; finite values past the largest
/// bf16 become infinite; f32 denormals become a zero of their sign (the bf16 dot-product
/// instructions treat denormal inputs as zero anyway).
#[inline]
pub(super) fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return ((bits >> 16) | 0x0040) as u16;
    }
    if bits & 0x7F80_0000 == 0 {
        return ((bits >> 16) & 0x8000) as u16;
    }
    (bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) >> 16) as u16
}

/// The f32 value of a bf16.
#[inline]
pub(super) fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// `x` rounded to bf16 ([`to_bf16`]), as an f32.
#[inline]
pub(super) fn round_bf16(x: f32) -> f32 {
    from_bf16(to_bf16(x))
}

/// The plain scalar bf16 product the kernels are tested against: dst (m × n, rows `dst_row`
/// apart) = [dst +] scale · Σₖ bf16(lhsᵢₖ) · bf16(rhsₖⱼ), each product exact in f32 and the sum
/// taken in f32 in increasing k; then `scale ·` and, when accumulating, `dst +`. The rounding
/// to bf16 is the kernels' (nearest even, NaN kept, f32 denormals to zero).
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

/// 64 bytes, the unit of [`Bf16Buf`].
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct Line([u16; 32]);

/// A 64-byte-aligned buffer of bf16, filled by the packing routines.
pub(super) struct Bf16Buf {
    lines: Vec<Line>,
    len: usize,
}

impl Bf16Buf {
    /// `len` bf16, every one written by `fill` (given the buffer's start), which must write them
    /// all: the buffer is not initialised before.
    ///
    /// # Safety
    /// `fill` must write all `len` elements.
    unsafe fn filled(len: usize, fill: impl FnOnce(*mut u16)) -> Bf16Buf {
        let mut lines: Vec<Line> = Vec::with_capacity(len.div_ceil(32));
        let ptr = lines.as_mut_ptr().cast::<u16>();
        fill(ptr);
        // SAFETY: `fill` wrote the first `len` u16 (contract); a partial last line is zeroed
        // here, so every byte of the lines is initialised.
        unsafe {
            std::ptr::write_bytes(ptr.add(len), 0, lines.capacity() * 32 - len);
            lines.set_len(len.div_ceil(32));
        }
        Bf16Buf { lines, len }
    }

    pub(super) fn as_slice(&self) -> &[u16] {
        // SAFETY: the lines hold at least `len` initialised u16 (Line is plain u16s, align 64).
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast(), self.len) }
    }
}

/// A raw pointer the tasks of one product may share: each writes its own part of the memory.
#[derive(Clone, Copy)]
pub(super) struct SharedPtr<T>(pub(super) *mut T);
// SAFETY: used only to hand an output to the tasks of one product, which write disjoint parts.
unsafe impl<T> Send for SharedPtr<T> {}
// SAFETY: as for Send.
unsafe impl<T> Sync for SharedPtr<T> {}
impl<T> SharedPtr<T> {
    /// The pointer (a method, so that closures capture the wrapper and not the raw field).
    pub(super) fn get(self) -> *mut T {
        self.0
    }
}

/// A (m × k) packed for the bf16 kernels: row-major (layout in the module doc), or, for the
/// `vdpbf16ps` kernel only, `tiled` in B's pair layout (tiles of 16 rows, each k_pad/2 pair-rows
/// of 16 dwords: dword i of pair-row r of tile t holds (A[16t + i][2r], A[16t + i][2r + 1])),
/// which is how [`pack_both`] lays out the transpose of a row-major matrix without transposing.
pub(super) struct PackedA {
    pub(super) data: Bf16Buf,
    /// Rows that are real (the rest up to a multiple of [`ROW_ALIGN`] are zero).
    pub(super) m: usize,
    pub(super) k_pad: usize,
    pub(super) tiled: bool,
}

impl PackedA {
    /// lhs (m × k) rounded to bf16 and packed, by units of rows spread over rayon's threads when
    /// `parallel`. Uses the AVX-512 packing when `hw`, else plain Rust (same result).
    ///
    /// # Safety
    /// lhs must be readable at every (i, p) of m × k; `hw` only if the CPU has AVX512_BF16 (with
    /// AVX-512F/BW).
    pub(super) unsafe fn new(lhs: Mat, m: usize, k: usize, hw: bool, parallel: bool) -> PackedA {
        let k_pad = k.next_multiple_of(K_ALIGN);
        let rows_pad = m.next_multiple_of(ROW_ALIGN);
        // Units of work: 32 rows; when the rows are not contiguous, as many (up to 512) as still
        // give each thread two units, so that each column (a row of the transposed matrix, often
        // a page of its own) is read for many rows at once.
        let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
        let unit = if lhs.col == 1 {
            ROW_ALIGN
        } else {
            (rows_pad / (2 * threads) / ROW_ALIGN * ROW_ALIGN).clamp(ROW_ALIGN, 16 * ROW_ALIGN)
        };
        let units = rows_pad.div_ceil(unit);
        let fill = |out: *mut u16| {
            let out = SharedPtr(out);
            let work = |g: usize| {
                let (i0, group) = (g * unit, unit.min(rows_pad - g * unit));
                let rows = group.min(m - i0);
                // SAFETY: rows i0..i0 + group are elements i0·k_pad..(i0 + group)·k_pad of the
                // buffer, written by this call alone; lhs is readable on m × k (contract).
                unsafe {
                    let out = out.get().add(i0 * k_pad);
                    #[cfg(target_arch = "x86_64")]
                    if hw {
                        return super::avx512::pack_a(lhs, i0, rows, k, k_pad, group, out);
                    }
                    let _ = hw;
                    pack_a_scalar(lhs, i0, rows, k, k_pad, group, out);
                }
            };
            if parallel && units > 1 && m * k >= 1 << 14 {
                (0..units).into_par_iter().for_each(work);
            } else {
                (0..units).for_each(work);
            }
        };
        // SAFETY: the units cover the buffer's rows_pad·k_pad elements, each writing all of its own.
        let data = unsafe { Bf16Buf::filled(rows_pad * k_pad, fill) };
        PackedA { data, m, k_pad, tiled: false }
    }

    /// Elements between consecutive rows (within a group of 16) and between consecutive pairs
    /// of k.
    fn strides(&self) -> (usize, usize) {
        if self.tiled {
            (2, 2 * TILE_N)
        } else {
            (self.k_pad, 2)
        }
    }

    /// Row i (a multiple of 16), from k = kc (even).
    fn at(&self, i: usize, kc: usize) -> *const u16 {
        let (row, pair) = self.strides();
        self.data.as_slice()[i / 16 * (16 * self.k_pad) + i % 16 * row + kc / 2 * pair..].as_ptr()
    }
}

/// M (m × k, rows contiguous) packed in one pass for the two products of a layer's backward:
/// as the left operand of one (m × k, row-major [`PackedA`]) and its transpose as the left
/// operand of the other (k × m, `tiled`: B's pair layout of M itself, so nothing is transposed).
/// Both round as [`PackedA::new`] does. Rows of M are taken 32 at a time, spread over rayon's
/// threads when `parallel`.
///
/// # Safety
/// M readable at every (i, p) of m × k with `mat.col == 1`; the CPU has AVX512_BF16 (with
/// AVX-512F/BW).
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn pack_both(mat: Mat, m: usize, k: usize, parallel: bool) -> (PackedA, PackedA) {
    // SAFETY: forwarded; nothing to compute first.
    unsafe { pack_both_on(mat, m, k, parallel, |_| ()) }
}

/// [`pack_both`] of a matrix computed 32 rows at a time: group g (rows 32g..) by `before(g)`,
/// run just before the group is packed, on the thread that packs it.
///
/// # Safety
/// As [`pack_both`], M being readable once `before` has run for the group; `before(g)` writes
/// only group g's rows.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn pack_both_on(
    mat: Mat,
    m: usize,
    k: usize,
    parallel: bool,
    before: impl Fn(usize) + Sync,
) -> (PackedA, PackedA) {
    let (m_pad, k_pad) = (m.next_multiple_of(ROW_ALIGN), k.next_multiple_of(K_ALIGN));
    let mut pairs = None;
    let fill_rows = |rows_out: *mut u16| {
        let fill_pairs = |pairs_out: *mut u16| {
            // SAFETY: forwarded; both buffers hold m_pad·k_pad elements.
            unsafe {
                pack_pair_rows(mat, m, k, parallel, Some(SharedPtr(rows_out)), SharedPtr(pairs_out), &before)
            }
        };
        // SAFETY: pack_pair_rows writes every element of both buffers.
        pairs = Some(unsafe { Bf16Buf::filled(k_pad * m_pad, fill_pairs) });
    };
    // SAFETY: as above.
    let rows = unsafe { Bf16Buf::filled(m_pad * k_pad, fill_rows) };
    (
        PackedA { data: rows, m, k_pad, tiled: false },
        PackedA { data: pairs.expect("filled with the rows"), m: k, k_pad: m_pad, tiled: true },
    )
}

/// M (m × k, rows contiguous) rounded to bf16 into `pairs_out`, B's pair layout of M (k_pad/16
/// tiles of m_pad/2 pair-rows; the padding zero), and into `rows_out` row-major (m_pad × k_pad)
/// when given, in one pass: 32 rows of M at a time (group g: rows 32g.., each after `before(g)`;
/// every group has real rows), spread over rayon's threads when `parallel`. B packed this way has
/// its k padded to [`ROW_ALIGN`] and its n to [`K_ALIGN`], which are [`PackedB`]'s [`K_ALIGN`] and
/// [`N_ALIGN`]: all four are 32.
///
/// # Safety
/// M readable on m × k with `mat.col == 1` (a group once `before` has run for it); the CPU has
/// AVX512_BF16 (with AVX-512F/BW); the outputs writable for m_pad·k_pad elements (m_pad = m and
/// k_pad = k rounded up to 32).
#[cfg(target_arch = "x86_64")]
unsafe fn pack_pair_rows(
    mat: Mat,
    m: usize,
    k: usize,
    parallel: bool,
    rows_out: Option<SharedPtr<u16>>,
    pairs_out: SharedPtr<u16>,
    before: &(impl Fn(usize) + Sync),
) {
    assert_eq!(mat.col, 1, "pack_pair_rows: rows must be contiguous");
    let (m_pad, k_pad) = (m.next_multiple_of(ROW_ALIGN), k.next_multiple_of(K_ALIGN));
    let work = |g: usize| {
        before(g);
        // SAFETY: rows g·32.. of the row-major buffer and pair-rows g·16.. of every tile are
        // this unit's alone; M is readable on m × k (contract).
        unsafe {
            super::avx512::pack_rows_and_pairs(
                mat,
                m,
                k,
                g * ROW_ALIGN,
                (k_pad, m_pad),
                rows_out.map(|r| r.get()),
                pairs_out.get(),
            )
        }
    };
    let units = m_pad / ROW_ALIGN;
    if parallel && units > 1 && m * k >= 1 << 14 {
        (0..units).into_par_iter().for_each(work);
    } else {
        (0..units).for_each(work);
    }
}

/// `group` rows of A from row i0 (`rows` of them real) in plain Rust.
///
/// # Safety
/// lhs readable on rows i0..i0 + rows, columns 0..k; `out` writable for group·k_pad.
unsafe fn pack_a_scalar(
    lhs: Mat,
    i0: usize,
    rows: usize,
    k: usize,
    k_pad: usize,
    group: usize,
    out: *mut u16,
) {
    for i in 0..group {
        for p in 0..k_pad {
            let v = if i < rows && p < k {
                // SAFETY: (i0 + i, p) is inside the matrix.
                to_bf16(unsafe { *lhs.ptr.add((i0 + i) * lhs.row + p * lhs.col) })
            } else {
                0
            };
            // SAFETY: inside the group.
            unsafe { *out.add(i * k_pad + p) = v };
        }
    }
}

/// B packed for the bf16 kernels (layout in the module doc).
pub(super) struct PackedB {
    pub(super) data: Bf16Buf,
    pub(super) k: usize,
    pub(super) n: usize,
    pub(super) k_pad: usize,
}

impl PackedB {
    /// u16 elements in one tile of 16 columns.
    pub(super) fn tile_len(&self) -> usize {
        self.k_pad * TILE_N
    }

    /// Tile t from pair-row p (k = 2p).
    fn tile(&self, t: usize, p: usize) -> *const u16 {
        self.data.as_slice()[t * self.tile_len() + 2 * TILE_N * p..].as_ptr()
    }

    /// B = M (k × n) from [`pack_both`]'s `tiled` packing of Mᵀ, which is B's pair layout of M:
    /// the same buffer, taken as it is; k is M's real rows.
    pub(super) fn from_tiled(at: PackedA, k: usize) -> PackedB {
        assert!(at.tiled && k <= at.k_pad, "PackedB::from_tiled: not the pair layout of a k-row matrix");
        PackedB { data: at.data, k, n: at.m, k_pad: at.k_pad }
    }

    /// rhs (k × n) rounded to bf16 and packed; the tiles are split between rayon's threads when
    /// `parallel`. Uses the AVX-512 packing when `hw`, else plain Rust (same result).
    ///
    /// # Safety
    /// rhs must be readable at every (p, j) of k × n; `hw` only if the CPU has AVX512_BF16 (with
    /// AVX-512F/BW).
    pub(super) unsafe fn new(rhs: Mat, k: usize, n: usize, hw: bool, parallel: bool) -> PackedB {
        let (k_pad, n_pad) = (k.next_multiple_of(K_ALIGN), n.next_multiple_of(N_ALIGN));
        #[cfg(target_arch = "x86_64")]
        if hw && rhs.col == 1 {
            // Rows contiguous: 32 rows at a time into the pair-rows of every tile (what
            // `pack_both` does for its transpose), rather than tiles at a time.
            let fill = |out: *mut u16| {
                // SAFETY: forwarded; the buffer holds k_pad·n_pad elements.
                unsafe { pack_pair_rows(rhs, k, n, parallel, None, SharedPtr(out), &|_| ()) }
            };
            // SAFETY: pack_pair_rows writes every element.
            let data = unsafe { Bf16Buf::filled(n_pad * k_pad, fill) };
            return PackedB { data, k, n, k_pad };
        }
        let tile_len = k_pad * TILE_N;
        let tiles = n_pad / TILE_N;
        // (Here without the AVX-512 packing, or rhs not row-major.) Units of work: one tile; when
        // rhs is row-major, as many (up to 32) as still give each thread two units, so that each
        // row (often a page of its own) is read for many tiles.
        let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
        let unit = if rhs.col == 1 { (tiles / (2 * threads)).clamp(1, 32) } else { 1 };
        let fill = |out: *mut u16| {
            let out = SharedPtr(out);
            let work = |g: usize| {
                let (t0, count) = (g * unit, unit.min(tiles - g * unit));
                // SAFETY: tiles t0..t0 + count are elements t0·tile_len..(t0 + count)·tile_len,
                // written by this call alone; rhs is readable on k × n (contract).
                unsafe {
                    let out = out.get().add(t0 * tile_len);
                    #[cfg(target_arch = "x86_64")]
                    if hw {
                        return super::avx512::pack_b_tiles(rhs, k, n, t0, count, k_pad, out);
                    }
                    let _ = hw;
                    for t in 0..count {
                        pack_b_tile_scalar(rhs, k, n, t0 + t, k_pad, out.add(t * tile_len));
                    }
                }
            };
            let units = tiles.div_ceil(unit);
            if parallel && units > 1 && k * n >= 1 << 14 {
                (0..units).into_par_iter().for_each(work);
            } else {
                (0..units).for_each(work);
            }
        };
        // SAFETY: the tiles cover the buffer's tiles·tile_len elements, each writing all of its own.
        let data = unsafe { Bf16Buf::filled(tiles * tile_len, fill) };
        PackedB { data, k, n, k_pad }
    }
}

/// Tile t of [`PackedB`] in plain Rust.
///
/// # Safety
/// rhs readable on k × n; `out` writable for k_pad·16 elements.
unsafe fn pack_b_tile_scalar(rhs: Mat, k: usize, n: usize, t: usize, k_pad: usize, out: *mut u16) {
    for r in 0..k_pad / 2 {
        for j in 0..TILE_N {
            let col = t * TILE_N + j;
            for h in 0..2 {
                let p = 2 * r + h;
                let v = if p < k && col < n {
                    // SAFETY: (p, col) is inside k × n.
                    to_bf16(unsafe { *rhs.ptr.add(p * rhs.row + col * rhs.col) })
                } else {
                    0
                };
                // SAFETY: inside the tile.
                unsafe { *out.add(2 * TILE_N * r + 2 * j + h) = v };
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

// SAFETY: the bias pointer is only read, by the tasks of one product, while the caller's slice lives.
unsafe impl Send for Epilogue {}
// SAFETY: as for Send.
unsafe impl Sync for Epilogue {}

impl Epilogue {
    /// Whether the sums can be stored as they are (no scale, no dst to add, no bias).
    pub(super) fn plain(&self) -> bool {
        self.scale == 1.0 && !self.accumulate && self.bias.is_null()
    }
}

/// One task: output rows i0..i1 (i0 a multiple of 32) × B tile pairs p0..p1, over all of k.
#[derive(Clone, Copy)]
pub(super) struct Task {
    pub(super) i0: usize,
    pub(super) i1: usize,
    pub(super) p0: usize,
    pub(super) p1: usize,
}

/// Where a task's sums go: dst (rows `dst_row` apart) through the epilogue.
#[derive(Clone, Copy)]
pub(super) struct Out {
    pub(super) dst: SharedPtr<f32>,
    pub(super) dst_row: usize,
    pub(super) e: Epilogue,
}

/// How the tasks of a product are formed and spread over the threads.
#[derive(Clone, Copy)]
pub(super) enum Schedule {
    /// Blocks of rows × columns, taken by rayon's threads as they come (or all on this thread).
    Blocks { parallel: bool },
    /// All rows, the column pairs split evenly between the threads (few-row products: each
    /// thread streams its own share of B once).
    Columns,
}

/// `super::matmul_rhs` on a bf16 kernel with B packed: A packed here, then the product, `bias`
/// (n floats) added to every row on the way out.
///
/// # Safety
/// As [`super::matmul`], lhs m × b.k; the CPU has `kind`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_packed_rhs(
    kind: Bf16Kernel,
    m: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    b: &PackedB,
    scale: f32,
    bias: Option<&[f32]>,
    parallel: bool,
) {
    // SAFETY: forwarded; a bf16 kernel implies AVX512_BF16 and AVX-512F/BW (Kernels::detect).
    let a = unsafe { PackedA::new(lhs, m, b.k, true, parallel) };
    let bias = bias.map_or(std::ptr::null(), |b| b.as_ptr());
    let out = Out { dst: SharedPtr(dst), dst_row, e: Epilogue { scale, accumulate, bias } };
    // SAFETY: forwarded; `a` and `b` pack lhs and rhs for the same k.
    unsafe { gemm_packed(kind, &a, b, out, Schedule::Blocks { parallel }) };
}

/// bf16 without a bf16 kernel: round both operands into f32 copies and use the fp32 kernel.
///
/// # Safety
/// As [`super::matmul`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn emulate(
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

thread_local! {
    /// Each thread's scratch block for the partial sums of a task (grown as needed, reused).
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// dst (a.m × b.n) ← the epilogue of A · B on a bf16 kernel, as `schedule` says.
///
/// # Safety
/// dst writable (and readable when accumulating) on a.m × b.n with rows `dst_row` apart, not
/// overlapping A or B; the bias, if any, b.n floats; a.k_pad == b.k_pad; the CPU has `kind`.
pub(super) unsafe fn gemm_packed(kind: Bf16Kernel, a: &PackedA, b: &PackedB, out: Out, schedule: Schedule) {
    assert_eq!(a.k_pad, b.k_pad, "bf16 operands packed for different k");
    let (m, pairs) = (a.m, b.n.div_ceil(N_ALIGN));
    if m == 0 || pairs == 0 {
        return;
    }
    let run = |task: Task| {
        SCRATCH.with_borrow_mut(|scratch| {
            // SAFETY: the task's rows and columns of dst are its own; the rest is forwarded.
            unsafe { run_task(kind, a, b, out, task, scratch) }
        })
    };
    match schedule {
        Schedule::Columns => {
            // Each thread its share of the column pairs, for all rows, 64 rows at a time (more
            // would touch too many pages of dst per pair of B tiles).
            let threads = rayon::current_num_threads().clamp(1, pairs);
            let work = |th: usize| {
                for i0 in (0..m).step_by(64) {
                    run(Task {
                        i0,
                        i1: m.min(i0 + 64),
                        p0: th * pairs / threads,
                        p1: (th + 1) * pairs / threads,
                    });
                }
            };
            if threads == 1 {
                work(0);
            } else {
                (0..threads).into_par_iter().for_each(work);
            }
        }
        Schedule::Blocks { parallel } => {
            let threads = if parallel { rayon::current_num_threads().max(1) } else { 1 };
            // The largest blocks that still give every thread several tasks.
            let (mut mc, mut pc) = (128, NC / N_ALIGN);
            while m.div_ceil(mc) * pairs.div_ceil(pc) < 4 * threads && (mc > 32 || pc > 1) {
                if pc > 1 {
                    pc /= 2;
                } else {
                    mc /= 2;
                }
            }
            let (row_blocks, col_blocks) = (m.div_ceil(mc), pairs.div_ceil(pc));
            let task = |id: usize| {
                let (ib, jb) = (id / col_blocks, id % col_blocks);
                Task { i0: ib * mc, i1: m.min((ib + 1) * mc), p0: jb * pc, p1: pairs.min((jb + 1) * pc) }
            };
            if threads > 1 && row_blocks * col_blocks > 1 {
                (0..row_blocks * col_blocks).into_par_iter().for_each(|id| run(task(id)));
            } else {
                (0..row_blocks * col_blocks).for_each(|id| run(task(id)));
            }
        }
    }
}

/// One task, NC columns at a time; within them k in chunks of [`KC`], each chunk over all the
/// column pairs (outer: a pair of B tiles stays mostly in L1) and all the row blocks (inner).
///
/// # Safety
/// As [`gemm_packed`]; the task's block of dst is written by this call alone.
unsafe fn run_task(kind: Bf16Kernel, a: &PackedA, b: &PackedB, out: Out, task: Task, scratch: &mut Vec<f32>) {
    let rows = task.i1 - task.i0;
    let pc = NC / N_ALIGN;
    let chunks = b.k_pad.div_ceil(KC).max(1);
    if chunks > 1 {
        scratch.resize(rows.next_multiple_of(ROW_ALIGN) * NC, 0.0);
    }
    #[cfg(target_arch = "x86_64")]
    // SAFETY: AMX is usable when `kind` is Amx (contract).
    let _tiles = (kind == Bf16Kernel::Amx).then(|| unsafe { super::amx::Tiles::load() });
    let mut q0 = task.p0;
    while q0 < task.p1 {
        let q1 = task.p1.min(q0 + pc);
        for c in 0..chunks {
            let kc = c * KC;
            let step = Step {
                a_row0: a.at(task.i0, kc),
                a_stride: a.strides().0,
                a_tile: 16 * a.k_pad,
                a_tiled: a.tiled,
                rows,
                pairs: (b.k_pad - kc).min(KC) / 2,
                first: c == 0,
                last: c == chunks - 1,
                scratch: scratch.as_mut_ptr(),
                scratch_row: NC,
            };
            for p in q0..q1 {
                let t = 2 * p;
                let cols = b.n - t * TILE_N;
                let blk = Block {
                    b0: b.tile(t, kc / 2),
                    b1: b.tile(t + 1, kc / 2),
                    col: t * TILE_N,
                    cols: cols.min(2 * TILE_N),
                    scratch_col: (p - q0) * 2 * TILE_N,
                };
                // SAFETY: forwarded; rows i0..i1 and columns of pair p of dst are this task's.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let dst = out.dst.get().add(task.i0 * out.dst_row);
                    match kind {
                        Bf16Kernel::Amx => super::amx::step(&step, &blk, dst, out.dst_row, &out.e),
                        Bf16Kernel::Avx512Bf16 => {
                            super::avx512::dp_step(&step, &blk, dst, out.dst_row, &out.e)
                        }
                    }
                }
                #[cfg(not(target_arch = "x86_64"))]
                let _ = (&step, &blk, kind);
            }
        }
        q0 = q1;
    }
}

/// One chunk of k for a task's rows: what the kernels need besides the B tiles.
pub(super) struct Step {
    /// Packed A at (the task's first row, the chunk's first k); rows `a_stride` elements apart
    /// within a group of 16, groups `a_tile` apart (row-major: a_tile = 16·a_stride).
    pub(super) a_row0: *const u16,
    pub(super) a_stride: usize,
    pub(super) a_tile: usize,
    /// A in B's pair layout ([`PackedA`]'s `tiled`): pairs of k 32 elements apart, not 2.
    pub(super) a_tiled: bool,
    /// The task's real rows (packed A has zero rows up to a multiple of 32 beyond them).
    pub(super) rows: usize,
    /// Pairs of k in this chunk.
    pub(super) pairs: usize,
    /// First chunk: the sums start at zero (else from the scratch block).
    pub(super) first: bool,
    /// Last chunk: the sums go to dst (else to the scratch block).
    pub(super) last: bool,
    /// The task's partial sums: row i (from the task's first row), column j (from its current
    /// column block) at scratch + i·scratch_row + j.
    pub(super) scratch: *mut f32,
    pub(super) scratch_row: usize,
}

impl Step {
    /// Packed A at row i (from the task's first row) of the chunk.
    pub(super) fn a_row(&self, i: usize) -> *const u16 {
        self.a_row0.wrapping_add(i / 16 * self.a_tile + i % 16 * self.a_stride)
    }
}

/// One pair of B tiles within a [`Step`].
pub(super) struct Block {
    /// The two tiles at the chunk's first pair-row.
    pub(super) b0: *const u16,
    pub(super) b1: *const u16,
    /// First output column of the pair, and how many of its 32 are real.
    pub(super) col: usize,
    pub(super) cols: usize,
    /// The pair's first column in the scratch block.
    pub(super) scratch_col: usize,
}
