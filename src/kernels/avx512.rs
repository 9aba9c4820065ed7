//! AVX-512 pieces of the bf16 kernels: loading 16 × 16 blocks of strided f32 operands (transposed
//! in registers when the operand is column-major), rounding them to bf16 with `vcvtne2ps2bf16`,
//! packing A and B (layouts in [`super::bf16`]), the `vdpbf16ps` kernel and the epilogue stores.

use super::bf16::{Block, Epilogue, Step, TILE_N};
use super::Mat;
use std::arch::x86_64::*;

/// The first `n` of 16 lanes.
#[inline]
pub(super) fn mask16(n: usize) -> __mmask16 {
    if n >= 16 {
        0xFFFF
    } else {
        (1u16 << n) - 1
    }
}

/// Transposes 16 vectors of 16 floats in place: afterwards vector j holds what was lane j of
/// each vector. Three rounds of shuffles: within 128-bit lanes (`unpack`, `shuffle_ps`), then
/// across them (`shuffle_f32x4` twice).
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn transpose16(r: &mut [__m512; 16]) {
    let mut t = [_mm512_setzero_ps(); 16];
    for i in 0..8 {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    // r[4g + c], 128-bit lane L: rows 4g..4g+4 of column 4L + c.
    for g in 0..4 {
        r[4 * g] = _mm512_shuffle_ps::<0x44>(t[4 * g], t[4 * g + 2]);
        r[4 * g + 1] = _mm512_shuffle_ps::<0xEE>(t[4 * g], t[4 * g + 2]);
        r[4 * g + 2] = _mm512_shuffle_ps::<0x44>(t[4 * g + 1], t[4 * g + 3]);
        r[4 * g + 3] = _mm512_shuffle_ps::<0xEE>(t[4 * g + 1], t[4 * g + 3]);
    }
    for c in 0..4 {
        t[c] = _mm512_shuffle_f32x4::<0x88>(r[c], r[4 + c]);
        t[4 + c] = _mm512_shuffle_f32x4::<0xDD>(r[c], r[4 + c]);
        t[8 + c] = _mm512_shuffle_f32x4::<0x88>(r[8 + c], r[12 + c]);
        t[12 + c] = _mm512_shuffle_f32x4::<0xDD>(r[8 + c], r[12 + c]);
    }
    for c in 0..4 {
        r[c] = _mm512_shuffle_f32x4::<0x88>(t[c], t[8 + c]);
        r[4 + c] = _mm512_shuffle_f32x4::<0x88>(t[4 + c], t[12 + c]);
        r[8 + c] = _mm512_shuffle_f32x4::<0xDD>(t[c], t[8 + c]);
        r[12 + c] = _mm512_shuffle_f32x4::<0xDD>(t[4 + c], t[12 + c]);
    }
}

/// The 16 × 16 block of `mat` at (r0, c0): vector t holds row r0 + t, columns c0..c0 + 16; rows
/// from `nr` and columns from `nc` on are zero (not read).
///
/// # Safety
/// `mat` must be readable at (r0 + t, c0 + u) for t < nr, u < nc.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn load_block(mat: Mat, r0: usize, c0: usize, nr: usize, nc: usize) -> [__m512; 16] {
    let (nr, nc) = (nr.min(16), nc.min(16));
    let mut v = [_mm512_setzero_ps(); 16];
    if nr == 0 || nc == 0 {
        return v;
    }
    if mat.col == 1 {
        let mask = mask16(nc);
        for (t, v) in v.iter_mut().enumerate().take(nr) {
            // SAFETY: the masked lanes are columns c0..c0 + nc of row r0 + t, readable.
            *v = unsafe { _mm512_maskz_loadu_ps(mask, mat.ptr.add((r0 + t) * mat.row + c0)) };
        }
    } else if mat.row == 1 {
        let mask = mask16(nr);
        for (u, v) in v.iter_mut().enumerate().take(nc) {
            // SAFETY: the masked lanes are rows r0..r0 + nr of column c0 + u, readable.
            *v = unsafe { _mm512_maskz_loadu_ps(mask, mat.ptr.add(r0 + (c0 + u) * mat.col)) };
        }
        transpose16(&mut v);
    } else {
        for (t, v) in v.iter_mut().enumerate().take(nr) {
            let mut row = [0f32; 16];
            for (u, x) in row.iter_mut().enumerate().take(nc) {
                // SAFETY: (r0 + t, c0 + u) is readable.
                *x = unsafe { *mat.ptr.add((r0 + t) * mat.row + (c0 + u) * mat.col) };
            }
            *v = _mm512_loadu_ps(row.as_ptr());
        }
    }
    v
}

/// Two vectors of 16 floats rounded to bf16 (as [`super::bf16::to_bf16`]): `lo` in the low 16
/// words, `hi` in the high 16.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
fn to_bf16x32(lo: __m512, hi: __m512) -> __m512i {
    // SAFETY: __m512bh and __m512i are both 64 bytes of plain bits.
    unsafe { std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(hi, lo)) }
}

/// `group` rows of A from row i0 (`rows` ≤ group of them real) into `out` (group × k_pad,
/// row-major), rounded to bf16; columns past k and rows past `rows` are zero.
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512_BF16; `lhs` readable on rows i0..i0 + rows, columns 0..k;
/// `out` writable for group·k_pad; k_pad a multiple of 32, ≥ k; group a multiple of 16.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_a(
    lhs: Mat,
    i0: usize,
    rows: usize,
    k: usize,
    k_pad: usize,
    group: usize,
    out: *mut u16,
) {
    let block = |r0: usize, c0: usize| {
        let nr = rows.saturating_sub(r0);
        let rows16: [__m512i; 16] = if lhs.row == 1 && lhs.col != 1 {
            // Column p holds the rows contiguously: convert k pairs (2q, 2q + 1) for 16 rows,
            // interleave them into dwords (a column of 16 k-pairs), then transpose the 16 × 16
            // dwords: half the shuffles of transposing the f32.
            let mask = mask16(nr);
            let mut v = [_mm512_setzero_ps(); 16];
            for (q, v) in v.iter_mut().enumerate() {
                let p = c0 + 2 * q;
                let col = |p: usize| lhs.ptr.wrapping_add(i0 + r0 + p * lhs.col);
                // SAFETY: the masked lanes are rows i0 + r0.. (nr of them) of columns p, p + 1
                // when below k (else nothing is read).
                let (even, odd) = unsafe {
                    (
                        if p < k { _mm512_maskz_loadu_ps(mask, col(p)) } else { _mm512_setzero_ps() },
                        if p + 1 < k { _mm512_maskz_loadu_ps(mask, col(p + 1)) } else { _mm512_setzero_ps() },
                    )
                };
                *v = _mm512_castsi512_ps(_mm512_permutexvar_epi16(interleave(), to_bf16x32(even, odd)));
            }
            transpose16(&mut v);
            v.map(|v| _mm512_castps_si512(v))
        } else {
            // SAFETY: rows below `rows` and columns below k are readable.
            let (lo, hi) = unsafe {
                (
                    load_block(lhs, i0 + r0, c0, nr, k.saturating_sub(c0)),
                    load_block(lhs, i0 + r0, c0 + 16, nr, k.saturating_sub(c0 + 16)),
                )
            };
            std::array::from_fn(|t| to_bf16x32(lo[t], hi[t]))
        };
        for (t, row) in rows16.iter().enumerate() {
            // SAFETY: row r0 + t < group, columns c0..c0 + 32 ≤ k_pad: inside `out`.
            unsafe { _mm512_storeu_si512(out.add((r0 + t) * k_pad + c0).cast(), *row) };
        }
    };
    if lhs.col == 1 {
        // Rows are contiguous: row by row, one stream in and one out, 32 values at a time.
        for i in 0..group {
            let dst = out.wrapping_add(i * k_pad);
            if i >= rows {
                // SAFETY: row i < group of `out`, k_pad elements.
                unsafe { std::ptr::write_bytes(dst, 0, k_pad) };
                continue;
            }
            let src = lhs.ptr.wrapping_add((i0 + i) * lhs.row);
            for c0 in (0..k_pad).step_by(32) {
                // SAFETY: the masked lanes are columns c0.. below k of row i0 + i, readable; the
                // store is columns c0..c0 + 32 ≤ k_pad of row i of `out`.
                unsafe {
                    let (lo, hi) = if c0 + 32 <= k {
                        (_mm512_loadu_ps(src.add(c0)), _mm512_loadu_ps(src.add(c0 + 16)))
                    } else {
                        (
                            _mm512_maskz_loadu_ps(mask16(k.saturating_sub(c0)), src.wrapping_add(c0)),
                            _mm512_maskz_loadu_ps(
                                mask16(k.saturating_sub(c0 + 16)),
                                src.wrapping_add(c0 + 16),
                            ),
                        )
                    };
                    _mm512_storeu_si512(dst.add(c0).cast(), to_bf16x32(lo, hi));
                }
            }
        }
    } else {
        // Columns are (or may be) far apart, each on a page of its own, and so are the packed
        // rows: tiles of up to 512 rows × 512 columns touch at most 1024 pages (the second-level
        // TLB holds more), each read and written for a few hundred bytes at once.
        for kb in (0..k_pad).step_by(512) {
            for c0 in (kb..k_pad.min(kb + 512)).step_by(32) {
                for r0 in (0..group).step_by(16) {
                    block(r0, c0);
                }
            }
        }
    }
}

/// The word permutation that interleaves two converted vectors (`to_bf16x32(even, odd)`) into
/// dwords (even j, odd j): word 2j takes word j, word 2j + 1 word 16 + j.
#[target_feature(enable = "avx512f,avx512bw")]
#[inline]
fn interleave() -> __m512i {
    _mm512_set_epi16(
        31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18,
        2, 17, 1, 16, 0,
    )
}

/// Tiles t0..t0 + count (columns 16t0..) of rhs (k × n) in the pair layout of
/// [`super::bf16::PackedB`], into `out` (count tiles of k_pad·16 elements), 32 k at a time for
/// all the tiles. (A row-major rhs goes through [`pack_rows_and_pairs`] instead.)
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512_BF16; `rhs` readable on k × n; k_pad a multiple of 32, ≥ k;
/// `out` writable for count·k_pad·16 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_b_tiles(
    rhs: Mat,
    k: usize,
    n: usize,
    t0: usize,
    count: usize,
    k_pad: usize,
    out: *mut u16,
) {
    for k0 in (0..k_pad).step_by(32) {
        for t in 0..count {
            // SAFETY: chunk k0 of tile t0 + t, inside `out` (contract).
            unsafe { pack_b_chunk(rhs, k, n, t0 + t, k0, out.add(t * k_pad * TILE_N + k0 * TILE_N)) };
        }
    }
}

/// Rows i0..i0 + 32 of M (m × k, rows contiguous; rows past m are zero) into `pairs_out`, B's
/// pair layout of M (k_pad/16 tiles of m_pad/2 pair-rows: pair-row r of tile t holds
/// (M[2r][16t + j], M[2r + 1][16t + j]) in dword j), and into `rows_out` (m_pad × k_pad,
/// row-major) when given. Two rows at a time, 32 columns of each: converted, stored as they are,
/// and interleaved into the pair-rows of two tiles; columns in blocks of 512 (32 tiles written
/// at once).
///
/// # Safety
/// The CPU has AVX-512F/BW and AVX512_BF16; M readable on m × k with `mat.col == 1`; i0 a
/// multiple of 32 below m_pad (a multiple of 32, ≥ m); k_pad a multiple of 32, ≥ k; both outputs
/// writable for m_pad·k_pad elements, their rows i0..i0 + 32 (pair-rows i0/2..) this call's.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
pub(super) unsafe fn pack_rows_and_pairs(
    mat: Mat,
    m: usize,
    k: usize,
    i0: usize,
    (k_pad, m_pad): (usize, usize),
    rows_out: Option<*mut u16>,
    pairs_out: *mut u16,
) {
    // Word 2j of the low result takes word j of the even row, word 2j + 1 word j of the odd row
    // (index 32 + j); the high result the same from word 16 + j.
    let lo_idx = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34,
        2, 33, 1, 32, 0,
    );
    let hi_idx = _mm512_set_epi16(
        63, 31, 62, 30, 61, 29, 60, 28, 59, 27, 58, 26, 57, 25, 56, 24, 55, 23, 54, 22, 53, 21, 52, 20, 51,
        19, 50, 18, 49, 17, 48, 16,
    );
    let tile_len = m_pad * TILE_N;
    let row = |i: usize, c0: usize| {
        if i >= m {
            return _mm512_setzero_si512();
        }
        let src = mat.ptr.wrapping_add(i * mat.row + c0);
        // SAFETY: the masked lanes are columns c0.. below k of row i < m, readable.
        let (lo, hi) = unsafe {
            if c0 + 32 <= k {
                (_mm512_loadu_ps(src), _mm512_loadu_ps(src.add(16)))
            } else {
                (
                    _mm512_maskz_loadu_ps(mask16(k.saturating_sub(c0)), src),
                    _mm512_maskz_loadu_ps(mask16(k.saturating_sub(c0 + 16)), src.wrapping_add(16)),
                )
            }
        };
        to_bf16x32(lo, hi)
    };
    for cb in (0..k_pad).step_by(512) {
        for p in (i0..i0 + 32).step_by(2) {
            for c0 in (cb..k_pad.min(cb + 512)).step_by(32) {
                let (even, odd) = (row(p, c0), row(p + 1, c0));
                let t = c0 / TILE_N;
                // SAFETY: rows p, p + 1 < m_pad, columns c0..c0 + 32 ≤ k_pad of `rows_out`;
                // pair-row p/2 of tiles t and t + 1 < k_pad/16 of `pairs_out` (contract).
                unsafe {
                    if let Some(rows_out) = rows_out {
                        _mm512_storeu_si512(rows_out.add(p * k_pad + c0).cast(), even);
                        _mm512_storeu_si512(rows_out.add((p + 1) * k_pad + c0).cast(), odd);
                    }
                    let pair_row = pairs_out.add(t * tile_len + p / 2 * 2 * TILE_N);
                    _mm512_storeu_si512(pair_row.cast(), _mm512_permutex2var_epi16(even, lo_idx, odd));
                    _mm512_storeu_si512(
                        pair_row.add(tile_len).cast(),
                        _mm512_permutex2var_epi16(even, hi_idx, odd),
                    );
                }
            }
        }
    }
}

/// Pair-rows k0/2..k0/2 + 16 of tile t (columns 16t..16t + 16) of rhs (k × n), into `out`
/// (16 rows of 32 bf16).
///
/// # Safety
/// As [`pack_b_tiles`]; `out` writable for 512 elements.
#[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
#[inline]
unsafe fn pack_b_chunk(rhs: Mat, k: usize, n: usize, t: usize, k0: usize, out: *mut u16) {
    let j0 = t * TILE_N;
    let nc = n.saturating_sub(j0).min(TILE_N);
    let interleave = interleave();
    {
        let (nk_lo, nk_hi) = (k.saturating_sub(k0).min(16), k.saturating_sub(k0 + 16).min(16));
        if rhs.row == 1 && rhs.col != 1 {
            // Column j holds k contiguously: 32 values of k are already 16 pairs; convert each
            // column, then transpose the 16 × 16 dwords into pair-rows.
            let mut v = [_mm512_setzero_ps(); 16];
            for (u, v) in v.iter_mut().enumerate().take(nc) {
                let col = rhs.ptr.wrapping_add(k0 + (j0 + u) * rhs.col);
                // SAFETY: the masked lanes are rows k0.. (nk_lo, then nk_hi of them) of column
                // j0 + u, readable.
                let (lo, hi) = unsafe {
                    (
                        _mm512_maskz_loadu_ps(mask16(nk_lo), col),
                        _mm512_maskz_loadu_ps(mask16(nk_hi), col.wrapping_add(16)),
                    )
                };
                *v = _mm512_castsi512_ps(to_bf16x32(lo, hi));
            }
            transpose16(&mut v);
            for (r, v) in v.iter().enumerate() {
                // SAFETY: pair-row r of this chunk, 64 bytes inside the tile.
                unsafe { _mm512_storeu_ps(out.add(2 * TILE_N * r).cast(), *v) };
            }
        } else {
            // SAFETY: rows below k and columns below n are readable.
            let (lo, hi) =
                unsafe { (load_block(rhs, k0, j0, nk_lo, nc), load_block(rhs, k0 + 16, j0, nk_hi, nc)) };
            for r in 0..16 {
                let (even, odd) =
                    if r < 8 { (lo[2 * r], lo[2 * r + 1]) } else { (hi[2 * r - 16], hi[2 * r - 15]) };
                let pair = _mm512_permutexvar_epi16(interleave, to_bf16x32(even, odd));
                // SAFETY: pair-row r of this chunk, 64 bytes inside the tile.
                unsafe { _mm512_storeu_si512(out.add(2 * TILE_N * r).cast(), pair) };
            }
        }
    }
}

/// Writes 16 sums (the first `cols` of them) through the epilogue: v = scale·acc, dst + v when
/// accumulating, v + bias when `bias` is not null.
///
/// # Safety
/// dst (and bias, if not null) valid for `cols` ≤ 16 floats.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) unsafe fn store16(dst: *mut f32, cols: usize, acc: __m512, bias: *const f32, e: &Epilogue) {
    let mask = mask16(cols);
    let mut v = _mm512_mul_ps(acc, _mm512_set1_ps(e.scale));
    if e.accumulate {
        // SAFETY: masked to the `cols` valid floats of dst.
        v = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(mask, dst) }, v);
    }
    if !bias.is_null() {
        // SAFETY: masked to the `cols` valid floats of the bias.
        v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(mask, bias) });
    }
    // SAFETY: masked to the `cols` valid floats of dst.
    unsafe { _mm512_mask_storeu_ps(dst, mask, v) };
}

/// Prefetches for writing the lines dst will take: `rows` rows (`dst_row` apart) of the first
/// `cols` ≤ 32 floats from `dst`.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn prefetch_rows(dst: *mut f32, dst_row: usize, rows: usize, cols: usize) {
    for i in 0..rows {
        let row = dst.wrapping_add(i * dst_row);
        // A prefetch never faults, whatever the address.
        _mm_prefetch::<_MM_HINT_ET0>(row.cast_const().cast());
        if cols > 16 {
            _mm_prefetch::<_MM_HINT_ET0>(row.wrapping_add(16).cast_const().cast());
        }
    }
}

/// The bias pointer for columns from `col`, or null.
#[inline]
pub(super) fn bias_at(e: &Epilogue, col: usize) -> *const f32 {
    if e.bias.is_null() {
        e.bias
    } else {
        e.bias.wrapping_add(col)
    }
}

/// MR rows of packed A (rows `a_stride` elements apart; or, `TILED`, MR consecutive rows of
/// one tile of B's pair layout) times two B tiles, over `pairs` pairs of k, with `vdpbf16ps`,
/// added to `acc` (acc[i][h]: row i, columns 16h..16h + 16 of the pair). Each `vdpbf16ps` adds a
/// pair's odd-k product, then its even-k one, to each lane.
///
/// # Safety
/// `a` readable for MR rows of 2·pairs (`TILED`: `pairs` pair-rows of 32 elements, MR ≤ 16
/// dwords of each), b0 and b1 for `pairs` rows of 32.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(super) unsafe fn dp_kernel<const MR: usize, const TILED: bool>(
    mut acc: [[__m512; 2]; MR],
    a: *const u16,
    a_stride: usize,
    b0: *const u16,
    b1: *const u16,
    pairs: usize,
) -> [[__m512; 2]; MR] {
    for r in 0..pairs {
        // SAFETY: pair-row r of both tiles and dword r of the MR rows are readable (contract).
        unsafe {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * r).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * r).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let at = if TILED { 2 * i + 2 * TILE_N * r } else { i * a_stride + 2 * r };
                let x = a.add(at).cast::<i32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
    }
    acc
}

/// Rows i0..i0 + MR of a [`Step`] on one [`Block`]: start from zero or the scratch block, run
/// [`dp_kernel`] over the chunk, then store to the scratch block or (last chunk) through the
/// epilogue to dst (the task's first row, column 0).
///
/// # Safety
/// As [`dp_step`].
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
unsafe fn dp_rows<const MR: usize, const TILED: bool>(
    s: &Step,
    blk: &Block,
    i0: usize,
    dst: *mut f32,
    dst_row: usize,
    e: &Epilogue,
) {
    let cols = [blk.cols.min(16), blk.cols.saturating_sub(16)];
    let sc = s.scratch.wrapping_add(i0 * s.scratch_row + blk.scratch_col);
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    if !s.first {
        for (i, acc) in acc.iter_mut().enumerate() {
            // SAFETY: rows i0.. of the scratch block, 32 columns of the pair, written by the
            // previous chunk.
            unsafe {
                *acc = [
                    _mm512_loadu_ps(sc.add(i * s.scratch_row)),
                    _mm512_loadu_ps(sc.add(i * s.scratch_row + 16)),
                ]
            };
        }
    }
    let d = dst.wrapping_add(i0 * dst_row + blk.col);
    if s.last {
        prefetch_rows(d, dst_row, MR, blk.cols);
    }
    // SAFETY: rows i0..i0 + MR of A and the chunk of both tiles are readable.
    let acc = unsafe { dp_kernel::<MR, TILED>(acc, s.a_row(i0), s.a_stride, blk.b0, blk.b1, s.pairs) };
    for (i, acc) in acc.iter().enumerate() {
        for (h, (&cols, &acc)) in cols.iter().zip(acc).enumerate() {
            // SAFETY: row i0 + i of the scratch block or of the task's dst block, columns of the pair.
            unsafe {
                if !s.last {
                    _mm512_storeu_ps(sc.add(i * s.scratch_row + 16 * h), acc);
                } else if cols > 0 {
                    store16(d.add(i * dst_row + 16 * h), cols, acc, bias_at(e, blk.col + 16 * h), e);
                }
            }
        }
    }
}

/// The `vdpbf16ps` kernel on one chunk of k of a task's rows, for one pair of B tiles: 8 rows at a
/// time (12 × 2 accumulators would spill; 8 × 2 keep two `vdpbf16ps` a cycle busy).
///
/// # Safety
/// The CPU has AVX-512F and AVX512_BF16; the step, block, dst (the task's first row, column 0,
/// rows `dst_row` apart) and bias describe valid memory, the block of dst being the caller's.
#[target_feature(enable = "avx512f,avx512bf16")]
pub(super) unsafe fn dp_step(s: &Step, blk: &Block, dst: *mut f32, dst_row: usize, e: &Epilogue) {
    // SAFETY: forwarded.
    unsafe {
        if s.a_tiled {
            dp_step_on::<true>(s, blk, dst, dst_row, e)
        } else {
            dp_step_on::<false>(s, blk, dst, dst_row, e)
        }
    }
}

/// [`dp_step`] on one layout of A. Groups of 8 rows start at multiples of 8, so that in the tiled
/// layout none straddles two tiles.
///
/// # Safety
/// As [`dp_step`]; `TILED` is the step's `a_tiled`.
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn dp_step_on<const TILED: bool>(s: &Step, blk: &Block, dst: *mut f32, dst_row: usize, e: &Epilogue) {
    let mut i0 = 0;
    while i0 < s.rows {
        let r = (s.rows - i0).min(8);
        // SAFETY: forwarded, rows i0..i0 + r.
        unsafe {
            match r {
                8 => dp_rows::<8, TILED>(s, blk, i0, dst, dst_row, e),
                7 => dp_rows::<7, TILED>(s, blk, i0, dst, dst_row, e),
                6 => dp_rows::<6, TILED>(s, blk, i0, dst, dst_row, e),
                5 => dp_rows::<5, TILED>(s, blk, i0, dst, dst_row, e),
                4 => dp_rows::<4, TILED>(s, blk, i0, dst, dst_row, e),
                3 => dp_rows::<3, TILED>(s, blk, i0, dst, dst_row, e),
                2 => dp_rows::<2, TILED>(s, blk, i0, dst, dst_row, e),
                _ => dp_rows::<1, TILED>(s, blk, i0, dst, dst_row, e),
            }
        }
        i0 += r;
    }
}
