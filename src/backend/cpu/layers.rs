//! GPT-2's layers as the CPU stores them, each built from the parameters it mirrors. Matrices are converted to the chosen [`DType`] and laid out for the kernels
//! once, at load; vectors (biases, layer norms) stay f32.

use super::kernels::Isa;
use super::matrix::Matrix;
use super::packed::Epilogue;
use crate::config::Activation;
use crate::dtype::DType;
use crate::error::Result;
use crate::model::params::{Dense, Norm, Params, Weights};
use crate::weights::MatrixData;

/// A matrix of `n` outputs × `k` inputs stored as `dtype`: packed from f32 rows, or read from the
/// checkpoint in its own format (a q8_0 tensor loads as q8 without quantizing again).
pub fn matrix(w: Weights, n: usize, k: usize, dtype: DType) -> Result<Matrix> {
    match w {
        Weights::Rows(rows) => Ok(Matrix::pack(&rows, n, k, dtype)),
        Weights::Stored { ck, name, conv1d } => {
            ck.matrix(&name, n, k, conv1d, dtype == DType::Q8, |data| match data {
                MatrixData::Q8_0(blocks) => Matrix::from_q8_0(blocks, n, k),
                MatrixData::Rows(rows) => Matrix::pack(&rows, n, k, dtype),
                MatrixData::Cols(cols) => Matrix::pack_cols(&cols, n, k, dtype),
            })
        }
    }
}

/// `ln_*`: LayerNorm with weight and bias of width `n_embd`.
#[derive(Clone)]
pub struct LayerNorm {
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
    pub eps: f32,
}

impl LayerNorm {
    pub fn load(params: &Params, norm: Norm) -> Result<Self> {
        let (weight, bias) = params.norm(norm)?;
        Ok(LayerNorm {
            weight,
            bias,
            eps: params.config().layer_norm_epsilon as f32,
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
    /// A dense layer from its weights (`n_out × n_in`, read or packed as `dtype`) and bias.
    pub fn load(
        weights: Weights,
        bias: Vec<f32>,
        n_in: usize,
        n_out: usize,
        dtype: DType,
    ) -> Result<Self> {
        Ok(Linear {
            weight: matrix(weights, n_out, n_in, dtype)?,
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

/// `mlp`: n_embd → n_inner → activation → n_embd.
pub struct Mlp {
    pub c_fc: Linear,
    pub c_proj: Linear,
    pub act: Activation,
}

/// `h.{i}`: a pre-LN transformer block, `x += attn(ln_1(x)); x += mlp(ln_2(x))`.
pub struct Block {
    pub ln_1: LayerNorm,
    pub attn: Attention,
    pub ln_2: LayerNorm,
    pub mlp: Mlp,
}

impl Block {
    /// Block `i`, each matrix packed as soon as it is read.
    pub fn load(params: &Params, i: usize, dtype: DType) -> Result<Self> {
        let cfg = params.config();
        let dense = |p: Dense| {
            let (n_in, n_out) = p.shape(cfg);
            let (w, bias) = params.dense_weights(i, p)?;
            Linear::load(w, bias, n_in, n_out, dtype)
        };
        Ok(Block {
            ln_1: LayerNorm::load(params, Norm::Ln1(i))?,
            attn: Attention {
                c_attn: dense(Dense::CAttn)?,
                c_proj: dense(Dense::AttnProj)?,
                n_head: cfg.n_head,
                head_dim: cfg.head_dim(),
                scale: params.attention_scale(i),
            },
            ln_2: LayerNorm::load(params, Norm::Ln2(i))?,
            mlp: Mlp {
                c_fc: dense(Dense::CFc)?,
                c_proj: dense(Dense::MlpProj)?,
                act: cfg.activation_function,
            },
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
