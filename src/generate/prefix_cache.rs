//! The engine's prefix cache: what each slot of the [`crate::State`] holds (its tokens, and the
//! prompt log-probs computed along them), so that a new request can start from the longest prefix
//! of its prompt that a slot already holds, running or idle, instead of prefilling it again.
//!
//! A slot is reused in place, or its prefix copied into a free slot. Idle slots keep what their
//! last request left, least recently used first out, within a budget of tokens. What is reused
//! is a function of the tokens alone (the CPU forward pass gives each row the same bits however a
//! prompt is batched or chunked), so a request's tokens and log-probs are the same with the cache
//! as without it.

use super::engine::TokenLogprob;

/// A prompt log-prob as computed, with the alternatives it was computed with.
#[derive(Clone)]
pub(crate) struct CachedLp {
    pub lp: TokenLogprob,
    /// Alternatives asked for when it was computed (its `top` has at most this many).
    pub alternatives: usize,
}

impl CachedLp {
    /// This entry as a request with `k` alternatives gets it from a run of its own: a full row's
    /// (rank and alternatives) for `k > 0`, the log-prob alone for `k == 0`. `None` when it was
    /// computed with fewer alternatives.
    fn serve(&self, k: usize) -> Option<TokenLogprob> {
        let lp = &self.lp;
        lp.logprob?;
        if k == 0 {
            return Some(TokenLogprob {
                top: Vec::new(),
                rank: None,
                ..lp.clone()
            });
        }
        if lp.rank.is_none() || self.alternatives < k {
            return None;
        }
        Some(TokenLogprob {
            top: lp.top[..k.min(lp.top.len())].to_vec(),
            ..lp.clone()
        })
    }
}

/// What one slot holds.
#[derive(Default)]
struct Held {
    /// The tokens in the slot's cache, position by position.
    tokens: Vec<u32>,
    /// `lps[p]`: the log-prob of the token at position `p` given the tokens before it, where a
    /// prompt's log-probs were computed (it may run one past `tokens`: a chunk's last row predicts
    /// the next chunk's first token).
    lps: Vec<Option<CachedLp>>,
    /// When a request last ran in it or started from it.
    used: u64,
}

/// Where a request can start: the slot whose prefix it reuses and how many positions of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hit {
    pub slot: usize,
    pub len: usize,
}

pub(crate) struct PrefixCache {
    held: Vec<Held>,
    /// Tokens idle slots may keep.
    budget: usize,
    clock: u64,
}

/// The length of the common prefix of `a` and `b`.
pub(crate) fn common_prefix(a: &[u32], b: &[u32]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

impl PrefixCache {
    pub fn new(slots: usize, budget: usize) -> Self {
        PrefixCache {
            held: (0..slots).map(|_| Held::default()).collect(),
            budget,
            clock: 0,
        }
    }

    /// The longest reusable prefix of `prompt` in any slot: at most all but its last token (whose
    /// row chooses the first generated token, or gives the next log-prob), and with prompt
    /// log-probs of `k` alternatives wanted, only as far as every position's log-prob is held
    /// (then one position less than the tokens shared: the row before a position gives its
    /// log-prob). Ties go to `prefer` (idle slots), then to the most recently used.
    pub fn best(
        &self,
        prompt: &[u32],
        prompt_logprobs: Option<usize>,
        prefer: impl Fn(usize) -> bool,
    ) -> Option<Hit> {
        let mut best: Option<(Hit, bool, u64)> = None;
        for (slot, h) in self.held.iter().enumerate() {
            let len = self.usable(h, prompt, prompt_logprobs);
            if len == 0 {
                continue;
            }
            let key = (len, prefer(slot), h.used);
            if best.is_none_or(|(b, p, u)| key > (b.len, p, u)) {
                best = Some((Hit { slot, len }, key.1, key.2));
            }
        }
        best.map(|b| b.0)
    }

    fn usable(&self, h: &Held, prompt: &[u32], prompt_logprobs: Option<usize>) -> usize {
        let shared = common_prefix(&h.tokens, prompt).min(prompt.len().saturating_sub(1));
        let Some(k) = prompt_logprobs else {
            return shared;
        };
        // Entries 1..=len must be held; entry p holds prompt[p]'s log-prob only if its token is
        // prompt[p] (past the shared tokens it is another token's).
        let mut len = 0;
        while len < shared {
            let p = len + 1;
            match h.lps.get(p).and_then(Option::as_ref) {
                Some(e) if e.lp.token == prompt[p] && e.serve(k).is_some() => len = p,
                _ => break,
            }
        }
        len.min(shared)
    }

    /// The prompt log-probs of positions `1..=len` of `slot`, as a request with `k` alternatives
    /// gets them (`usable` checked that they are held).
    pub fn logprobs(&self, slot: usize, len: usize, k: usize) -> Vec<TokenLogprob> {
        self.held[slot].lps[1..=len]
            .iter()
            .filter_map(|e| e.as_ref().and_then(|e| e.serve(k)))
            .collect()
    }

    pub fn tokens(&self, slot: usize) -> usize {
        self.held[slot].tokens.len()
    }

    /// Slot `dst` now holds the first `len` positions of `src` (copied, or `src` itself cut).
    pub fn copy(&mut self, src: usize, dst: usize, len: usize) {
        let tokens = self.held[src].tokens[..len].to_vec();
        let lps = self.held[src].lps[..(len + 1).min(self.held[src].lps.len())].to_vec();
        let used = self.tick();
        self.held[src].used = used;
        self.held[dst] = Held { tokens, lps, used };
    }

    /// Forget all but the first `len` positions of `slot`.
    pub fn truncate(&mut self, slot: usize, len: usize) {
        let h = &mut self.held[slot];
        h.tokens.truncate(len);
        // An entry past the tokens depends only on them and names its own token.
        h.lps.truncate(len + 1);
    }

    /// Tokens ran into `slot`'s cache.
    pub fn extend(&mut self, slot: usize, tokens: &[u32]) {
        self.held[slot].tokens.extend_from_slice(tokens);
    }

    /// A prompt log-prob computed for position `p` of `slot`.
    pub fn set_logprob(&mut self, slot: usize, p: usize, lp: &TokenLogprob, alternatives: usize) {
        let lps = &mut self.held[slot].lps;
        if lps.len() <= p {
            lps.resize(p + 1, None);
        }
        lps[p] = Some(CachedLp {
            lp: lp.clone(),
            alternatives,
        });
    }

    /// A request ran in `slot` (now, or it just left).
    pub fn touch(&mut self, slot: usize) {
        self.held[slot].used = self.tick();
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// The idle slot to give a new request when none holds its prefix: an empty one, else the
    /// least recently used (not `keep`).
    pub fn victim(&self, idle: &[usize], keep: Option<usize>) -> Option<usize> {
        idle.iter()
            .copied()
            .filter(|&s| Some(s) != keep)
            .min_by_key(|&s| (!self.held[s].tokens.is_empty(), self.held[s].used))
    }

    /// Idle slots to empty, least recently used first, until they hold at most the budget.
    pub fn over_budget(&self, idle: &[usize]) -> Vec<usize> {
        let mut held: usize = idle.iter().map(|&s| self.held[s].tokens.len()).sum();
        let mut order: Vec<usize> = idle
            .iter()
            .copied()
            .filter(|&s| !self.held[s].tokens.is_empty())
            .collect();
        order.sort_by_key(|&s| self.held[s].used);
        let mut out = Vec::new();
        for s in order {
            if held <= self.budget {
                break;
            }
            held -= self.held[s].tokens.len();
            out.push(s);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lp(token: u32, rank: Option<u32>, top: usize) -> TokenLogprob {
        TokenLogprob {
            token,
            logprob: Some(-(token as f32)),
            top: (0..top as u32).map(|t| (t, -1.0 - t as f32)).collect(),
            rank,
        }
    }

    #[test]
    fn the_longest_prefix_wins_but_never_the_whole_prompt() {
        let mut c = PrefixCache::new(3, 100);
        c.extend(0, &[1, 2, 3]);
        c.extend(1, &[1, 2, 3, 4, 5, 6]);
        c.touch(1);
        assert_eq!(
            c.best(&[1, 2, 3, 4, 9], None, |_| false),
            Some(Hit { slot: 1, len: 4 })
        );
        // All but the last prompt token.
        assert_eq!(
            c.best(&[1, 2, 3, 4], None, |_| false),
            Some(Hit { slot: 1, len: 3 })
        );
        // Equal lengths: the preferred slot, then the most recent.
        assert_eq!(
            c.best(&[1, 2, 7], None, |s| s == 0),
            Some(Hit { slot: 0, len: 2 })
        );
        assert_eq!(
            c.best(&[1, 2, 7], None, |_| false),
            Some(Hit { slot: 1, len: 2 })
        );
        assert_eq!(c.best(&[5, 2, 7], None, |_| true), None);
    }

    #[test]
    fn prompt_logprobs_are_reused_only_as_computed() {
        let mut c = PrefixCache::new(2, 100);
        c.extend(0, &[10, 11, 12, 13, 14]);
        for p in 1..5 {
            c.set_logprob(0, p, &lp(10 + p as u32, Some(1), 2), 2);
        }
        // Logprobs wanted: one position less than the shared tokens.
        assert_eq!(
            c.best(&[10, 11, 12, 99], Some(1), |_| false),
            Some(Hit { slot: 0, len: 2 })
        );
        assert_eq!(
            c.best(&[10, 11, 12, 99], None, |_| false),
            Some(Hit { slot: 0, len: 3 })
        );
        // More alternatives than were computed: nothing to reuse.
        assert_eq!(c.best(&[10, 11, 12, 99], Some(3), |_| false), None);
        let got = c.logprobs(0, 2, 1);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].top.len(), 1);
        assert_eq!(got[1].token, 12);
        // The log-prob alone, from any entry.
        assert_eq!(c.logprobs(0, 2, 0)[0].rank, None);
        // A hole (a generated token's position) stops the reuse there.
        c.extend(1, &[10, 11, 12, 13]);
        c.set_logprob(1, 1, &lp(11, None, 0), 0);
        c.set_logprob(1, 3, &lp(13, None, 0), 0);
        c.truncate(0, 0);
        assert_eq!(
            c.best(&[10, 11, 12, 13, 1], Some(0), |_| false),
            Some(Hit { slot: 1, len: 1 })
        );
    }

    #[test]
    fn idle_slots_go_least_recently_used_first() {
        let mut c = PrefixCache::new(4, 5);
        c.extend(0, &[1, 2, 3]);
        c.touch(0);
        c.extend(1, &[4, 5, 6]);
        c.touch(1);
        c.extend(2, &[7]);
        c.touch(2);
        assert_eq!(c.victim(&[0, 1, 2, 3], None), Some(3));
        assert_eq!(c.victim(&[0, 1, 2], None), Some(0));
        assert_eq!(c.victim(&[0, 1, 2], Some(0)), Some(1));
        assert_eq!(c.over_budget(&[0, 1, 2]), vec![0]);
        assert_eq!(c.over_budget(&[1, 2]), Vec::<usize>::new());
    }
}
