//! GPT-2's parameters under transformers' names, read one tensor at a time from a checkpoint (or
//! made up, for benchmarks), each checked against the config. A backend converts or uploads each
//! tensor before it asks for the next, so loading peaks near the model's own size.
//!
//! ```text
//! wte (vocab, n_embd)        token embedding; also the unembedding unless lm_head differs
//! wpe (n_positions, n_embd)  position embedding
//! h.{i}.ln_1, h.{i}.ln_2     LayerNorm weight and bias (n_embd)
//! h.{i}.attn.c_attn          Conv1D n_embd → 3·n_embd (q | k | v, heads contiguous in each)
//! h.{i}.attn.c_proj          Conv1D n_embd → n_embd
//! h.{i}.mlp.c_fc             Conv1D n_embd → n_inner
//! h.{i}.mlp.c_proj           Conv1D n_inner → n_embd
//! ln_f                       the final LayerNorm
//! ```

use std::cell::RefCell;

use crate::config::GPT2Config;
use crate::error::{Error, Result};
use crate::numerics::Rng;
use crate::weights::Checkpoint;

/// A LayerNorm of the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Norm {
    /// Before block `i`'s attention.
    Ln1(usize),
    /// Before block `i`'s MLP.
    Ln2(usize),
    /// After the last block.
    LnF,
}

/// A block's dense layers, in the order the forward pass runs them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dense {
    CAttn,
    AttnProj,
    CFc,
    MlpProj,
}

impl Dense {
    fn key(self) -> &'static str {
        match self {
            Dense::CAttn => "attn.c_attn",
            Dense::AttnProj => "attn.c_proj",
            Dense::CFc => "mlp.c_fc",
            Dense::MlpProj => "mlp.c_proj",
        }
    }

    /// (inputs, outputs).
    pub(crate) fn shape(self, cfg: &GPT2Config) -> (usize, usize) {
        let (c, f) = (cfg.n_embd, cfg.n_inner);
        match self {
            Dense::CAttn => (c, 3 * c),
            Dense::AttnProj => (c, c),
            Dense::CFc => (c, f),
            Dense::MlpProj => (f, c),
        }
    }
}

/// A dense layer's weights as rows, one output per row (`(n_out, n_in)`; transformers' Conv1D
/// stores the transpose), and its bias.
pub(crate) struct DenseWeights {
    pub rows: Vec<f32>,
    pub bias: Vec<f32>,
}

/// A weight matrix of `n` outputs × `k` inputs, as a backend receives it.
pub(crate) enum Weights<'a> {
    /// Rows `(n, k)`, one output per row, in f32.
    Rows(Vec<f32>),
    /// A checkpoint tensor for the backend to read in its own format
    /// (`Checkpoint::matrix(name, n, k, conv1d, dtype)`: a q8_0 tensor stays as stored for q8).
    Stored {
        ck: &'a Checkpoint,
        name: String,
        /// Stored as transformers' Conv1D, `(k, n)`.
        conv1d: bool,
    },
}

enum Source<'a> {
    Checkpoint(&'a Checkpoint),
    /// Deterministic values: the embeddings from one generator and the dense layers from another,
    /// each in the order a backend asks for them (wte before wpe; layer by layer, c_attn, attn.c_proj, c_fc, mlp.c_proj).
    Random {
        embeddings: RefCell<Rng>,
        dense: RefCell<Rng>,
    },
}

pub(crate) struct Params<'a> {
    config: GPT2Config,
    source: Source<'a>,
}

fn fill(rng: &RefCell<Rng>, n: usize, scale: f32) -> Vec<f32> {
    let mut rng = rng.borrow_mut();
    (0..n)
        .map(|_| (rng.next_f64() as f32 * 2.0 - 1.0) * scale)
        .collect()
}

fn validated(config: GPT2Config) -> Result<GPT2Config> {
    config.validate().map_err(|msg| Error::Config {
        path: "config".into(),
        msg,
    })?;
    Ok(config)
}

impl<'a> Params<'a> {
    pub(crate) fn from_checkpoint(config: GPT2Config, ck: &'a Checkpoint) -> Result<Self> {
        Ok(Params {
            config: validated(config)?,
            source: Source::Checkpoint(ck),
        })
    }

    /// Random weights at a real shape (they run at exactly the speed of real ones).
    pub(crate) fn random(config: GPT2Config, seed: u64) -> Result<Self> {
        Ok(Params {
            config: validated(config)?,
            source: Source::Random {
                embeddings: RefCell::new(Rng::new(seed ^ 0x5EED)),
                dense: RefCell::new(Rng::new(seed)),
            },
        })
    }

    pub(crate) fn config(&self) -> &GPT2Config {
        &self.config
    }

    /// `wte`: `(vocab_size, n_embd)`.
    pub(crate) fn wte(&self) -> Result<Vec<f32>> {
        let (v, c) = (self.config.vocab_size, self.config.n_embd);
        match &self.source {
            Source::Checkpoint(ck) => ck.f32("wte.weight", &[v, c]),
            Source::Random { embeddings, .. } => Ok(fill(embeddings, v * c, 0.1)),
        }
    }

    /// `wte` as a matrix of vocab outputs × n_embd inputs (the unembedding).
    pub(crate) fn wte_weights(&self) -> Result<Weights<'a>> {
        match &self.source {
            Source::Checkpoint(ck) => Ok(Weights::Stored {
                ck,
                name: "wte.weight".into(),
                conv1d: false,
            }),
            Source::Random { .. } => self.wte().map(Weights::Rows),
        }
    }

    /// `lm_head.weight` as a matrix, when it differs from `wte` ([`Params::lm_head`]).
    pub(crate) fn lm_head_weights(&self) -> Result<Option<Weights<'a>>> {
        match &self.source {
            Source::Checkpoint(ck) => {
                if ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight") {
                    return Ok(Some(Weights::Stored {
                        ck,
                        name: "lm_head.weight".into(),
                        conv1d: false,
                    }));
                }
                ck.mark_used("lm_head.weight");
                Ok(None)
            }
            Source::Random { .. } => Ok(None),
        }
    }

    /// Block `layer`'s dense layer `proj` as a matrix of n_out × n_in, and its bias.
    pub(crate) fn dense_weights(
        &self,
        layer: usize,
        proj: Dense,
    ) -> Result<(Weights<'a>, Vec<f32>)> {
        match &self.source {
            Source::Checkpoint(ck) => {
                let key = format!("h.{layer}.{}", proj.key());
                let (n_in, n_out) = proj.shape(&self.config);
                // The weight's shape first: its error is the one to report when both are off.
                ck.check_shape(&format!("{key}.weight"), &[n_in, n_out])?;
                let bias = ck.f32(&format!("{key}.bias"), &[n_out])?;
                let w = Weights::Stored {
                    ck,
                    name: format!("{key}.weight"),
                    conv1d: true,
                };
                Ok((w, bias))
            }
            Source::Random { .. } => {
                let d = self.dense(layer, proj)?;
                Ok((Weights::Rows(d.rows), d.bias))
            }
        }
    }

    /// `wpe`: `(n_positions, n_embd)`.
    pub(crate) fn wpe(&self) -> Result<Vec<f32>> {
        let (p, c) = (self.config.n_positions, self.config.n_embd);
        match &self.source {
            Source::Checkpoint(ck) => ck.f32("wpe.weight", &[p, c]),
            Source::Random { embeddings, .. } => Ok(fill(embeddings, p * c, 0.02)),
        }
    }

    /// `lm_head.weight` when the checkpoint has one that differs from `wte` (else the unembedding is
    /// `wte`, tied).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn lm_head(&self) -> Result<Option<Vec<f32>>> {
        let (v, c) = (self.config.vocab_size, self.config.n_embd);
        match &self.source {
            Source::Checkpoint(ck) => {
                if ck.contains("lm_head.weight") && !ck.same_data("lm_head.weight", "wte.weight") {
                    return ck.f32("lm_head.weight", &[v, c]).map(Some);
                }
                ck.mark_used("lm_head.weight"); // absent, or the same bytes as wte
                Ok(None)
            }
            Source::Random { .. } => Ok(None),
        }
    }

    /// A LayerNorm's (weight, bias).
    pub(crate) fn norm(&self, norm: Norm) -> Result<(Vec<f32>, Vec<f32>)> {
        let c = self.config.n_embd;
        let key = match norm {
            Norm::Ln1(i) => format!("h.{i}.ln_1"),
            Norm::Ln2(i) => format!("h.{i}.ln_2"),
            Norm::LnF => "ln_f".into(),
        };
        match &self.source {
            Source::Checkpoint(ck) => Ok((
                ck.f32(&format!("{key}.weight"), &[c])?,
                ck.f32(&format!("{key}.bias"), &[c])?,
            )),
            Source::Random { .. } => Ok((vec![1.0; c], vec![0.0; c])),
        }
    }

    /// Block `layer`'s dense layer `proj`.
    pub(crate) fn dense(&self, layer: usize, proj: Dense) -> Result<DenseWeights> {
        let (n_in, n_out) = proj.shape(&self.config);
        let (rows, bias) = match &self.source {
            Source::Checkpoint(ck) => {
                let key = format!("h.{layer}.{}", proj.key());
                let w = ck.f32(&format!("{key}.weight"), &[n_in, n_out])?;
                let mut rows = vec![0.0; n_in * n_out];
                for i in 0..n_in {
                    for o in 0..n_out {
                        rows[o * n_in + i] = w[i * n_out + o];
                    }
                }
                (rows, ck.f32(&format!("{key}.bias"), &[n_out])?)
            }
            Source::Random { dense, .. } => {
                (fill(dense, n_in * n_out, 0.04), fill(dense, n_out, 0.02))
            }
        };
        Ok(DenseWeights { rows, bias })
    }

    /// Attention scores' scale in block `layer`: 1/√head_dim, and also 1/(layer+1) with
    /// `scale_attn_by_inverse_layer_idx`.
    pub(crate) fn attention_scale(&self, layer: usize) -> f32 {
        let mut scale = 1.0 / (self.config.head_dim() as f32).sqrt();
        if self.config.scale_attn_by_inverse_layer_idx {
            scale /= (layer + 1) as f32;
        }
        scale
    }

    /// Every tensor of the checkpoint was asked for: an unknown one is an error, not ignored.
    pub(crate) fn finish(&self) -> Result<()> {
        match &self.source {
            Source::Checkpoint(ck) => ck.finish(),
            Source::Random { .. } => Ok(()),
        }
    }
}
