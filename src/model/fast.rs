//! The fast CPU engine: the GPT of [`super::describe`] with its forward and backward written out by
//! hand in the spirit of llm.c's `train_gpt2.c`. Parameters, gradients and AdamW moments live in
//! flat `Vec<f32>` buffers laid out by the description (one slice per parameter, views by name),
//! activations in buffers allocated once per batch shape; the ops are in [`super::ops`], the
//! matrix products in [`crate::kernels`].
//!
//! The block is written once (`block_qkv` + `block_rest`) and serves three passes: training and
//! scoring run whole sequences from position 0 and keep every activation (`forward_sequences`,
//! then `backward`); decoding ([`Decoder`]) runs a few new positions per row against a KV cache.
//! [`super::candle`] is the reference: tests check that this engine's loss, every gradient and the
//! decoder's logits match candle's.
//!
//! Shapes: B batch (rows), T time, C channels, H heads, hs = C / H, V vocabulary, BT = B·T rows.

use super::ops::{
    add, attention, attention_backward, embedding_backward, gelu_backward, gelu_forward, last_rows,
    layernorm_backward, layernorm_forward, linear, matmul_backward, matmul_backward_lhs, matmul_forward_with,
    max, Compute, KvLayout, WeightRhs,
};
use super::profile::phase;
use super::{describe, flat_layout, split, split_mut, Block, ModelConfig, Params, Weights};
use crate::kernels::{Lhs, PackedWeights, Rhs};
use rayon::prelude::*;
use std::ops::Range;

/// ln_1 and the q|k|v projection of a block's rows. A `_rhs` field is its activation as the
/// right operand of the backward's d W product, kept from the forward product when training
/// packs it there (bf16 on `vdpbf16ps`), else None.
struct QkvActs {
    ln1: Vec<f32>,        // (BT, C)
    ln1_mean: Vec<f32>,   // (BT)
    ln1_rstd: Vec<f32>,   // (BT)
    ln1_rhs: Option<Rhs>, // ln1 for d c_attn.weight
    qkv: Vec<f32>,        // (BT, 3C)
}

/// The rest of a block: attention, projection, residual, ln_2, MLP, residual.
struct RestActs {
    att: Vec<f32>,  // (B, H, T, T) softmax probabilities, zero above the diagonal (training only)
    atty: Vec<f32>, // (BT, C) attention output before the projection
    atty_rhs: Option<Rhs>, // atty for d attn.c_proj.weight
    res2: Vec<f32>, // (BT, C) residual after attention
    ln2: Vec<f32>,  // (BT, C)
    ln2_mean: Vec<f32>, // (BT)
    ln2_rstd: Vec<f32>, // (BT)
    ln2_rhs: Option<Rhs>, // ln2 for d c_fc.weight
    fch: Vec<f32>,  // (BT, 4C) before GELU
    fch_gelu: Vec<f32>, // (BT, 4C)
    fch_gelu_rhs: Option<Rhs>, // fch_gelu for d mlp.c_proj.weight
    res3: Vec<f32>, // (BT, C) residual after the MLP: the block's output
}

/// One block's activations for `n` rows; `probs` floats of attention probabilities (0 when they
/// are not kept).
struct LayerActs {
    q: QkvActs,
    r: RestActs,
}

impl LayerActs {
    fn new(n: usize, c: usize, probs: usize) -> Self {
        let z = |len: usize| vec![0f32; len];
        Self {
            q: QkvActs { ln1: z(n * c), ln1_mean: z(n), ln1_rstd: z(n), ln1_rhs: None, qkv: z(n * 3 * c) },
            r: RestActs {
                att: z(probs),
                atty: z(n * c),
                atty_rhs: None,
                res2: z(n * c),
                ln2: z(n * c),
                ln2_mean: z(n),
                ln2_rstd: z(n),
                ln2_rhs: None,
                fch: z(n * 4 * c),
                fch_gelu: z(n * 4 * c),
                fch_gelu_rhs: None,
                res3: z(n * c),
            },
        }
    }
}

/// The weight matrices of one block packed for decoding's few-row products.
struct PackedBlock {
    qkv: PackedWeights,
    proj: PackedWeights,
    fc: PackedWeights,
    fcp: PackedWeights,
}

impl PackedBlock {
    fn new(cp: Compute, p: &Block<&[f32]>, c: usize) -> Self {
        let pack = |w: &[f32], out, inp| PackedWeights::new(cp.kernels, w, out, inp, cp.precision);
        Self {
            qkv: pack(p.attn.c_attn.weight, 3 * c, c),
            proj: pack(p.attn.c_proj.weight, c, c),
            fc: pack(p.mlp.c_fc.weight, 4 * c, c),
            fcp: pack(p.mlp.c_proj.weight, c, 4 * c),
        }
    }
}

/// x (n, C) = wte[token] + wpe[position]; row i holds token i of its sequence of `t`, at position
/// pos0 + i mod t.
fn embed(x: &mut [f32], w: &Params<&[f32]>, tokens: &[u32], t: usize, pos0: usize, c: usize) {
    x.par_chunks_mut(c).enumerate().for_each(|(row, x)| {
        let (tok, p) = (tokens[row] as usize, pos0 + row % t);
        let (te, pe) = (&w.wte[tok * c..(tok + 1) * c], &w.wpe[p * c..(p + 1) * c]);
        for i in 0..c {
            x[i] = te[i] + pe[i];
        }
    });
}

/// The first half of a block on n rows: ln_1(input) → q|k|v; keeping what the backward needs
/// when `train`.
#[allow(clippy::too_many_arguments)]
fn block_qkv(
    cp: Compute,
    p: &Block<&[f32]>,
    pk: Option<&PackedBlock>,
    a: &mut QkvActs,
    input: &[f32],
    train: bool,
    n: usize,
    c: usize,
) {
    layernorm_forward(&mut a.ln1, &mut a.ln1_mean, &mut a.ln1_rstd, input, p.ln_1.weight, p.ln_1.bias, c);
    a.ln1_rhs = None;
    let (w, b) = (p.attn.c_attn.weight, Some(p.attn.c_attn.bias));
    linear(cp, &mut a.qkv, &a.ln1, w, pk.map(|k| &k.qkv), b, n, train.then_some(&mut a.ln1_rhs));
}

/// The second half of a block for `rows` sequences of `t` queries at positions pos0..: attention
/// over `kv` → c_proj → + input → ln_2 → c_fc → GELU → c_proj → + residual, into `a.res3`;
/// keeping what the backward needs when `train` (the probabilities, the packed operands).
/// `tmp` is (rows·t, C) scratch.
///
/// # Safety
/// `kv` must be valid for [`attention`] with these shapes.
#[allow(clippy::too_many_arguments)]
unsafe fn block_rest(
    cp: Compute,
    p: &Block<&[f32]>,
    pk: Option<&PackedBlock>,
    a: &mut RestActs,
    tmp: &mut [f32],
    input: &[f32],
    qkv: &[f32],
    kv: KvLayout,
    train: bool,
    (rows, t, pos0): (usize, usize, usize),
    (c, h): (usize, usize),
) {
    let n = rows * t;
    let probs = if train { Some(&mut a.att[..]) } else { None };
    // SAFETY: forwarded from the caller.
    unsafe { attention(cp.kernels, &mut a.atty, probs, qkv, kv, rows, t, pos0, c, h) };
    (a.atty_rhs, a.ln2_rhs, a.fch_gelu_rhs) = (None, None, None);
    let (attn, mlp) = (&p.attn, &p.mlp);
    let (proj, fc, fcp) = (pk.map(|k| &k.proj), pk.map(|k| &k.fc), pk.map(|k| &k.fcp));
    let keep = train.then_some(&mut a.atty_rhs);
    linear(cp, tmp, &a.atty, attn.c_proj.weight, proj, Some(attn.c_proj.bias), n, keep);
    add(&mut a.res2, input, tmp);
    layernorm_forward(&mut a.ln2, &mut a.ln2_mean, &mut a.ln2_rstd, &a.res2, p.ln_2.weight, p.ln_2.bias, c);
    let keep = train.then_some(&mut a.ln2_rhs);
    linear(cp, &mut a.fch, &a.ln2, mlp.c_fc.weight, fc, Some(mlp.c_fc.bias), n, keep);
    gelu_forward(&mut a.fch_gelu, &a.fch);
    let keep = train.then_some(&mut a.fch_gelu_rhs);
    linear(cp, tmp, &a.fch_gelu, mlp.c_proj.weight, fcp, Some(mlp.c_proj.bias), n, keep);
    add(&mut a.res3, &a.res2, tmp);
}

/// Every buffer a training (or scoring) pass needs for a fixed (B, T), allocated once.
struct Acts {
    b: usize,
    t: usize,
    x0: Vec<f32>, // (BT, C) embeddings
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,      // (BT, C)
    lnf_mean: Vec<f32>, // (BT)
    lnf_rstd: Vec<f32>, // (BT)
    head_chunk: usize,  // rows of the head computed at once
    logits: Vec<f32>,   // (chunk, V); after the loss, d loss / d logits
    losses: Vec<f32>,   // (BT)
    tmp_c: Vec<f32>,    // (BT, C)
    // Gradient scratch.
    d_res: Vec<f32>, // (BT, C)
    d_c: Vec<f32>,   // (BT, C)
    d_4c: Vec<f32>,  // (BT, 4C)
    d_3c: Vec<f32>,  // (BT, 3C)
}

impl Acts {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let (c, h, bt) = (cfg.d_model, cfg.n_head, b * t);
        let z = |n: usize| vec![0f32; n];
        Self {
            b,
            t,
            x0: z(bt * c),
            layers: (0..cfg.n_layer).map(|_| LayerActs::new(bt, c, b * h * t * t)).collect(),
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            head_chunk: head_chunk(cfg.vocab_size, bt),
            logits: z(head_chunk(cfg.vocab_size, bt) * cfg.vocab_size),
            losses: z(bt),
            tmp_c: z(bt * c),
            d_res: z(bt * c),
            d_c: z(bt * c),
            d_4c: z(bt * 4 * c),
            d_3c: z(bt * 3 * c),
        }
    }

    /// Reuses the buffers when the shape is the same.
    fn ensure<'a>(slot: &'a mut Option<Acts>, cfg: &ModelConfig, b: usize, t: usize) -> &'a mut Acts {
        if slot.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            *slot = Some(Acts::new(cfg, b, t));
        }
        slot.as_mut().expect("allocated above")
    }
}

/// Forward over whole sequences: inputs and targets (B, T) row-major. Leaves every activation in
/// `a` and the NLL of each target in `a.losses`; when training (`head_grad`), it also runs the
/// head's backward on each chunk's d(mean loss)/d(logits). Returns the mean loss.
fn forward_sequences(
    cp: Compute,
    cfg: &ModelConfig,
    w: &Params<&[f32]>,
    a: &mut Acts,
    inputs: &[u32],
    targets: &[u32],
    mut head_grad: Option<&mut [f32]>,
) -> f32 {
    let (b, t, c, v, h) = (a.b, a.t, cfg.d_model, cfg.vocab_size, cfg.n_head);
    let (bt, train) = (b * t, head_grad.is_some());
    phase("embedding", || embed(&mut a.x0, w, inputs, t, 0, c));
    for l in 0..cfg.n_layer {
        let (done, rest) = a.layers.split_at_mut(l);
        let la = &mut rest[0];
        let input: &[f32] = if l == 0 { &a.x0 } else { &done[l - 1].r.res3 };
        block_qkv(cp, &w.h[l], None, &mut la.q, input, train, bt, c);
        // Keys and values straight from qkv: position j of head hi of sequence r at row r·T + j.
        let qkv = &la.q.qkv;
        let kv = KvLayout {
            k: qkv[c..].as_ptr(),
            v: qkv[2 * c..].as_ptr(),
            seq: t * 3 * c,
            head: c / h,
            pos: 3 * c,
        };
        // SAFETY: kv describes the k and v columns of qkv, (B·T, 3C), which outlives the call.
        unsafe {
            block_rest(cp, &w.h[l], None, &mut la.r, &mut a.tmp_c, input, qkv, kv, train, (b, t, 0), (c, h))
        };
    }
    let last = &a.layers[cfg.n_layer - 1].r.res3;
    layernorm_forward(&mut a.lnf, &mut a.lnf_mean, &mut a.lnf_rstd, last, w.ln_f.weight, w.ln_f.bias, c);
    // The head and the loss, a chunk of rows at a time so that their logits (rows × V) stay in
    // cache instead of a (B·T × V) buffer going through memory several times; when training, the
    // head's backward runs on the chunk too: d lnf = dlogits · wte, d wte += dlogitsᵀ · lnf.
    let inv_n = 1.0 / bt as f32;
    let chunk = a.head_chunk;
    // wte prepared (in bf16: packed) once for every chunk's products.
    let wte_fwd = WeightRhs::forward(cp, w.wte, v, c);
    let wte_back = head_grad.is_some().then(|| WeightRhs::backward(cp.head_backward(), w.wte, v, c));
    for r0 in (0..bt).step_by(chunk) {
        let rows = chunk.min(bt - r0);
        let logits = &mut a.logits[..rows * v];
        let lnf = &a.lnf[r0 * c..(r0 + rows) * c];
        phase("head", || matmul_forward_with(logits, lnf, &wte_fwd, None, rows));
        let (tgt, losses) = (&targets[r0..r0 + rows], &mut a.losses[r0..r0 + rows]);
        if head_grad.is_none() {
            // Scoring: only −log softmax at the target, in two passes that write nothing.
            logits.par_chunks(v).zip(losses.par_iter_mut()).zip(tgt.par_iter()).for_each(
                |((x, loss), &target)| {
                    let m = max(x);
                    *loss = m + super::ops::sum_exp(x, m).ln() - x[target as usize];
                },
            );
            continue;
        }
        // Fused softmax + cross-entropy; the logits become d(mean loss)/d(logits), prepared as
        // the left operand of the head's two backward products as they are computed (in bf16:
        // packed while still in cache).
        let ce = |i: usize, x: &mut [f32], loss: &mut f32| {
            let m = max(x);
            let target = tgt[i] as usize;
            let logit = x[target];
            let total = super::ops::exp_sum_in_place(x, m, 1.0);
            let inv = 1.0 / total;
            *loss = m + total.ln() - logit; // −log softmax, finite even when the target's probability underflows
            for y in x.iter_mut() {
                *y *= inv * inv_n;
            }
            x[target] -= inv_n;
        };
        let hb = cp.head_backward();
        // SAFETY: the logits are not written again while d_logits is used (this iteration).
        let d_logits = phase("cross-entropy", || unsafe {
            Lhs::from_rows(hb.kernels, hb.precision, (rows, v), logits, losses, ce)
        });
        if let (Some(gw), Some(wte_back)) = (head_grad.as_deref_mut(), &wte_back) {
            let d_lnf = &mut a.d_c[r0 * c..(r0 + rows) * c];
            let products = || matmul_backward_lhs(hb, (d_lnf, gw), &d_logits, (lnf, None), wte_back, rows);
            phase("head backward", products);
        }
    }
    a.losses.iter().map(|&x| x as f64).sum::<f64>() as f32 * inv_n
}

/// Rows of the head computed at once: as many as keep their logits within about 32 MB (so, in
/// cache), at least 64; it depends only on the vocabulary, so results do not depend on threads.
fn head_chunk(vocab: usize, rows: usize) -> usize {
    ((32 << 20) / (4 * vocab.max(1))).max(64).min(rows.max(1))
}

/// Backward of [`forward_sequences`]: accumulates every gradient into `g` (zeroed by the caller).
fn backward(
    cp: Compute,
    cfg: &ModelConfig,
    w: &Params<&[f32]>,
    g: &mut Params<&mut [f32]>,
    a: &mut Acts,
    inputs: &[u32],
) {
    let (b, t, c, h) = (a.b, a.t, cfg.d_model, cfg.n_head);
    let (bt, blocked) = (b * t, cp.blocked_sums);
    // The LM head (tied) was differentiated with the loss: a.d_c holds d lnf, g.wte its part.
    a.d_res.fill(0.0);
    let last = &a.layers[cfg.n_layer - 1].r.res3;
    let (lf, glf) = (&w.ln_f, &mut g.ln_f);
    layernorm_backward(
        blocked,
        &mut a.d_res,
        glf.weight,
        glf.bias,
        &a.d_c,
        last,
        lf.weight,
        &a.lnf_mean,
        &a.lnf_rstd,
        c,
    );
    for l in (0..cfg.n_layer).rev() {
        let (done, rest) = a.layers.split_at(l);
        let (lq, lr) = (&rest[0].q, &rest[0].r);
        let input: &[f32] = if l == 0 { &a.x0 } else { &done[l - 1].r.res3 };
        let (p, gp) = (&w.h[l], &mut g.h[l]);
        // res3 = res2 + c_proj(gelu(c_fc(ln_2(res2)))): d_res is d res3.
        let (fc, gfc) = (&p.mlp.c_fc, &mut gp.mlp.c_fc);
        let (fcp, gfcp) = (&p.mlp.c_proj, &mut gp.mlp.c_proj);
        matmul_backward(
            cp,
            &mut a.d_4c,
            gfcp.weight,
            Some(gfcp.bias),
            &a.d_res,
            (&lr.fch_gelu, lr.fch_gelu_rhs.as_ref()),
            fcp.weight,
            bt,
            4 * c,
            c,
        );
        gelu_backward(&mut a.d_4c, &lr.fch);
        matmul_backward(
            cp,
            &mut a.d_c,
            gfc.weight,
            Some(gfc.bias),
            &a.d_4c,
            (&lr.ln2, lr.ln2_rhs.as_ref()),
            fc.weight,
            bt,
            c,
            4 * c,
        );
        let (ln2, gln2) = (&p.ln_2, &mut gp.ln_2);
        let (m2, r2) = (&lr.ln2_mean, &lr.ln2_rstd);
        layernorm_backward(
            blocked,
            &mut a.d_res,
            gln2.weight,
            gln2.bias,
            &a.d_c,
            &lr.res2,
            ln2.weight,
            m2,
            r2,
            c,
        );
        // res2 = input + c_proj(attention(c_attn(ln_1(input)))): d_res is now d res2.
        let (proj, gproj) = (&p.attn.c_proj, &mut gp.attn.c_proj);
        matmul_backward(
            cp,
            &mut a.d_c,
            gproj.weight,
            Some(gproj.bias),
            &a.d_res,
            (&lr.atty, lr.atty_rhs.as_ref()),
            proj.weight,
            bt,
            c,
            c,
        );
        attention_backward(cp.kernels, &mut a.d_3c, &a.d_c, &lq.qkv, &lr.att, b, t, c, h);
        let (qkv, gqkv) = (&p.attn.c_attn, &mut gp.attn.c_attn);
        matmul_backward(
            cp,
            &mut a.d_c,
            gqkv.weight,
            Some(gqkv.bias),
            &a.d_3c,
            (&lq.ln1, lq.ln1_rhs.as_ref()),
            qkv.weight,
            bt,
            c,
            3 * c,
        );
        let (ln1, gln1) = (&p.ln_1, &mut gp.ln_1);
        let (m1, r1) = (&lq.ln1_mean, &lq.ln1_rstd);
        layernorm_backward(
            blocked,
            &mut a.d_res,
            gln1.weight,
            gln1.bias,
            &a.d_c,
            input,
            ln1.weight,
            m1,
            r1,
            c,
        );
    }
    phase("embedding backward", || embedding_backward(g.wte, g.wpe, &a.d_res, inputs, t, c));
}

/// A model's weights in one flat buffer laid out by the description.
#[derive(Clone)]
struct Flat {
    layout: Params<Range<usize>>,
    data: Vec<f32>,
}

impl Flat {
    fn new(cfg: &ModelConfig, weights: &Weights) -> Self {
        let (layout, total) = flat_layout(cfg);
        let mut data = Vec::with_capacity(total);
        for w in weights.iter() {
            data.extend_from_slice(w);
        }
        assert_eq!(data.len(), total, "weights of another shape");
        Self { layout, data }
    }

    fn zeros_like(&self) -> Vec<f32> {
        vec![0f32; self.data.len()]
    }

    fn view(&self) -> Params<&[f32]> {
        split(&self.layout, &self.data)
    }

    fn weights(&self) -> Weights {
        self.view().map(|s| s.to_vec())
    }
}

/// The fast trainer: parameters, gradients, AdamW state and activation buffers.
pub struct Trainer {
    pub cfg: ModelConfig,
    cp: Compute,
    w: Flat,
    g: Vec<f32>,
    m: Vec<f32>,
    v: Vec<f32>,
    /// Each parameter's range in the buffers and whether AdamW decays it.
    params: Vec<(Range<usize>, bool)>,
    step: i32,
    acts: Option<Acts>,
}

impl Trainer {
    /// A trainer whose products run on `cp` (f32 or bf16 inputs).
    pub fn new(cp: Compute, cfg: &ModelConfig, weights: &Weights) -> Self {
        let w = Flat::new(cfg, weights);
        let specs = describe(cfg);
        let params =
            specs.iter().into_iter().zip(w.layout.iter()).map(|(s, r)| (r.clone(), s.decay)).collect();
        let zeros = w.zeros_like();
        Self {
            cfg: cfg.clone(),
            cp,
            g: zeros.clone(),
            m: zeros.clone(),
            v: zeros,
            w,
            params,
            step: 0,
            acts: None,
        }
    }

    /// The current weights, copied out.
    pub fn weights(&self) -> Weights {
        self.w.weights()
    }

    /// Gradients by parameter name (for tests against candle autograd).
    pub fn grads(&self) -> Vec<(String, Vec<f32>)> {
        let names = describe(&self.cfg);
        names
            .iter()
            .into_iter()
            .zip(&self.params)
            .map(|(s, (r, _))| (s.name.clone(), self.g[r.clone()].to_vec()))
            .collect()
    }

    /// Forward and backward of the mean cross-entropy of `inputs` → `targets`, both (B, T) row-major.
    /// Gradients are left in the trainer; returns the loss.
    pub fn forward_backward(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> f32 {
        assert!(t <= self.cfg.ctx && inputs.len() == b * t && targets.len() == b * t);
        let acts = Acts::ensure(&mut self.acts, &self.cfg, b, t);
        let w = self.w.view();
        phase("zero gradients", || self.g.fill(0.0));
        let mut g = split_mut(&self.w.layout, &mut self.g);
        let loss = phase("forward", || {
            forward_sequences(self.cp, &self.cfg, &w, acts, inputs, targets, Some(&mut *g.wte))
        });
        phase("backward", || backward(self.cp, &self.cfg, &w, &mut g, acts, inputs));
        loss
    }

    /// Global L2 norm of the gradients: squares summed in f64, in blocks of 4096 entries (eight
    /// lanes each, blocks in parallel), the blocks' sums added in order, parameter by parameter;
    /// the same order whatever the threads.
    pub fn grad_norm(&self) -> f64 {
        let block_sum = |b: &[f32]| {
            let mut acc = [0f64; 8];
            let chunks = b.chunks_exact(8);
            let rest: f64 = chunks.remainder().iter().map(|&x| (x as f64) * (x as f64)).sum();
            for c in chunks {
                for i in 0..8 {
                    acc[i] += (c[i] as f64) * (c[i] as f64);
                }
            }
            acc.iter().sum::<f64>() + rest
        };
        let sq: f64 = self
            .params
            .iter()
            .map(|(r, _)| {
                let blocks: Vec<f64> = self.g[r.clone()].par_chunks(4096).map(block_sum).collect();
                blocks.iter().sum::<f64>()
            })
            .sum();
        sq.sqrt()
    }

    /// One AdamW update (decoupled weight decay on the parameters the description marks), gradients
    /// scaled by `grad_scale`; the same arithmetic as [`super::candle::AdamW`].
    pub fn adamw(&mut self, lr: f64, grad_scale: f64, beta1: f64, beta2: f64, weight_decay: f64) {
        self.step += 1;
        let (c1, c2) = (1.0 - beta1.powi(self.step), 1.0 - beta2.powi(self.step));
        let (b1, b2, s) = (beta1 as f32, beta2 as f32, grad_scale as f32);
        let (ic1, ic2, lr32) = ((1.0 / c1) as f32, (1.0 / c2) as f32, lr as f32);
        for (r, decays) in &self.params {
            let decay = if *decays { (1.0 - lr * weight_decay) as f32 } else { 1.0 };
            let p = &mut self.w.data[r.clone()];
            let (g, m, v) = (&self.g[r.clone()], &mut self.m[r.clone()], &mut self.v[r.clone()]);
            p.par_chunks_mut(4096)
                .zip(g.par_chunks(4096))
                .zip(m.par_chunks_mut(4096))
                .zip(v.par_chunks_mut(4096))
                .for_each(|(((p, g), m), v)| {
                    // Zipped, so that the loop has no bounds checks and vectorises.
                    for (((p, &g), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                        let gi = g * s;
                        *m = b1 * *m + (1.0 - b1) * gi;
                        *v = b2 * *v + (1.0 - b2) * gi * gi;
                        let update = (*m * ic1) / ((*v * ic2).sqrt() + 1e-8);
                        *p = *p * decay - lr32 * update;
                    }
                });
        }
    }

    /// A scorer on the current weights (validation during training), in f32 like every measurement.
    pub fn scorer(&self) -> Scorer<'_> {
        Scorer { cp: self.cp.f32(), cfg: &self.cfg, w: self.w.view(), acts: None }
    }
}

/// A trained model for inference on the fast engine.
#[derive(Clone)]
pub struct Model {
    pub cfg: ModelConfig,
    cp: Compute,
    w: Flat,
}

impl Model {
    /// A model whose decoder multiplies on `cp` (scoring is always f32).
    pub fn new(cp: Compute, cfg: &ModelConfig, weights: &Weights) -> Self {
        Self { cfg: cfg.clone(), cp, w: Flat::new(cfg, weights) }
    }

    pub fn weights(&self) -> Weights {
        self.w.weights()
    }

    pub fn scorer(&self) -> Scorer<'_> {
        Scorer { cp: self.cp.f32(), cfg: &self.cfg, w: self.w.view(), acts: None }
    }

    /// A KV-cache decoder for `rows` sequences advancing together.
    pub fn decoder(&self, rows: usize) -> Decoder<'_> {
        Decoder::new(self.cp, &self.cfg, self.w.view(), rows)
    }
}

/// Forward-only scoring: the NLL of every target token of a batch.
pub struct Scorer<'a> {
    cp: Compute,
    cfg: &'a ModelConfig,
    w: Params<&'a [f32]>,
    acts: Option<Acts>,
}

impl Scorer<'_> {
    /// inputs, targets: (B, T) row-major → NLL of each target, (B·T).
    pub fn nlls(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Vec<f32> {
        assert!(t <= self.cfg.ctx && inputs.len() == b * t && targets.len() == b * t);
        let acts = Acts::ensure(&mut self.acts, self.cfg, b, t);
        forward_sequences(self.cp, self.cfg, &self.w, acts, inputs, targets, None);
        acts.losses.clone()
    }
}

/// Inference with a KV cache: what sampling runs on the CPU. Rows are independent sequences that
/// advance together; [`Decoder::select_rows`] reorders them for beam search.
pub struct Decoder<'a> {
    cfg: &'a ModelConfig,
    w: Params<&'a [f32]>,
    packed: Vec<PackedBlock>, // the blocks' weights in panels, for the few-row products of decoding
    head: PackedWeights,      // wte packed: the LM head
    cp: Compute,
    rows: usize,
    pos: usize,
    k: Vec<Vec<f32>>, // per layer (rows, H, ctx, hs): each head's keys contiguous
    v: Vec<Vec<f32>>, // per layer (rows, H, ctx, hs)
}

impl<'a> Decoder<'a> {
    fn new(cp: Compute, cfg: &'a ModelConfig, w: Params<&'a [f32]>, rows: usize) -> Self {
        let (c, n) = (cfg.d_model, rows * cfg.ctx * cfg.d_model);
        Self {
            packed: w.h.iter().map(|p| PackedBlock::new(cp, p, c)).collect(),
            head: PackedWeights::new(cp.kernels, w.wte, cfg.vocab_size, c, cp.precision),
            cp,
            cfg,
            w,
            rows,
            pos: 0,
            k: vec![vec![0f32; n]; cfg.n_layer],
            v: vec![vec![0f32; n]; cfg.n_layer],
        }
    }

    /// Positions already in the cache.
    pub fn len(&self) -> usize {
        self.pos
    }

    pub fn is_empty(&self) -> bool {
        self.pos == 0
    }

    /// Keeps the cache rows `rows` (in that order, repeats allowed): the new row i is old row `rows[i]`.
    pub fn select_rows(&mut self, rows: &[usize]) {
        let per_row = self.cfg.ctx * self.cfg.d_model;
        for cache in self.k.iter_mut().chain(self.v.iter_mut()) {
            let mut next = vec![0f32; rows.len() * per_row];
            for (i, &r) in rows.iter().enumerate() {
                next[i * per_row..(i + 1) * per_row].copy_from_slice(&cache[r * per_row..(r + 1) * per_row]);
            }
            *cache = next;
        }
        self.rows = rows.len();
    }

    /// tokens: (rows, t) at positions len()..len()+t → logits of the last position, (rows, V).
    pub fn forward(&mut self, tokens: &[u32], t: usize) -> Vec<f32> {
        let (cfg, c, h, cp) = (self.cfg, self.cfg.d_model, self.cfg.n_head, self.cp);
        let (rows, pos0, hs) = (self.rows, self.pos, c / h);
        assert!(tokens.len() == rows * t && pos0 + t <= cfg.ctx, "decoder input does not fit");
        let n = rows * t;
        let mut x = vec![0f32; n * c];
        embed(&mut x, &self.w, tokens, t, pos0, c);
        let mut la = LayerActs::new(n, c, 0);
        let mut tmp = vec![0f32; n * c];
        let kv_of = |kc: &[f32], vc: &[f32]| KvLayout {
            k: kc.as_ptr(),
            v: vc.as_ptr(),
            seq: h * cfg.ctx * hs,
            head: cfg.ctx * hs,
            pos: hs,
        };
        for l in 0..cfg.n_layer {
            let (p, pk) = (&self.w.h[l], Some(&self.packed[l]));
            block_qkv(cp, p, pk, &mut la.q, &x, false, n, c);
            // Append this step's keys and values to the cache: row r, head hi, position pos0 + i.
            let (kc, vc) = (&mut self.k[l], &mut self.v[l]);
            for (i, q) in la.q.qkv.chunks(3 * c).enumerate() {
                for hi in 0..h {
                    let at = (((i / t) * h + hi) * cfg.ctx + pos0 + i % t) * hs;
                    kc[at..at + hs].copy_from_slice(&q[c + hi * hs..c + (hi + 1) * hs]);
                    vc[at..at + hs].copy_from_slice(&q[2 * c + hi * hs..2 * c + (hi + 1) * hs]);
                }
            }
            let kv = kv_of(kc, vc);
            if l + 1 == cfg.n_layer && t > 1 {
                // Only the last position of each row feeds the logits, so once the last block's
                // keys and values are cached, the rest of that block runs on those rows alone.
                let (qkv, input) = (last_rows(&la.q.qkv, rows, t, 3 * c), last_rows(&x, rows, t, c));
                let mut last = LayerActs::new(rows, c, 0);
                tmp.truncate(rows * c);
                // SAFETY: kv points into this layer's cache, valid for rows × H × (pos0 + t).
                unsafe {
                    block_rest(
                        cp,
                        p,
                        pk,
                        &mut last.r,
                        &mut tmp,
                        &input,
                        &qkv,
                        kv,
                        false,
                        (rows, 1, pos0 + t - 1),
                        (c, h),
                    )
                };
                x = std::mem::take(&mut last.r.res3);
            } else {
                // SAFETY: as above.
                unsafe {
                    block_rest(
                        cp,
                        p,
                        pk,
                        &mut la.r,
                        &mut tmp,
                        &x,
                        &la.q.qkv,
                        kv,
                        false,
                        (rows, t, pos0),
                        (c, h),
                    )
                };
                std::mem::swap(&mut x, &mut la.r.res3);
            }
        }
        self.pos += t;
        // x is now (rows, C): each row's last position, the only one that needs logits.
        debug_assert_eq!(x.len(), rows * c);
        let (mut lnl, mut m1, mut r1) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        layernorm_forward(&mut lnl, &mut m1, &mut r1, &x, self.w.ln_f.weight, self.w.ln_f.bias, c);
        let mut logits = vec![0f32; rows * cfg.vocab_size];
        linear(self.cp, &mut logits, &lnl, self.w.wte, Some(&self.head), None, rows, None);
        logits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::candle::{loss, AdamW, Gpt};
    use crate::model::init_weights;
    use candle_core::{Device, Tensor};

    fn cfg() -> ModelConfig {
        ModelConfig { vocab_size: 37, ctx: 12, d_model: 24, n_layer: 2, n_head: 3, dropout: 0.0 }
    }

    /// The fast path's loss and every gradient equal candle autograd's on a tiny model:
    /// |fast − candle| ≤ 1e-4 + 1e-3·|candle| element-wise (f32, different summation orders); on
    /// sequences of 10 and of 75.
    #[test]
    fn loss_and_gradients_match_candle_autograd() {
        for (cfg, t) in [(cfg(), 10), (ModelConfig { ctx: 80, ..cfg() }, 75)] {
            loss_and_gradients_match_candle_autograd_on(&cfg, t);
        }
    }

    fn loss_and_gradients_match_candle_autograd_on(cfg: &ModelConfig, t: usize) {
        let cfg = cfg.clone();
        let dev = Device::Cpu;
        let w0 = init_weights(&cfg, 11);
        let (model, vars) = Gpt::trainable(&cfg, &w0, &dev).unwrap();
        let b = 3;
        let x: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 37) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|i| ((i * 5 + 1) % 37) as u32).collect();
        let xt = Tensor::from_vec(x.clone(), (b, t), &dev).unwrap();
        let yt = Tensor::from_vec(y.clone(), (b, t), &dev).unwrap();
        let reference = loss(&model.forward(&xt, None).unwrap(), &yt).unwrap();
        let grads = reference.backward().unwrap();
        let mut fast = Trainer::new(Compute::fp32(), &cfg, &w0);
        let fast_loss = fast.forward_backward(&x, &y, b, t);
        let ref_loss = reference.to_scalar::<f32>().unwrap();
        assert!((fast_loss - ref_loss).abs() < 1e-5, "loss {fast_loss} vs {ref_loss}");
        for ((name, g), (var, _)) in fast.grads().into_iter().zip(&vars) {
            let want = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (i, diff) = g
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() - 1e-3 * b.abs())
                .enumerate()
                .fold((0, f32::MIN), |acc, (i, d)| if d > acc.1 { (i, d) } else { acc });
            assert!(diff <= 1e-4, "{name}[{i}]: fast {} vs candle {}", g[i], want[i]);
        }
    }

    /// The fast path's loss and gradients with every kernel this CPU has, against candle autograd
    /// (f32): fp32 AVX2 and AVX-512 within the f32 tolerance above; bf16 (AMX, AVX512-BF16) within a
    /// tolerance derived from its rounding. bf16 rounds each input of every product to 8
    /// significant bits (relative error ≤ 2⁻⁹ each, so ≤ 2⁻⁸ per product), summed exactly in f32; a
    /// gradient passes through at most four chained products here (head, two per block on the way
    /// back), so its error stays within about 4 · 2⁻⁸ ≈ 1.6 % of its scale: each gradient tensor
    /// must be within 4 % in relative L2 norm, and the loss within 0.5 %. With only the head's
    /// backward in bf16 the forward is f32, so the loss keeps the f32 tolerance and the gradients
    /// (all downstream of the head's) the bf16 one. A path the CPU lacks is skipped with a printed
    /// reason.
    #[test]
    fn every_kernel_path_matches_candle_autograd() {
        use crate::kernels::{Bf16Kernel, Fp32Kernel, Kernels, Precision};
        let cfg = cfg();
        let dev = Device::Cpu;
        let w0 = init_weights(&cfg, 12);
        let (model, vars) = Gpt::trainable(&cfg, &w0, &dev).unwrap();
        let (b, t) = (4, 12);
        let x: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 37) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|i| ((i * 5 + 1) % 37) as u32).collect();
        let xt = Tensor::from_vec(x.clone(), (b, t), &dev).unwrap();
        let yt = Tensor::from_vec(y.clone(), (b, t), &dev).unwrap();
        let reference = loss(&model.forward(&xt, None).unwrap(), &yt).unwrap();
        let grads = reference.backward().unwrap();
        let ref_loss = reference.to_scalar::<f32>().unwrap();
        let want: Vec<Vec<f32>> = vars
            .iter()
            .map(|(v, _)| grads.get(v.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect();
        // (name, kernels, the products' precision, the head's backward products' precision)
        let cases = [
            ("fp32 avx2", "avx2", Precision::F32, Precision::F32),
            ("fp32 avx512", "avx512", Precision::F32, Precision::F32),
            ("bf16 avx512-bf16", "avx512", Precision::Bf16, Precision::Bf16),
            ("bf16 amx", "auto", Precision::Bf16, Precision::Bf16),
            ("fp32, head grad bf16 avx512-bf16", "avx512", Precision::F32, Precision::Bf16),
            ("fp32, head grad bf16 amx", "auto", Precision::F32, Precision::Bf16),
        ];
        for (name, cap, precision, head_grad) in cases {
            let kernels = Kernels::parse(cap).unwrap();
            let present = match (cap, precision, head_grad) {
                ("avx2", _, _) => kernels.fp32() == Fp32Kernel::Avx2,
                ("avx512", _, Precision::F32) => kernels.fp32() == Fp32Kernel::Avx512,
                ("avx512", _, _) => kernels.bf16() == Some(Bf16Kernel::Avx512Bf16),
                _ => kernels.bf16() == Some(Bf16Kernel::Amx),
            };
            if !present {
                eprintln!(
                    "skipped: every_kernel_path_matches_candle_autograd: {name}: this CPU has {}",
                    kernels.describe()
                );
                continue;
            }
            let mut fast = Trainer::new(Compute { head_grad, ..Compute::new(kernels, precision) }, &cfg, &w0);
            let got_loss = fast.forward_backward(&x, &y, b, t);
            if precision == Precision::F32 && head_grad == Precision::Bf16 {
                // The head's gradient did go through bf16: it differs from the fp32 one (bf16 moves
                // nearly every entry), while the loss, from the fp32 forward, is the same bits.
                let mut f32 = Trainer::new(Compute::new(kernels, Precision::F32), &cfg, &w0);
                assert_eq!(f32.forward_backward(&x, &y, b, t).to_bits(), got_loss.to_bits(), "{name}: loss");
                let (g, r) = (fast.grads().swap_remove(0), f32.grads().swap_remove(0));
                assert!(g.0 == r.0 && g.0.contains("wte"), "{name}: {} first", g.0);
                assert!(g.1.iter().zip(&r.1).any(|(a, b)| a != b), "{name}: {} is the fp32 one", g.0);
            }
            for ((gname, g), want) in fast.grads().into_iter().zip(&want) {
                match head_grad {
                    Precision::F32 => {
                        for (i, (a, r)) in g.iter().zip(want).enumerate() {
                            assert!(
                                (a - r).abs() <= 1e-4 + 1e-3 * r.abs(),
                                "{name}: {gname}[{i}]: {a} vs {r}"
                            );
                        }
                    }
                    Precision::Bf16 => {
                        let diff: f32 =
                            g.iter().zip(want).map(|(a, r)| (a - r) * (a - r)).sum::<f32>().sqrt();
                        let norm: f32 = want.iter().map(|r| r * r).sum::<f32>().sqrt();
                        assert!(
                            diff <= 0.04 * norm + 1e-6,
                            "{name}: {gname}: relative L2 error {}",
                            diff / norm
                        );
                    }
                }
            }
            let tol = if precision == Precision::F32 { 1e-5 } else { 5e-3 * ref_loss };
            assert!((got_loss - ref_loss).abs() <= tol, "{name}: loss {got_loss} vs {ref_loss}");
        }
    }

    /// A prefill of more rows than the panels take (30 prompts × 10 tokens = 300 > PANEL_MAX_ROWS,
    /// so gemm) in a one-block model, whose only block is also the last (shrunk to 30 rows, so
    /// panels), then a decoding step: candle's full-forward logits at both positions.
    #[test]
    fn large_prefill_and_single_block_match_the_candle_forward() {
        let cfg = ModelConfig { n_layer: 1, ..cfg() };
        let w = init_weights(&cfg, 9);
        let gpt = Gpt::new(&cfg, &w, &Device::Cpu).unwrap();
        let model = Model::new(Compute::fp32(), &cfg, &w);
        let rows = 30;
        let panel_max = crate::model::ops::PACKED_MAX_ROWS;
        assert!(rows * 10 > panel_max && rows <= panel_max, "the prefill must take the gemm path");
        let seqs: Vec<u32> = (0..rows * 11).map(|i| ((i * 13 + i / 11) % 37) as u32).collect();
        let x = Tensor::from_vec(seqs.clone(), (rows, 11), &Device::Cpu).unwrap();
        let full = gpt.forward(&x, None).unwrap().to_vec3::<f32>().unwrap(); // (rows, 11, V)
        let mut dec = model.decoder(rows);
        let prompt: Vec<u32> = (0..rows).flat_map(|r| seqs[r * 11..r * 11 + 10].to_vec()).collect();
        let next: Vec<u32> = (0..rows).map(|r| seqs[r * 11 + 10]).collect();
        for (logits, pos) in [(dec.forward(&prompt, 10), 9), (dec.forward(&next, 1), 10)] {
            for r in 0..rows {
                let got = &logits[r * 37..(r + 1) * 37];
                let diff = got.iter().zip(&full[r][pos]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "row {r} position {pos}: max |Δ| {diff}");
            }
        }
    }

    /// A prefill of 40 positions after a prefix of 5 gives candle's full-forward logits.
    #[test]
    fn long_prefill_after_a_prefix_matches_the_candle_forward() {
        let cfg = ModelConfig { ctx: 48, ..cfg() };
        let w = init_weights(&cfg, 5);
        let gpt = Gpt::new(&cfg, &w, &Device::Cpu).unwrap();
        let model = Model::new(Compute::fp32(), &cfg, &w);
        let (rows, len) = (3, 45);
        let seqs: Vec<u32> = (0..rows * len).map(|i| ((i * 11 + i / 7) % 37) as u32).collect();
        let x = Tensor::from_vec(seqs.clone(), (rows, len), &Device::Cpu).unwrap();
        let full = gpt.forward(&x, None).unwrap().to_vec3::<f32>().unwrap(); // (rows, len, V)
        let mut dec = model.decoder(rows);
        let part = |a: usize, b: usize| -> Vec<u32> {
            (0..rows).flat_map(|r| seqs[r * len + a..r * len + b].to_vec()).collect()
        };
        dec.forward(&part(0, 5), 5);
        let logits = dec.forward(&part(5, len), len - 5);
        for r in 0..rows {
            let got = &logits[r * 37..(r + 1) * 37];
            let diff = got.iter().zip(&full[r][len - 1]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "row {r}: max |Δ| {diff}");
        }
    }

    /// The fast decoder (prefill, then one token at a time, then a beam-style row reorder) gives
    /// candle's full-forward logits at every step.
    #[test]
    fn decoder_matches_the_candle_forward() {
        let cfg = cfg();
        let w = init_weights(&cfg, 4);
        let gpt = Gpt::new(&cfg, &w, &Device::Cpu).unwrap();
        let model = Model::new(Compute::fp32(), &cfg, &w);
        let seqs: [Vec<u32>; 2] = [vec![3, 1, 4, 1, 5, 9, 2, 6], vec![2, 7, 1, 8, 2, 8, 1, 8]];
        let full: Vec<Vec<Vec<f32>>> = seqs
            .iter()
            .map(|s| {
                let x = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
                gpt.forward(&x, None).unwrap().to_vec3::<f32>().unwrap().remove(0)
            })
            .collect();
        let mut dec = model.decoder(2);
        let prompt: Vec<u32> = seqs.iter().flat_map(|s| s[..5].to_vec()).collect();
        let check = |logits: &[f32], pos: usize, order: [usize; 2]| {
            for (row, &s) in order.iter().enumerate() {
                let got = &logits[row * 37..(row + 1) * 37];
                let diff = got.iter().zip(&full[s][pos]).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
                assert!(diff < 1e-4, "sequence {s} position {pos}: max |Δ| {diff}");
            }
        };
        check(&dec.forward(&prompt, 5), 4, [0, 1]);
        check(&dec.forward(&[seqs[0][5], seqs[1][5]], 1), 5, [0, 1]);
        dec.select_rows(&[1, 0]);
        check(&dec.forward(&[seqs[1][6], seqs[0][6]], 1), 6, [1, 0]);
        assert_eq!(dec.len(), 7);
    }

    /// After training steps, the fast trainer's weights equal those of candle autograd with the
    /// candle AdamW: the two optimisers do the same arithmetic.
    #[test]
    fn adamw_matches_the_candle_optimizer() {
        let cfg = cfg();
        let dev = Device::Cpu;
        let w0 = init_weights(&cfg, 2);
        let (model, vars) = Gpt::trainable(&cfg, &w0, &dev).unwrap();
        let mut fast = Trainer::new(Compute::fp32(), &cfg, &w0);
        let tc = crate::config::Config::preset("smoke").unwrap().train;
        let mut opt = AdamW::new(vars, &tc).unwrap();
        let (b, t) = (2, 8);
        for step in 0..3 {
            let x: Vec<u32> = (0..b * t).map(|i| ((i * 3 + step) % 37) as u32).collect();
            let y: Vec<u32> = (0..b * t).map(|i| ((i * 11 + step) % 37) as u32).collect();
            let xt = Tensor::from_vec(x.clone(), (b, t), &dev).unwrap();
            let yt = Tensor::from_vec(y.clone(), (b, t), &dev).unwrap();
            let grads = loss(&model.forward(&xt, None).unwrap(), &yt).unwrap().backward().unwrap();
            opt.step(&grads, 1e-2, 0.5).unwrap();
            fast.forward_backward(&x, &y, b, t);
            fast.adamw(1e-2, 0.5, tc.beta1, tc.beta2, tc.weight_decay);
        }
        let (a, bw) = (model.weights().unwrap(), fast.weights());
        for ((s, p), q) in describe(&cfg).iter().into_iter().zip(a.iter()).zip(bw.iter()) {
            let diff = p.iter().zip(q.iter()).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{}: max |Δ| {diff}", s.name);
        }
    }
}
