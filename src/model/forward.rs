//! GPT-2's forward pass, written once over the operations a backend provides. A batch is ragged:
//! each sequence brings its own new tokens and continues from its own cache length, and all new
//! tokens are stacked into one `(rows, width)` activation per [`Act`], so every dense layer is one
//! matrix product and no padding or mask is needed.

use super::params::{Dense, Norm};
use super::sites::{BlockSite, Site};

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

    /// Whether the pass stops at `site` to read or replace it (never, without hooks).
    fn hooked(&self, _site: Site) -> bool {
        false
    }
    /// Read and/or replace `site`, whose values `act` holds (q, k and v: their thirds of it; the
    /// embeddings: its two terms); called only where [`Ops::hooked`]. The attention scores and
    /// pattern are inside [`Ops::attention`], which reads its own hooks.
    fn site(&mut self, _site: Site, _act: Act) {}
    /// `dst = src · W + b` for block `layer`'s `c_fc`, without the activation (when
    /// `mlp.hook_pre` is hooked; [`Ops::activate`] follows).
    fn dense_pre(&mut self, src: Act, layer: usize, dst: Act);
    /// Block `layer`'s MLP activation of `dst`, in place, after [`Ops::dense_pre`].
    fn activate(&mut self, layer: usize, dst: Act);
    /// Block `layer`'s whole MLP, `dst = c_proj(act(c_fc(src)))`, with `hidden` as its scratch
    /// (when neither `mlp.hook_pre` nor `mlp.hook_post` is hooked, so `hidden` is not read after).
    fn mlp(&mut self, layer: usize, src: Act, hidden: Act, dst: Act);
}

/// The first `layers` blocks, then `ln_f` into [`Act::Hidden`] if `final_norm`; each named site
/// that [`Ops::hooked`] says is wanted goes to [`Ops::site`] once the operation making it is done.
pub(crate) fn forward_until(ops: &mut impl Ops, layers: usize, final_norm: bool) {
    use Act::*;
    fn hook(ops: &mut impl Ops, site: Site, act: Act) {
        if ops.hooked(site) {
            ops.site(site, act);
        }
    }
    ops.embed();
    hook(ops, Site::Embed, X);
    hook(ops, Site::PosEmbed, X);
    for l in 0..layers {
        let at = |s| Site::Block(l, s);
        // Pre-LN blocks: x += attn(ln_1(x)); x += mlp(ln_2(x)).
        hook(ops, at(BlockSite::ResidPre), X);
        ops.layer_norm(X, Norm::Ln1(l), Ln);
        hook(ops, at(BlockSite::Ln1), Ln);
        ops.dense(Ln, l, Dense::CAttn, Qkv);
        hook(ops, at(BlockSite::Q), Qkv);
        hook(ops, at(BlockSite::K), Qkv);
        hook(ops, at(BlockSite::V), Qkv);
        ops.attention(l, Qkv, Attn);
        hook(ops, at(BlockSite::Z), Attn);
        ops.dense(Attn, l, Dense::AttnProj, Out);
        hook(ops, at(BlockSite::AttnOut), Out);
        ops.add(X, Out);
        hook(ops, at(BlockSite::ResidMid), X);

        ops.layer_norm(X, Norm::Ln2(l), Ln);
        hook(ops, at(BlockSite::Ln2), Ln);
        if ops.hooked(at(BlockSite::MlpPre)) {
            ops.dense_pre(Ln, l, Fc);
            ops.site(at(BlockSite::MlpPre), Fc);
            ops.activate(l, Fc);
            hook(ops, at(BlockSite::MlpPost), Fc);
            ops.dense(Fc, l, Dense::MlpProj, Out);
        } else if ops.hooked(at(BlockSite::MlpPost)) {
            ops.dense(Ln, l, Dense::CFc, Fc);
            ops.site(at(BlockSite::MlpPost), Fc);
            ops.dense(Fc, l, Dense::MlpProj, Out);
        } else {
            ops.mlp(l, Ln, Fc, Out);
        }
        hook(ops, at(BlockSite::MlpOut), Out);
        ops.add(X, Out);
        hook(ops, at(BlockSite::ResidPost), X);
    }
    if final_norm {
        ops.layer_norm(X, Norm::LnF, Hidden);
        hook(ops, Site::LnFinal, Hidden);
    }
}
