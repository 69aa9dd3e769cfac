//! Structured output: sampling constrained to a JSON schema, a regular expression, a choice of
//! strings or a Lark grammar, by [llguidance](https://github.com/guidance-ai/llguidance) (what
//! llama.cpp and vLLM use).
//!
//! [`Grammars`] holds llguidance's token trie over one tokenizer's vocabulary (built once: tens of
//! milliseconds for GPT-2's 50257 tokens) and compiles a [`ConstraintSpec`] into a [`Constraint`],
//! which a [`super::GenerationConfig`] carries. Each [`super::Sequence`] runs its own copy: before
//! every token it sets the logits of the tokens the constraint does not allow to −∞ (before the
//! sampling processors, as vLLM applies its grammar bitmask; the log-probs reported stay the raw
//! model's), and once the constraint can take nothing more the sequence finishes with
//! [`super::FinishReason::Stop`]. The end-of-sequence token is allowed exactly when the constraint
//! accepts what came so far.
//!
//! The mask allows every token whose bytes can continue the constrained text: llguidance is told
//! the tokenization is not canonical, so it never forces its own tokenization of a fixed part. A
//! token that already satisfies the constraint is therefore never changed (greedy constrained
//! decoding equals greedy unconstrained decoding wherever the latter stays inside the constraint).
//!
//! Without the `constrain` feature (the bare library) the types exist but [`Grammars::new`]
//! refuses, so no [`Constraint`] can be made.

use serde_json::Value;

use crate::error::{Error, Result};
use crate::tokenizer::Tokenizer;

/// Whitespace allowed between JSON tokens unless the schema says otherwise (llguidance's
/// `x-guidance.whitespace_pattern`, vLLM's `guided_whitespace_pattern`): pretty-printed JSON fits,
/// but a model cannot loop on whitespace forever (llama.cpp bounds it likewise).
pub const JSON_WHITESPACE: &str = r"[\x20\x0A\x0D\x09]{1,20}";

/// What output a constraint asks for, as a request gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum ConstraintSpec {
    /// Any JSON object (OpenAI's `response_format: {"type": "json_object"}`).
    JsonObject,
    /// JSON valid under this schema (llguidance's subset of JSON Schema).
    JsonSchema(Value),
    /// Text matching this regular expression (Rust `regex` syntax), whole.
    Regex(String),
    /// Exactly one of these strings.
    Choice(Vec<String>),
    /// Text of this grammar, in llguidance's Lark syntax.
    Grammar(String),
}

impl ConstraintSpec {
    /// A JSON schema given as JSON text.
    pub fn json_schema_text(text: &str) -> Result<ConstraintSpec> {
        serde_json::from_str(text)
            .map(ConstraintSpec::JsonSchema)
            .map_err(|e| Error::Input(format!("the JSON schema is not valid JSON: {e}")))
    }

    /// What kind of constraint this is, for messages.
    pub fn kind(&self) -> &'static str {
        match self {
            ConstraintSpec::JsonObject => "JSON object",
            ConstraintSpec::JsonSchema(_) => "JSON schema",
            ConstraintSpec::Regex(_) => "regex",
            ConstraintSpec::Choice(_) => "choice",
            ConstraintSpec::Grammar(_) => "grammar",
        }
    }

    /// `schema` with llguidance's whitespace between JSON tokens set to `pattern` (vLLM's
    /// `guided_whitespace_pattern`); for JSON constraints only.
    pub fn with_whitespace_pattern(self, pattern: &str) -> Result<ConstraintSpec> {
        let mut schema = match self {
            ConstraintSpec::JsonObject => serde_json::json!({"type": "object"}),
            ConstraintSpec::JsonSchema(s) => s,
            other => {
                return Err(Error::Input(format!(
                    "a whitespace pattern applies to JSON output, not to a {}",
                    other.kind()
                )))
            }
        };
        match &mut schema {
            Value::Object(o) => {
                o.insert(
                    "x-guidance".into(),
                    serde_json::json!({"whitespace_pattern": pattern}),
                );
            }
            // `true` / `false` schemas: wrap them so that the option has a place.
            other => {
                *other = serde_json::json!({
                    "allOf": [other.clone()],
                    "x-guidance": {"whitespace_pattern": pattern},
                })
            }
        }
        Ok(ConstraintSpec::JsonSchema(schema))
    }
}

#[cfg(feature = "constrain")]
mod imp {
    use std::sync::{Arc, Mutex};

    use llguidance::api::{StopReason, TopLevelGrammar};
    use llguidance::toktrie::{SimpleVob, TokEnv, TokRxInfo, TokTrie, TokenId, TokenizerEnv};
    use llguidance::{Matcher, ParserFactory};

    use serde_json::{json, Value};

    use super::{ConstraintSpec, JSON_WHITESPACE};
    use crate::error::{Error, Result};
    use crate::tokenizer::Tokenizer;

    /// `s` with every character that means something in a regex escaped (as `regex::escape`).
    pub(super) fn regex_escape(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        for c in s.chars() {
            if "\\.+*?()|[]{}^$#&-~".contains(c) {
                out.push('\\');
            }
            out.push(c);
        }
        out
    }

    /// GPT-2's vocabulary as llguidance sees it. Tokenization is declared not canonical: the mask
    /// then allows every token consistent with the constraint, and llguidance never forces a
    /// token of its own choosing (which would change a token the model chose within the
    /// constraint).
    struct Vocab {
        trie: TokTrie,
    }

    impl TokenizerEnv for Vocab {
        fn tok_trie(&self) -> &TokTrie {
            &self.trie
        }

        fn tokenize_bytes(&self, s: &[u8]) -> Vec<TokenId> {
            self.trie.greedy_tokenize(s)
        }

        fn tokenize_is_canonical(&self) -> bool {
            false
        }
    }

    /// Compiled constraints kept for reuse (a classifier's server sees the same schema again and
    /// again); their lexer caches are shared by the sequences cloned from them.
    const CACHE: usize = 32;

    /// Compiles constraints for one tokenizer; build it once per model and share it.
    pub struct Grammars {
        factory: ParserFactory,
        eos: u32,
        cache: Mutex<Vec<(String, Constraint)>>,
    }

    impl Grammars {
        /// The token trie over `tok`'s vocabulary, `eos` ending a constrained sequence.
        pub fn new(tok: &Tokenizer, eos: u32) -> Result<Grammars> {
            let n = tok.vocab_size();
            let words = (0..n as u32)
                .map(|id| {
                    let b = tok.token_bytes(id)?;
                    // llguidance marks special tokens with a leading 0xFF byte (never in text), so
                    // that a constraint can never spell `<|endoftext|>` out of plain text.
                    Ok(if tok.is_special(id) {
                        [&[0xFF], b].concat()
                    } else {
                        b.to_vec()
                    })
                })
                .collect::<Result<Vec<Vec<u8>>>>()?;
            if eos as usize >= n {
                return Err(Error::Input(format!(
                    "end-of-sequence token {eos} is beyond the tokenizer's {n} tokens"
                )));
            }
            let info = TokRxInfo::new(n as u32, eos);
            let env: TokEnv = Arc::new(Vocab {
                trie: TokTrie::from(&info, &words),
            });
            let mut factory = ParserFactory::new_simple(&env)
                .map_err(|e| Error::Input(format!("building the grammar compiler: {e}")))?;
            // Nothing on stderr: a bad constraint is the caller's error, reported to them.
            factory.quiet();
            // Errors without llguidance's parser state and grammar dump: they reach clients.
            factory.limits_mut().verbose_errors = false;
            Ok(Grammars {
                factory,
                eos,
                cache: Mutex::new(Vec::new()),
            })
        }

        /// The end-of-sequence token the constraints were built for.
        pub fn eos(&self) -> u32 {
            self.eos
        }

        /// Compile `spec`; an error carries llguidance's message (a bad regex, schema or grammar),
        /// or says that the constraint allows no output at all (nothing can match it).
        pub fn compile(&self, spec: &ConstraintSpec) -> Result<Constraint> {
            let key = cache_key(spec);
            if let Ok(cache) = self.cache.lock() {
                if let Some((_, c)) = cache.iter().find(|(k, _)| *k == key) {
                    return Ok(c.clone());
                }
            }
            let grammar = match spec {
                ConstraintSpec::JsonObject => {
                    TopLevelGrammar::from_json_schema(with_whitespace(json!({"type": "object"})))
                }
                ConstraintSpec::JsonSchema(s) => {
                    TopLevelGrammar::from_json_schema(with_whitespace(s.clone()))
                }
                ConstraintSpec::Regex(r) => TopLevelGrammar::from_regex(r),
                ConstraintSpec::Choice(c) => {
                    if c.is_empty() {
                        return Err(Error::Input("a choice needs at least one string".into()));
                    }
                    let alts: Vec<String> = c.iter().map(|s| regex_escape(s)).collect();
                    TopLevelGrammar::from_regex(&format!("({})", alts.join("|")))
                }
                ConstraintSpec::Grammar(g) => {
                    if g.trim().is_empty() {
                        return Err(Error::Input("the grammar is empty".into()));
                    }
                    TopLevelGrammar::from_lark(g.clone())
                }
            };
            let parser = self.factory.create_parser(grammar).map_err(|e| {
                Error::Input(format!("the {} does not compile: {}", spec.kind(), tidy(e)))
            })?;
            let matcher = Arc::new(Matcher::new(Ok(parser)));
            if let Some(e) = matcher.get_error() {
                return Err(Error::Input(format!(
                    "the {} does not compile: {}",
                    spec.kind(),
                    tidy(e)
                )));
            }
            // The first mask, on a copy (the matcher stays fresh for the sequences): a constraint
            // nothing can match (`[a&&b]`, a rule that never ends, a schema that is only a
            // reference to itself) allows no first token, and is the request's error here rather
            // than a sampling failure once it runs.
            let first = Matcher::clone(&matcher).compute_mask().map_err(|e| {
                Error::Input(if dead_end(&e) {
                    format!(
                        "the {} allows no output: no text can match it (expected a {} that \
                         some text satisfies)",
                        spec.kind(),
                        spec.kind()
                    )
                } else {
                    format!(
                        "the {} fails before its first token: {}",
                        spec.kind(),
                        tidy(e)
                    )
                })
            })?;
            let constraint = Constraint {
                kind: spec.kind(),
                matcher,
                first: Arc::new(first),
            };
            if let Ok(mut cache) = self.cache.lock() {
                if cache.len() >= CACHE {
                    cache.remove(0);
                }
                cache.push((key, constraint.clone()));
            }
            Ok(constraint)
        }
    }

    /// The cache's key for `spec`: distinct specs never share one. The kinds' prefixes differ
    /// and each ends at its `\0`; after it, one string runs to the end, and a choice's list is
    /// JSON (a plain separator would make `["a", "b"]` and `["a\0b"]` one key).
    pub(super) fn cache_key(spec: &ConstraintSpec) -> String {
        match spec {
            ConstraintSpec::JsonObject => "json_object".to_owned(),
            ConstraintSpec::JsonSchema(s) => format!("json_schema\0{s}"),
            ConstraintSpec::Regex(r) => format!("regex\0{r}"),
            ConstraintSpec::Choice(c) => format!("choice\0{}", Value::from(c.clone())),
            ConstraintSpec::Grammar(g) => format!("grammar\0{g}"),
        }
    }

    /// llguidance's message, without anything after its first line that is its own state (a
    /// `<state>` dump or a `<non-verbose/>` marker), and at most 500 bytes: it goes to clients.
    fn tidy(e: impl std::fmt::Display) -> String {
        let mut s = e.to_string();
        for marker in ["\n<state>", "\n<non-verbose/>", "\n<grammar>"] {
            if let Some(i) = s.find(marker) {
                s.truncate(i);
            }
        }
        if s.len() > 500 {
            let mut end = 500;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s.truncate(end);
            s.push('…');
        }
        s
    }

    /// Whether llguidance's error says that the constraint allows no token here (its parser
    /// can go no further: a dead end of the grammar), as opposed to an internal failure.
    fn dead_end(e: &impl std::fmt::Display) -> bool {
        e.to_string().lines().next() == Some(&StopReason::NoExtensionBias.to_string())
    }

    /// `schema` with [`JSON_WHITESPACE`] unless it sets llguidance's options itself.
    fn with_whitespace(mut schema: Value) -> Value {
        if let Value::Object(o) = &mut schema {
            o.entry("x-guidance")
                .or_insert_with(|| json!({"whitespace_pattern": JSON_WHITESPACE}));
        }
        schema
    }

    /// A compiled constraint, ready to start any number of sequences (cloning it is cheap; the
    /// matcher, large, is behind an Arc so that settings that carry it stay small).
    #[derive(Clone)]
    pub struct Constraint {
        kind: &'static str,
        matcher: Arc<Matcher>,
        /// The first token's mask, computed when compiling.
        first: Arc<SimpleVob>,
    }

    impl std::fmt::Debug for Constraint {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Constraint({})", self.kind)
        }
    }

    impl Constraint {
        /// What kind of constraint this is, for messages.
        pub fn kind(&self) -> &'static str {
            self.kind
        }

        /// A fresh state for one sequence.
        pub(crate) fn start(&self) -> State {
            State {
                matcher: Matcher::clone(&self.matcher),
                next: Some(SimpleVob::clone(&self.first)),
            }
        }
    }

    /// One sequence's place in its constraint.
    pub(crate) struct State {
        matcher: Matcher,
        /// The next token's mask, computed ahead (when compiling for the first token, after each
        /// token for the next), so that a dead end ends the sequence at the token that led to it.
        next: Option<SimpleVob>,
    }

    fn failed(e: impl std::fmt::Display) -> Error {
        Error::Input(format!("the constraint failed: {}", tidy(e)))
    }

    impl State {
        /// Set the logits of the tokens the constraint does not allow next to −∞; returns
        /// whether it allows any token not in `avoid` (tokens the caller would ban).
        pub(crate) fn mask(&mut self, logits: &mut [f32], avoid: &[u32]) -> Result<bool> {
            let mask = match self.next.take() {
                Some(m) => m,
                None => self.matcher.compute_mask().map_err(failed)?,
            };
            apply(&mask, logits);
            let mut avoided: Vec<u32> = avoid
                .iter()
                .copied()
                .filter(|&t| (t as usize) < mask.len() && mask.is_allowed(t))
                .collect();
            avoided.sort_unstable();
            avoided.dedup();
            Ok(mask.num_set() > avoided.len())
        }

        /// Take the chosen `token`; true when the constraint can take nothing more: complete, or
        /// at a dead end (a grammar rule that can never finish), where no token is allowed.
        pub(crate) fn consume(&mut self, token: u32) -> Result<bool> {
            self.matcher.consume_token(token).map_err(failed)?;
            if self.matcher.is_stopped() {
                return Ok(true);
            }
            match self.matcher.compute_mask() {
                Ok(m) => {
                    self.next = Some(m);
                    Ok(false)
                }
                Err(e) if dead_end(&e) => Ok(true),
                Err(e) => Err(failed(e)),
            }
        }
    }

    /// −∞ wherever `mask` has no bit (tokens beyond the tokenizer's vocabulary included).
    fn apply(mask: &SimpleVob, logits: &mut [f32]) {
        let words = mask.as_slice();
        for (w, chunk) in logits.chunks_mut(32).enumerate() {
            let bits = words.get(w).copied().unwrap_or(0);
            if bits == u32::MAX && chunk.len() == 32 {
                continue;
            }
            for (b, l) in chunk.iter_mut().enumerate() {
                if bits & (1 << b) == 0 {
                    *l = f32::NEG_INFINITY;
                }
            }
        }
    }
}

#[cfg(not(feature = "constrain"))]
mod imp {
    use super::ConstraintSpec;
    use crate::error::{Error, Result};
    use crate::tokenizer::Tokenizer;

    /// Without the `constrain` feature no constraint can be compiled: this type has no value.
    pub struct Grammars(std::convert::Infallible);

    impl Grammars {
        pub fn new(_tok: &Tokenizer, _eos: u32) -> Result<Grammars> {
            Err(Error::Input(
                "structured output needs the library's `constrain` feature, which this build lacks"
                    .into(),
            ))
        }

        pub fn eos(&self) -> u32 {
            match self.0 {}
        }

        pub fn compile(&self, _spec: &ConstraintSpec) -> Result<Constraint> {
            match self.0 {}
        }
    }

    /// Has no value without the `constrain` feature.
    #[derive(Clone, Debug)]
    pub struct Constraint(std::convert::Infallible);

    impl Constraint {
        pub fn kind(&self) -> &'static str {
            match self.0 {}
        }

        pub(crate) fn start(&self) -> State {
            match self.0 {}
        }
    }

    pub(crate) struct State(std::convert::Infallible);

    impl State {
        pub(crate) fn mask(&mut self, _logits: &mut [f32], _avoid: &[u32]) -> Result<bool> {
            match self.0 {}
        }

        pub(crate) fn consume(&mut self, _token: u32) -> Result<bool> {
            match self.0 {}
        }
    }
}

pub(crate) use imp::State;
pub use imp::{Constraint, Grammars};

/// Compile `spec` for `tok` in one go (builds the token trie: for one-off use; keep a [`Grammars`]
/// to compile several).
pub fn compile(tok: &Tokenizer, eos: u32, spec: &ConstraintSpec) -> Result<Constraint> {
    Grammars::new(tok, eos)?.compile(spec)
}

#[cfg(all(test, feature = "constrain"))]
mod tests {
    use super::imp::{cache_key, regex_escape};
    use super::ConstraintSpec;

    #[test]
    fn cache_keys_are_distinct_for_distinct_specs() {
        let choice = |c: &[&str]| ConstraintSpec::Choice(c.iter().map(|s| s.to_string()).collect());
        let specs = [
            choice(&["a", "b"]),
            choice(&["a\0b"]),
            choice(&["a", ""]),
            choice(&["a\0"]),
            choice(&["a"]),
            ConstraintSpec::Regex("a".into()),
            ConstraintSpec::Regex("a\0b".into()),
            ConstraintSpec::Grammar("a".into()),
            ConstraintSpec::JsonSchema(serde_json::json!("a")),
            ConstraintSpec::JsonObject,
        ];
        for (i, a) in specs.iter().enumerate() {
            for b in &specs[i + 1..] {
                assert_ne!(cache_key(a), cache_key(b), "{a:?} and {b:?}");
            }
        }
    }

    #[test]
    fn escaped_choices_are_literal() {
        assert_eq!(regex_escape("a.b|c"), "a\\.b\\|c");
        assert_eq!(regex_escape("(x)"), "\\(x\\)");
    }
}
