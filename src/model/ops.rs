//! The ops of the fast engine ([`super::fast`]): linear layers on [`crate::kernels`]' products (the
//! general one, or weights packed once for the few rows of a decoding step), fused LayerNorm, GELU
//! and causal attention with their derivatives written beside them, and the vectorisable reductions
//! (sum, dot, max, exp) every row loop uses.
//!
//! Shapes: rows of activations are row-major; a weight W is (out, in) and a product is x·Wᵀ.

use super::profile::phase;
use crate::kernels::{packed_matmul, Kernels, Mat, PackedWeights, Precision};
use rayon::prelude::*;

/// The last of every t rows of a (rows·t, width) matrix: (rows, width).
pub fn last_rows(a: &[f32], rows: usize, t: usize, width: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| a[((r + 1) * t - 1) * width..(r + 1) * t * width].iter().copied()).collect()
}

/// The kernels and arithmetic of the engine's matrix products (the attention's small products
/// always run in f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compute {
    pub kernels: Kernels,
    pub precision: Precision,
    /// The head's two backward products (d lnf = dlogits·wte and d wte += dlogitsᵀ·lnf: with a
    /// word-sized vocabulary most of a training step's FLOPs): `precision`, or bf16 while every
    /// other product, the forward included, stays f32 (`train.precision = fp32-bf16-head-grad`).
    pub head_grad: Precision,
    /// Whether the batch sums of the bias and LayerNorm gradients go by blocks of rows
    /// ([`SUM_BLOCK`]; bf16 training's) or column by column over every row in order (the rest).
    /// Both are the same whatever the threads. The blocks are faster on several threads: each
    /// reads its own rows (which the threads have just written in blocks of rows, too) in one
    /// pass, where the columns' sums read every row, most of them from another core's cache. f32
    /// keeps the order of earlier versions, so that its runs repeat their bytes.
    pub blocked_sums: bool,
}

impl Compute {
    /// Every product in `precision` on `kernels`.
    pub fn new(kernels: Kernels, precision: Precision) -> Self {
        Self { kernels, precision, head_grad: precision, blocked_sums: precision == Precision::Bf16 }
    }

    /// f32 on the best kernels of this CPU (what tests use; the engine reads the environment).
    pub fn fp32() -> Self {
        Self::new(Kernels::detect(), Precision::F32)
    }

    /// The same kernels, in f32.
    pub fn f32(self) -> Self {
        Self::new(self.kernels, Precision::F32)
    }

    /// The head's backward products: on these kernels, in `head_grad` (the sums stay this
    /// engine's).
    pub fn head_backward(self) -> Self {
        Self { blocked_sums: self.blocked_sums, ..Self::new(self.kernels, self.head_grad) }
    }
}

/// Up to this many rows a product with packed weights goes to [`packed_matmul`], above it (a
/// prefill) to the general product on the plain matrix.
pub const PACKED_MAX_ROWS: usize = 256;

/// out (n_rows, oc) = inp (n_rows, ic) · W^T + bias (W: (oc, ic)). With `packed` (W packed once for
/// decoding), few rows go to [`packed_matmul`], many (a prefill) to the general product. The two
/// sum in different orders, so a prompt's logits can differ in the last bits with the size of its
/// batch; a run stays reproducible, as its batches are fixed. With `keep` (training), the
/// product is [`matmul_forward_keep`]'s, and `keep` receives what it returns.
#[allow(clippy::too_many_arguments)]
pub fn linear(
    c: Compute,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    packed: Option<&PackedWeights>,
    bias: Option<&[f32]>,
    n_rows: usize,
    keep: Option<&mut Option<Rhs>>,
) {
    let (oc, ic) = (out.len() / n_rows.max(1), inp.len() / n_rows.max(1));
    phase("linear", || match (packed, keep) {
        (Some(p), None) if n_rows <= PACKED_MAX_ROWS => packed_matmul(out, inp, p, bias, n_rows),
        (_, Some(keep)) => *keep = matmul_forward_keep(c, out, inp, w, bias, n_rows),
        (_, None) => matmul_forward(c, out, inp, w, bias, n_rows, ic, oc),
    })
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
    kernels: Kernels,
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
    // SAFETY: forwarded.
    phase("attention", || unsafe { attention_on(kernels, true, out, probs, qkv, kv, rows, t, pos0, c, h) })
}

/// [`attention`], its products in causal blocks ([`causal_blocks`]) when `blocked`, else each
/// whole: the same bits (the test compares them).
///
/// # Safety
/// As [`attention`].
#[allow(clippy::too_many_arguments)]
unsafe fn attention_on(
    kernels: Kernels,
    blocked: bool,
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
    let (keys, sums) = CAUSAL_BLOCKS;
    let (blocks_n, blocks_k) =
        (causal_blocks(blocked, keys, t, len, hs), causal_blocks(blocked, sums, t, len, hs));
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
                // att (t, len) = q · kᵀ · scale, by blocks of rows, each up to the keys its last
                // row sees (the rest of each row is masked: zeroed below).
                for &(i0, i1) in &blocks_n {
                    head_product(
                        kernels,
                        (i1 - i0, pos0 + i1, hs),
                        (att.as_mut_ptr().add(i0 * len), len),
                        Mat::row_major(q.add(i0 * 3 * c), 3 * c),
                        Mat::transposed(k, pos),
                        scale,
                    );
                }
                for (i, row) in att.chunks_mut(len).enumerate() {
                    causal_softmax(row, pos0 + i + 1);
                }
                // out (t, hs) = att · v, by the same blocks, each over the keys it sees (the terms
                // left out are zeros at the end of each sum).
                let o = out_p.ptr().add(r * t * c + hi * hs);
                for &(i0, i1) in &blocks_k {
                    head_product(
                        kernels,
                        (i1 - i0, hs, pos0 + i1),
                        (o.add(i0 * c), c),
                        Mat::row_major(att.as_ptr().add(i0 * len), len),
                        Mat::row_major(v, pos),
                        1.0,
                    );
                }
            }
        },
    );
}

use crate::kernels::{matmul, matmul_rhs, Lhs, Rhs};

/// Softmax of the first `visible` entries of an attention row, in place; the rest (masked) zero.
fn causal_softmax(row: &mut [f32], visible: usize) {
    let m = max(&row[..visible]);
    for x in &mut row[..visible] {
        *x = fast_exp(*x - m);
    }
    let inv = 1.0 / sum(&row[..visible]);
    row[..visible].iter_mut().for_each(|x| *x *= inv);
    row[visible..].iter_mut().for_each(|x| *x = 0.0);
}

/// Query rows per block of attention's causal products: 64 for those whose columns are keys
/// (q·kᵀ, d out·vᵀ, whose operand gemm packs transposed), 32 for those that sum over keys
/// (att·v and the three backward ones like it). The fastest sizes for each at T = 128 on one core
/// of an AMD EPYC Zen 5.
const CAUSAL_BLOCKS: (usize, usize) = (64, 32);

/// The t query rows of attention (keys 0..len) as blocks (first, end) of `size` rows for its
/// products: under the causal mask a block needs only the keys up to its last row's, so blocks
/// skip the masked products; the terms left out are exact zeros at one end of each sum. The last
/// block takes in a remainder (so that none is short), and there is one block (every product
/// whole) unless `blocked`, t ≥ 2 blocks, 2 < hs ≤ 512 and len ≤ 512. In those bounds each of
/// gemm's outputs is one chain of fused multiply-adds in the order of k (k being hs or a number of
/// keys), whatever the block, so blocking keeps the bits (for finite inputs: a masked zero times
/// an infinite or NaN operand is NaN in the whole product, and left out of the block's); outside
/// them gemm picks other kernels for short or thin blocks, or splits k in chunks that depend on
/// the block's shape, which changes them.
fn causal_blocks(blocked: bool, size: usize, t: usize, len: usize, hs: usize) -> Vec<(usize, usize)> {
    if !blocked || t < 2 * size || hs <= 2 || hs > 512 || len > 512 {
        return vec![(0, t)];
    }
    let n = t / size;
    (0..n).map(|b| (b * size, if b + 1 == n { t } else { (b + 1) * size })).collect()
}

/// One of attention's small products, in f32 on the calling thread (the tasks are the heads):
/// dst (m × n, rows `dst_row` apart) = scale · lhs (m × k) · rhs (k × n).
///
/// # Safety
/// As [`matmul`].
unsafe fn head_product(
    kernels: Kernels,
    (m, n, k): (usize, usize, usize),
    (dst, dst_row): (*mut f32, usize),
    lhs: Mat,
    rhs: Mat,
    scale: f32,
) {
    // SAFETY: forwarded.
    unsafe { matmul(kernels, Precision::F32, m, n, k, dst, dst_row, false, lhs, rhs, scale, false) }
}

/// A weight W (oc, ic) as the right operand of its layer's products, prepared once (in bf16,
/// rounded and packed) for several of them: the LM head's, one chunk of rows at a time.
pub struct WeightRhs<'a> {
    rhs: Rhs,
    /// Whether this is Wᵀ (ic, oc) for the forward product, or W (oc, ic) for d inp.
    forward: bool,
    /// W's shape.
    oc: usize,
    ic: usize,
    _w: std::marker::PhantomData<&'a [f32]>,
}

impl<'a> WeightRhs<'a> {
    /// Wᵀ, for out = inp · Wᵀ on `c`.
    pub fn forward(c: Compute, w: &'a [f32], oc: usize, ic: usize) -> Self {
        assert_eq!(w.len(), oc * ic, "weight of another shape");
        // SAFETY: w holds oc·ic floats, read as (ic, oc) through a transposed view; the borrow
        // keeps it alive and unchanged while the value lives.
        let rhs = unsafe { Rhs::new(c.kernels, c.precision, Mat::transposed(w.as_ptr(), ic), ic, oc, true) };
        Self { rhs, forward: true, oc, ic, _w: std::marker::PhantomData }
    }

    /// W, for d inp = d out · W on `c`.
    pub fn backward(c: Compute, w: &'a [f32], oc: usize, ic: usize) -> Self {
        assert_eq!(w.len(), oc * ic, "weight of another shape");
        // SAFETY: as in `forward`, read row-major.
        let rhs = unsafe { Rhs::new(c.kernels, c.precision, Mat::row_major(w.as_ptr(), ic), oc, ic, true) };
        Self { rhs, forward: false, oc, ic, _w: std::marker::PhantomData }
    }
}

/// out (n_rows, oc) = inp (n_rows, ic) · W^T (W: (oc, ic)) + bias.
#[allow(clippy::too_many_arguments)]
pub fn matmul_forward(
    c: Compute,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n_rows: usize,
    ic: usize,
    oc: usize,
) {
    matmul_forward_with(out, inp, &WeightRhs::forward(c, w, oc, ic), bias, n_rows)
}

/// [`matmul_forward`] with W prepared beforehand (its shape is W's).
pub fn matmul_forward_with(out: &mut [f32], inp: &[f32], w: &WeightRhs, bias: Option<&[f32]>, n_rows: usize) {
    let (oc, ic) = (w.oc, w.ic);
    assert!(w.forward, "matmul_forward: W prepared for d inp");
    assert!(out.len() == n_rows * oc && inp.len() == n_rows * ic, "matmul_forward shapes");
    assert!(bias.is_none_or(|b| b.len() == oc), "matmul_forward: bias length");
    // SAFETY: the slices hold n_rows·oc and n_rows·ic elements laid out row-major, which is what
    // the strides describe; W is alive (borrowed by `w`); matmul_rhs checks the bias's length;
    // `out` does not alias the inputs.
    unsafe {
        matmul_rhs(
            n_rows,
            out.as_mut_ptr(),
            oc,
            false,
            Mat::row_major(inp.as_ptr(), ic),
            &w.rhs,
            1.0,
            bias,
            true,
        )
    }
}

/// [`matmul_forward`] in training: inp is prepared as this product's left operand and, where
/// that packs it (bf16 on `vdpbf16ps`, in the same pass), as the right operand of the backward's
/// d W = d outᵀ · inp, which is returned for [`matmul_backward`] (None where nothing is packed:
/// the backward prepares inp itself). The same sums as [`matmul_forward`].
pub fn matmul_forward_keep(
    c: Compute,
    out: &mut [f32],
    inp: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n_rows: usize,
) -> Option<Rhs> {
    let (oc, ic) = (out.len() / n_rows.max(1), inp.len() / n_rows.max(1));
    assert!(out.len() == n_rows * oc && inp.len() == n_rows * ic, "matmul_forward shapes");
    let (w, x) = phase("packing", || {
        // SAFETY: inp holds n_rows × ic floats and outlives `x` (the Rhs it becomes does not
        // read them: it is packed, or not returned).
        let x =
            unsafe { Lhs::new(c.kernels, c.precision, Mat::row_major(inp.as_ptr(), ic), n_rows, ic, true) };
        (WeightRhs::forward(c, w, oc, ic), x)
    });
    // SAFETY: out holds n_rows × oc and aliases neither operand.
    phase("product", || unsafe { x.matmul(false, &w.rhs, out.as_mut_ptr(), oc, false, 1.0, bias, true) });
    x.into_rhs()
}

/// Given d out (n_rows, oc): d inp = d out · W (overwritten), d W += d out^T · inp, d bias += Σ d out.
/// `inp_rhs`: inp as d W's right operand, kept from the forward pass ([`matmul_forward_keep`]).
#[allow(clippy::too_many_arguments)]
pub fn matmul_backward(
    c: Compute,
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
    dout: &[f32],
    (inp, inp_rhs): (&[f32], Option<&Rhs>),
    w: &[f32],
    n_rows: usize,
    ic: usize,
    oc: usize,
) {
    assert!(dout.len() == n_rows * oc, "matmul_backward shapes");
    phase("linear backward", || {
        if let Some(db) = dbias {
            assert_eq!(db.len(), oc, "matmul_backward: bias gradient length");
            // First, while d out is still in cache from whatever wrote it.
            phase("bias sums", || bias_sums(c.blocked_sums, db, dout, n_rows));
        }
        // d out is the left operand of both products (d inp = d out · W, d W += d outᵀ · inp):
        // prepared (in bf16: packed both ways) once.
        let (d_out, w) = phase("packing", || {
            // SAFETY: dout holds n_rows × oc floats and outlives the value.
            let d_out = unsafe {
                Lhs::new(c.kernels, c.precision, Mat::row_major(dout.as_ptr(), oc), n_rows, oc, true)
            };
            (d_out, WeightRhs::backward(c, w, oc, ic))
        });
        matmul_backward_lhs(c, (dinp, dw), &d_out, (inp, inp_rhs), &w, n_rows);
    })
}

/// d inp = d out · W (overwritten) and d W += d outᵀ · inp, d out (n_rows, oc) prepared
/// beforehand ([`Lhs`], on `c`'s kernels and precision, as d W's product); inp too when
/// `inp_rhs` is given (kept from the forward pass, on the same kernels and precision).
pub fn matmul_backward_lhs(
    c: Compute,
    (dinp, dw): (&mut [f32], &mut [f32]),
    d_out: &Lhs,
    (inp, inp_rhs): (&[f32], Option<&Rhs>),
    w: &WeightRhs,
    n_rows: usize,
) {
    let (oc, ic) = (w.oc, w.ic);
    assert!(!w.forward, "matmul_backward: W prepared for the forward product");
    assert!(dinp.len() == n_rows * ic && dw.len() == oc * ic, "matmul_backward shapes");
    assert!(inp.len() == n_rows * ic && d_out.shape() == (n_rows, oc), "matmul_backward shapes");
    assert!(inp_rhs.is_none_or(|r| r.shape() == (n_rows, ic)), "matmul_backward: inp kept for another shape");
    // SAFETY: each destination is a separate buffer of the stated size; W (borrowed by `w`), d
    // out's matrix (the caller's contract with Lhs) and inp outlive the products.
    phase("d input", || unsafe {
        d_out.matmul(false, &w.rhs, dinp.as_mut_ptr(), ic, false, 1.0, None, true)
    });
    // SAFETY: as above; `fresh` lives until the product returns.
    phase("d weight", || unsafe {
        let fresh;
        let inp = match inp_rhs {
            Some(kept) => kept,
            None => {
                fresh = Rhs::new(c.kernels, c.precision, Mat::row_major(inp.as_ptr(), ic), n_rows, ic, true);
                &fresh
            }
        };
        d_out.matmul(true, inp, dw.as_mut_ptr(), ic, true, 1.0, None, true);
    });
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
    phase("layernorm", || {
        out.par_chunks_mut(c)
            .zip(inp.par_chunks(c))
            .zip(mean.par_iter_mut().zip(rstd.par_iter_mut()))
            .for_each(|((o, x), (m, r))| {
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
            });
    })
}

/// LayerNorm backward: d inp += …, d w += Σ d out · x̂, d b += Σ d out; the sums over the rows
/// by blocks of rows when `blocked` ([`Compute`]'s `blocked_sums`).
#[allow(clippy::too_many_arguments)]
pub fn layernorm_backward(
    blocked: bool,
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
    assert!(db.len() == c && dw.len() == c, "layernorm_backward: parameter gradients of another width");
    let rows = mean.len();
    assert!(
        dinp.len() == rows * c && dout.len() == rows * c && inp.len() == rows * c,
        "layernorm_backward shapes"
    );
    // Row `row` (x, its d out d and its d inp di): d inp, and x̂ in `norm` for the sums.
    let row_backward = |row: usize, di: &mut [f32], norm: &mut [f32], dnorm: &mut [f32]| {
        let (d, x) = (&dout[row * c..(row + 1) * c], &inp[row * c..(row + 1) * c]);
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
    };
    phase("layernorm backward", || {
        let scratch = || (vec![0f32; c], vec![0f32; c]);
        if blocked && c > 0 {
            // One pass: each block's rows, then their terms added to the block's own sums.
            let mut partial = vec![0f32; rows.div_ceil(SUM_BLOCK) * 2 * c];
            let blocks = partial.par_chunks_mut(2 * c).zip(dinp.par_chunks_mut(SUM_BLOCK * c)).enumerate();
            blocks.for_each_init(scratch, |(norm, dnorm), (b, (sums, di))| {
                let (sb, sw) = sums.split_at_mut(c);
                for (k, di) in di.chunks_mut(c).enumerate() {
                    let row = b * SUM_BLOCK + k;
                    row_backward(row, di, norm, dnorm);
                    for (((sb, sw), &d), &n) in
                        sb.iter_mut().zip(sw.iter_mut()).zip(&dout[row * c..]).zip(&norm[..])
                    {
                        *sb += d;
                        *sw += n * d;
                    }
                }
            });
            add_blocks([db, dw], &partial);
            return;
        }
        let each_row = dinp.par_chunks_mut(c).enumerate();
        each_row.for_each_init(scratch, |(norm, dnorm), (row, di)| row_backward(row, di, norm, dnorm));
        column_sums([db, dw], rows, |row, j0, [db, dw]| {
            let (mu, s) = (mean[row], rstd[row]);
            let (d, x) = (&dout[row * c + j0..], &inp[row * c + j0..]);
            for (((db, dw), &d), &x) in db.iter_mut().zip(dw.iter_mut()).zip(d).zip(x) {
                *db += d;
                *dw += (x - mu) * s * d;
            }
        });
    })
}

/// d bias += Σ over the rows of d out (rows × bias's width): by blocks of rows when `blocked`
/// ([`Compute`]'s `blocked_sums`), else column by column in row order.
pub fn bias_sums(blocked: bool, db: &mut [f32], dout: &[f32], rows: usize) {
    let oc = db.len();
    assert_eq!(dout.len(), rows * oc, "bias_sums shapes");
    if blocked && oc > 0 {
        let mut partial = vec![0f32; rows.div_ceil(SUM_BLOCK) * oc];
        partial.par_chunks_mut(oc).zip(dout.par_chunks(SUM_BLOCK * oc)).for_each(|(sums, block)| {
            for row in block.chunks(oc) {
                for (s, x) in sums.iter_mut().zip(row) {
                    *s += x;
                }
            }
        });
        add_blocks([db], &partial);
        return;
    }
    column_sums([db], rows, |i, j0, [db]| {
        for (d, x) in db.iter_mut().zip(&dout[i * oc + j0..]) {
            *d += x;
        }
    });
}

/// Rows per block of the blocked batch sums ([`Compute`]'s `blocked_sums`): a constant, so that the
/// sums do not depend on the threads.
pub const SUM_BLOCK: usize = 32;

/// acc[n] += each block's sums in block order: `partial` holds, block after block, N sums as
/// wide as the accumulators (each the block's rows added in order, from zero).
fn add_blocks<const N: usize>(mut acc: [&mut [f32]; N], partial: &[f32]) {
    let c = acc[0].len();
    for sums in partial.chunks(N * c) {
        for (a, s) in acc.iter_mut().zip(sums.chunks(c)) {
            for (a, s) in a.iter_mut().zip(s) {
                *a += s;
            }
        }
    }
}

/// acc[n][j] += Σ over rows i, in order, of row i's term n at column j, for N accumulators as
/// wide as the rows: a gradient summed over the batch column by column, the same sums whatever
/// the threads. The columns are split into one contiguous range per thread, each range's rows
/// read in order (so memory streams by rows, and the sums stay in L1); `add_row(i, j0, s)` adds
/// row i's terms for columns j0.. into s[n] (as long as the range).
fn column_sums<const N: usize>(
    acc: [&mut [f32]; N],
    rows: usize,
    add_row: impl Fn(usize, usize, &mut [&mut [f32]; N]) + Sync,
) {
    let c = acc[0].len();
    assert!(acc.iter().all(|a| a.len() == c), "column_sums: accumulators of different widths");
    if c == 0 {
        return;
    }
    let width = c.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(16);
    let ptrs = acc.map(|a| SendPtr(a.as_mut_ptr()));
    (0..c.div_ceil(width)).into_par_iter().for_each(|r| {
        let (j0, w) = (r * width, width.min(c - r * width));
        // SAFETY: columns j0..j0 + w of each accumulator are this task's alone.
        let mut sums = ptrs.map(|p| unsafe { std::slice::from_raw_parts_mut(p.ptr().add(j0), w) });
        for i in 0..rows {
            add_row(i, j0, &mut sums);
        }
    });
}

/// Backward of the token and position embeddings: for each row r of d x (B·T rows of c, in
/// order), `d wte[inputs[r]] += d x[r]` and `d wpe[r mod t] += d x[r]`. In parallel over ranges of
/// columns, each range's rows in order (a token's row gets its terms in row order whatever the
/// threads): the sums of the plain loop.
pub fn embedding_backward(
    g_wte: &mut [f32],
    g_wpe: &mut [f32],
    dx: &[f32],
    inputs: &[u32],
    t: usize,
    c: usize,
) {
    assert!(
        dx.len() == inputs.len() * c && g_wpe.len() >= t.min(inputs.len()) * c,
        "embedding_backward shapes"
    );
    assert!(
        inputs.iter().all(|&k| (k as usize + 1) * c <= g_wte.len()),
        "embedding_backward: token outside wte"
    );
    if c == 0 || t == 0 {
        return;
    }
    let width = c.div_ceil(rayon::current_num_threads().max(1)).next_multiple_of(16);
    let (wte, wpe) = (SendPtr(g_wte.as_mut_ptr()), SendPtr(g_wpe.as_mut_ptr()));
    (0..c.div_ceil(width)).into_par_iter().for_each(|r| {
        let (j0, w) = (r * width, width.min(c - r * width));
        for (row, d) in dx.chunks(c).enumerate() {
            let (tok, pos) = (inputs[row] as usize, row % t);
            // SAFETY: columns j0..j0 + w of row tok of d wte and row pos of d wpe are inside them
            // (asserted) and this task's alone; the two are different buffers.
            let (gw, gp) = unsafe {
                (
                    std::slice::from_raw_parts_mut(wte.ptr().add(tok * c + j0), w),
                    std::slice::from_raw_parts_mut(wpe.ptr().add(pos * c + j0), w),
                )
            };
            let d = &d[j0..j0 + w];
            gw.iter_mut().zip(d).for_each(|(g, d)| *g += d);
            gp.iter_mut().zip(d).for_each(|(g, d)| *g += d);
        }
    });
}

/// out = a + b: the residual connections.
pub fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
    phase("residual", || {
        out.par_chunks_mut(4096).zip(a.par_chunks(4096).zip(b.par_chunks(4096))).for_each(|(o, (a, b))| {
            for i in 0..o.len() {
                o[i] = a[i] + b[i];
            }
        })
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

/// Whether the exp loops below run their AVX-512 form: the fp32 kernels [`Kernels::from_env`]
/// chooses (once per process) are the AVX-512 ones. `COLLAPSE_LAB_KERNELS=avx2` forces the
/// portable form, which the compiler vectorises for the CPU it targets.
fn wide_exp() -> bool {
    static WIDE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *WIDE.get_or_init(|| Kernels::from_env().is_ok_and(|k| k.fp32() == crate::kernels::Fp32Kernel::Avx512))
}

/// Σ e^(x − m) in sixteen lanes, in one pass that writes nothing (scoring's softmax denominator).
/// Same terms as exponentiating in place and calling [`sum`], summed in another order.
pub fn sum_exp(x: &[f32], m: f32) -> f32 {
    sum_exp_on(wide_exp(), x, m)
}

/// [`sum_exp`] in its AVX-512 form when `wide` (and the CPU has AVX-512F), else the portable
/// one: the same bits either way.
pub fn sum_exp_on(wide: bool, x: &[f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rest: f32 = chunks.remainder().iter().map(|&y| fast_exp(y - m)).sum();
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        unsafe { wide::sum_exp16(x, m, &mut acc) };
        return acc.iter().sum::<f32>() + rest;
    }
    let _ = wide;
    for c in chunks {
        for i in 0..16 {
            acc[i] += fast_exp(c[i] - m);
        }
    }
    acc.iter().sum::<f32>() + rest
}

/// x ← e^((x − m)·scale), entry by entry (a softmax's numerators; `scale` is 1 or 1/temperature).
pub fn exp_in_place(x: &mut [f32], m: f32, scale: f32) {
    exp_in_place_on(wide_exp(), x, m, scale)
}

/// [`exp_in_place`] in its AVX-512 form when `wide` (and the CPU has AVX-512F), else the
/// portable one: the same bits either way.
pub fn exp_in_place_on(wide: bool, x: &mut [f32], m: f32, scale: f32) {
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        let done = unsafe { wide::exp16_in_place(x, m, scale) };
        for y in &mut x[done..] {
            *y = fast_exp((*y - m) * scale);
        }
        return;
    }
    let _ = wide;
    for y in x.iter_mut() {
        *y = fast_exp((*y - m) * scale);
    }
}

/// [`exp_in_place`], then the [`sum`] of the result (the same bits), in one pass where the
/// AVX-512 exp loop runs: the cross-entropy's softmax denominator.
pub fn exp_sum_in_place(x: &mut [f32], m: f32, scale: f32) -> f32 {
    exp_sum_in_place_on(wide_exp(), x, m, scale)
}

/// [`exp_sum_in_place`] in its AVX-512 form when `wide` (and the CPU has AVX-512F), else the
/// portable one: the same bits either way.
pub fn exp_sum_in_place_on(wide: bool, x: &mut [f32], m: f32, scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if wide && std::arch::is_x86_feature_detected!("avx512f") {
        let mut acc = [0f32; 8];
        // SAFETY: the CPU has AVX-512F.
        let done = unsafe { wide::exp16_sum8_in_place(x, m, scale, &mut acc) };
        for y in &mut x[done..] {
            *y = fast_exp((*y - m) * scale);
        }
        // The rest as `sum` goes on: its chunks of 8 (done is a multiple of 8), then the remainder.
        let chunks = x[done..].chunks_exact(8);
        let rest: f32 = chunks.remainder().iter().sum();
        for c in chunks {
            for i in 0..8 {
                acc[i] += c[i];
            }
        }
        return acc.iter().sum::<f32>() + rest;
    }
    exp_in_place_on(wide, x, m, scale);
    sum(x)
}

/// [`fast_exp`] sixteen lanes at a time in AVX-512, operation for operation (no fused
/// multiply-adds), so every lane gives the scalar function's bits. Each loop takes four registers
/// (64 entries) at a time, then single ones: the functions on `[__m512; N]` interleave their N
/// independent chains of operations, which the core overlaps (one chain at a time is limited by
/// its latency: GELU ran 1.5× slower that way on an AMD EPYC Zen 5).
#[cfg(target_arch = "x86_64")]
mod wide {
    use std::arch::x86_64::*;

    /// Registers a loop takes at once.
    const N: usize = 4;

    /// Runs `body` on the whole blocks of N·16 entries of a slice of `len` with `i` their start
    /// and the constant `R` = N, then on the rest's whole chunks of 16 with R = 1 (one register
    /// each); evaluates to how many entries that covered. A macro, not a function taking
    /// closures, so that everything inlines into the caller's AVX-512 code.
    macro_rules! blocks {
        ($len:expr, |$i:ident, $r:ident| $body:expr) => {{
            let len = $len;
            let mut $i = 0;
            while $i + 16 * N <= len {
                {
                    const $r: usize = N;
                    $body
                };
                $i += 16 * N;
            }
            while $i + 16 <= len {
                {
                    const $r: usize = 1;
                    $body
                };
                $i += 16;
            }
            $i
        }};
    }

    /// Registers from x + i, 16 floats apart.
    ///
    /// # Safety
    /// x readable for i..i + 16·R.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load<const R: usize>(x: *const f32, i: usize) -> [__m512; R] {
        let mut v = [_mm512_setzero_ps(); R];
        for (j, v) in v.iter_mut().enumerate() {
            // SAFETY: inside the contract's range.
            *v = unsafe { _mm512_loadu_ps(x.add(i + 16 * j)) };
        }
        v
    }

    /// Registers to x + i, 16 floats apart.
    ///
    /// # Safety
    /// x writable for i..i + 16·R.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn store<const R: usize>(x: *mut f32, i: usize, v: [__m512; R]) {
        for (j, v) in v.iter().enumerate() {
            // SAFETY: inside the contract's range.
            unsafe { _mm512_storeu_ps(x.add(i + 16 * j), *v) };
        }
    }

    /// [`super::fast_exp`] of each lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn exp16<const R: usize>(x: [__m512; R]) -> [__m512; R] {
        let c = _mm512_set1_ps;
        let (mut under, mut v) = ([0u16; R], x);
        for i in 0..R {
            under[i] = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x[i], x[i])
                | _mm512_cmp_ps_mask::<_CMP_LE_OQ>(x[i], c(-87.0));
            let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x[i], c(88.0));
            v[i] = _mm512_mask_blend_ps(under[i], _mm512_mask_blend_ps(below, c(88.0), x[i]), c(-87.0));
        }
        let magic = c(12_582_912.0);
        let (mut n, mut r) = (v, v);
        for i in 0..R {
            n[i] =
                _mm512_sub_ps(_mm512_add_ps(_mm512_mul_ps(v[i], c(std::f32::consts::LOG2_E)), magic), magic);
        }
        for i in 0..R {
            r[i] = _mm512_sub_ps(
                _mm512_sub_ps(v[i], _mm512_mul_ps(n[i], c(0.693_145_75))),
                _mm512_mul_ps(n[i], c(1.428_606_8e-6)),
            );
        }
        let mut p = [c(1.0f32 / 720.0); R];
        for k in [1.0f32 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
            for i in 0..R {
                p[i] = _mm512_add_ps(c(k), _mm512_mul_ps(r[i], p[i]));
            }
        }
        for i in 0..R {
            let two_n =
                _mm512_slli_epi32::<23>(_mm512_add_epi32(_mm512_cvttps_epi32(n[i]), _mm512_set1_epi32(127)));
            p[i] = _mm512_maskz_mov_ps(!under[i], _mm512_mul_ps(p[i], _mm512_castsi512_ps(two_n)));
        }
        p
    }

    /// [`super::fast_tanh`] of GELU's argument GELU_S · (v + 0.044715·v·v·v), as [`super::gelu`]
    /// forms both, for each lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn gelu_tanh16<const R: usize>(v: [__m512; R]) -> [__m512; R] {
        let c = _mm512_set1_ps;
        let mut u = v;
        for i in 0..R {
            let cube = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(c(0.044715), v[i]), v[i]), v[i]);
            u[i] = _mm512_mul_ps(c(2.0), _mm512_mul_ps(c(super::GELU_S), _mm512_add_ps(v[i], cube)));
        }
        let mut th = exp16(u);
        for t in &mut th {
            *t = _mm512_sub_ps(c(1.0), _mm512_div_ps(c(2.0), _mm512_add_ps(*t, c(1.0))));
        }
        th
    }

    /// [`super::gelu`] of each lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn gelu<const R: usize>(v: [__m512; R]) -> [__m512; R] {
        let c = _mm512_set1_ps;
        let mut y = gelu_tanh16(v);
        for i in 0..R {
            y[i] = _mm512_mul_ps(_mm512_mul_ps(c(0.5), v[i]), _mm512_add_ps(c(1.0), y[i]));
        }
        y
    }

    /// [`super::gelu_grad`] of each lane.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn gelu_grad<const R: usize>(v: [__m512; R]) -> [__m512; R] {
        let c = _mm512_set1_ps;
        let mut g = gelu_tanh16(v);
        for i in 0..R {
            let th = g[i];
            let sech2 = _mm512_sub_ps(c(1.0), _mm512_mul_ps(th, th));
            // 0.5·(1 + th) + 0.5·v·sech2·GELU_S·(1 + 3·0.044715·v·v), left to right.
            let left = _mm512_mul_ps(c(0.5), _mm512_add_ps(c(1.0), th));
            let inner = _mm512_add_ps(c(1.0), _mm512_mul_ps(_mm512_mul_ps(c(3.0 * 0.044715), v[i]), v[i]));
            let right = _mm512_mul_ps(
                _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(c(0.5), v[i]), sech2), c(super::GELU_S)),
                inner,
            );
            g[i] = _mm512_add_ps(left, right);
        }
        g
    }

    /// out ← [`super::gelu`] of inp over the whole chunks of 16; returns how many entries.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `out` and `inp` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu16(out: &mut [f32], inp: &[f32]) -> usize {
        let (o, x) = (out.as_mut_ptr(), inp.as_ptr());
        // SAFETY: whole registers inside both slices (`blocks`).
        blocks!(out.len().min(inp.len()), |i, R| unsafe { store::<R>(o, i, gelu(load::<R>(x, i))) })
    }

    /// d ← d · [`super::gelu_grad`] of inp over the whole chunks of 16; returns how many entries.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `d` and `inp` have the same length.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn gelu_grad16_mul(d: &mut [f32], inp: &[f32]) -> usize {
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn at<const R: usize>(d: *mut f32, x: *const f32, i: usize) {
            // SAFETY: forwarded.
            unsafe {
                let (mut dv, g) = (load::<R>(d, i), gelu_grad(load::<R>(x, i)));
                for (dv, g) in dv.iter_mut().zip(g) {
                    *dv = _mm512_mul_ps(*dv, g);
                }
                store(d, i, dv);
            }
        }
        let (dp, x) = (d.as_mut_ptr(), inp.as_ptr());
        // SAFETY: whole registers inside both slices (`blocks`).
        blocks!(d.len().min(inp.len()), |i, R| unsafe { at::<R>(dp, x, i) })
    }

    /// e^((x − m)·scale) of R registers from x + i, or e^(x − m) without `scale`.
    ///
    /// # Safety
    /// x readable for i..i + 16·R.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn exp_at<const R: usize>(
        x: *const f32,
        i: usize,
        m: __m512,
        scale: Option<__m512>,
    ) -> [__m512; R] {
        // SAFETY: forwarded.
        let mut v = unsafe { load::<R>(x, i) };
        for v in &mut v {
            *v = _mm512_sub_ps(*v, m);
            if let Some(scale) = scale {
                *v = _mm512_mul_ps(*v, scale);
            }
        }
        exp16(v)
    }

    /// acc[i] += e^(x[16j + i] − m) over the whole chunks of 16, chunk after chunk.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_exp16(x: &[f32], m: f32, acc: &mut [f32; 16]) {
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn at<const R: usize>(x: *const f32, i: usize, m: __m512, sum: &mut __m512) {
            // SAFETY: forwarded.
            for e in unsafe { exp_at::<R>(x, i, m, None) } {
                *sum = _mm512_add_ps(*sum, e);
            }
        }
        let (mut sum, m, xp) = (_mm512_loadu_ps(acc.as_ptr()), _mm512_set1_ps(m), x.as_ptr());
        // SAFETY: whole registers inside x (`blocks`).
        blocks!(x.len(), |i, R| unsafe { at::<R>(xp, i, m, &mut sum) });
        // SAFETY: 16 floats.
        unsafe { _mm512_storeu_ps(acc.as_mut_ptr(), sum) };
    }

    /// As [`exp16_in_place`], also adding the results to `acc` in [`super::sum`]'s order: each
    /// chunk of 16 as its two chunks of 8, one after the other.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp16_sum8_in_place(x: &mut [f32], m: f32, scale: f32, acc: &mut [f32; 8]) -> usize {
        #[target_feature(enable = "avx512f")]
        #[inline]
        unsafe fn at<const R: usize>(x: *mut f32, i: usize, m: __m512, scale: __m512, sum: &mut __m256) {
            // SAFETY: forwarded.
            let e = unsafe { exp_at::<R>(x, i, m, Some(scale)) };
            // SAFETY: forwarded.
            unsafe { store(x, i, e) };
            for e in e {
                *sum = _mm256_add_ps(*sum, _mm512_castps512_ps256(e));
                *sum =
                    _mm256_add_ps(*sum, _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(e))));
            }
        }
        let (m, scale, xp) = (_mm512_set1_ps(m), _mm512_set1_ps(scale), x.as_mut_ptr());
        // SAFETY: 8 floats.
        let mut sum = unsafe { _mm256_loadu_ps(acc.as_ptr()) };
        // SAFETY: whole registers inside x (`blocks`).
        let done = blocks!(x.len(), |i, R| unsafe { at::<R>(xp, i, m, scale, &mut sum) });
        // SAFETY: 8 floats.
        unsafe { _mm256_storeu_ps(acc.as_mut_ptr(), sum) };
        done
    }

    /// x ← e^((x − m)·scale) over the whole chunks of 16; returns how many entries that was.
    ///
    /// # Safety
    /// The CPU has AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn exp16_in_place(x: &mut [f32], m: f32, scale: f32) -> usize {
        let (m, scale, xp) = (_mm512_set1_ps(m), _mm512_set1_ps(scale), x.as_mut_ptr());
        // SAFETY: whole registers inside x (`blocks`).
        blocks!(x.len(), |i, R| unsafe { store::<R>(xp, i, exp_at::<R>(xp, i, m, Some(scale))) })
    }
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

/// Maximum in 32 lanes, so that no one chain of comparisons runs the length of a vocabulary-wide
/// row (NaNs are skipped; −∞ for an empty or all-NaN slice; of +0 and −0, whichever its lane saw
/// first).
#[inline(always)]
pub fn max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 32];
    let chunks = x.chunks_exact(32);
    let rest = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    for c in chunks {
        for i in 0..32 {
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
    phase("gelu", || gelu_forward_on(wide_exp(), out, inp))
}

/// [`gelu_forward`] in its AVX-512 form (`wide`, same bits) or the portable one.
pub fn gelu_forward_on(wide: bool, out: &mut [f32], inp: &[f32]) {
    map_on(wide, out, inp, GELU16, |o, x| *o = gelu(x));
}

/// The AVX-512 GELU loops (nothing on other architectures).
#[cfg(target_arch = "x86_64")]
const GELU16: Wide16 = wide::gelu16;
#[cfg(target_arch = "x86_64")]
const GELU_GRAD16: Wide16 = wide::gelu_grad16_mul;
#[cfg(not(target_arch = "x86_64"))]
const GELU16: Wide16 = ();
#[cfg(not(target_arch = "x86_64"))]
const GELU_GRAD16: Wide16 = ();

/// The AVX-512 form of an element-wise loop: handles the whole chunks of 16 of (dst, inp), returns
/// how many entries that was.
#[cfg(target_arch = "x86_64")]
type Wide16 = unsafe fn(&mut [f32], &[f32]) -> usize;
#[cfg(not(target_arch = "x86_64"))]
type Wide16 = ();

/// `f(dst[i], inp[i])` for every i, in parallel blocks: the whole chunks of 16 by `wide16` when
/// `wide` and the CPU has AVX-512F (which must give f's bits), the rest by f.
fn map_on(wide: bool, dst: &mut [f32], inp: &[f32], wide16: Wide16, f: impl Fn(&mut f32, f32) + Sync) {
    dst.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(d, x)| {
        #[cfg(target_arch = "x86_64")]
        let done = if wide && std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F, which is all the wide loops need; d and x have the
            // same length.
            unsafe { wide16(d, x) }
        } else {
            0
        };
        #[cfg(not(target_arch = "x86_64"))]
        let (done, _) = (0, (wide, wide16));
        for (d, &x) in d[done..].iter_mut().zip(&x[done..]) {
            f(d, x);
        }
    });
}

/// GELU of one value (what the AVX-512 form computes, operation for operation).
#[inline(always)]
fn gelu(v: f32) -> f32 {
    0.5 * v * (1.0 + fast_tanh(GELU_S * (v + 0.044715 * v * v * v)))
}

/// gelu'(v).
#[inline(always)]
fn gelu_grad(v: f32) -> f32 {
    let u = GELU_S * (v + 0.044715 * v * v * v);
    let th = fast_tanh(u);
    let sech2 = 1.0 - th * th;
    0.5 * (1.0 + th) + 0.5 * v * sech2 * GELU_S * (1.0 + 3.0 * 0.044715 * v * v)
}

/// d inp = d out · gelu'(inp), in place on `d`.
pub fn gelu_backward(d: &mut [f32], inp: &[f32]) {
    phase("gelu backward", || gelu_backward_on(wide_exp(), d, inp))
}

/// [`gelu_backward`] in its AVX-512 form (`wide`, same bits) or the portable one.
pub fn gelu_backward_on(wide: bool, d: &mut [f32], inp: &[f32]) {
    map_on(wide, d, inp, GELU_GRAD16, |d, x| *d *= gelu_grad(x));
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
/// d qkv (B, T, 3C) from d out (B, T, C) and the saved probabilities `att` (B, H, T, T). Each
/// head's d att (T, T) goes through one scratch block per thread, which stays in cache.
#[allow(clippy::too_many_arguments)]
pub fn attention_backward(
    kernels: Kernels,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
) {
    phase("attention backward", || attention_backward_on(kernels, true, dqkv, dout, qkv, att, b, t, c, h))
}

/// [`attention_backward`], its products in causal blocks when `blocked` (as [`attention_on`]).
#[allow(clippy::too_many_arguments)]
fn attention_backward_on(
    kernels: Kernels,
    blocked: bool,
    dqkv: &mut [f32],
    dout: &[f32],
    qkv: &[f32],
    att: &[f32],
    b: usize,
    t: usize,
    c: usize,
    h: usize,
) {
    let hs = c / h;
    let (keys, sums) = CAUSAL_BLOCKS;
    let (blocks_n, blocks_k) =
        (causal_blocks(blocked, keys, t, t, hs), causal_blocks(blocked, sums, t, t, hs));
    assert!(dqkv.len() == b * t * 3 * c && qkv.len() == b * t * 3 * c, "attention_backward shapes");
    assert!(dout.len() == b * t * c && att.len() == b * h * t * t, "attention_backward shapes");
    let scale = 1.0 / (hs as f32).sqrt();
    let dq_p = SendPtr(dqkv.as_mut_ptr());
    (0..b * h).into_par_iter().for_each_init(
        || vec![0f32; t * t],
        |da, bh| {
            let (bi, hi) = (bh / h, bh % h);
            let a = &att[bh * t * t..(bh + 1) * t * t];
            let base = qkv[bi * t * 3 * c..].as_ptr();

            // SAFETY: q, k, v, d out and att are read inside their (asserted) shapes; writes go to
            // this (bi, hi)'s q, k, v columns of dqkv, which no other task touches, and to this
            // thread's d att scratch.
            unsafe {
                let (q, k, v) = (base.add(hi * hs), base.add(c + hi * hs), base.add(2 * c + hi * hs));
                let d_o = dout.as_ptr().add(bi * t * c + hi * hs);
                let db = dq_p.ptr().add(bi * t * 3 * c);
                let (dq, dk, dv) = (db.add(hi * hs), db.add(c + hi * hs), db.add(2 * c + hi * hs));
                // Each product by blocks of rows, leaving out what the causal mask makes zero: the
                // terms left out are zeros at the start or the end of each sum.
                for &(i0, i1) in &blocks_n {
                    // datt (T, T) = dout · vᵀ, on and below the diagonal (the rest is zeroed below).
                    head_product(
                        kernels,
                        (i1 - i0, i1, hs),
                        (da.as_mut_ptr().add(i0 * t), t),
                        Mat::row_major(d_o.add(i0 * c), c),
                        Mat::transposed(v, 3 * c),
                        1.0,
                    );
                }
                for &(i0, i1) in &blocks_k {
                    // dv (T, hs) = attᵀ · dout: row j from the queries i ≥ j.
                    head_product(
                        kernels,
                        (i1 - i0, hs, t - i0),
                        (dv.add(i0 * 3 * c), 3 * c),
                        Mat::transposed(a.as_ptr().add(i0 * t + i0), t),
                        Mat::row_major(d_o.add(i0 * c), c),
                        1.0,
                    );
                }
                // Softmax backward, in place: dpre = att ⊙ (datt − Σ att·datt), zero above the diagonal.
                for t1 in 0..t {
                    let (ar, dr) = (&a[t1 * t..(t1 + 1) * t], &mut da[t1 * t..(t1 + 1) * t]);
                    let d = dot(&ar[..=t1], &dr[..=t1]);
                    for t2 in 0..=t1 {
                        dr[t2] = ar[t2] * (dr[t2] - d);
                    }
                    dr[t1 + 1..].iter_mut().for_each(|x| *x = 0.0);
                }
                for &(i0, i1) in &blocks_k {
                    // dq (T, hs) = dpre · k · scale: row i from the keys j ≤ i.
                    head_product(
                        kernels,
                        (i1 - i0, hs, i1),
                        (dq.add(i0 * 3 * c), 3 * c),
                        Mat::row_major(da.as_ptr().add(i0 * t), t),
                        Mat::row_major(k, 3 * c),
                        scale,
                    );
                    // dk (T, hs) = dpreᵀ · q · scale: row j from the queries i ≥ j.
                    head_product(
                        kernels,
                        (i1 - i0, hs, t - i0),
                        (dk.add(i0 * 3 * c), 3 * c),
                        Mat::transposed(da.as_ptr().add(i0 * t + i0), t),
                        Mat::row_major(q.add(i0 * 3 * c), 3 * c),
                        scale,
                    );
                }
            }
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Fp32Kernel;

    #[test]
    fn fast_exp_and_tanh_are_accurate() {
        for i in -8699..8000 {
            let x = i as f32 * 0.01;
            let (want, got) = (x.exp(), fast_exp(x));
            assert!((got - want).abs() <= 1e-6 * want, "exp({x}): {got} vs {want}");
            let (want, got) = (x.tanh(), fast_tanh(x));
            assert!((got - want).abs() <= 1e-6, "tanh({x}): {got} vs {want}");
        }
        assert_eq!((fast_exp(-1000.0), fast_exp(f32::NEG_INFINITY), fast_exp(f32::NAN)), (0.0, 0.0, 0.0));
    }

    /// The AVX-512 exp and GELU loops give the portable ones' bits: every entry and every sum (and
    /// GELU and its derivative), on rows of every length up to 140 (the four-register blocks with every remainder) and a 33,278-word one, over
    /// special values and the whole range (underflow, the clamp at 88, NaN, ±∞, ±0, denormals,
    /// both sides of the cut-offs).
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn wide_exp_loops_give_the_portable_bits() {
        let bits = |x: &[f32]| x.iter().map(|v| v.to_bits()).collect::<Vec<u32>>();
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("skipped: this CPU has no AVX-512F, so only the portable exp loops can run");
            return;
        }
        let special = [
            0.0,
            -0.0,
            1e-40,
            -1e-40,
            f32::NAN,
            f32::INFINITY,
            f32::NEG_INFINITY,
            -87.0,
            -86.99,
            -87.01,
            88.0,
            87.99,
            88.01,
            200.0,
            -200.0,
            0.3466,
            -0.3466,
            1.0,
            -1.0,
            f32::MAX,
            f32::MIN,
        ];
        let mut state = 12345u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 180.0 - 95.0
        };
        let mut rows: Vec<Vec<f32>> = (0..=140).map(|n| (0..n).map(|_| next()).collect()).collect();
        rows.push(
            (0..33_278).map(|i| if i % 97 == 0 { special[i / 97 % special.len()] } else { next() }).collect(),
        );
        rows.push(special.iter().copied().cycle().take(48).collect());
        // Rows of values close together, so that every term counts in the sums (and their order
        // shows in the bits).
        rows.extend([64, 1000, 8203].map(|n| (0..n).map(|_| next() / 50.0).collect::<Vec<f32>>()));
        for row in &rows {
            for (m, scale) in [(0.0, 1.0), (3.5, 1.0), (-2.0, 1.0 / 0.7), (1.0, 1.25)] {
                let (wide, portable) = (sum_exp_on(true, row, m), sum_exp_on(false, row, m));
                assert_eq!(wide.to_bits(), portable.to_bits(), "sum_exp over {} entries, m = {m}", row.len());
                let (mut a, mut b) = (row.clone(), row.clone());
                gelu_forward_on(true, &mut a, row);
                gelu_forward_on(false, &mut b, row);
                assert_eq!(bits(&a), bits(&b), "gelu over {} entries", row.len());
                let d: Vec<f32> = row.iter().map(|x| x * 0.37 - m).collect();
                let (mut a, mut b) = (d.clone(), d);
                gelu_backward_on(true, &mut a, row);
                gelu_backward_on(false, &mut b, row);
                assert_eq!(bits(&a), bits(&b), "gelu backward over {} entries", row.len());
                let (mut a, mut b) = (row.clone(), row.clone());
                let (sa, sb) = (
                    exp_sum_in_place_on(true, &mut a, m, scale),
                    exp_sum_in_place_on(false, &mut b, m, scale),
                );
                assert_eq!(bits(&a), bits(&b), "exp_sum_in_place over {} entries", row.len());
                assert_eq!(sa.to_bits(), sb.to_bits(), "exp_sum_in_place's sum over {} entries", row.len());
                assert_eq!(sb.to_bits(), sum(&b).to_bits(), "exp_sum_in_place: sum's order");
                let (mut a, mut b) = (row.clone(), row.clone());
                exp_in_place_on(true, &mut a, m, scale);
                exp_in_place_on(false, &mut b, m, scale);
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert_eq!(
                        x.to_bits(),
                        y.to_bits(),
                        "entry {i} of {}: e^(({} − {m})·{scale})",
                        row.len(),
                        row[i]
                    );
                }
            }
        }
    }

    /// Column sums (a bias's and LayerNorm's gradients) are each column's terms added in row
    /// order, whatever the threads and the widths (not multiples of the 16-column ranges): the
    /// bits of the plain loop. A hand-checked case: columns of 1, 2, 3 over three rows.
    #[test]
    fn column_sums_add_each_column_in_row_order() {
        let mut acc = vec![10.0f32, 20.0];
        let m = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        column_sums([&mut acc[..]], 3, |i, j0, [a]| {
            for (a, x) in a.iter_mut().zip(&m[i * 2 + j0..]) {
                *a += x;
            }
        });
        assert_eq!(acc, [19.0, 32.0]);
        let mut state = 7u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0f32.powi((state % 13) as i32 - 6)
        };
        for (rows, c) in [(0, 5), (7, 1), (33, 15), (64, 17), (50, 100), (9, 257)] {
            let (d, x): (Vec<f32>, Vec<f32>) = (0..rows * c).map(|_| (next(), next())).unzip();
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (0..rows).map(|_| (next(), next().abs() + 0.5)).unzip();
            let (db0, dw0): (Vec<f32>, Vec<f32>) = (0..c).map(|_| (next(), next())).unzip();
            let (mut want_b, mut want_w) = (db0.clone(), dw0.clone());
            for i in 0..rows {
                for j in 0..c {
                    want_b[j] += d[i * c + j];
                    want_w[j] += (x[i * c + j] - mean[i]) * rstd[i] * d[i * c + j];
                }
            }
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (mut db, mut dw, mut dinp) = (db0.clone(), dw0.clone(), vec![0f32; rows * c]);
                let w = vec![1f32; c];
                pool.install(|| {
                    layernorm_backward(false, &mut dinp, &mut dw, &mut db, &d, &x, &w, &mean, &rstd, c)
                });
                let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&db), bits(&want_b), "d bias, {rows} × {c}, {threads} threads");
                assert_eq!(bits(&dw), bits(&want_w), "d weight, {rows} × {c}, {threads} threads");
            }
        }
    }

    /// The blocked batch sums (bf16's) add each block of [`SUM_BLOCK`] rows from zero in row
    /// order, then the blocks in order, whatever the threads; d inp is the unblocked one's. A
    /// hand-checked case where the orders differ: one column, 1e8 then 63 ones. Row by row, each
    /// 1 is lost to rounding (f32 steps by 8 there): 1e8. By blocks: 1e8 (+ 31 ones, lost) + 32.
    #[test]
    fn blocked_sums_add_blocks_of_rows_in_order() {
        let column: Vec<f32> = (0..64).map(|i| if i == 0 { 1e8 } else { 1.0 }).collect();
        for (blocked, want) in [(false, 1e8f32), (true, 100_000_032.0)] {
            let mut db = [0f32];
            bias_sums(blocked, &mut db, &column, 64);
            assert_eq!(db[0], want, "blocked: {blocked}");
        }
        let mut state = 11u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 3.0f32.powi((state % 13) as i32 - 6)
        };
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        for (rows, c) in [(0, 5), (7, 1), (32, 3), (33, 15), (70, 17), (100, 100), (9, 257)] {
            let (d, x): (Vec<f32>, Vec<f32>) = (0..rows * c).map(|_| (next(), next())).unzip();
            let (mean, rstd): (Vec<f32>, Vec<f32>) = (0..rows).map(|_| (next(), next().abs() + 0.5)).unzip();
            let (db0, dw0): (Vec<f32>, Vec<f32>) = (0..c).map(|_| (next(), next())).unzip();
            let w: Vec<f32> = (0..c).map(|_| next()).collect();
            let dinp0: Vec<f32> = (0..rows * c).map(|_| next()).collect();
            // The order by hand: each block's rows from zero, then db0 + block 0 + block 1 + ….
            let (mut want_b, mut want_w) = (db0.clone(), dw0.clone());
            for b0 in (0..rows).step_by(SUM_BLOCK) {
                let (mut sb, mut sw) = (vec![0f32; c], vec![0f32; c]);
                for i in b0..rows.min(b0 + SUM_BLOCK) {
                    for j in 0..c {
                        sb[j] += d[i * c + j];
                        sw[j] += (x[i * c + j] - mean[i]) * rstd[i] * d[i * c + j];
                    }
                }
                for j in 0..c {
                    want_b[j] += sb[j];
                    want_w[j] += sw[j];
                }
            }
            let mut want_dinp = dinp0.clone();
            let (mut db, mut dw) = (db0.clone(), dw0.clone());
            layernorm_backward(false, &mut want_dinp, &mut dw, &mut db, &d, &x, &w, &mean, &rstd, c);
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (mut db, mut dw, mut dinp) = (db0.clone(), dw0.clone(), dinp0.clone());
                pool.install(|| {
                    layernorm_backward(true, &mut dinp, &mut dw, &mut db, &d, &x, &w, &mean, &rstd, c)
                });
                let at = format!("{rows} × {c}, {threads} threads");
                assert_eq!(bits(&db), bits(&want_b), "layernorm d bias, {at}");
                assert_eq!(bits(&dw), bits(&want_w), "layernorm d weight, {at}");
                assert_eq!(bits(&dinp), bits(&want_dinp), "layernorm d inp, {at}");
                let mut db = db0.clone();
                pool.install(|| bias_sums(true, &mut db, &d, rows));
                assert_eq!(bits(&db), bits(&want_b), "bias, {at}");
                let (mut db, mut want) = (db0.clone(), db0.clone());
                pool.install(|| bias_sums(false, &mut db, &d, rows));
                for i in 0..rows {
                    for j in 0..c {
                        want[j] += d[i * c + j];
                    }
                }
                assert_eq!(bits(&db), bits(&want), "bias row by row, {at}");
            }
        }
    }

    /// Attention's products in causal blocks give the bits of the whole products, forward (with
    /// the probabilities from position 0, and without them after a prefix of keys, as a prefill
    /// does) and backward, for every length up to 260 (head size 16), lengths around the block
    /// edges at head size 64, up to 512 keys and past them, head sizes 128, 512 and 768 (past 512
    /// gemm would split the sums of a 64 × 64 block and of the whole product differently), on
    /// each fp32 kernel this CPU has (the portable one on any). Any block that left out a key it
    /// sees, or took in a masked one as other than a zero at one end of a sum, changes bits here.
    #[test]
    fn causal_blocks_give_the_bits_of_whole_products() {
        assert_eq!(causal_blocks(true, 32, 100, 100, 64), [(0, 32), (32, 64), (64, 100)]);
        assert_eq!(causal_blocks(true, 32, 128, 128, 64), [(0, 32), (32, 64), (64, 96), (96, 128)]);
        assert_eq!(causal_blocks(true, 64, 191, 191, 64), [(0, 64), (64, 191)]);
        assert_eq!(causal_blocks(true, 32, 63, 63, 64), [(0, 63)]);
        assert_eq!(causal_blocks(true, 32, 100, 513, 64), [(0, 100)]);
        assert_eq!(causal_blocks(true, 32, 100, 100, 2), [(0, 100)]);
        assert_eq!(causal_blocks(true, 32, 100, 100, 513), [(0, 100)]);
        assert_eq!(causal_blocks(false, 32, 128, 128, 64), [(0, 128)]);
        let mut state = 11u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        };
        let same = |got: &[f32], want: &[f32], what: &str| {
            let first = got.iter().zip(want).position(|(a, b)| a.to_bits() != b.to_bits());
            assert!(first.is_none(), "{what}: entry {first:?} differs");
        };
        let mut kernels = vec![("portable", Kernels::portable())];
        for cap in ["avx2", "avx512"] {
            let k = Kernels::parse(cap).unwrap();
            let want = if cap == "avx2" { Fp32Kernel::Avx2 } else { Fp32Kernel::Avx512 };
            if k.fp32() == want {
                kernels.push((cap, k));
            } else {
                println!("skipped: causal blocks on {cap}: this CPU has {}", k.describe());
            }
        }
        let short: Vec<usize> = (1..=260).collect();
        let long =
            [64, 65, 66, 67, 70, 95, 96, 97, 98, 127, 128, 129, 130, 161, 191, 192, 193, 256, 257, 512, 530];
        let (rows, h) = (2, 2);
        for (name, kernels) in kernels {
            for (hs, lengths) in
                [(16, &short[..]), (64, &long[..]), (128, &[128, 130]), (512, &[128]), (768, &[128, 192])]
            {
                let c = h * hs;
                for &t in lengths {
                    let qkv: Vec<f32> = (0..rows * t * 3 * c).map(|_| 2.0 * next()).collect();
                    let dout: Vec<f32> = (0..rows * t * c).map(|_| next()).collect();
                    let kv = KvLayout {
                        k: qkv[c..].as_ptr(),
                        v: qkv[2 * c..].as_ptr(),
                        seq: t * 3 * c,
                        head: hs,
                        pos: 3 * c,
                    };
                    let mut out = [vec![f32::NAN; rows * t * c], vec![f32::NAN; rows * t * c]];
                    let mut probs = [vec![f32::NAN; rows * h * t * t], vec![f32::NAN; rows * h * t * t]];
                    let mut dqkv = [vec![f32::NAN; qkv.len()], vec![f32::NAN; qkv.len()]];
                    for (i, blocked) in [false, true].into_iter().enumerate() {
                        // SAFETY: kv is the k and v columns of qkv, (rows·t, 3C), which outlives the call.
                        unsafe {
                            let p = Some(&mut probs[i][..]);
                            attention_on(kernels, blocked, &mut out[i], p, &qkv, kv, rows, t, 0, c, h)
                        };
                        attention_backward_on(
                            kernels,
                            blocked,
                            &mut dqkv[i],
                            &dout,
                            &qkv,
                            &probs[i],
                            rows,
                            t,
                            c,
                            h,
                        );
                    }
                    let at = format!("{name}, hs {hs}, t {t}");
                    same(&out[1], &out[0], &format!("forward, {at}"));
                    same(&probs[1], &probs[0], &format!("probabilities, {at}"));
                    same(&dqkv[1], &dqkv[0], &format!("d qkv, {at}"));
                    assert!(out[0].iter().chain(&dqkv[0]).all(|x| x.is_finite()), "all written, {at}");
                }
                // A prefill: t queries after a prefix of pos0 keys, the keys and values of all
                // pos0 + t positions in a separate (rows, len, 3C) buffer.
                for (pos0, t) in [
                    (5, 64),
                    (5, 100),
                    (40, 70),
                    (100, 113),
                    (3, 128),
                    (7, 129),
                    (10, 200),
                    (400, 112),
                    (450, 100),
                ] {
                    let len = pos0 + t;
                    let qkv: Vec<f32> = (0..rows * t * 3 * c).map(|_| 2.0 * next()).collect();
                    let cache: Vec<f32> = (0..rows * len * 3 * c).map(|_| 2.0 * next()).collect();
                    let kv = KvLayout {
                        k: cache[c..].as_ptr(),
                        v: cache[2 * c..].as_ptr(),
                        seq: len * 3 * c,
                        head: hs,
                        pos: 3 * c,
                    };
                    let mut out = [vec![f32::NAN; rows * t * c], vec![f32::NAN; rows * t * c]];
                    for (i, blocked) in [false, true].into_iter().enumerate() {
                        // SAFETY: kv is the k and v columns of cache, rows sequences of len positions.
                        unsafe {
                            attention_on(kernels, blocked, &mut out[i], None, &qkv, kv, rows, t, pos0, c, h)
                        };
                    }
                    let at = format!("{name}, hs {hs}, pos0 {pos0}, t {t}");
                    same(&out[1], &out[0], &format!("prefill, {at}"));
                    assert!(out[0].iter().all(|x| x.is_finite()), "all written, {at}");
                }
            }
        }
    }

    /// Nanoseconds per entry of the AVX-512 exp and GELU loops on a 4,096-entry row in L1, one
    /// thread. A benchmark, not a check: `cargo test --release --lib exp_loops_speed -- --ignored
    /// --nocapture`.
    #[test]
    #[ignore]
    #[cfg(target_arch = "x86_64")]
    fn exp_loops_speed() {
        if !std::arch::is_x86_feature_detected!("avx512f") {
            println!("skipped: this CPU has no AVX-512F");
            return;
        }
        let (n, reps) = (4096usize, 20_000usize);
        let x: Vec<f32> = (0..n).map(|i| ((i % 1000) as f32 - 500.0) * 0.01).collect();
        let mut y = x.clone();
        let mut time = |name: &str, f: &mut dyn FnMut(&mut [f32])| {
            let start = std::time::Instant::now();
            for _ in 0..reps {
                y.copy_from_slice(&x);
                f(&mut y);
                std::hint::black_box(&mut y);
            }
            let ns = start.elapsed().as_secs_f64() / (n * reps) as f64 * 1e9;
            println!("{name}: {ns:.3} ns per entry (with the row's copy)");
        };
        // SAFETY (both): the CPU has AVX-512F (checked); y and x have the same length.
        time("gelu16", &mut |y| unsafe {
            wide::gelu16(y, &x);
        });
        time("gelu_grad16_mul", &mut |y| unsafe {
            wide::gelu_grad16_mul(y, &x);
        });
        time("exp_sum_in_place", &mut |y| {
            exp_sum_in_place_on(true, y, 5.0, 1.0);
        });
        time("copy alone", &mut |_| ());
    }

    /// How long each of attention's small products takes in causal blocks of 128 (whole), 64 and
    /// 32 query rows at config A's head shape (T = 128, hs = 64), and the softmax passes, on one
    /// thread: what [`CAUSAL_BLOCKS`] was chosen from. A benchmark, not a check:
    /// `cargo test --release --lib attention_block_speed -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn attention_block_speed() {
        let kernels = Kernels::from_env().expect("COLLAPSE_LAB_KERNELS");
        let (t, hs, c, reps) = (128usize, 64usize, 256usize, 2000);
        let qkv: Vec<f32> = (0..t * 3 * c).map(|i| ((i * 7919 % 1000) as f32 - 500.0) * 0.001).collect();
        let (mut att, mut o) = (vec![0f32; t * t], vec![0f32; t * c]);
        let time = |f: &mut dyn FnMut()| {
            let start = std::time::Instant::now();
            for _ in 0..reps {
                f();
            }
            start.elapsed().as_secs_f64() / reps as f64 * 1e6
        };
        println!("{}; T {t}, hs {hs}; µs per head, one thread", kernels.describe());
        let (q, k) = (qkv.as_ptr(), qkv[c..].as_ptr());
        for size in [128, 64, 32] {
            let blocks = causal_blocks(true, size, t, t, hs);
            // SAFETY (all three): the operands are inside qkv, att and o at these strides.
            let keys = time(&mut || {
                for &(i0, i1) in &blocks {
                    let lhs = Mat::row_major(unsafe { q.add(i0 * 3 * c) }, 3 * c);
                    let dst = unsafe { att.as_mut_ptr().add(i0 * t) };
                    unsafe {
                        head_product(
                            kernels,
                            (i1 - i0, i1, hs),
                            (dst, t),
                            lhs,
                            Mat::transposed(k, 3 * c),
                            0.1,
                        )
                    };
                }
            });
            let sums = time(&mut || {
                for &(i0, i1) in &blocks {
                    let lhs = Mat::row_major(unsafe { att.as_ptr().add(i0 * t) }, t);
                    let dst = unsafe { o.as_mut_ptr().add(i0 * c) };
                    unsafe {
                        head_product(kernels, (i1 - i0, hs, i1), (dst, c), lhs, Mat::row_major(k, 3 * c), 1.0)
                    };
                }
            });
            let sums_t = time(&mut || {
                for &(i0, i1) in &blocks {
                    let lhs = Mat::transposed(unsafe { att.as_ptr().add(i0 * t + i0) }, t);
                    let (dst, rhs) =
                        unsafe { (o.as_mut_ptr().add(i0 * c), Mat::row_major(q.add(i0 * 3 * c), 3 * c)) };
                    unsafe { head_product(kernels, (i1 - i0, hs, t - i0), (dst, c), lhs, rhs, 1.0) };
                }
            });
            println!(
                "blocks of {size}: q·kᵀ-like {keys:.2}, att·v-like {sums:.2}, attᵀ·d out-like {sums_t:.2}"
            );
        }
        let softmax = time(&mut || {
            for (i, row) in att.chunks_mut(t).enumerate() {
                causal_softmax(row, i + 1);
            }
        });
        println!("causal softmax of the {t} rows: {softmax:.2}");
    }

    /// The embeddings' backward gives the bits of the plain loop (each token's and position's
    /// row gets its terms in row order), with repeated tokens and widths that are not multiples
    /// of the 16-column ranges, on 1, 2 and 3 threads; a hand-checked case.
    #[test]
    fn embedding_backward_adds_each_row_in_order() {
        let (mut wte, mut wpe) = (vec![0f32; 3 * 2], vec![0f32; 2 * 2]);
        embedding_backward(&mut wte, &mut wpe, &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], &[2, 0, 2], 2, 2);
        assert_eq!((wte, wpe), (vec![3.0, 4.0, 0.0, 0.0, 6.0, 8.0], vec![6.0, 8.0, 3.0, 4.0]));
        let mut state = 5u64;
        let mut next = move || {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            state >> 33
        };
        for (vocab, t, rows, c) in [(5, 3, 12, 1), (7, 4, 16, 17), (3, 8, 64, 100), (50, 5, 20, 257)] {
            let inputs: Vec<u32> = (0..rows).map(|_| (next() % vocab) as u32).collect();
            let dx: Vec<f32> = (0..rows * c).map(|_| (next() % 2001) as f32 / 1000.0 - 1.0).collect();
            let (w0, p0): (Vec<f32>, Vec<f32>) = (
                (0..vocab as usize * c).map(|i| i as f32 * 0.1).collect(),
                (0..t * c).map(|i| i as f32).collect(),
            );
            let (mut want_w, mut want_p) = (w0.clone(), p0.clone());
            for (row, d) in dx.chunks(c).enumerate() {
                let (tok, pos) = (inputs[row] as usize, row % t);
                want_w[tok * c..(tok + 1) * c].iter_mut().zip(d).for_each(|(g, d)| *g += d);
                want_p[pos * c..(pos + 1) * c].iter_mut().zip(d).for_each(|(g, d)| *g += d);
            }
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            for threads in [1, 2, 3] {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                let (mut w, mut p) = (w0.clone(), p0.clone());
                pool.install(|| embedding_backward(&mut w, &mut p, &dx, &inputs, t, c));
                assert_eq!(bits(&w), bits(&want_w), "d wte, {rows} rows of {c}, {threads} threads");
                assert_eq!(bits(&p), bits(&want_p), "d wpe, {rows} rows of {c}, {threads} threads");
            }
        }
    }

    /// The linear layer gives the same numbers (to f32 rounding) through packed weights (few rows)
    /// and the general product, with and without bias; a hand-checked element.
    #[test]
    fn linear_packed_and_general_agree() {
        let c = Compute::fp32();
        let (rows, ic, oc) = (11, 5, 37);
        let inp: Vec<f32> = (0..rows * ic).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let w: Vec<f32> = (0..oc * ic).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
        let bias: Vec<f32> = (0..oc).map(|j| j as f32 / 10.0).collect();
        let (mut want, mut got) = (vec![0f32; rows * oc], vec![1f32; rows * oc]);
        linear(c, &mut want, &inp, &w, None, Some(&bias), rows, None);
        let packed = PackedWeights::new(c.kernels, &w, oc, ic, Precision::F32);
        linear(c, &mut got, &inp, &w, Some(&packed), Some(&bias), rows, None);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "max |Δ| {diff}");
        let dot0: f32 = (0..ic).map(|k| inp[k] * w[k]).sum();
        assert!((want[0] - dot0).abs() < 1e-6, "row 0 · column 0 + bias 0");
    }
}
