//! What a forward pass takes: new tokens for some sequences of a state, checked once for every
//! backend before anything is touched.

use crate::error::{Error, Result};

/// New tokens for one sequence of a batch, continuing the state's slot `slot`.
#[derive(Debug, Clone, Copy)]
pub struct SeqInput<'a> {
    pub slot: usize,
    pub tokens: &'a [u32],
}

/// Which rows get logits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Logits {
    /// The last new token of each sequence (what decoding needs).
    Last,
    /// Every new token (what scoring needs).
    All,
}

/// Which of one sequence's new tokens get logits: llama.cpp's per-token `logits` flags, said per
/// sequence of a batch, so that one request's needs do not set another's work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rows<'t> {
    /// None: a prompt chunk that only fills the cache.
    None,
    /// The last new token's logits (what decoding needs).
    Last,
    /// Every new token's logits (prompt log-probs with alternatives).
    All,
    /// No logits: for each new token, the log-probability of the token given here (one entry per
    /// new token, `None` where none is wanted), reduced as the unembedding computes it.
    Targets(&'t [Option<u32>]),
}

impl Rows<'_> {
    /// Rows of logits a sequence of `n` new tokens gets.
    pub fn count(self, n: usize) -> usize {
        match self {
            Rows::None | Rows::Targets(_) => 0,
            Rows::Last => n.min(1),
            Rows::All => n,
        }
    }
}

/// A batch that [`check`] accepted: its slots exist and are distinct, each sequence brings at least
/// one token, every id is in the vocabulary and every sequence fits its slot. Backends rely on this
/// (the CPU's attention tasks write each slot's cache region without locks), so only `check`
/// makes one.
#[derive(Clone, Copy)]
pub(crate) struct Checked<'b, 'a>(&'b [SeqInput<'a>]);

impl<'b, 'a> Checked<'b, 'a> {
    pub(crate) fn seqs(&self) -> &'b [SeqInput<'a>] {
        self.0
    }

    /// New tokens in the whole batch.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn rows(&self) -> usize {
        self.0.iter().map(|s| s.tokens.len()).sum()
    }

    /// The batch's row indices (new tokens, in batch order) that `rows` (sequence index → its
    /// selection) selects, ascending; allocates nothing.
    pub(crate) fn selected<'r, F: Fn(usize) -> Rows<'r>>(
        &self,
        rows: F,
    ) -> impl Iterator<Item = usize> + use<'b, 'a, 'r, F> {
        let mut start = 0;
        self.0.iter().enumerate().flat_map(move |(i, s)| {
            let n = s.tokens.len();
            let first = start;
            start += n;
            match rows(i) {
                Rows::None | Rows::Targets(_) => first..first,
                Rows::Last => first + n - 1..first + n,
                Rows::All => first..first + n,
            }
        })
    }

    /// The same tokens as consecutive batches of at most `max_rows` rows, in order: a sequence's
    /// tokens continue in the next chunk where one fills up. Each chunk is valid as this batch is
    /// (its slots are this batch's, once each, and each continues where the last chunk left it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn for_each_chunk(
        &self,
        max_rows: usize,
        f: &mut dyn FnMut(Checked<'_, 'a>) -> Result<()>,
    ) -> Result<()> {
        assert!(max_rows > 0);
        let mut chunk: Vec<SeqInput<'a>> = Vec::new();
        let mut rows = 0;
        for s in self.0 {
            let mut tokens = s.tokens;
            while !tokens.is_empty() {
                let take = (max_rows - rows).min(tokens.len());
                chunk.push(SeqInput {
                    slot: s.slot,
                    tokens: &tokens[..take],
                });
                tokens = &tokens[take..];
                rows += take;
                if rows == max_rows {
                    f(Checked(&chunk))?;
                    chunk.clear();
                    rows = 0;
                }
            }
        }
        if !chunk.is_empty() {
            f(Checked(&chunk))?;
        }
        Ok(())
    }
}

/// Check a batch against a state of `slots` slots of `capacity` positions, `len(slot)` of them
/// used, and a vocabulary of `vocab` tokens.
pub(crate) fn check<'b, 'a>(
    batch: &'b [SeqInput<'a>],
    vocab: usize,
    slots: usize,
    capacity: usize,
    len: impl Fn(usize) -> usize,
) -> Result<Checked<'b, 'a>> {
    for (i, s) in batch.iter().enumerate() {
        if s.slot >= slots {
            return Err(Error::Input(format!(
                "batch entry {i}: slot {} does not exist (the state has {slots} slots)",
                s.slot
            )));
        }
        // Quadratic, but batches are small and this allocates nothing per token.
        if batch[..i].iter().any(|o| o.slot == s.slot) {
            return Err(Error::Input(format!(
                "batch entry {i}: slot {} appears twice",
                s.slot
            )));
        }
        if s.tokens.is_empty() {
            return Err(Error::Input(format!("batch entry {i}: no tokens")));
        }
        if let Some(&t) = s.tokens.iter().find(|&&t| t as usize >= vocab) {
            return Err(Error::Input(format!(
                "token id {t} is out of range: the vocabulary has {vocab} tokens"
            )));
        }
        let cached = len(s.slot);
        let end = cached + s.tokens.len();
        if end > capacity {
            return Err(Error::Input(format!(
                "sequence of {end} tokens does not fit the context of {capacity} positions{}",
                if cached > 0 {
                    format!(" ({cached} cached + {} new)", s.tokens.len())
                } else {
                    String::new()
                }
            )));
        }
    }
    Ok(Checked(batch))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_batches_are_refused_with_their_reason() {
        let t = [1u32, 2];
        let seq = |slot, tokens| SeqInput { slot, tokens };
        let err =
            |b: &[SeqInput], len: usize| check(b, 10, 2, 4, |_| len).err().map(|e| e.to_string());
        assert!(err(&[seq(0, &t), seq(1, &t)], 0).is_none());
        assert!(err(&[], 0).is_none());
        assert!(err(&[seq(2, &t)], 0).unwrap().contains("does not exist"));
        assert!(err(&[seq(0, &t), seq(0, &t)], 0).unwrap().contains("twice"));
        assert!(err(&[seq(0, &[])], 0).unwrap().contains("no tokens"));
        assert!(err(&[seq(0, &[10])], 0).unwrap().contains("out of range"));
        assert!(err(&[seq(0, &t)], 3).unwrap().contains("3 cached + 2 new"));
    }

    #[test]
    fn chunks_keep_each_sequence_in_order_and_its_slot_once() {
        let (a, b) = ([1u32, 2, 3, 4, 5], [6u32, 7, 8]);
        let batch = [
            SeqInput {
                slot: 1,
                tokens: &a,
            },
            SeqInput {
                slot: 0,
                tokens: &b,
            },
        ];
        let checked = check(&batch, 10, 2, 8, |_| 0).unwrap();
        let mut seen = vec![];
        checked
            .for_each_chunk(3, &mut |c| {
                assert!(c.rows() <= 3);
                seen.push(
                    c.seqs()
                        .iter()
                        .map(|s| (s.slot, s.tokens.to_vec()))
                        .collect::<Vec<_>>(),
                );
                Ok(())
            })
            .unwrap();
        assert_eq!(
            seen,
            [
                vec![(1, vec![1, 2, 3])],
                vec![(1, vec![4, 5]), (0, vec![6])],
                vec![(0, vec![7, 8])]
            ]
        );
    }
}
