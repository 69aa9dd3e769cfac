//! GPT-2's layers as typed parameters, each loaded from the checkpoint key it mirrors and checked
//! against the config. Matrices are converted to the chosen [`DType`] and laid out for the kernels
//! once, at load; vectors (biases, layer norms) stay f32.

use crate::backend::cpu::kernels::Isa;
use crate::backend::cpu::matrix::Matrix;
use crate::backend::cpu::packed::Epilogue;
use crate::config::{Activation, GPT2Config};
use crate::dtype::DType;
use crate::error::Result;
use crate::weights::Checkpoint;

/// `ln_*`: LayerNorm with weight and bias of width `n_embd`.
#[derive(Clone)]
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
/// load into panels of 32 outputs (`backend::cpu::matrix`), the layout the kernels stream.
pub struct Linear {
    pub weight: Matrix,
    pub bias: Option<Vec<f32>>,
    pub n_in: usize,
    pub n_out: usize,
}

impl Linear {
    /// Load a transformers `Conv1D` (`{prefix}.weight` of shape `(n_in, n_out)`, `{prefix}.bias`).
    pub fn load_conv1d(
        ck: &Checkpoint,
        prefix: &str,
        n_in: usize,
        n_out: usize,
        dtype: DType,
    ) -> Result<Self> {
        let weight = ck.matrix(&format!("{prefix}.weight"), n_out, n_in, true, dtype)?;
        let bias = ck.f32(&format!("{prefix}.bias"), &[n_out])?;
        Ok(Linear {
            weight,
            bias: Some(bias),
            n_in,
            n_out,
        })
    }

    /// From a row-major `(n_out, n_in)` matrix (one output per row).
    pub fn from_rows(
        rows: &[f32],
        bias: Option<Vec<f32>>,
        n_in: usize,
        n_out: usize,
        dtype: DType,
    ) -> Self {
        Linear {
            weight: Matrix::pack(rows, n_out, n_in, dtype),
            bias,
            n_in,
            n_out,
        }
    }

    /// The weights as a row-major `(n_out, n_in)` f32 matrix (dequantized).
    pub fn weight_rows(&self) -> Vec<f32> {
        self.weight.to_rows()
    }

    /// The same layer stored as `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Self {
        let rows = self.weight_rows();
        Self::from_rows(&rows, self.bias.clone(), self.n_in, self.n_out, dtype)
    }

    /// `out (rows, n_out) = x (rows, n_in) · Wᵀ + b`.
    pub fn forward(&self, x: &[f32], out: &mut [f32]) {
        self.weight.matmul(x, self.bias.as_deref(), out);
    }

    /// `act(x · W + b)`, the activation fused into the product.
    pub fn forward_act(&self, x: &[f32], act: Activation, out: &mut [f32]) {
        let epi = Epilogue {
            bias: self.bias.as_deref(),
            act: Some(act),
        };
        self.weight.matmul_with(Isa::detect(), x, epi, out);
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
    pub fn load(
        ck: &Checkpoint,
        prefix: &str,
        cfg: &GPT2Config,
        layer_idx: usize,
        dtype: DType,
    ) -> Result<Self> {
        let c = cfg.n_embd;
        let mut scale = 1.0 / (cfg.head_dim() as f32).sqrt();
        if cfg.scale_attn_by_inverse_layer_idx {
            scale /= (layer_idx + 1) as f32;
        }
        Ok(Attention {
            c_attn: Linear::load_conv1d(ck, &format!("{prefix}.c_attn"), c, 3 * c, dtype)?,
            c_proj: Linear::load_conv1d(ck, &format!("{prefix}.c_proj"), c, c, dtype)?,
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
    pub fn load(ck: &Checkpoint, prefix: &str, cfg: &GPT2Config, dtype: DType) -> Result<Self> {
        let (c, f) = (cfg.n_embd, cfg.n_inner);
        Ok(Mlp {
            c_fc: Linear::load_conv1d(ck, &format!("{prefix}.c_fc"), c, f, dtype)?,
            c_proj: Linear::load_conv1d(ck, &format!("{prefix}.c_proj"), f, c, dtype)?,
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
    pub fn load(ck: &Checkpoint, cfg: &GPT2Config, i: usize, dtype: DType) -> Result<Self> {
        let p = format!("h.{i}");
        let eps = cfg.layer_norm_epsilon;
        Ok(Block {
            ln_1: LayerNorm::load(ck, &format!("{p}.ln_1"), cfg.n_embd, eps)?,
            attn: Attention::load(ck, &format!("{p}.attn"), cfg, i, dtype)?,
            ln_2: LayerNorm::load(ck, &format!("{p}.ln_2"), cfg.n_embd, eps)?,
            mlp: Mlp::load(ck, &format!("{p}.mlp"), cfg, dtype)?,
        })
    }

    /// The same block with its matrices stored as `dtype`.
    pub fn to_dtype(&self, dtype: DType) -> Self {
        Block {
            ln_1: self.ln_1.clone(),
            attn: Attention {
                c_attn: self.attn.c_attn.to_dtype(dtype),
                c_proj: self.attn.c_proj.to_dtype(dtype),
                ..self.attn
            },
            ln_2: self.ln_2.clone(),
            mlp: Mlp {
                c_fc: self.mlp.c_fc.to_dtype(dtype),
                c_proj: self.mlp.c_proj.to_dtype(dtype),
                act: self.mlp.act,
            },
        }
    }
}
