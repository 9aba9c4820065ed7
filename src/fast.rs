//! The fast CPU training path: the same GPT as [`crate::model`], with its forward and backward
//! written out by hand in the spirit of llm.c's `train_gpt2.c`. Weights, gradients, AdamW moments
//! and activations live in plain `Vec<f32>` buffers allocated once; matrix products go to the
//! `gemm` crate (the kernels candle itself uses); LayerNorm, causal softmax attention, GELU and the
//! cross-entropy over the vocabulary are fused loops with their derivatives written beside them.
//!
//! [`crate::model::Gpt`] stays the reference (and the CUDA path): tests check that this module's
//! loss and every gradient match candle autograd's (`tests` below). Conversion to and from the
//! candle `VarMap` is by parameter name, so checkpoints are the same files either way.
//!
//! Shapes: B batch, T time, C channels, H heads, hs = C / H, V vocabulary, BT = B·T rows.

use crate::model::ModelConfig;
use candle_core::{Tensor, Var};
use candle_nn::VarMap;
use gemm::Parallelism;
use rayon::prelude::*;

/// One transformer block's parameters (or their gradients, or AdamW moments).
#[derive(Clone)]
struct Layer {
    ln1_w: Vec<f32>,  // (C)
    ln1_b: Vec<f32>,  // (C)
    qkv_w: Vec<f32>,  // (3C, C)
    qkv_b: Vec<f32>,  // (3C)
    proj_w: Vec<f32>, // (C, C)
    proj_b: Vec<f32>, // (C)
    ln2_w: Vec<f32>,  // (C)
    ln2_b: Vec<f32>,  // (C)
    fc_w: Vec<f32>,   // (4C, C)
    fc_b: Vec<f32>,   // (4C)
    fcp_w: Vec<f32>,  // (C, 4C)
    fcp_b: Vec<f32>,  // (C)
}

/// All parameters, named as in [`crate::model`] so they map one to one onto the candle `VarMap`.
#[derive(Clone)]
pub struct Weights {
    wte: Vec<f32>, // (V, C), also the LM head
    wpe: Vec<f32>, // (ctx, C)
    layers: Vec<Layer>,
    lnf_w: Vec<f32>, // (C)
    lnf_b: Vec<f32>, // (C)
}

impl Weights {
    fn zeros(cfg: &ModelConfig) -> Self {
        let c = cfg.d_model;
        let z = |n: usize| vec![0f32; n];
        let layer = Layer {
            ln1_w: z(c),
            ln1_b: z(c),
            qkv_w: z(3 * c * c),
            qkv_b: z(3 * c),
            proj_w: z(c * c),
            proj_b: z(c),
            ln2_w: z(c),
            ln2_b: z(c),
            fc_w: z(4 * c * c),
            fc_b: z(4 * c),
            fcp_w: z(4 * c * c),
            fcp_b: z(c),
        };
        Self {
            wte: z(cfg.vocab_size * c),
            wpe: z(cfg.ctx * c),
            layers: vec![layer; cfg.n_layer],
            lnf_w: z(c),
            lnf_b: z(c),
        }
    }

    /// (name, buffer, rank ≥ 2) for every parameter, in a fixed order.
    fn named_mut(&mut self) -> Vec<(String, &mut Vec<f32>, bool)> {
        let mut out = vec![
            ("wte.weight".to_string(), &mut self.wte, true),
            ("wpe.weight".to_string(), &mut self.wpe, true),
        ];
        for (i, l) in self.layers.iter_mut().enumerate() {
            let p = |s: &str| format!("h.{i}.{s}");
            out.extend([
                (p("ln_1.weight"), &mut l.ln1_w, false),
                (p("ln_1.bias"), &mut l.ln1_b, false),
                (p("attn.c_attn.weight"), &mut l.qkv_w, true),
                (p("attn.c_attn.bias"), &mut l.qkv_b, false),
                (p("attn.c_proj.weight"), &mut l.proj_w, true),
                (p("attn.c_proj.bias"), &mut l.proj_b, false),
                (p("ln_2.weight"), &mut l.ln2_w, false),
                (p("ln_2.bias"), &mut l.ln2_b, false),
                (p("mlp.c_fc.weight"), &mut l.fc_w, true),
                (p("mlp.c_fc.bias"), &mut l.fc_b, false),
                (p("mlp.c_proj.weight"), &mut l.fcp_w, true),
                (p("mlp.c_proj.bias"), &mut l.fcp_b, false),
            ]);
        }
        out.push(("ln_f.weight".to_string(), &mut self.lnf_w, false));
        out.push(("ln_f.bias".to_string(), &mut self.lnf_b, false));
        out
    }

    fn fill(&mut self, v: f32) {
        for (_, buf, _) in self.named_mut() {
            buf.fill(v);
        }
    }
}

/// Activations of one layer for a (B, T) batch, kept for the backward pass.
struct LayerActs {
    ln1: Vec<f32>,      // (BT, C)
    ln1_mean: Vec<f32>, // (BT)
    ln1_rstd: Vec<f32>, // (BT)
    qkv: Vec<f32>,      // (BT, 3C)
    att: Vec<f32>,      // (B, H, T, T) softmax probabilities, zero above the diagonal
    atty: Vec<f32>,     // (BT, C) attention output before the projection
    res2: Vec<f32>,     // (BT, C) residual after attention
    ln2: Vec<f32>,      // (BT, C)
    ln2_mean: Vec<f32>, // (BT)
    ln2_rstd: Vec<f32>, // (BT)
    fch: Vec<f32>,      // (BT, 4C) before GELU
    fch_gelu: Vec<f32>, // (BT, 4C)
    res3: Vec<f32>,     // (BT, C) residual after the MLP: the layer's output
}

/// Every buffer a training step needs for a fixed (B, T), allocated once.
struct Acts {
    b: usize,
    t: usize,
    x0: Vec<f32>, // (BT, C) embeddings
    layers: Vec<LayerActs>,
    lnf: Vec<f32>,      // (BT, C)
    lnf_mean: Vec<f32>, // (BT)
    lnf_rstd: Vec<f32>, // (BT)
    logits: Vec<f32>,   // (BT, V); after the loss, d loss / d logits
    losses: Vec<f32>,   // (BT)
    // Gradient scratch.
    d_res: Vec<f32>, // (BT, C)
    d_c: Vec<f32>,   // (BT, C)
    d_4c: Vec<f32>,  // (BT, 4C)
    d_3c: Vec<f32>,  // (BT, 3C)
    d_att: Vec<f32>, // (B, H, T, T)
    tmp_c: Vec<f32>, // (BT, C)
}

impl Acts {
    fn new(cfg: &ModelConfig, b: usize, t: usize) -> Self {
        let (c, h, bt) = (cfg.d_model, cfg.n_head, b * t);
        let z = |n: usize| vec![0f32; n];
        Self {
            b,
            t,
            x0: z(bt * c),
            layers: (0..cfg.n_layer)
                .map(|_| LayerActs {
                    ln1: z(bt * c),
                    ln1_mean: z(bt),
                    ln1_rstd: z(bt),
                    qkv: z(bt * 3 * c),
                    att: z(b * h * t * t),
                    atty: z(bt * c),
                    res2: z(bt * c),
                    ln2: z(bt * c),
                    ln2_mean: z(bt),
                    ln2_rstd: z(bt),
                    fch: z(bt * 4 * c),
                    fch_gelu: z(bt * 4 * c),
                    res3: z(bt * c),
                })
                .collect(),
            lnf: z(bt * c),
            lnf_mean: z(bt),
            lnf_rstd: z(bt),
            logits: z(bt * cfg.vocab_size),
            losses: z(bt),
            d_res: z(bt * c),
            d_c: z(bt * c),
            d_4c: z(bt * 4 * c),
            d_3c: z(bt * 3 * c),
            d_att: z(b * h * t * t),
            tmp_c: z(bt * c),
        }
    }
}

/// The fast trainer: parameters, gradients, AdamW state and activation buffers.
pub struct FastGpt {
    pub cfg: ModelConfig,
    w: Weights,
    g: Weights,
    m: Weights,
    v: Weights,
    step: i32,
    acts: Option<Acts>,
}

impl FastGpt {
    /// Copies the parameters out of a candle `VarMap` built by [`crate::model::init_model`].
    pub fn from_varmap(cfg: &ModelConfig, varmap: &VarMap) -> candle_core::Result<Self> {
        let mut w = Weights::zeros(cfg);
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        for (name, buf, _) in w.named_mut() {
            let var = data
                .get(&name)
                .ok_or_else(|| candle_core::Error::Msg(format!("missing parameter {name}")))?;
            let values = var.as_tensor().flatten_all()?.to_vec1::<f32>()?;
            if values.len() != buf.len() {
                candle_core::bail!("{name}: {} values, expected {}", values.len(), buf.len());
            }
            *buf = values;
        }
        let zeros = Weights::zeros(cfg);
        Ok(Self { cfg: cfg.clone(), w, g: zeros.clone(), m: zeros.clone(), v: zeros, step: 0, acts: None })
    }

    /// Writes the current parameters into the `VarMap`'s variables (for evaluation and checkpoints).
    pub fn store(&mut self, varmap: &VarMap) -> candle_core::Result<()> {
        let data = varmap.data().lock().expect("VarMap lock poisoned");
        for (name, buf, _) in self.w.named_mut() {
            let var: &Var =
                data.get(&name).ok_or_else(|| candle_core::Error::Msg(format!("missing {name}")))?;
            let t = Tensor::from_slice(buf.as_slice(), var.as_tensor().shape(), var.as_tensor().device())?;
            var.set(&t)?;
        }
        Ok(())
    }

    /// Gradients by parameter name (for tests against candle autograd).
    pub fn grads(&mut self) -> Vec<(String, Vec<f32>)> {
        self.g.named_mut().into_iter().map(|(n, b, _)| (n, b.clone())).collect()
    }

    /// Forward and backward of the mean cross-entropy of `inputs` → `targets`, both (B, T) row-major.
    /// Gradients are left in the trainer; returns the loss.
    pub fn forward_backward(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> f32 {
        assert!(t <= self.cfg.ctx && inputs.len() == b * t && targets.len() == b * t);
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = Some(Acts::new(&self.cfg, b, t));
        }
        let acts = self.acts.as_mut().expect("allocated above");
        let loss = forward(&self.cfg, &self.w, acts, inputs, targets);
        self.g.fill(0.0);
        backward(&self.cfg, &self.w, &mut self.g, acts, inputs);
        loss
    }

    /// Global L2 norm of the gradients.
    pub fn grad_norm(&mut self) -> f64 {
        let sq: f64 = self
            .g
            .named_mut()
            .iter()
            .map(|(_, g, _)| g.iter().map(|&x| (x as f64) * (x as f64)).sum::<f64>())
            .sum();
        sq.sqrt()
    }

    /// One AdamW update (decoupled weight decay on parameters of rank ≥ 2), gradients scaled by
    /// `grad_scale`; the same arithmetic as [`crate::train::AdamW`].
    pub fn adamw(&mut self, lr: f64, grad_scale: f64, beta1: f64, beta2: f64, weight_decay: f64) {
        self.step += 1;
        let (c1, c2) = (1.0 - beta1.powi(self.step), 1.0 - beta2.powi(self.step));
        let (b1, b2, s) = (beta1 as f32, beta2 as f32, grad_scale as f32);
        let (ic1, ic2, lr32) = ((1.0 / c1) as f32, (1.0 / c2) as f32, lr as f32);
        let params = self.w.named_mut();
        let grads = self.g.named_mut();
        let ms = self.m.named_mut();
        let vs = self.v.named_mut();
        for (((p, g), m), v) in params.into_iter().zip(grads).zip(ms).zip(vs) {
            let decay = if p.2 { (1.0 - lr * weight_decay) as f32 } else { 1.0 };
            let (p, g, m, v) = (p.1, g.1, m.1, v.1);
            p.par_chunks_mut(4096)
                .zip(g.par_chunks(4096))
                .zip(m.par_chunks_mut(4096))
                .zip(v.par_chunks_mut(4096))
                .for_each(|(((p, g), m), v)| {
                    for i in 0..p.len() {
                        let gi = g[i] * s;
                        m[i] = b1 * m[i] + (1.0 - b1) * gi;
                        v[i] = b2 * v[i] + (1.0 - b2) * gi * gi;
                        let update = (m[i] * ic1) / ((v[i] * ic2).sqrt() + 1e-8);
                        p[i] = p[i] * decay - lr32 * update;
                    }
                });
        }
    }
}

impl Weights {
    /// The weights of a candle model (e.g. one loaded from `model.safetensors`).
    pub fn from_gpt(model: &crate::model::Gpt) -> candle_core::Result<Self> {
        let mut w = Weights::zeros(&model.cfg);
        let tensors: std::collections::HashMap<String, Tensor> = model.named_tensors().into_iter().collect();
        for (name, buf, _) in w.named_mut() {
            let t = tensors.get(&name).ok_or_else(|| candle_core::Error::Msg(format!("missing {name}")))?;
            *buf = t.flatten_all()?.to_vec1::<f32>()?;
        }
        Ok(w)
    }
}

/// Forward-only scoring on the fast kernels: the NLL of every target token of a batch.
pub struct Scorer {
    cfg: ModelConfig,
    w: Weights,
    acts: Option<Acts>,
}

impl Scorer {
    pub fn new(model: &crate::model::Gpt) -> candle_core::Result<Self> {
        Ok(Self { cfg: model.cfg.clone(), w: Weights::from_gpt(model)?, acts: None })
    }

    /// inputs, targets: (B, T) row-major → NLL of each target, (B·T).
    pub fn nlls(&mut self, inputs: &[u32], targets: &[u32], b: usize, t: usize) -> Vec<f32> {
        if self.acts.as_ref().is_none_or(|a| a.b != b || a.t != t) {
            self.acts = Some(Acts::new(&self.cfg, b, t));
        }
        let acts = self.acts.as_mut().expect("allocated above");
        forward(&self.cfg, &self.w, acts, inputs, targets);
        acts.losses.clone()
    }
}

/// Inference with a KV cache on the fast kernels: what sampling runs on CPU. Rows are independent
/// sequences that advance together; [`FastDecoder::select_rows`] reorders them for beam search.
pub struct FastDecoder<'a> {
    cfg: &'a ModelConfig,
    w: &'a Weights,
    packed: Vec<PackedLayer>, // the blocks' weights in panels, for the few-row products of decoding
    head: Panels,             // wte in panels: the LM head
    rows: usize,
    pos: usize,
    k: Vec<Vec<f32>>, // per layer (rows, H, ctx, hs): each head's keys contiguous
    v: Vec<Vec<f32>>, // per layer (rows, H, ctx, hs)
}

impl<'a> FastDecoder<'a> {
    pub fn new(cfg: &'a ModelConfig, w: &'a Weights, rows: usize) -> Self {
        let n = rows * cfg.ctx * cfg.d_model;
        let c = cfg.d_model;
        let packed = w
            .layers
            .iter()
            .map(|p| PackedLayer {
                qkv: Panels::new(&p.qkv_w, 3 * c, c),
                proj: Panels::new(&p.proj_w, c, c),
                fc: Panels::new(&p.fc_w, 4 * c, c),
                fcp: Panels::new(&p.fcp_w, c, 4 * c),
            })
            .collect();
        Self {
            cfg,
            w,
            packed,
            head: Panels::new(&w.wte, cfg.vocab_size, c),
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

    /// Keeps the cache rows `rows` (in that order, repeats allowed): the new row i is old row rows[i].
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
        let (cfg, w) = (self.cfg, self.w);
        let (c, h, rows, pos0) = (cfg.d_model, cfg.n_head, self.rows, self.pos);
        assert!(tokens.len() == rows * t && pos0 + t <= cfg.ctx, "decoder input does not fit");
        let n = rows * t;
        let mut x = vec![0f32; n * c];
        x.par_chunks_mut(c).enumerate().for_each(|(i, xr)| {
            let (tok, p) = (tokens[i] as usize, pos0 + i % t);
            let (te, pe) = (&w.wte[tok * c..(tok + 1) * c], &w.wpe[p * c..(p + 1) * c]);
            for (x, (a, b)) in xr.iter_mut().zip(te.iter().zip(pe)) {
                *x = a + b;
            }
        });
        let (mut ln, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        let (mut qkv, mut y, mut tmp) = (vec![0f32; n * 3 * c], vec![0f32; n * c], vec![0f32; n * c]);
        let (mut fch, mut fcg) = (vec![0f32; n * 4 * c], vec![0f32; n * 4 * c]);
        // Rows in flight, and queries per prompt row and the position of the first: all t positions
        // until the last block, which needs only each row's last position (see below).
        let (mut n, mut tq, mut qpos) = (n, t, pos0);
        for l in 0..cfg.n_layer {
            let (p, pk) = (&w.layers[l], &self.packed[l]);
            layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &p.ln1_w, &p.ln1_b, c);
            linear(&mut qkv, &ln, &p.qkv_w, &pk.qkv, Some(&p.qkv_b), n);
            // Append this step's keys and values to the cache: row r, head hi, position pos0 + i.
            let (kc, vc) = (&mut self.k[l], &mut self.v[l]);
            let hs = c / h;
            for (i, q) in qkv.chunks(3 * c).enumerate() {
                for hi in 0..h {
                    let at = (((i / t) * h + hi) * cfg.ctx + pos0 + i % t) * hs;
                    kc[at..at + hs].copy_from_slice(&q[c + hi * hs..c + (hi + 1) * hs]);
                    vc[at..at + hs].copy_from_slice(&q[2 * c + hi * hs..2 * c + (hi + 1) * hs]);
                }
            }
            if l + 1 == cfg.n_layer && tq > 1 {
                // Only the last position of each row feeds the logits, so once the last block's
                // keys and values are cached, the rest of that block runs on those rows alone.
                (x, qkv) = (last_rows(&x, rows, tq, c), last_rows(&qkv, rows, tq, 3 * c));
                (n, qpos, tq) = (rows, pos0 + tq - 1, 1);
                for (buf, width) in
                    [(&mut ln, c), (&mut y, c), (&mut tmp, c), (&mut fch, 4 * c), (&mut fcg, 4 * c)]
                {
                    buf.truncate(n * width);
                }
                (mean, rstd) = (vec![0f32; n], vec![0f32; n]);
            }
            cached_attention(&mut y, &qkv, kc, vc, rows, tq, qpos, cfg.ctx, c, h);
            linear(&mut tmp, &y, &p.proj_w, &pk.proj, Some(&p.proj_b), n);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
            layernorm_forward(&mut ln, &mut mean, &mut rstd, &x, &p.ln2_w, &p.ln2_b, c);
            linear(&mut fch, &ln, &p.fc_w, &pk.fc, Some(&p.fc_b), n);
            gelu_forward(&mut fcg, &fch);
            linear(&mut tmp, &fcg, &p.fcp_w, &pk.fcp, Some(&p.fcp_b), n);
            x.iter_mut().zip(&tmp).for_each(|(a, b)| *a += b);
        }
        self.pos += t;
        // x is now (rows, C): each row's last position, the only one that needs logits.
        debug_assert_eq!(x.len(), rows * c);
        let (mut lnl, mut m1, mut r1) = (vec![0f32; rows * c], vec![0f32; rows], vec![0f32; rows]);
        layernorm_forward(&mut lnl, &mut m1, &mut r1, &x, &w.lnf_w, &w.lnf_b, c);
        let mut logits = vec![0f32; rows * cfg.vocab_size];
        linear(&mut logits, &lnl, &w.wte, &self.head, None, rows);
        logits
    }
}

/// The last of every t rows of a (rows·t, width) matrix: (rows, width).
fn last_rows(a: &[f32], rows: usize, t: usize, width: usize) -> Vec<f32> {
    (0..rows).flat_map(|r| a[((r + 1) * t - 1) * width..(r + 1) * t * width].iter().copied()).collect()
}

/// The weight matrices of one block, in panels.
struct PackedLayer {
    qkv: Panels,
    proj: Panels,
    fc: Panels,
    fcp: Panels,
}

/// Output features per panel: one 512-bit register (two 256-bit ones) of f32.
const PANEL: usize = 16;
/// Rows per register block of [`panel_block`]: 6 rows × 16 outputs of accumulators.
const BLOCK_ROWS: usize = 6;
/// Up to this many rows a product goes to [`panel_matmul`], above it to gemm.
const PANEL_MAX_ROWS: usize = 256;

/// A weight matrix W (oc, ic) rearranged for decoding: panel p holds outputs 16p..16p+16 as an
/// (ic, 16) row-major block (zero-padded past oc). A decode step multiplies only a few rows, so a
/// general gemm spends much of its time re-packing the weights at every step (its left operand,
/// once it transposes the row-major product); packing them once per sampling call removes that.
struct Panels {
    data: Vec<f32>,
    ic: usize,
    oc: usize,
}

impl Panels {
    fn new(w: &[f32], oc: usize, ic: usize) -> Self {
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

/// out (n_rows, oc) = inp (n_rows, ic) · W^T + bias, with W given both ways: few rows go to
/// [`panel_matmul`] on the panels, many (a prefill) to gemm on the plain matrix. The two sum in
/// different orders, so a prompt's logits can differ in the last bits with the size of its batch;
/// a run stays reproducible, as its batches are fixed.
fn linear(out: &mut [f32], inp: &[f32], w: &[f32], panels: &Panels, bias: Option<&[f32]>, n_rows: usize) {
    if n_rows <= PANEL_MAX_ROWS {
        panel_matmul(out, inp, panels, bias, n_rows);
    } else {
        matmul_forward(out, inp, w, bias, n_rows, panels.ic, panels.oc);
    }
}

/// out (n_rows, oc) = inp (n_rows, ic) · W^T + bias, W in panels. The panels are split between
/// the threads; each panel is multiplied by every block of rows while it sits in cache.
fn panel_matmul(out: &mut [f32], inp: &[f32], w: &Panels, bias: Option<&[f32]>, n_rows: usize) {
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

/// Attention of t new queries per row over the cached keys/values 0..pos0+t (causal within the new
/// block). qkv: (rows·t, 3C); caches: (rows, H, ctx, hs); out: (rows·t, C).
#[allow(clippy::too_many_arguments)]
fn cached_attention(
    out: &mut [f32],
    qkv: &[f32],
    kc: &[f32],
    vc: &[f32],
    rows: usize,
    t: usize,
    pos0: usize,
    ctx: usize,
    c: usize,
    h: usize,
) {
    let (hs, len) = (c / h, pos0 + t);
    // The raw writes below rely on these shapes.
    assert!(out.len() == rows * t * c && qkv.len() == rows * t * 3 * c, "cached_attention shapes");
    assert!(kc.len() >= rows * h * ctx * hs && vc.len() == kc.len() && len <= ctx, "cached_attention cache");
    let scale = 1.0 / (hs as f32).sqrt();
    let out_p = SendPtr(out.as_mut_ptr());
    (0..rows * h).into_par_iter().for_each_init(
        || (vec![0f32; t * len], vec![0f32; hs]),
        |(att, acc), rh| {
            let (r, hi) = (rh / h, rh % h);
            // SAFETY: q rows of (r, hi) are t rows of hs floats at stride 3C; the cache rows are len
            // rows at stride C; this task alone writes out's (r, hi) columns.
            if t == 1 {
                // One new query (decoding): dot products and a weighted sum, no gemm set-up.
                let q = &qkv[r * 3 * c + hi * hs..r * 3 * c + (hi + 1) * hs];
                let row = &mut att[..len];
                let base = rh * ctx * hs;
                for (j, s) in row.iter_mut().enumerate() {
                    let at = base + j * hs;
                    *s = dot(q, &kc[at..at + hs]) * scale;
                }
                let m = max(row);
                row.iter_mut().for_each(|x| *x = fast_exp(*x - m));
                let inv = 1.0 / sum(row);
                acc.fill(0.0);
                for (j, &p) in row.iter().enumerate() {
                    let at = base + j * hs;
                    for (a, &x) in acc.iter_mut().zip(&vc[at..at + hs]) {
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
            unsafe {
                let q = qkv.as_ptr().add(r * t * 3 * c + hi * hs);
                let k = kc.as_ptr().add(rh * ctx * hs);
                let v = vc.as_ptr().add(rh * ctx * hs);
                matmul(
                    t,
                    len,
                    hs,
                    att.as_mut_ptr(),
                    len,
                    false,
                    row_major(q, 3 * c),
                    transposed(k, hs),
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
                let o = out_p.ptr().add(r * t * c + hi * hs);
                matmul(
                    t,
                    hs,
                    len,
                    o,
                    c,
                    false,
                    row_major(att.as_ptr(), len),
                    row_major(v, hs),
                    1.0,
                    Parallelism::None,
                );
            }
        },
    );
}

fn forward(cfg: &ModelConfig, w: &Weights, a: &mut Acts, inputs: &[u32], targets: &[u32]) -> f32 {
    let (b, t, c, v) = (a.b, a.t, cfg.d_model, cfg.vocab_size);
    let bt = b * t;
    // Embeddings: x0[b, t] = wte[token] + wpe[t].
    a.x0.par_chunks_mut(c).enumerate().for_each(|(row, x)| {
        let tok = inputs[row] as usize;
        let (te, pe) = (&w.wte[tok * c..(tok + 1) * c], &w.wpe[(row % t) * c..(row % t + 1) * c]);
        for i in 0..c {
            x[i] = te[i] + pe[i];
        }
    });
    for l in 0..cfg.n_layer {
        let (done, rest) = a.layers.split_at_mut(l);
        let la = &mut rest[0];
        let input: &[f32] = if l == 0 { &a.x0 } else { &done[l - 1].res3 };
        let p = &w.layers[l];
        layernorm_forward(&mut la.ln1, &mut la.ln1_mean, &mut la.ln1_rstd, input, &p.ln1_w, &p.ln1_b, c);
        matmul_forward(&mut la.qkv, &la.ln1, &p.qkv_w, Some(&p.qkv_b), bt, c, 3 * c);
        attention_forward(&mut la.atty, &mut la.att, &la.qkv, b, t, c, cfg.n_head);
        matmul_forward(&mut a.tmp_c, &la.atty, &p.proj_w, Some(&p.proj_b), bt, c, c);
        add(&mut la.res2, input, &a.tmp_c);
        layernorm_forward(&mut la.ln2, &mut la.ln2_mean, &mut la.ln2_rstd, &la.res2, &p.ln2_w, &p.ln2_b, c);
        matmul_forward(&mut la.fch, &la.ln2, &p.fc_w, Some(&p.fc_b), bt, c, 4 * c);
        gelu_forward(&mut la.fch_gelu, &la.fch);
        matmul_forward(&mut a.tmp_c, &la.fch_gelu, &p.fcp_w, Some(&p.fcp_b), bt, 4 * c, c);
        add(&mut la.res3, &la.res2, &a.tmp_c);
    }
    let last = &a.layers[cfg.n_layer - 1].res3;
    layernorm_forward(&mut a.lnf, &mut a.lnf_mean, &mut a.lnf_rstd, last, &w.lnf_w, &w.lnf_b, c);
    matmul_forward(&mut a.logits, &a.lnf, &w.wte, None, bt, c, v);
    // Fused softmax + cross-entropy; the logits buffer becomes d(mean loss)/d(logits).
    let inv_n = 1.0 / bt as f32;
    a.logits.par_chunks_mut(v).zip(a.losses.par_iter_mut()).enumerate().for_each(|(row, (x, loss))| {
        let m = max(x);
        let target = targets[row] as usize;
        let logit = x[target];
        for y in x.iter_mut() {
            *y = fast_exp(*y - m);
        }
        let total = sum(x);
        let inv = 1.0 / total;
        *loss = m + total.ln() - logit; // −log softmax, finite even when the target's probability underflows
        for y in x.iter_mut() {
            *y *= inv * inv_n;
        }
        x[target] -= inv_n;
    });
    a.losses.iter().map(|&x| x as f64).sum::<f64>() as f32 * inv_n
}

fn backward(cfg: &ModelConfig, w: &Weights, g: &mut Weights, a: &mut Acts, inputs: &[u32]) {
    let (b, t, c, v, h) = (a.b, a.t, cfg.d_model, cfg.vocab_size, cfg.n_head);
    let bt = b * t;
    // LM head (tied): d lnf = dlogits · wte; d wte += dlogits^T · lnf.
    matmul_backward(&mut a.d_c, &mut g.wte, None, &a.logits, &a.lnf, &w.wte, bt, c, v);
    a.d_res.fill(0.0);
    let last = &a.layers[cfg.n_layer - 1].res3;
    layernorm_backward(
        &mut a.d_res,
        &mut g.lnf_w,
        &mut g.lnf_b,
        &a.d_c,
        last,
        &w.lnf_w,
        &a.lnf_mean,
        &a.lnf_rstd,
        c,
    );
    for l in (0..cfg.n_layer).rev() {
        let (done, rest) = a.layers.split_at(l);
        let la = &rest[0];
        let input: &[f32] = if l == 0 { &a.x0 } else { &done[l - 1].res3 };
        let (p, gp) = (&w.layers[l], &mut g.layers[l]);
        // res3 = res2 + fcproj(gelu(fc(ln2(res2)))): d_res is d res3.
        matmul_backward(
            &mut a.d_4c,
            &mut gp.fcp_w,
            Some(&mut gp.fcp_b),
            &a.d_res,
            &la.fch_gelu,
            &p.fcp_w,
            bt,
            4 * c,
            c,
        );
        gelu_backward(&mut a.d_4c, &la.fch);
        matmul_backward(
            &mut a.d_c,
            &mut gp.fc_w,
            Some(&mut gp.fc_b),
            &a.d_4c,
            &la.ln2,
            &p.fc_w,
            bt,
            c,
            4 * c,
        );
        layernorm_backward(
            &mut a.d_res,
            &mut gp.ln2_w,
            &mut gp.ln2_b,
            &a.d_c,
            &la.res2,
            &p.ln2_w,
            &la.ln2_mean,
            &la.ln2_rstd,
            c,
        );
        // res2 = input + proj(attention(qkv(ln1(input)))): d_res is now d res2.
        matmul_backward(
            &mut a.d_c,
            &mut gp.proj_w,
            Some(&mut gp.proj_b),
            &a.d_res,
            &la.atty,
            &p.proj_w,
            bt,
            c,
            c,
        );
        attention_backward(&mut a.d_3c, &mut a.d_att, &a.d_c, &la.qkv, &la.att, b, t, c, h);
        matmul_backward(
            &mut a.d_c,
            &mut gp.qkv_w,
            Some(&mut gp.qkv_b),
            &a.d_3c,
            &la.ln1,
            &p.qkv_w,
            bt,
            c,
            3 * c,
        );
        layernorm_backward(
            &mut a.d_res,
            &mut gp.ln1_w,
            &mut gp.ln1_b,
            &a.d_c,
            input,
            &p.ln1_w,
            &la.ln1_mean,
            &la.ln1_rstd,
            c,
        );
    }
    // Embeddings.
    for (row, d) in a.d_res.chunks(c).enumerate() {
        let tok = inputs[row] as usize;
        let pos = row % t;
        g.wte[tok * c..(tok + 1) * c].iter_mut().zip(d).for_each(|(g, d)| *g += d);
        g.wpe[pos * c..(pos + 1) * c].iter_mut().zip(d).for_each(|(g, d)| *g += d);
    }
}

/// A strided matrix operand: element (i, j) is at `ptr + i·row + j·col`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    row: usize,
    col: usize,
}

/// A matrix stored row by row, rows `stride` floats apart.
fn row_major(ptr: *const f32, stride: usize) -> Mat {
    Mat { ptr, row: stride, col: 1 }
}

/// The transpose of a matrix stored row by row (rows `stride` floats apart).
fn transposed(ptr: *const f32, stride: usize) -> Mat {
    Mat { ptr, row: 1, col: stride }
}

/// dst (m × n, rows `dst_row` floats apart) = [dst +] scale · lhs (m × k) · rhs (k × n), on the `gemm`
/// crate's kernels.
///
/// # Safety
/// The operands must describe memory valid for the given shapes and strides, and `dst` must not
/// alias them.
#[allow(clippy::too_many_arguments)]
unsafe fn matmul(
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

fn threads() -> Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => Parallelism::None,
        n => Parallelism::Rayon(n),
    }
}

/// out (n_rows, oc) = inp (n_rows, ic) · W^T (W: (oc, ic)) + bias.
fn matmul_forward(
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
fn matmul_backward(
    dinp: &mut [f32],
    dw: &mut [f32],
    dbias: Option<&mut Vec<f32>>,
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
fn layernorm_forward(
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
fn layernorm_backward(
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

fn add(out: &mut [f32], a: &[f32], b: &[f32]) {
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
fn sum(x: &[f32]) -> f32 {
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
fn dot(a: &[f32], b: &[f32]) -> f32 {
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
pub(crate) fn max(x: &[f32]) -> f32 {
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
fn gelu_forward(out: &mut [f32], inp: &[f32]) {
    out.par_chunks_mut(4096).zip(inp.par_chunks(4096)).for_each(|(o, x)| {
        for i in 0..o.len() {
            let v = x[i];
            o[i] = 0.5 * v * (1.0 + fast_tanh(GELU_S * (v + 0.044715 * v * v * v)));
        }
    });
}

/// d inp = d out · gelu'(inp), in place on `d`.
fn gelu_backward(d: &mut [f32], inp: &[f32]) {
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

/// Causal multi-head attention. qkv: (B, T, 3C) holding q | k | v; att: (B, H, T, T) probabilities;
/// out: (B, T, C) with head h in columns h·hs..(h+1)·hs.
fn attention_forward(out: &mut [f32], att: &mut [f32], qkv: &[f32], b: usize, t: usize, c: usize, h: usize) {
    let hs = c / h;
    assert_eq!(att.len(), b * h * t * t);
    let scale = 1.0 / (hs as f32).sqrt();
    let out_p = SendPtr(out.as_mut_ptr());
    att.par_chunks_mut(t * t).enumerate().for_each(|(bh, a)| {
        let (bi, hi) = (bh / h, bh % h);
        let base = qkv[bi * t * 3 * c..].as_ptr();
        // SAFETY: q, k, v of (bi, hi) are T rows of hs floats with row stride 3C inside qkv; a is
        // this task's own (T, T) block; the output columns of (bi, hi) are written by this task only.
        unsafe {
            let (q, k, v) = (base.add(hi * hs), base.add(c + hi * hs), base.add(2 * c + hi * hs));
            // preatt (T, T) = q · k^T · scale
            matmul(
                t,
                t,
                hs,
                a.as_mut_ptr(),
                t,
                false,
                row_major(q, 3 * c),
                transposed(k, 3 * c),
                scale,
                Parallelism::None,
            );
            for t1 in 0..t {
                let row = &mut a[t1 * t..(t1 + 1) * t];
                let m = max(&row[..=t1]);
                for x in &mut row[..=t1] {
                    *x = fast_exp(*x - m);
                }
                let inv = 1.0 / sum(&row[..=t1]);
                row[..=t1].iter_mut().for_each(|x| *x *= inv);
                row[t1 + 1..].iter_mut().for_each(|x| *x = 0.0);
            }
            // out (T, hs) = att · v
            let o = out_p.ptr().add(bi * t * c + hi * hs);
            matmul(
                t,
                hs,
                t,
                o,
                c,
                false,
                row_major(a.as_ptr(), t),
                row_major(v, 3 * c),
                1.0,
                Parallelism::None,
            );
        }
    });
}

/// Backward of [`attention_forward`]: fills d qkv (B, T, 3C) from d out (B, T, C).
#[allow(clippy::too_many_arguments)]
fn attention_backward(
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{init_model, loss};
    use candle_core::Device;

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

    fn cfg() -> ModelConfig {
        ModelConfig { vocab_size: 37, ctx: 12, d_model: 24, n_layer: 2, n_head: 3, dropout: 0.0 }
    }

    /// The fast path's loss and every gradient equal candle autograd's on a tiny model:
    /// |fast − candle| ≤ 1e-4 + 1e-3·|candle| element-wise (f32, different summation orders).
    #[test]
    fn loss_and_gradients_match_candle_autograd() {
        let cfg = cfg();
        let dev = Device::Cpu;
        let (model, varmap) = init_model(&cfg, 11, &dev).unwrap();
        let (b, t) = (3, 10);
        let x: Vec<u32> = (0..b * t).map(|i| ((i * 7 + 3) % 37) as u32).collect();
        let y: Vec<u32> = (0..b * t).map(|i| ((i * 5 + 1) % 37) as u32).collect();
        let xt = Tensor::from_vec(x.clone(), (b, t), &dev).unwrap();
        let yt = Tensor::from_vec(y.clone(), (b, t), &dev).unwrap();
        let reference = loss(&model.forward(&xt, None).unwrap(), &yt).unwrap();
        let grads = reference.backward().unwrap();
        let mut fast = FastGpt::from_varmap(&cfg, &varmap).unwrap();
        let fast_loss = fast.forward_backward(&x, &y, b, t);
        let ref_loss = reference.to_scalar::<f32>().unwrap();
        assert!((fast_loss - ref_loss).abs() < 1e-5, "loss {fast_loss} vs {ref_loss}");
        let data = varmap.data().lock().unwrap();
        for (name, g) in fast.grads() {
            let want =
                grads.get(data[&name].as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let (i, diff) = g
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs() - 1e-3 * b.abs())
                .enumerate()
                .fold((0, f32::MIN), |acc, (i, d)| if d > acc.1 { (i, d) } else { acc });
            assert!(diff <= 1e-4, "{name}[{i}]: fast {} vs candle {}", g[i], want[i]);
        }
    }

    /// The decode-step product on panels equals gemm's on the plain matrix, for shapes that leave
    /// partial panels (oc = 37) and partial row blocks (11 rows = 6 + 5).
    #[test]
    fn panel_matmul_matches_gemm() {
        let (rows, ic, oc) = (11, 5, 37);
        let inp: Vec<f32> = (0..rows * ic).map(|i| ((i * 7 % 11) as f32 - 5.0) / 4.0).collect();
        let w: Vec<f32> = (0..oc * ic).map(|i| ((i * 5 % 13) as f32 - 6.0) / 8.0).collect();
        let bias: Vec<f32> = (0..oc).map(|j| j as f32 / 10.0).collect();
        let (mut want, mut got) = (vec![0f32; rows * oc], vec![1f32; rows * oc]);
        matmul_forward(&mut want, &inp, &w, Some(&bias), rows, ic, oc);
        panel_matmul(&mut got, &inp, &Panels::new(&w, oc, ic), Some(&bias), rows);
        let diff = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        assert!(diff < 1e-5, "max |Δ| {diff}");
        // Hand-checked element: row 0 = inp[0..5], column 0 = w[0..5], plus bias 0.
        let dot0: f32 = (0..ic).map(|k| inp[k] * w[k]).sum();
        assert!((got[0] - dot0).abs() < 1e-6);
        panel_matmul(&mut got, &inp, &Panels::new(&w, oc, ic), None, rows);
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!((g - (w - bias[i % oc])).abs() < 1e-5, "no bias, element {i}");
        }
    }

    /// A prefill of more rows than the panels take (30 prompts × 10 tokens = 300 > PANEL_MAX_ROWS,
    /// so gemm) in a one-block model, whose only block is also the last (shrunk to 30 rows, so
    /// panels), then a decoding step: candle's full-forward logits at both positions.
    #[test]
    fn large_prefill_and_single_block_match_the_candle_forward() {
        let cfg = ModelConfig { n_layer: 1, ..cfg() };
        let (model, _) = init_model(&cfg, 9, &Device::Cpu).unwrap();
        let model = model.detached();
        let w = Weights::from_gpt(&model).unwrap();
        let rows = 30;
        assert!(rows * 10 > PANEL_MAX_ROWS && rows <= PANEL_MAX_ROWS, "the prefill must take the gemm path");
        let seqs: Vec<u32> = (0..rows * 11).map(|i| ((i * 13 + i / 11) % 37) as u32).collect();
        let x = Tensor::from_vec(seqs.clone(), (rows, 11), &Device::Cpu).unwrap();
        let full = model.forward(&x, None).unwrap().to_vec3::<f32>().unwrap(); // (rows, 11, V)
        let mut dec = FastDecoder::new(&cfg, &w, rows);
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

    /// The fast decoder (prefill, then one token at a time, then a beam-style row reorder) gives
    /// candle's full-forward logits at every step.
    #[test]
    fn decoder_matches_the_candle_forward() {
        let cfg = cfg();
        let (model, _) = init_model(&cfg, 4, &Device::Cpu).unwrap();
        let model = model.detached();
        let w = Weights::from_gpt(&model).unwrap();
        let seqs: [Vec<u32>; 2] = [vec![3, 1, 4, 1, 5, 9, 2, 6], vec![2, 7, 1, 8, 2, 8, 1, 8]];
        let full: Vec<Vec<Vec<f32>>> = seqs
            .iter()
            .map(|s| {
                let x = Tensor::from_vec(s.clone(), (1, s.len()), &Device::Cpu).unwrap();
                model.forward(&x, None).unwrap().to_vec3::<f32>().unwrap().remove(0)
            })
            .collect();
        let mut dec = FastDecoder::new(&cfg, &w, 2);
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

    /// After training steps, the parameters written back give candle the same logits as the fast
    /// path's internal state: store() round-trips, and AdamW matches the candle optimiser.
    #[test]
    fn adamw_matches_the_candle_optimizer() {
        let cfg = cfg();
        let dev = Device::Cpu;
        let (model, varmap) = init_model(&cfg, 2, &dev).unwrap();
        let (_, varmap2) = init_model(&cfg, 2, &dev).unwrap();
        let mut fast = FastGpt::from_varmap(&cfg, &varmap2).unwrap();
        let tc = crate::config::Config::preset("smoke").unwrap().train;
        let mut opt = crate::train::AdamW::new(&varmap, &tc).unwrap();
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
        fast.store(&varmap2).unwrap();
        let (a, bmap) = (varmap.data().lock().unwrap(), varmap2.data().lock().unwrap());
        for (name, var) in a.iter() {
            let p = var.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let q = bmap[name].as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let diff = p.iter().zip(&q).map(|(x, y)| (x - y).abs()).fold(0f32, f32::max);
            assert!(diff < 1e-4, "{name}: max |Δ| {diff}");
        }
    }
}
