//! GPT-2's forward pass, written once over the operations a backend provides. A batch is ragged:
//! each sequence brings its own new tokens and continues from its own cache length, and all new
//! tokens are stacked into one `(rows, width)` activation per [`Act`], so every dense layer is one
//! matrix product and no padding or mask is needed.

use super::params::{Dense, Norm};

/// The activations of one pass, each `(rows, width)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// The residual stream, `n_embd` wide.
    X,
    /// A LayerNorm's output, `n_embd`.
    Ln,
    /// q | k | v, `3·n_embd`.
    Qkv,
    /// Attention's output (heads side by side), `n_embd`.
    Attn,
    /// A projection back to the residual width (attention's or the MLP's output), `n_embd`.
    Out,
    /// The MLP's hidden activation, `n_inner`.
    Fc,
    /// The final hidden states (after `ln_f`), `n_embd`.
    Hidden,
}

/// What a backend computes; [`forward`] says in which order.
pub(crate) trait Ops {
    /// `X = wte[token] + wpe[position]` for every new token.
    fn embed(&mut self);
    fn layer_norm(&mut self, src: Act, norm: Norm, dst: Act);
    /// `dst = src · W + b` for block `layer`'s `proj`, then the activation for the MLP's `c_fc`.
    fn dense(&mut self, src: Act, layer: usize, proj: Dense, dst: Act);
    /// Causal self-attention of block `layer` over the cached and new positions: stores the new
    /// tokens' keys and values (from `qkv`) in the cache, then attends.
    fn attention(&mut self, layer: usize, qkv: Act, dst: Act);
    /// `dst += src` (the residual connections).
    fn add(&mut self, dst: Act, src: Act);
}

/// Every new token's final hidden state, in [`Act::Hidden`].
pub(crate) fn forward(ops: &mut impl Ops, n_layer: usize) {
    use Act::*;
    ops.embed();
    for l in 0..n_layer {
        // Pre-LN blocks: x += attn(ln_1(x)); x += mlp(ln_2(x)).
        ops.layer_norm(X, Norm::Ln1(l), Ln);
        ops.dense(Ln, l, Dense::CAttn, Qkv);
        ops.attention(l, Qkv, Attn);
        ops.dense(Attn, l, Dense::AttnProj, Out);
        ops.add(X, Out);

        ops.layer_norm(X, Norm::Ln2(l), Ln);
        ops.dense(Ln, l, Dense::CFc, Fc);
        ops.dense(Fc, l, Dense::MlpProj, Out);
        ops.add(X, Out);
    }
    ops.layer_norm(X, Norm::LnF, Hidden);
}
