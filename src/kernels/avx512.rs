//! AVX-512 pieces of the bf16 kernels: loading 16 × 16 blocks of strided f32 operands (transposed
//! in registers when the operand is column-major), rounding them to bf16, packing A and B
//! (layouts in [`super::bf16`]), the `vdpbf16ps` kernel and the epilogue stores.

use super::bf16::{Epilogue, PackedB, TILE_N};
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

/// Each lane rounded to bf16 (nearest, ties to even; NaN made quiet so it stays NaN), in the high
/// 16 bits of its 32 (the low 16 are junk). Same as [`super::bf16::to_bf16`].
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn bf16_high(v: __m512) -> __m512i {
    let bits = _mm512_castps_si512(v);
    let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
    let rounded = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v);
    _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(bits, _mm512_set1_epi32(0x0040_0000)))
}

/// 16 floats rounded to 16 bf16.
#[target_feature(enable = "avx512f")]
#[inline]
pub(super) fn to_bf16x16(v: __m512) -> __m256i {
    _mm512_cvtepi32_epi16(_mm512_srli_epi32::<16>(bf16_high(v)))
}

/// Rows i0..i0 + rows of `lhs` (columns 0..k) rounded to bf16 into `out`, row-major with rows
/// k_pad apart; the columns past k and the rows past `rows` (up to out.len() / k_pad) are zero.
///
/// # Safety
/// `lhs` readable on rows i0..i0 + rows, columns 0..k; k_pad a multiple of 16 that is ≥ k.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_a(lhs: Mat, i0: usize, rows: usize, k: usize, k_pad: usize, out: &mut [u16]) {
    if k_pad == 0 {
        return;
    }
    let rows_pad = out.len() / k_pad;
    for r0 in (0..rows_pad).step_by(16) {
        for c0 in (0..k_pad).step_by(16) {
            // SAFETY: rows below `rows` and columns below k are readable.
            let v = unsafe { load_block(lhs, i0 + r0, c0, rows.saturating_sub(r0), k.saturating_sub(c0)) };
            for (t, v) in v.iter().enumerate().take(rows_pad - r0) {
                let dst = &mut out[(r0 + t) * k_pad + c0..][..16];
                // SAFETY: dst is 16 u16 = 32 bytes (bounds-checked above).
                unsafe { _mm256_storeu_si256(dst.as_mut_ptr().cast(), to_bf16x16(*v)) };
            }
        }
    }
}

/// Tile t (columns 16t..16t + 16) of rhs (k × n) in the pair layout of [`PackedB`].
///
/// # Safety
/// `rhs` readable on k × n; `tile` is k_pad·16 elements with k_pad a multiple of 16 and ≥ k.
#[target_feature(enable = "avx512f,avx512bw")]
pub(super) unsafe fn pack_b_tile(rhs: Mat, k: usize, n: usize, t: usize, tile: &mut [u16]) {
    let j0 = t * TILE_N;
    let high = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    for (c, chunk) in tile.chunks_exact_mut(16 * TILE_N).enumerate() {
        let k0 = 16 * c;
        // SAFETY: rows below k and columns below n are readable.
        let v = unsafe { load_block(rhs, k0, j0, k.saturating_sub(k0), n.saturating_sub(j0)) };
        for (r, row) in chunk.chunks_exact_mut(2 * TILE_N).enumerate() {
            let (even, odd) = (bf16_high(v[2 * r]), bf16_high(v[2 * r + 1]));
            let pair = _mm512_or_si512(_mm512_and_si512(odd, high), _mm512_srli_epi32::<16>(even));
            // SAFETY: row is 32 u16 = 64 bytes.
            unsafe { _mm512_storeu_si512(row.as_mut_ptr().cast(), pair) };
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
    // SAFETY (all three): masked to the `cols` valid floats.
    if e.accumulate {
        v = _mm512_add_ps(unsafe { _mm512_maskz_loadu_ps(mask, dst) }, v);
    }
    if !bias.is_null() {
        v = _mm512_add_ps(v, unsafe { _mm512_maskz_loadu_ps(mask, bias) });
    }
    unsafe { _mm512_mask_storeu_ps(dst, mask, v) };
}

/// MR rows of packed A (rows `a_stride` elements apart) times two B tiles, over `pairs` pairs of
/// k, with `vdpbf16ps`: acc[i][h] holds the sums for row i, columns 16h..16h + 16 of the pair.
/// Each `vdpbf16ps` adds the odd-k product then the even-k product of a pair to its lane.
///
/// # Safety
/// `a` readable for MR rows of 2·pairs, b0 and b1 for `pairs` rows of 32.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
pub(super) unsafe fn dp_kernel<const MR: usize>(
    a: *const u16,
    a_stride: usize,
    b0: *const u16,
    b1: *const u16,
    pairs: usize,
) -> [[__m512; 2]; MR] {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for r in 0..pairs {
        // SAFETY: pair-row r of both tiles and dword r of the MR rows are readable (contract).
        unsafe {
            let w0: __m512bh = std::mem::transmute(_mm512_loadu_si512(b0.add(32 * r).cast()));
            let w1: __m512bh = std::mem::transmute(_mm512_loadu_si512(b1.add(32 * r).cast()));
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = a.add(i * a_stride + 2 * r).cast::<i32>().read_unaligned();
                let x: __m512bh = std::mem::transmute(_mm512_set1_epi32(x));
                acc[0] = _mm512_dpbf16_ps(acc[0], x, w0);
                acc[1] = _mm512_dpbf16_ps(acc[1], x, w1);
            }
        }
    }
    acc
}

/// One [`dp_kernel`] call and its stores: rows i0..i0 + MR of the block, columns j0..j0 + 32.
///
/// # Safety
/// As [`dp_block`], for these rows and columns.
#[target_feature(enable = "avx512f,avx512bf16")]
#[inline]
#[allow(clippy::too_many_arguments)]
unsafe fn dp_rows<const MR: usize>(
    a: *const u16,
    b: &PackedB,
    t: usize,
    i0: usize,
    dst: *mut f32,
    dst_row: usize,
    e: &Epilogue,
) {
    let j0 = t * TILE_N;
    let tile = |t: usize| b.data[t * b.tile_len()..].as_ptr();
    // SAFETY: rows i0..i0 + MR of A and tiles t, t + 1 of B are readable.
    let acc = unsafe { dp_kernel::<MR>(a.add(i0 * b.k_pad), b.k_pad, tile(t), tile(t + 1), b.k_pad / 2) };
    let cols = [b.n.saturating_sub(j0).min(16), b.n.saturating_sub(j0 + 16).min(16)];
    for (i, acc) in acc.iter().enumerate() {
        for h in 0..2 {
            if cols[h] > 0 {
                let bias = if e.bias.is_null() { e.bias } else { e.bias.wrapping_add(j0 + 16 * h) };
                // SAFETY: row i0 + i, columns j0 + 16h.. (cols[h] of them) are this block's.
                unsafe { store16(dst.add((i0 + i) * dst_row + j0 + 16 * h), cols[h], acc[h], bias, e) };
            }
        }
    }
}

/// The `vdpbf16ps` kernel on one block: `rows` rows of packed A (k_pad apart, padded to a
/// multiple of 8) times B tiles t0..t1 (an even range), stored through the epilogue into dst
/// (the block's first row, column 0 of the whole output; rows `dst_row` apart). Column pairs
/// outer, blocks of 8 rows inner, so that a pair of B tiles is read from cache by all rows.
///
/// # Safety
/// The CPU has AVX-512F and AVX512_BF16; `a`, B and dst valid for these rows and tiles.
#[target_feature(enable = "avx512f,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn dp_block(
    a: *const u16,
    rows: usize,
    b: &PackedB,
    t0: usize,
    t1: usize,
    dst: *mut f32,
    dst_row: usize,
    e: Epilogue,
) {
    for t in (t0..t1).step_by(2) {
        if t * TILE_N >= b.n {
            break;
        }
        let mut i0 = 0;
        while i0 < rows {
            let r = (rows - i0).min(8);
            // SAFETY: forwarded: rows i0..i0 + r, tiles t and t + 1.
            unsafe {
                match r {
                    8 => dp_rows::<8>(a, b, t, i0, dst, dst_row, &e),
                    7 => dp_rows::<7>(a, b, t, i0, dst, dst_row, &e),
                    6 => dp_rows::<6>(a, b, t, i0, dst, dst_row, &e),
                    5 => dp_rows::<5>(a, b, t, i0, dst, dst_row, &e),
                    4 => dp_rows::<4>(a, b, t, i0, dst, dst_row, &e),
                    3 => dp_rows::<3>(a, b, t, i0, dst, dst_row, &e),
                    2 => dp_rows::<2>(a, b, t, i0, dst, dst_row, &e),
                    _ => dp_rows::<1>(a, b, t, i0, dst, dst_row, &e),
                }
            }
            i0 += r;
        }
    }
}
