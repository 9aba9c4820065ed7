//! The CPU kernels of the fast engine ([`super::fast`]): matrix products through the `gemm` crate
//! (strided operands) or, for the few rows of a decoding step, on weights packed once into
//! register-sized panels; fused LayerNorm, GELU and causal attention with their derivatives
//! written beside them; and the vectorisable reductions (sum, dot, max, exp) every row loop uses.
//!
//! Shapes: rows of activations are row-major; a weight W is (out, in) and a product is x·Wᵀ.

use gemm::Parallelism;
use rayon::prelude::*;

/// The last of every t rows of a (rows·t, width) matrix: (rows, width).
pub fn last_rows(a: &[f32], rows: usize, t: usize, width: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| a[((r + 1) * t - 1) * width..(r + 1) * t * width].iter().copied()).collect()
}

/// Output features per panel: one 512-bit register (two 256-bit ones) of f32.
const PANEL: usize = 16;
/// Rows per register block of [`panel_block`]: 6 rows × 16 outputs of accumulators.
const BLOCK_ROWS: usize = 6;
/// Up to this many rows a product goes to [`panel_matmul`], above it to gemm.
pub const PANEL_MAX_ROWS: usize = 256;

/// A weight matrix W (oc, ic) rearranged for decoding: panel p holds outputs 16p..16p+16 as an
/// (ic, 16) row-major block (zero-padded past oc). A decode step multiplies only a few rows, so a
/// general gemm spends much of its time re-packing the weights at every step (its left operand,
/// once it transposes the row-major product); packing them once per sampling call removes that.
pub struct Panels {
    data: Vec<f32>,
    ic: usize,
    oc: usize,
}

impl Panels {
    pub fn new(w: &[f32], oc: usize, ic: usize) -> Self {
        assert_eq!(w.len(), oc * ic, "weight shape");
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

/// out (n_rows, oc) = inp (n_rows, ic) · W^T + bias (W: (oc, ic)). With `panels` (W packed for
/// decoding), few rows go to [`panel_matmul`], many (a prefill) to gemm on the plain matrix. The two
/// sum in different orders, so a prompt's logits can differ in the last bits with the size of its
/// batch; a run stays reproducible, as its batches are fixed.
pub fn linear(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    panels: Option<&Panels>,
    bias: Option<&[f32]>,
    n_rows: usize,
) {
    let (oc, ic) = (out.len() / n_rows.max(1), inp.len() / n_rows.max(1));
    match panels {
        Some(p) if n_rows <= PANEL_MAX_ROWS => panel_matmul(out, inp, p, bias, n_rows),
        _ => matmul_forward(out, inp, w, bias, n_rows, ic, oc),
    }
}

/// out (n_rows, oc) = inp (n_rows, ic) · W^T + bias, W in panels. The panels are split between
/// the threads; each panel is multiplied by every block of rows while it sits in cache.
pub fn panel_matmul(out: &mut [f32], inp: &[f32], w: &Panels, bias: Option<&[f32]>, n_rows: usize) {
    let (ic, oc) = (w.ic, w.oc);
    assert!(inp.len() == n_rows * ic && out.len() == n_rows * oc, "panel_matmul shapes");
    assert!(bias.is_none_or(|b| b.len() == oc), "panel_matmul bias");
    let n_panels = oc.div_ceil(PANEL);
    let threads = rayon::current_num_threads().clamp(1, n_panels.max(1));
    let out_p = SendPtr(out.as_mut_ptr());
    (0..threads).into_par_iter().for_each(|th| {
        for p in th * n_panels / threads..(th + 1) * n_panels / threads {
            let panel = &w.data[p * ic * PANEL..(p + 1) * ic * PANEL];
            let (j0, cols) = (p * PANEL, PANEL.min(oc - p * PANEL));
            let mut r0 = 0;
            while r0 < n_rows {
                let rows = BLOCK_ROWS.min(n_rows - r0);
                let acc = match rows {
                    6 => panel_block::<6>(inp, r0, ic, panel),
                    5 => panel_block::<5>(inp, r0, ic, panel),
                    4 => panel_block::<4>(inp, r0, ic, panel),
                    3 => panel_block::<3>(inp, r0, ic, panel),
                    2 => panel_block::<2>(inp, r0, ic, panel),
                    _ => panel_block::<1>(inp, r0, ic, panel),
                };
                for (i, a) in acc.iter().take(rows).enumerate() {
                    // SAFETY: row r0 + i, columns j0..j0 + cols of `out` (n_rows × oc) are written by
                    // this thread alone: the panels, hence the column ranges, are split between threads.
                    let o =
                        unsafe { std::slice::from_raw_parts_mut(out_p.ptr().add((r0 + i) * oc + j0), cols) };
                    match bias {
                        Some(b) => o.iter_mut().zip(a).zip(&b[j0..]).for_each(|((o, a), b)| *o = a + b),
                        None => o.copy_from_slice(&a[..cols]),
                    }
                }
                r0 += rows;
            }
        }
    });
}

/// The register block: rows r0..r0+R of `inp` times one panel, R × 16 sums over k. Written with
/// fixed sizes so that the compiler keeps the accumulators in vector registers and emits FMAs.
#[inline(always)]
fn panel_block<const R: usize>(
    inp: &[f32],
    r0: usize,
    ic: usize,
    panel: &[f32],
) -> [[f32; PANEL]; BLOCK_ROWS] {
    let mut acc = [[0f32; PANEL]; R];
    let x: [&[f32]; R] = std::array::from_fn(|i| &inp[(r0 + i) * ic..(r0 + i + 1) * ic]);
    for (k, wk) in panel.chunks_exact(PANEL).enumerate() {
        for i in 0..R {
            let xv = x[i][k];
            for jj in 0..PANEL {
                acc[i][jj] = mul_add(xv, wk[jj], acc[i][jj]);
            }
        }
    }
    let mut full = [[0f32; PANEL]; BLOCK_ROWS];
    full[..R].copy_from_slice(&acc);
    full
}

/// a·b + c, fused where the CPU has FMA (without it, `f32::mul_add` would be a slow library call).
#[inline(always)]
fn mul_add(a: f32, b: f32, c: f32) -> f32 {
    if cfg!(target_feature = "fma") {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Where an attention call finds its keys and values: position j of head hi of sequence r is at
/// `k + r·seq + hi·head + j·pos` (and likewise from `v`). Training reads them straight from the
/// qkv activations (pos = 3C), decoding from its KV cache (pos = hs).
#[derive(Clone, Copy)]
pub struct KvLayout {
    pub k: *const f32,
    pub v: *const f32,
    pub seq: usize,
    pub head: usize,
    pub pos: usize,
}

// SAFETY: a KvLayout only describes memory that the caller of `attention` guarantees to be valid
// and unchanged for the duration of the call; tasks only read through it.
unsafe impl Send for KvLayout {}
unsafe impl Sync for KvLayout {}

impl KvLayout {
    /// The keys and values of head `hi` of sequence `r` (taking `self` whole, so closures capture
    /// the Sync wrapper rather than its raw pointer fields).
    fn head(self, r: usize, hi: usize) -> (*const f32, *const f32, usize) {
        let at = r * self.seq + hi * self.head;
        (self.k.wrapping_add(at), self.v.wrapping_add(at), self.pos)
    }
}

/// Causal multi-head attention of `t` queries per sequence, at positions pos0..pos0+t, over the
/// keys and values at positions 0..pos0+t (`len`). qkv: (rows·t, 3C), the queries in its first C
/// columns (head hi at columns hi·hs..); out: (rows·t, C). `probs`, when given (training), receives
/// the softmax probabilities (rows, H, t, len), zero where masked, for the backward pass.
///
/// # Safety
/// `kv` must describe keys and values valid for `rows` sequences, `h` heads and `pos0 + t`
/// positions, not aliasing `out`.
#[allow(clippy::too_many_arguments)]
pub unsafe fn attention(
    out: &mut [f32],
    probs: Option<&mut [f32]>,
    qkv: &[f32],
    kv: KvLayout,
    rows: usize,
    t: usize,
    pos0: usize,
    c: usize,
    h: usize,
) {
    let (hs, len) = (c / h, pos0 + t);
    // The raw writes below rely on these shapes.
    assert!(out.len() == rows * t * c && qkv.len() == rows * t * 3 * c, "attention shapes");
    assert!(probs.as_ref().is_none_or(|p| p.len() == rows * h * t * len), "attention probabilities");
    let scale = 1.0 / (hs as f32).sqrt();
    let out_p = SendPtr(out.as_mut_ptr());
    let probs_p = probs.map(|p| SendPtr(p.as_mut_ptr()));
    let scratch = if probs_p.is_some() { 0 } else { t * len };
    (0..rows * h).into_par_iter().for_each_init(
        || (vec![0f32; scratch], vec![0f32; hs]),
        |(scratch, acc), rh| {
            let (r, hi) = (rh / h, rh % h);
            // SAFETY: task rh alone writes its (t, len) block of the probabilities and out's
            // (r, hi) columns; k and v are valid by the caller's contract.
            let att: &mut [f32] = match probs_p {
                Some(p) => unsafe { std::slice::from_raw_parts_mut(p.ptr().add(rh * t * len), t * len) },
                None => &mut scratch[..],
            };
            let (k, v, pos) = kv.head(r, hi);
            if t == 1 && probs_p.is_none() {
                // One new query (decoding): dot products and a weighted sum, no gemm set-up.
                let q = &qkv[r * 3 * c + hi * hs..r * 3 * c + (hi + 1) * hs];
                let row = &mut att[..len];
                for (j, s) in row.iter_mut().enumerate() {
                    // SAFETY: position j < len of this head's keys.
                    let kj = unsafe { std::slice::from_raw_parts(k.add(j * pos), hs) };
                    *s = dot(q, kj) * scale;
                }
                let m = max(row);
                row.iter_mut().for_each(|x| *x = fast_exp(*x - m));
                let inv = 1.0 / sum(row);
                acc.fill(0.0);
                for (j, &p) in row.iter().enumerate() {
                    // SAFETY: as above, for the values.
                    let vj = unsafe { std::slice::from_raw_parts(v.add(j * pos), hs) };
                    for (a, &x) in acc.iter_mut().zip(vj) {
                        *a += p * x;
                    }
                }
                // SAFETY: this task alone writes out's (r, hi) columns.
                let o = unsafe { std::slice::from_raw_parts_mut(out_p.ptr().add(r * c + hi * hs), hs) };
                for (o, a) in o.iter_mut().zip(acc.iter()) {
                    *o = a * inv;
                }
                return;
            }
            // SAFETY: q rows of (r, hi) are t rows of hs floats at stride 3C inside qkv; k and v
            // are len rows at stride `pos`; the output columns of (r, hi) are this task's alone.
            unsafe {
                let q = qkv.as_ptr().add(r * t * 3 * c + hi * hs);
                // att (t, len) = q · kᵀ · scale
                matmul(
                    t,
                    len,
                    hs,
                    att.as_mut_ptr(),
                    len,
                    false,
                    row_major(q, 3 * c),
                    transposed(k, pos),
                    scale,
                    Parallelism::None,
                );
                for i in 0..t {
                    let row = &mut att[i * len..(i + 1) * len];
                    let visible = pos0 + i + 1;
                    let m = max(&row[..visible]);
                    for x in &mut row[..visible] {
                        *x = fast_exp(*x - m);
                    }
                    let inv = 1.0 / sum(&row[..visible]);
                    row[..visible].iter_mut().for_each(|x| *x *= inv);
                    row[visible..].iter_mut().for_each(|x| *x = 0.0);
                }
                // out (t, hs) = att · v
                let o = out_p.ptr().add(r * t * c + hi * hs);
                matmul(
                    t,
                    hs,
                    len,
                    o,
                    c,
                    false,
                    row_major(att.as_ptr(), len),
                    row_major(v, pos),
                    1.0,
                    Parallelism::None,
                );
            }
        },
    );
}

/// A strided matrix operand: element (i, j) is at `ptr + i·row + j·col`.
#[derive(Clone, Copy)]
pub struct Mat {
    ptr: *const f32,
    row: usize,
    col: usize,
}

/// A matrix stored row by row, rows `stride` floats apart.
pub fn row_major(ptr: *const f32, stride: usize) -> Mat {
    Mat { ptr, row: stride, col: 1 }
}

/// The transpose of a matrix stored row by row (rows `stride` floats apart).
pub fn transposed(ptr: *const f32, stride: usize) -> Mat {
    Mat { ptr, row: 1, col: stride }
}

/// dst (m × n, rows `dst_row` floats apart) = [dst +] scale · lhs (m × k) · rhs (k × n), on the `gemm`
/// crate's kernels.
///
/// # Safety
/// The operands must describe memory valid for the given shapes and strides, and `dst` must not
/// alias them.
#[allow(clippy::too_many_arguments)]
pub unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_row: usize,
    accumulate: bool,
    lhs: Mat,
    rhs: Mat,
    scale: f32,
    parallelism: Parallelism,
) {
    let alpha = if accumulate { 1.0 } else { 0.0 };
    let (lc, lr, rc, rr) = (lhs.col as isize, lhs.row as isize, rhs.col as isize, rhs.row as isize);
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_row as isize,
        accumulate,
        lhs.ptr,
        lc,
        lr,
        rhs.ptr,
        rc,
        rr,
        alpha,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

pub fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// out (n_rows, oc) = inp (n_rows, ic) · W^T (W: (oc, ic)) + bias.
pub fn matmul_forward(
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n_rows: usize,
    ic: usize,
    oc: usize,
) {
    // SAFETY: the slices hold n_rows·oc, n_rows·ic and oc·ic elements laid out row-major, which is
    // what the strides below describe; `out` does not alias the inputs.
    unsafe {
        matmul(
            n_rows,
            oc,
            ic,
            out.as_mut_ptr(),
            oc,
            false,
            row_major(inp.as_ptr(), ic),
            transposed(w.as_ptr(), ic),
            1.0,
            threads(),
        );
    }
    if let Some(bias) = bias {
        out.par_chunks_mut(oc).for_each(|row| {
            for (o, b) in row.iter_mut().zip(bias) {
                *o += b;
            }
        });
    }
}

/// Given d out (n_rows, oc): d inp = d out · W (overwritten), d W += d out^T · inp, d bias += Σ d out.
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    n_rows: usize,
    ic: usize,
    oc: usize,
) {
    // SAFETY: as in matmul_forward; each destination is a separate buffer of the stated size.
    unsafe {
        matmul(
            n_rows,
            ic,
            oc,
            dinp.as_mut_ptr(),
            ic,
            false,
            row_major(dout.as_ptr(), oc),
            row_major(w.as_ptr(), ic),
            1.0,
            threads(),
        );
        matmul(
            oc,
            ic,
            n_rows,
            dw.as_mut_ptr(),
            ic,
            true,
            transposed(dout.as_ptr(), oc),
            row_major(inp.as_ptr(), ic),
            1.0,
            threads(),
        );
    }
    if let Some(db) = dbias {
        for row in dout.chunks(oc) {
            for (d, x) in db.iter_mut().zip(row) {
                *d += x;
            }
        }
    }
}

/// Row-wise LayerNorm (eps 1e-5), keeping each row's mean and 1/std for the backward pass.
pub fn layernorm_forward(
    out: &mut [f32],
    mean: &mut [f32],
    rstd: &mut [f32],
    inp: &[f32],
    w: &[f32],
    b: &[f32],
    c: usize,
) {
    out.par_chunks_mut(c).zip(inp.par_chunks(c)).zip(mean.par_iter_mut().zip(rstd.par_iter_mut())).for_each(
        |((o, x), (m, r))| {
            let mu = sum(x) / c as f32;
            for i in 0..c {
                o[i] = x[i] - mu;
            }
            let var = dot(o, o) / c as f32;
            let s = 1.0 / (var + 1e-5).sqrt();
            for i in 0..c {
                o[i] = o[i] * s * w[i] + b[i];
            }
            *m = mu;
            *r = s;
        },
    );
}

/// LayerNorm backward: d inp += …, d w += Σ d out · x̂, d b += Σ d out.
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    db: &mut [f32],
    dout: &[f32],
    inp: &[f32],
    w: &[f32],
    mean: &[f32],
    rstd: &[f32],
    c: usize,
) {
    let rows = dinp.par_chunks_mut(c).zip(dout.par_chunks(c)).zip(inp.par_chunks(c)).enumerate();
    rows.for_each_init(
        || (vec![0f32; c], vec![0f32; c]),
        |(norm, dnorm), (row, ((di, d), x))| {
            let (mu, s) = (mean[row], rstd[row]);
            for i in 0..c {
                norm[i] = (x[i] - mu) * s;
                dnorm[i] = w[i] * d[i];
            }
            let dnorm_mean = sum(dnorm) / c as f32;
            let dnorm_norm_mean = dot(dnorm, norm) / c as f32;
            for i in 0..c {
                di[i] += (dnorm[i] - dnorm_mean - norm[i] * dnorm_norm_mean) * s;
            }
        },
    );
    for (row, (d, x)) in dout.chunks(c).zip(inp.chunks(c)).enumerate() {
        let (mu, s) = (mean[row], rstd[row]);
        for i in 0..c {
            db[i] += d[i];
            dw[i] += (x[i] - mu) * s * d[i];
        }
    }
}

pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    out.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(o, (a, b))| {
        for i in 0..o.len() {
            o[i] = a[i] + b[i];
        }
    });
}

const GELU_S: f32 = 0.797_884_6; // √(2/π)

/// e^x for f32 in a form the compiler vectorises (libm's `expf` is a scalar call): x = n·ln2 + r
/// with |r| ≤ ln2/2, e^r by its degree-6 Taylor polynomial (relative error < 2·10⁻⁷ on that
/// interval), 2^n put into the exponent bits. Below −87 (and for NaN) it returns 0, above 88 e^88.
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5·2²³: adding and subtracting it rounds to an integer
    let underflow = x.is_nan() || x <= -87.0;
    let x = if underflow {
        -87.0
    } else if x < 88.0 {
        x
    } else {
        88.0
    };
    let n = (x * std::f32::consts::LOG2_E + MAGIC) - MAGIC;
    let r = x - n * 0.693_145_75 - n * 1.428_606_8e-6; // ln 2 split in two for precision
    let p = 1.0
        + r * (1.0 + r * (0.5 + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // SAFETY: x is in [−87, 88] here, so n is an integer in [−126, 127] and converts exactly.
    let n: i32 = unsafe { n.to_int_unchecked() };
    let e = p * f32::from_bits(((n + 127) << 23) as u32);
    if underflow {
        0.0
    } else {
        e
    }
}

/// Sums in eight independent lanes so the loop vectorises (a single running sum cannot, as float
/// addition is not associative). Used by every row reduction here.
#[inline(always)]
pub fn sum(x: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let chunks = x.chunks_exact(8);
    let rest: f32 = chunks.remainder().iter().sum();
    for c in chunks {
        for i in 0..8 {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Σ a·b in eight lanes.
#[inline(always)]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let rest: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// Maximum in eight lanes (NaNs are skipped; −∞ for an empty or all-NaN slice).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 8];
    let chunks = x.chunks_exact(8);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..8 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    acc.iter().fold(rest, |m, &v| if v > m { v } else { m })
}

/// tanh(u) = 1 − 2 / (e^{2u} + 1) with [`fast_exp`] (absolute error below 10⁻⁶).
#[inline(always)]
fn fast_tanh(u: f32) -> f32 {
    1.0 - 2.0 / (fast_exp(2.0 * u) + 1.0)
}

/// GELU, tanh approximation (candle's `gelu`, GPT-2's).
pub fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(o, x)| {
        for i in 0..o.len() {
            let v = x[i];
            o[i] = 0.5 * v * (1.0 + fast_tanh(GELU_S * (v + 0.044715 * v * v * v)));
        }
    });
}

/// d inp = d out · gelu'(inp), in place on `d`.
pub fn gelu_backward(d: &mut [f32], inp: &[f32]) {
    d.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(d, x)| {
        for i in 0..d.len() {
            let v = x[i];
            let u = GELU_S * (v + 0.044715 * v * v * v);
            let th = fast_tanh(u);
            let sech2 = 1.0 - th * th;
            let grad = 0.5 * (1.0 + th) + 0.5 * v * sech2 * GELU_S * (1.0 + 3.0 * 0.044715 * v * v);
            d[i] *= grad;
        }
    });
}

/// A raw pointer that may cross threads: each task below writes a disjoint region.
#[derive(Clone, Copy)]
struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Taking `self` makes closures capture the whole (Send) wrapper, not the raw pointer field.
    fn ptr(self) -> *mut f32 {
        self.0
    }
}

/// Backward of [`attention`] over a whole sequence (pos0 = 0, keys and values in qkv): fills
/// d qkv (B, T, 3C) from d out (B, T, C) and the saved probabilities `att` (B, H, T, T).
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    dqkv: &mut [f32],
    datt: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
) {
    let hs = c / h;
    assert_eq!(datt.len(), b * h * t * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let dq_p = SendPtr(dqkv.as_mut_ptr());
    datt.par_chunks_mut(t * t).enumerate().for_each(|(bh, da)| {
        let (bi, hi) = (bh / h, bh % h);
        let a = &att[bh * t * t..(bh + 1) * t * t];
        let base = qkv[bi * t * 3 * c..].as_ptr();

        // SAFETY: reads as in attention_forward; writes go to this (bi, hi)'s q, k, v columns of
        // dqkv, which no other task touches, and to its own datt block.
        unsafe {
            let (q, k, v) = (base.add(hi * hs), base.add(c + hi * hs), base.add(2 * c + hi * hs));
            let d_o = dout.as_ptr().add(bi * t * c + hi * hs);
            let db = dq_p.ptr().add(bi * t * 3 * c);
            let (dq, dk, dv) = (db.add(hi * hs), db.add(c + hi * hs), db.add(2 * c + hi * hs));
            // datt (T, T) = dout · v^T
            matmul(
                t,
                t,
                hs,
                da.as_mut_ptr(),
                t,
                false,
                row_major(d_o, c),
                transposed(v, 3 * c),
                1.0,
                Parallelism::None,
            );
            // dv (T, hs) = att^T · dout
            matmul(
                t,
                hs,
                t,
                dv,
                3 * c,
                false,
                transposed(a.as_ptr(), t),
                row_major(d_o, c),
                1.0,
                Parallelism::None,
            );
            // Softmax backward, in place: dpre = att ⊙ (datt − Σ att·datt), zero above the diagonal.
            for t1 in 0..t {
                let (ar, dr) = (&a[t1 * t..(t1 + 1) * t], &mut da[t1 * t..(t1 + 1) * t]);
                let d = dot(&ar[..=t1], &dr[..=t1]);
                for t2 in 0..=t1 {
                    dr[t2] = ar[t2] * (dr[t2] - d);
                }
                dr[t1 + 1..].iter_mut().for_each(|x| *x = 0.0);
            }
            // dq (T, hs) = dpre · k · scale
            matmul(
                t,
                hs,
                t,
                dq,
                3 * c,
                false,
                row_major(da.as_ptr(), t),
                row_major(k, 3 * c),
                scale,
                Parallelism::None,
            );
            // dk (T, hs) = dpre^T · q · scale
            matmul(
                t,
                hs,
                t,
                dk,
                3 * c,
                false,
                transposed(da.as_ptr(), t),
                row_major(q, 3 * c),
                scale,
                Parallelism::None,
            );
        }
    });
}
