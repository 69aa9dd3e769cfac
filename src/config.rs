//! `GPT2Config`: the hyper-parameters of a GPT-2 model, read from `config.json` or a preset.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// The MLP non-linearity, named as transformers' `activation_function`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Activation {
    /// `gelu_new` (and its synonyms `gelu_pytorch_tanh`, `gelu_fast`): the tanh approximation GPT-2 uses.
    GeluNew,
    /// `gelu`: the exact erf form.
    Gelu,
    Relu,
    /// `silu` / `swish`.
    Silu,
    /// `quick_gelu`: x·σ(1.702x).
    QuickGelu,
}

impl Activation {
    /// The canonical transformers name.
    pub fn name(self) -> &'static str {
        match self {
            Activation::GeluNew => "gelu_new",
            Activation::Gelu => "gelu",
            Activation::Relu => "relu",
            Activation::Silu => "silu",
            Activation::QuickGelu => "quick_gelu",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        Some(match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluNew,
            "gelu" => Activation::Gelu,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            "quick_gelu" => Activation::QuickGelu,
            _ => return None,
        })
    }
}

/// GPT-2 hyper-parameters, with transformers' names.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GPT2Config {
    pub n_layer: usize,
    pub n_embd: usize,
    pub n_head: usize,
    /// Context length (`n_positions`, or `n_ctx` in old configs).
    pub n_positions: usize,
    pub vocab_size: usize,
    /// Width of the MLP's hidden layer (`n_inner`, 4·n_embd when absent).
    pub n_inner: usize,
    pub layer_norm_epsilon: f64,
    pub activation_function: Activation,
    pub scale_attn_by_inverse_layer_idx: bool,
    pub reorder_and_upcast_attn: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

/// `config.json` as transformers writes it; every field optional so that we can name what is missing.
#[derive(Deserialize)]
struct RawConfig {
    model_type: Option<String>,
    n_layer: Option<usize>,
    n_embd: Option<usize>,
    n_head: Option<usize>,
    n_positions: Option<usize>,
    n_ctx: Option<usize>,
    vocab_size: Option<usize>,
    n_inner: Option<usize>,
    layer_norm_epsilon: Option<f64>,
    activation_function: Option<String>,
    #[serde(default)]
    scale_attn_by_inverse_layer_idx: bool,
    #[serde(default)]
    reorder_and_upcast_attn: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
}

/// The released OpenAI checkpoints and distilgpt2, by hub id.
#[doc(hidden)]
pub const PRESETS: &[&str] = &["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl", "distilgpt2"];

impl GPT2Config {
    /// The config of a released model: `gpt2`, `gpt2-medium`, `gpt2-large`, `gpt2-xl`, `distilgpt2`
    /// (an `openai-community/` or `distilbert/` prefix is accepted).
    pub fn preset(name: &str) -> Option<Self> {
        let base = name.rsplit('/').next().unwrap_or(name);
        let (n_layer, n_embd, n_head) = match base {
            "gpt2" => (12, 768, 12),
            "gpt2-medium" => (24, 1024, 16),
            "gpt2-large" => (36, 1280, 20),
            "gpt2-xl" => (48, 1600, 25),
            "distilgpt2" => (6, 768, 12),
            _ => return None,
        };
        Some(GPT2Config {
            n_layer,
            n_embd,
            n_head,
            n_positions: 1024,
            vocab_size: 50257,
            n_inner: 4 * n_embd,
            layer_norm_epsilon: 1e-5,
            activation_function: Activation::GeluNew,
            scale_attn_by_inverse_layer_idx: false,
            reorder_and_upcast_attn: false,
            bos_token_id: 50256,
            eos_token_id: 50256,
        })
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text, &path.display().to_string())
    }

    /// Parse `config.json` text; `origin` names it in errors.
    pub fn from_json(text: &str, origin: &str) -> Result<Self> {
        let err = |msg: String| Error::Config {
            path: origin.to_owned(),
            msg,
        };
        let raw: RawConfig =
            serde_json::from_str(text).map_err(|e| err(format!("not a valid config.json: {e}")))?;
        if let Some(t) = &raw.model_type {
            if t != "gpt2" {
                return Err(err(format!(
                    "model_type is {t:?}; this engine runs only \"gpt2\" models"
                )));
            }
        }
        let need =
            |v: Option<usize>, name: &str| v.ok_or_else(|| err(format!("missing field `{name}`")));
        let n_layer = need(raw.n_layer, "n_layer")?;
        let n_embd = need(raw.n_embd, "n_embd")?;
        let n_head = need(raw.n_head, "n_head")?;
        let n_positions = need(raw.n_positions.or(raw.n_ctx), "n_positions")?;
        let vocab_size = need(raw.vocab_size, "vocab_size")?;
        let act_name = raw.activation_function.as_deref().unwrap_or("gelu_new");
        let activation_function = Activation::from_name(act_name).ok_or_else(|| {
            err(format!(
                "activation_function {act_name:?} is not supported \
                 (expected gelu_new, gelu_pytorch_tanh, gelu_fast, gelu, relu, silu, swish or quick_gelu)"
            ))
        })?;
        let config = GPT2Config {
            n_layer,
            n_embd,
            n_head,
            n_positions,
            vocab_size,
            n_inner: raw.n_inner.unwrap_or(4 * n_embd),
            layer_norm_epsilon: raw.layer_norm_epsilon.unwrap_or(1e-5),
            activation_function,
            scale_attn_by_inverse_layer_idx: raw.scale_attn_by_inverse_layer_idx,
            reorder_and_upcast_attn: raw.reorder_and_upcast_attn,
            bos_token_id: raw.bos_token_id.unwrap_or(50256),
            eos_token_id: raw.eos_token_id.unwrap_or(50256),
        };
        config.validate().map_err(err)?;
        Ok(config)
    }

    /// Check that the engine can run this shape.
    pub fn validate(&self) -> std::result::Result<(), String> {
        for (name, v) in [
            ("n_layer", self.n_layer),
            ("n_embd", self.n_embd),
            ("n_head", self.n_head),
            ("n_positions", self.n_positions),
            ("vocab_size", self.vocab_size),
            ("n_inner", self.n_inner),
        ] {
            if v == 0 {
                return Err(format!("{name} is 0; it must be positive"));
            }
        }
        if !self.n_embd.is_multiple_of(self.n_head) {
            return Err(format!(
                "n_embd ({}) is not divisible by n_head ({})",
                self.n_embd, self.n_head
            ));
        }
        if self.vocab_size > u32::MAX as usize {
            return Err(format!(
                "vocab_size {} does not fit in u32 ids",
                self.vocab_size
            ));
        }
        // Every size the engine computes from the shape must fit in a usize (and the sizes it
        // allocates in bytes, so with room for 4-byte floats).
        if self
            .checked_parameter_count()
            .and_then(|p| p.checked_mul(4))
            .is_none()
        {
            return Err(format!(
                "n_layer {}, n_embd {}, n_inner {}, n_positions {}, vocab_size {}: the parameter \
                 count overflows a {}-bit integer",
                self.n_layer,
                self.n_embd,
                self.n_inner,
                self.n_positions,
                self.vocab_size,
                usize::BITS
            ));
        }
        if !(self.layer_norm_epsilon.is_finite() && self.layer_norm_epsilon >= 0.0) {
            return Err(format!(
                "layer_norm_epsilon {} is not a non-negative number",
                self.layer_norm_epsilon
            ));
        }
        Ok(())
    }

    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Parameters as transformers counts them: the tied embedding matrix once. Saturates at
    /// `usize::MAX` for a shape [`validate`](Self::validate) refuses (the fields are public).
    pub fn parameter_count(&self) -> usize {
        self.checked_parameter_count().unwrap_or(usize::MAX)
    }

    /// [`parameter_count`](Self::parameter_count), `None` when it overflows.
    pub fn checked_parameter_count(&self) -> Option<usize> {
        let (c, f) = (self.n_embd, self.n_inner);
        // Sum of products, each checked: a config can ask for 10^9-wide layers.
        let sum = |terms: &[(usize, usize)]| {
            terms
                .iter()
                .try_fold(0usize, |acc, &(a, b)| acc.checked_add(a.checked_mul(b)?))
        };
        let c3 = c.checked_mul(3)?;
        let block = sum(&[
            (4, c),  // ln_1, ln_2
            (c, c3), // c_attn
            (1, c3),
            (c, c), // attn c_proj
            (1, c),
            (c, f), // c_fc
            (1, f),
            (f, c), // mlp c_proj
            (1, c),
        ])?;
        sum(&[
            (self.vocab_size, c),
            (self.n_positions, c),
            (self.n_layer, block),
            (2, c),
        ])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn preset_parameter_counts_match_transformers() {
        // transformers' num_parameters() for the released checkpoints.
        assert_eq!(
            GPT2Config::preset("gpt2").unwrap().parameter_count(),
            124_439_808
        );
        assert_eq!(
            GPT2Config::preset("gpt2-medium").unwrap().parameter_count(),
            354_823_168
        );
        assert_eq!(
            GPT2Config::preset("gpt2-large").unwrap().parameter_count(),
            774_030_080
        );
        assert_eq!(
            GPT2Config::preset("gpt2-xl").unwrap().parameter_count(),
            1_557_611_200
        );
        assert_eq!(
            GPT2Config::preset("distilgpt2").unwrap().parameter_count(),
            81_912_576
        );
    }

    #[test]
    fn refuses_what_it_cannot_run() {
        let base = r#""n_layer":2,"n_embd":64,"n_head":4,"n_positions":32,"vocab_size":100"#;
        let bad = [
            (format!(r#"{{"model_type":"llama",{base}}}"#), "model_type"),
            (
                r#"{"n_layer":2,"n_embd":65,"n_head":4,"n_positions":32,"vocab_size":100}"#.into(),
                "not divisible",
            ),
            (
                format!(r#"{{"activation_function":"tanh",{base}}}"#),
                "activation_function",
            ),
            (r#"{"n_layer":2}"#.into(), "missing field `n_embd`"),
            (
                r#"{"n_layer":1000000,"n_embd":1000000000,"n_head":1,"n_positions":1,"vocab_size":1}"#
                    .into(),
                "parameter count overflows",
            ),
            ("not json".into(), "not a valid config.json"),
        ];
        for (json, want) in bad {
            let e = GPT2Config::from_json(&json, "test.json")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{e:?} should mention {want:?}");
        }
        let ok = GPT2Config::from_json(&format!(r#"{{"n_ctx":16,{base}}}"#), "t").unwrap();
        assert_eq!((ok.n_positions, ok.head_dim(), ok.n_inner), (32, 16, 256));
    }
}
