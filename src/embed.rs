//! Text embeddings from GPT-2: the final hidden state (after `ln_f`, `ln_final.hook_normalized`)
//! pooled over a text's positions, unit length by default as OpenAI's embeddings are. What the
//! server's `/v1/embeddings`, `gpt2 embed` and Python's `Model.embed` return.

use crate::backend::Model;
use crate::error::{Error, Result};
use crate::model::{Hooked, Site};

/// How a text's hidden states become one vector.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pooling {
    /// The mean over every position.
    #[default]
    Mean,
    /// The last position's (it has seen the whole text).
    Last,
}

impl Pooling {
    /// `"mean"` or `"last"`.
    pub fn parse(s: &str) -> Result<Pooling> {
        match s {
            "mean" => Ok(Pooling::Mean),
            "last" => Ok(Pooling::Last),
            _ => Err(Error::Input(format!(
                "pooling {s:?}; expected \"mean\" or \"last\""
            ))),
        }
    }
}

/// Positions run per forward pass: texts are batched up to this many tokens (at least one text).
pub(crate) const BATCH_POSITIONS: usize = 2048;

/// One embedding (`n_embd` values) per text, each text run as alone (the same bits in any batch);
/// texts must have 1 to `n_positions` tokens.
pub fn embed(
    model: &Model,
    texts: &[Vec<u32>],
    pooling: Pooling,
    normalize: bool,
) -> Result<Vec<Vec<f32>>> {
    let c = model.config();
    for (i, t) in texts.iter().enumerate() {
        if t.is_empty() || t.len() > c.n_positions {
            return Err(Error::Input(format!(
                "text {i} has {} tokens; expected 1 to the context of {}",
                t.len(),
                c.n_positions
            )));
        }
    }
    let mut out = Vec::with_capacity(texts.len());
    let (mut i, mut state) = (0, None);
    while i < texts.len() {
        let (mut j, mut positions) = (i + 1, texts[i].len());
        while j < texts.len() && positions + texts[j].len() <= BATCH_POSITIONS {
            positions += texts[j].len();
            j += 1;
        }
        let batch: Vec<Hooked> = texts[i..j]
            .iter()
            .map(|ids| Hooked { ids, patches: &[] })
            .collect();
        for a in model.run_with_hooks_reusing(&mut state, &batch, &[Site::LnFinal], false)? {
            let (_, h) = a.get(Site::LnFinal).expect("ln_final was captured");
            out.push(pool(h, c.n_embd, pooling, normalize));
        }
        i = j;
    }
    Ok(out)
}

/// Pool hidden states `(T, n_embd)` into one vector (summed in f64).
fn pool(h: &[f32], n_embd: usize, pooling: Pooling, normalize: bool) -> Vec<f32> {
    let t = h.len() / n_embd;
    let mut e = vec![0f64; n_embd];
    match pooling {
        Pooling::Last => {
            for (o, x) in e.iter_mut().zip(&h[(t - 1) * n_embd..]) {
                *o = *x as f64;
            }
        }
        Pooling::Mean => {
            for row in h.chunks_exact(n_embd) {
                for (o, x) in e.iter_mut().zip(row) {
                    *o += *x as f64;
                }
            }
            e.iter_mut().for_each(|o| *o /= t as f64);
        }
    }
    if normalize {
        let norm = e.iter().map(|x| x * x).sum::<f64>().sqrt();
        if norm > 0.0 {
            e.iter_mut().for_each(|o| *o /= norm);
        }
    }
    e.into_iter().map(|x| x as f32).collect()
}
