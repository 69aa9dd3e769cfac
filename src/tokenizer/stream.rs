//! Incremental detokenization: bytes arrive token by token and leave as text only once they form
//! whole UTF-8 characters, so an emoji split over three tokens is printed whole. The concatenated
//! output equals `String::from_utf8_lossy` of all the bytes, for any split.

/// Turns a stream of token bytes into a stream of text.
#[derive(Default)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add bytes; return the text that is now complete. Bytes that can never be valid UTF-8 come out
    /// as U+FFFD as soon as that is certain; an unfinished character waits for more.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.pending;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (ok, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(ok).expect("validated"));
                    match e.error_len() {
                        Some(n) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            rest = &after[n..];
                        }
                        // An incomplete character at the end: keep it for the next push.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        let keep = rest.len();
        let len = self.pending.len();
        self.pending.copy_within(len - keep.., 0);
        self.pending.truncate(keep);
        out
    }

    /// End of stream: an unfinished character becomes U+FFFD.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}
