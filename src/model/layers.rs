//! GPT-2's layers as typed parameters, each loaded from the checkpoint key it mirrors and checked
//! against the config. Weights are converted to f32 and laid out for the kernels once, at load.

use crate::backend::cpu::packed;
use crate::config::{Activation, GPT2Config};
use crate::error::Result;
use crate::weights::Checkpoint;

/// `ln_*`: LayerNorm with weight and bias of width `n_embd`.
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(ck: &Checkpoint, prefix: &str, width: usize, eps: f64) -> Result<Self> {
        Ok(LayerNorm {
            weight: ck.f32(&format!("{prefix}.weight"), &[width])?,
            bias: ck.f32(&format!("{prefix}.bias"), &[width])?,
            eps: eps as f32,
        })
    }
}

/// A dense layer `y = x·W + b`. transformers' `Conv1D` stores W as `(in, out)`; we pack it once at
/// load into panels of 32 outputs (`backend::cpu::packed`), the layout the FMA kernels stream.
pub struct Linear {
    /// Packed panels `[n_out/32][n_in][32]`.
    pub weight: Vec<f32>,
    pub bias: Option<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
}

impl Linear {
    /// Load a transformers `Conv1D` (`{prefix}.weight` of shape `(n_in, n_out)`, `{prefix}.bias`).
    pub fn load_conv1d(ck: &Checkpoint, prefix: &str, n_in: usize, n_out: usize) -> Result<Self> {
        let w = ck.f32(&format!("{prefix}.weight"), &[n_in, n_out])?;
        let mut rows = vec![0.0; n_in * n_out];
        for i in 0..n_in {
            for o in 0..n_out {
                rows[o * n_in + i] = w[i * n_out + o];
            }
        }
        let bias = ck.f32(&format!("{prefix}.bias"), &[n_out])?;
        Ok(Self::from_rows(&rows, Some(bias), n_in, n_out))
    }

    /// From a row-major `(n_out, n_in)` matrix (one output per row).
    pub fn from_rows(rows: &[f32], bias: Option<Vec<f32>>, n_in: usize, n_out: usize) -> Self {
        Linear {
            weight: packed::pack(rows, n_out, n_in),
            bias,
            n_in,
            n_out,
        }
    }

    /// The weights as a row-major `(n_out, n_in)` matrix.
    pub fn weight_rows(&self) -> Vec<f32> {
        packed::unpack(&self.weight, self.n_out, self.n_in)
    }

    /// `out (rows, n_out) = x (rows, n_in) · Wᵀ + b`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        packed::matmul(
            x,
            &self.weight,
            self.bias.as_deref(),
            self.n_in,
            self.n_out,
            out,
        );
    }
}

/// `attn`: fused q|k|v projection then the output projection.
pub struct Attention {
    /// `c_attn`: n_embd → 3·n_embd (q, k, v; heads contiguous inside each).
    pub c_attn: Linear,
    /// `c_proj`: n_embd → n_embd.
    pub c_proj: Linear,
    pub n_head: usize,
    pub head_dim: usize,
    /// 1/√head_dim, and also 1/(layer_idx+1) with `scale_attn_by_inverse_layer_idx`.
    pub scale: f32,
}

impl Attention {
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: &GPT2Config, layer_idx: usize) -> Result<Self> {
        let c = cfg.n_embd;
        let mut scale = 1.0 / (cfg.head_dim() as f32).sqrt();
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f32;
        }
        Ok(Attention {
            c_attn: Linear::load_conv1d(ck, &format!("{prefix}.c_attn"), c, 3 * c)?,
            c_proj: Linear::load_conv1d(ck, &format!("{prefix}.c_proj"), c, c)?,
            n_head: cfg.n_head,
            head_dim: cfg.head_dim(),
            scale,
        })
    }
}

/// `mlp`: n_embd → n_inner → activation → n_embd.
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub act: Activation,
}

impl Mlp {
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: &GPT2Config) -> Result<Self> {
        Ok(Mlp {
            c_fc: Linear::load_conv1d(ck, &format!("{prefix}.c_fc"), cfg.n_embd, cfg.n_inner)?,
            c_proj: Linear::load_conv1d(ck, &format!("{prefix}.c_proj"), cfg.n_inner, cfg.n_embd)?,
            act: cfg.activation_function,
        })
    }
}

/// `h.{i}`: a pre-LN transformer block, `x += attn(ln_1(x)); x += mlp(ln_2(x))`.
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    pub fn load(ck: &Checkpoint, cfg: &GPT2Config, i: usize) -> Result<Self> {
        let p = format!("h.{i}");
        let eps = cfg.layer_norm_epsilon;
        Ok(Block {
            ln_1: LayerNorm::load(ck, &format!("{p}.ln_1"), cfg.n_embd, eps)?,
            attn: Attention::load(ck, &format!("{p}.attn"), cfg, i)?,
            ln_2: LayerNorm::load(ck, &format!("{p}.ln_2"), cfg.n_embd, eps)?,
            mlp: Mlp::load(ck, &format!("{p}.mlp"), cfg)?,
        })
    }
}
