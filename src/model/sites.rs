//! Named activation sites: where a forward pass can be read ("captured") or have a value replaced
//! ("patched"), under TransformerLens's names for GPT-2, with the values transformers computes
//! from the checkpoint's own weights (TransformerLens's `from_pretrained_no_processing`).
//!
//! | site | shape (one sequence of `T` tokens) |
//! |---|---|
//! | `hook_embed`, `hook_pos_embed` | `(T, n_embd)` |
//! | `blocks.L.hook_resid_pre`, `.hook_resid_mid`, `.hook_resid_post` | `(T, n_embd)` |
//! | `blocks.L.ln1.hook_normalized`, `blocks.L.ln2.hook_normalized` | `(T, n_embd)` |
//! | `blocks.L.attn.hook_q`, `hook_k`, `hook_v`, `hook_z` | `(T, n_head, d_head)` |
//! | `blocks.L.attn.hook_attn_scores`, `hook_pattern` | `(n_head, T, T)` |
//! | `blocks.L.hook_attn_out`, `blocks.L.hook_mlp_out` | `(T, n_embd)` |
//! | `blocks.L.mlp.hook_pre`, `blocks.L.mlp.hook_post` | `(T, d_mlp)` |
//! | `ln_final.hook_normalized` | `(T, n_embd)` |
//!
//! Attention scores are scaled and causally masked (−∞ above the diagonal), as TransformerLens
//! gives them; the pattern is their softmax.

use std::fmt;

use crate::config::GPT2Config;
use crate::error::{Error, Result};

/// A named activation site.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Site {
    /// `hook_embed`: the token embeddings.
    Embed,
    /// `hook_pos_embed`: the position embeddings.
    PosEmbed,
    /// A site inside block `layer`.
    Block(usize, BlockSite),
    /// `ln_final.hook_normalized`: the final hidden states (after `ln_f`).
    LnFinal,
}

/// The sites of one block, in the order a forward pass reaches them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum BlockSite {
    ResidPre,
    Ln1,
    Q,
    K,
    V,
    AttnScores,
    Pattern,
    Z,
    AttnOut,
    ResidMid,
    Ln2,
    MlpPre,
    MlpPost,
    MlpOut,
    ResidPost,
}

impl BlockSite {
    const ALL: [BlockSite; 15] = [
        BlockSite::ResidPre,
        BlockSite::Ln1,
        BlockSite::Q,
        BlockSite::K,
        BlockSite::V,
        BlockSite::AttnScores,
        BlockSite::Pattern,
        BlockSite::Z,
        BlockSite::AttnOut,
        BlockSite::ResidMid,
        BlockSite::Ln2,
        BlockSite::MlpPre,
        BlockSite::MlpPost,
        BlockSite::MlpOut,
        BlockSite::ResidPost,
    ];

    fn suffix(self) -> &'static str {
        match self {
            BlockSite::ResidPre => "hook_resid_pre",
            BlockSite::Ln1 => "ln1.hook_normalized",
            BlockSite::Q => "attn.hook_q",
            BlockSite::K => "attn.hook_k",
            BlockSite::V => "attn.hook_v",
            BlockSite::AttnScores => "attn.hook_attn_scores",
            BlockSite::Pattern => "attn.hook_pattern",
            BlockSite::Z => "attn.hook_z",
            BlockSite::AttnOut => "hook_attn_out",
            BlockSite::ResidMid => "hook_resid_mid",
            BlockSite::Ln2 => "ln2.hook_normalized",
            BlockSite::MlpPre => "mlp.hook_pre",
            BlockSite::MlpPost => "mlp.hook_post",
            BlockSite::MlpOut => "hook_mlp_out",
            BlockSite::ResidPost => "hook_resid_post",
        }
    }
}

impl fmt::Display for Site {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Site::Embed => f.write_str("hook_embed"),
            Site::PosEmbed => f.write_str("hook_pos_embed"),
            Site::Block(l, s) => write!(f, "blocks.{l}.{}", s.suffix()),
            Site::LnFinal => f.write_str("ln_final.hook_normalized"),
        }
    }
}

/// How a site's values are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Layout {
    /// One row per token, this wide: `(T, width)` (heads side by side for q, k, v, z).
    Rows(usize),
    /// `(n_head, T, T)`, per sequence.
    Heads,
}

impl Site {
    /// Every site of a model with `n_layer` blocks, in the order a forward pass reaches them.
    pub fn all(n_layer: usize) -> Vec<Site> {
        let mut v = vec![Site::Embed, Site::PosEmbed];
        for l in 0..n_layer {
            v.extend(BlockSite::ALL.iter().map(|&s| Site::Block(l, s)));
        }
        v.push(Site::LnFinal);
        v
    }

    /// The block a site is in (`None` for the embeddings and the final norm).
    pub fn layer(&self) -> Option<usize> {
        match *self {
            Site::Block(l, _) => Some(l),
            _ => None,
        }
    }

    /// A site by its name (`blocks.3.attn.hook_z`), checked against `config`'s layers.
    pub fn parse(name: &str, config: &GPT2Config) -> Result<Site> {
        let unknown = || {
            Error::Input(format!(
                "no activation site {name:?}; sites are hook_embed, hook_pos_embed, blocks.L.<{}> for L in 0..{}, and ln_final.hook_normalized",
                BlockSite::ALL.map(BlockSite::suffix).join("|"),
                config.n_layer
            ))
        };
        let site = match name {
            "hook_embed" => Site::Embed,
            "hook_pos_embed" => Site::PosEmbed,
            "ln_final.hook_normalized" => Site::LnFinal,
            _ => {
                let rest = name.strip_prefix("blocks.").ok_or_else(unknown)?;
                let (l, suffix) = rest.split_once('.').ok_or_else(unknown)?;
                let l: usize = l.parse().map_err(|_| unknown())?;
                let s = BlockSite::ALL
                    .into_iter()
                    .find(|s| s.suffix() == suffix)
                    .ok_or_else(unknown)?;
                if l >= config.n_layer {
                    return Err(Error::Input(format!(
                        "activation site {name:?}: this model has blocks 0 to {}",
                        config.n_layer - 1
                    )));
                }
                Site::Block(l, s)
            }
        };
        Ok(site)
    }

    /// The sites that names or glob patterns select (`*` any run of characters, `?` one
    /// character: `blocks.*.hook_resid_post`), each once, in forward order. A pattern that selects
    /// nothing is an error naming it.
    pub fn select<S: AsRef<str>>(patterns: &[S], config: &GPT2Config) -> Result<Vec<Site>> {
        let all = Site::all(config.n_layer);
        let mut picked = vec![false; all.len()];
        for p in patterns {
            let p = p.as_ref();
            if !p.contains(['*', '?']) {
                let s = Site::parse(p, config)?;
                let i = all
                    .iter()
                    .position(|a| *a == s)
                    .expect("parsed sites exist");
                picked[i] = true;
                continue;
            }
            let mut any = false;
            for (i, s) in all.iter().enumerate() {
                if glob(p.as_bytes(), s.to_string().as_bytes()) {
                    picked[i] = true;
                    any = true;
                }
            }
            if !any {
                return Err(Error::Input(format!(
                    "the pattern {p:?} selects no activation site (e.g. blocks.*.hook_resid_post)"
                )));
            }
        }
        Ok(all
            .into_iter()
            .zip(picked)
            .filter_map(|(s, p)| p.then_some(s))
            .collect())
    }

    /// Whether the site holds a row per token (all but the attention scores and pattern, which are
    /// `(n_head, T, T)`).
    pub fn per_token(&self) -> bool {
        !matches!(
            self,
            Site::Block(_, BlockSite::AttnScores | BlockSite::Pattern)
        )
    }

    pub(crate) fn layout(&self, config: &GPT2Config) -> Layout {
        match self {
            Site::Block(_, BlockSite::AttnScores | BlockSite::Pattern) => Layout::Heads,
            Site::Block(_, BlockSite::MlpPre | BlockSite::MlpPost) => Layout::Rows(config.n_inner),
            _ => Layout::Rows(config.n_embd),
        }
    }

    /// The site's shape for one sequence of `tokens` tokens (see the module's table).
    pub fn shape(&self, config: &GPT2Config, tokens: usize) -> Vec<usize> {
        let (h, d) = (config.n_head, config.head_dim());
        match self {
            Site::Block(_, BlockSite::Q | BlockSite::K | BlockSite::V | BlockSite::Z) => {
                vec![tokens, h, d]
            }
            _ => match self.layout(config) {
                Layout::Rows(w) => vec![tokens, w],
                Layout::Heads => vec![h, tokens, tokens],
            },
        }
    }

    /// Values in the site's shape for one sequence of `tokens` tokens.
    pub fn len(&self, config: &GPT2Config, tokens: usize) -> usize {
        self.shape(config, tokens).iter().product()
    }
}

/// Whether `name` matches the glob `pat` (`*`: any run, `?`: one byte).
fn glob(pat: &[u8], name: &[u8]) -> bool {
    let (mut p, mut n) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while n < name.len() {
        if p < pat.len() && (pat[p] == b'?' || pat[p] == name[n]) {
            p += 1;
            n += 1;
        } else if p < pat.len() && pat[p] == b'*' {
            star = Some(p);
            mark = n;
            p += 1;
        } else if let Some(s) = star {
            p = s + 1;
            mark += 1;
            n = mark;
        } else {
            return false;
        }
    }
    pat[p..].iter().all(|&c| c == b'*')
}

/// A site's value replaced for one sequence: `value` in the site's shape.
#[derive(Debug, Clone, Copy)]
pub struct Patch<'a> {
    pub site: Site,
    pub value: &'a [f32],
}

/// One sequence's input to [`crate::Model::run_with_hooks`]: its tokens and the sites to replace.
#[derive(Debug, Clone, Copy)]
pub struct Hooked<'a> {
    pub ids: &'a [u32],
    pub patches: &'a [Patch<'a>],
}

/// A captured site: the site, its shape, its values (row-major).
pub type Captured = (Site, Vec<usize>, Vec<f32>);

/// What [`crate::Model::run_with_hooks`] gives back for one sequence.
#[derive(Debug, Clone, Default)]
pub struct Activations {
    /// `(T, vocab_size)` when logits were asked for.
    pub logits: Option<Vec<f32>>,
    /// Each captured site with its shape and values (row-major), in the order asked.
    pub sites: Vec<Captured>,
}

impl Activations {
    /// A captured site's shape and values.
    pub fn get(&self, site: Site) -> Option<(&[usize], &[f32])> {
        self.sites
            .iter()
            .find(|(s, _, _)| *s == site)
            .map(|(_, shape, v)| (shape.as_slice(), v.as_slice()))
    }
}

/// A checked hooked run over a batch: which sites each pass captures and patches, how far it must
/// go, and where the captured values go (each sequence's own buffers, written once).
pub(crate) struct HookPlan<'a> {
    /// The sites captured, each once, in the order asked.
    pub(crate) capture: Vec<Site>,
    /// `patches[i]`: sequence i's replacements.
    pub(crate) patches: Vec<&'a [Patch<'a>]>,
    /// Blocks to run: past the last one a capture or the logits need, nothing is computed.
    pub(crate) layers: usize,
    /// Whether `ln_f` runs (for the logits or `ln_final.hook_normalized`).
    pub(crate) final_norm: bool,
    /// `out[seq]`: sequence seq's captured values, a buffer per site in `capture`'s order, or with
    /// [`Captures::Stacked`] one buffer holding them all one after another.
    out: Vec<Vec<Vec<f32>>>,
    /// `at[seq][i]`: where `capture[i]` lies in `out[seq]`: (buffer, offset, length).
    at: Vec<Vec<(usize, usize, usize)>>,
}

/// How a hooked run hands each sequence's captured sites back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Captures {
    /// A buffer per site ([`Activations::sites`]).
    PerSite,
    /// One buffer per sequence, the sites one after another.
    Stacked,
}

impl<'a> HookPlan<'a> {
    /// Check a batch's sites and patches against `config`.
    pub(crate) fn new(
        config: &GPT2Config,
        seqs: &[Hooked<'a>],
        capture: &[Site],
        logits: bool,
    ) -> Result<Self> {
        for &s in capture {
            check_layer(s, config)?;
        }
        let mut deepest: Option<usize> = None;
        let mut final_norm = logits;
        for &s in capture {
            match s {
                Site::LnFinal => final_norm = true,
                Site::Block(l, _) => deepest = Some(deepest.map_or(l, |d| d.max(l))),
                _ => {}
            }
        }
        for (i, q) in seqs.iter().enumerate() {
            for (j, p) in q.patches.iter().enumerate() {
                check_layer(p.site, config)?;
                if q.patches[..j].iter().any(|o| o.site == p.site) {
                    return Err(Error::Input(format!(
                        "sequence {i}: {} is patched twice",
                        p.site
                    )));
                }
                let want = p.site.len(config, q.ids.len());
                if p.value.len() != want {
                    return Err(Error::Input(format!(
                        "sequence {i}: the patch of {} has {} values; its shape {:?} holds {want}",
                        p.site,
                        p.value.len(),
                        p.site.shape(config, q.ids.len())
                    )));
                }
            }
        }
        let layers = if final_norm {
            config.n_layer
        } else {
            deepest.map_or(0, |d| d + 1)
        };
        let mut unique: Vec<Site> = Vec::with_capacity(capture.len());
        for &s in capture {
            if !unique.contains(&s) {
                unique.push(s);
            }
        }
        Ok(HookPlan {
            capture: unique,
            patches: seqs.iter().map(|q| q.patches).collect(),
            layers,
            final_norm,
            out: Vec::new(),
            at: Vec::new(),
        })
    }

    /// Whether the pass stops at `site`: it is captured or patched by some sequence.
    pub(crate) fn touches(&self, site: Site) -> bool {
        self.capture.contains(&site)
            || self
                .patches
                .iter()
                .any(|p| p.iter().any(|p| p.site == site))
    }

    /// Sequence `seq`'s replacement of `site`, if any.
    pub(crate) fn patch(&self, seq: usize, site: Site) -> Option<&'a [f32]> {
        self.patches[seq]
            .iter()
            .find(|p| p.site == site)
            .map(|p| p.value)
    }

    /// Make the buffers for sequences of `lens` tokens, laid out as `captures` says; `lens` must
    /// be checked against the context first (a head site's values grow as T²).
    pub(crate) fn allocate(&mut self, config: &GPT2Config, lens: &[usize], captures: Captures) {
        // Zeroed buffers cost nothing until written: a large one is fresh mapped memory.
        (self.out, self.at) = (
            Vec::with_capacity(lens.len()),
            Vec::with_capacity(lens.len()),
        );
        for &t in lens {
            let sizes = self.capture.iter().map(|s| s.len(config, t));
            match captures {
                Captures::PerSite => {
                    self.at
                        .push(sizes.clone().enumerate().map(|(i, n)| (i, 0, n)).collect());
                    self.out.push(sizes.map(|n| vec![0.0; n]).collect());
                }
                Captures::Stacked => {
                    let mut off = 0;
                    self.at.push(
                        sizes
                            .map(|n| {
                                off += n;
                                (0, off - n, n)
                            })
                            .collect(),
                    );
                    self.out.push(vec![vec![0.0; off]]);
                }
            }
        }
    }

    /// Where sequence `seq`'s value of `site` goes, if `site` is captured.
    pub(crate) fn dest(&mut self, seq: usize, site: Site) -> Option<&mut [f32]> {
        let i = self.capture.iter().position(|&s| s == site)?;
        let (b, off, n) = self.at[seq][i];
        Some(&mut self.out[seq][b][off..off + n])
    }

    /// Store `site`'s values for the whole batch, stacked (each sequence's after the one before).
    pub(crate) fn store(&mut self, site: Site, values: &[f32]) {
        let mut at = 0;
        for seq in 0..self.out.len() {
            if let Some(d) = self.dest(seq, site) {
                d.copy_from_slice(&values[at..at + d.len()]);
                at += d.len();
            }
        }
    }

    /// Each sequence's captured sites with their shapes ([`Captures::PerSite`]).
    pub(crate) fn into_sites(self, config: &GPT2Config, lens: &[usize]) -> Vec<Vec<Captured>> {
        self.out
            .into_iter()
            .zip(lens)
            .map(|(bufs, &t)| {
                self.capture
                    .iter()
                    .zip(bufs)
                    .map(|(&site, v)| (site, site.shape(config, t), v))
                    .collect()
            })
            .collect()
    }

    /// Each sequence's one buffer ([`Captures::Stacked`]).
    pub(crate) fn into_stacked(self) -> Vec<Vec<f32>> {
        self.out
            .into_iter()
            .map(|mut bufs| bufs.pop().unwrap_or_default())
            .collect()
    }
}

fn check_layer(s: Site, config: &GPT2Config) -> Result<()> {
    match s.layer() {
        Some(l) if l >= config.n_layer => Err(Error::Input(format!(
            "activation site {s}: this model has blocks 0 to {}",
            config.n_layer - 1
        ))),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> GPT2Config {
        GPT2Config {
            n_layer: 3,
            ..GPT2Config::preset("gpt2").unwrap()
        }
    }

    #[test]
    fn names_round_trip() {
        let c = config();
        let all = Site::all(c.n_layer);
        assert_eq!(all.len(), 2 + 15 * 3 + 1);
        for s in all {
            assert_eq!(Site::parse(&s.to_string(), &c).unwrap(), s);
        }
        assert!(Site::parse("blocks.3.hook_resid_post", &c).is_err());
        assert!(Site::parse("blocks.x.hook_resid_post", &c).is_err());
        assert!(Site::parse("hook_nothing", &c).is_err());
    }

    #[test]
    fn patterns_select_in_forward_order() {
        let c = config();
        let s = Site::select(&["blocks.*.hook_resid_post", "hook_embed"], &c).unwrap();
        assert_eq!(
            s,
            vec![
                Site::Embed,
                Site::Block(0, BlockSite::ResidPost),
                Site::Block(1, BlockSite::ResidPost),
                Site::Block(2, BlockSite::ResidPost),
            ]
        );
        let s = Site::select(&["blocks.1.attn.hook_?"], &c).unwrap();
        assert_eq!(s.len(), 4); // q, k, v, z
        assert!(Site::select(&["blocks.*.nothing"], &c).is_err());
        assert_eq!(Site::select(&["*"], &c).unwrap().len(), 48);
    }

    #[test]
    fn shapes() {
        let c = config();
        let z = Site::Block(0, BlockSite::Z);
        assert_eq!(z.shape(&c, 5), vec![5, 12, 64]);
        let p = Site::Block(0, BlockSite::Pattern);
        assert_eq!(p.shape(&c, 5), vec![12, 5, 5]);
        let m = Site::Block(0, BlockSite::MlpPost);
        assert_eq!(m.shape(&c, 5), vec![5, 3072]);
    }
}
