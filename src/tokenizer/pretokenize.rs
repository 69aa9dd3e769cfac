//! GPT-2's pre-tokenizer, hand-written: the pieces that the regex
//! `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`
//! finds, with its exact leftmost-first semantics, in one linear pass (no backtracking engine).
//! `\s` is Unicode White_Space, `\p{L}` and `\p{N}` the letter and number general categories.

use unicode_general_category::{get_general_category, GeneralCategory as G};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Class {
    Letter,
    Number,
    Space,
    Other,
}

const fn ascii_classes() -> [Class; 128] {
    let mut t = [Class::Other; 128];
    let mut b = 0;
    while b < 128 {
        let c = b as u8;
        t[b] = if c.is_ascii_alphabetic() {
            Class::Letter
        } else if c.is_ascii_digit() {
            Class::Number
        } else if matches!(c, b' ' | b'\t' | b'\n' | 0x0B | 0x0C | b'\r') {
            Class::Space
        } else {
            Class::Other
        };
        b += 1;
    }
    t
}

static ASCII: [Class; 128] = ascii_classes();

/// Unicode White_Space (what `\s` means in the regex engines tiktoken and transformers use).
fn is_white_space(c: char) -> bool {
    matches!(c, '\t'..='\r' | ' ' | '\u{85}' | '\u{A0}' | '\u{1680}' | '\u{2000}'..='\u{200A}'
        | '\u{2028}' | '\u{2029}' | '\u{202F}' | '\u{205F}' | '\u{3000}')
}

fn classify(c: char) -> Class {
    if c.is_ascii() {
        return ASCII[c as usize];
    }
    if is_white_space(c) {
        return Class::Space;
    }
    match get_general_category(c) {
        G::UppercaseLetter
        | G::LowercaseLetter
        | G::TitlecaseLetter
        | G::ModifierLetter
        | G::OtherLetter => Class::Letter,
        G::DecimalNumber | G::LetterNumber | G::OtherNumber => Class::Number,
        _ => Class::Other,
    }
}

/// Iterator over the pieces of a text, as byte ranges that cover it exactly.
pub struct Pieces<'a> {
    text: &'a str,
    pos: usize,
}

pub fn pieces(text: &str) -> Pieces<'_> {
    Pieces { text, pos: 0 }
}

/// The class and byte length of the char at `i` (which is a char boundary).
#[inline]
fn at(s: &[u8], text: &str, i: usize) -> (Class, usize) {
    let b = s[i];
    if b < 0x80 {
        return (ASCII[b as usize], 1);
    }
    let c = text[i..].chars().next().expect("char boundary");
    (classify(c), c.len_utf8())
}

impl Pieces<'_> {
    /// End of the run of chars of class `class` starting at `i`.
    #[inline]
    fn run(&self, mut i: usize, class: Class) -> usize {
        let s = self.text.as_bytes();
        while i < s.len() {
            let (c, n) = at(s, self.text, i);
            if c != class {
                break;
            }
            i += n;
        }
        i
    }

    /// The piece starting at `i`.
    fn next_end(&self, i: usize) -> usize {
        let s = self.text.as_bytes();
        let len = s.len();
        // 's 't 're 've 'm 'll 'd (lowercase only, as the pattern is case-sensitive).
        if s[i] == b'\'' && i + 1 < len {
            match s[i + 1] {
                b's' | b't' | b'm' | b'd' => return i + 2,
                b'r' | b'v' if i + 2 < len && s[i + 2] == b'e' => return i + 3,
                b'l' if i + 2 < len && s[i + 2] == b'l' => return i + 3,
                _ => {}
            }
        }
        // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional space, then a run of one class.
        let start = if s[i] == b' ' && i + 1 < len {
            i + 1
        } else {
            i
        };
        let (class, _) = at(s, self.text, start);
        if class != Class::Space {
            return self.run(start, class);
        }
        // `\s+(?!\S)` then `\s+`: a whitespace run, less its last char when a non-space follows
        // (that char then starts the next piece, as ` word` say), unless the run is one char.
        let end = self.run(i, Class::Space);
        if end == len {
            return end;
        }
        let last = self.text[..end]
            .char_indices()
            .next_back()
            .map(|(j, _)| j)
            .unwrap_or(i);
        if last > i {
            last
        } else {
            end
        }
    }
}

impl<'a> Iterator for Pieces<'a> {
    type Item = &'a str;

    #[inline]
    fn next(&mut self) -> Option<&'a str> {
        if self.pos >= self.text.len() {
            return None;
        }
        let start = self.pos;
        self.pos = self.next_end(start);
        Some(&self.text[start..self.pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn split(s: &str) -> Vec<&str> {
        pieces(s).collect()
    }

    #[test]
    fn follows_the_pattern() {
        assert_eq!(split("Hello world"), ["Hello", " world"]);
        assert_eq!(
            split("I'm here, they'll go"),
            ["I", "'m", " here", ",", " they", "'ll", " go"]
        );
        assert_eq!(split("I'M"), ["I", "'", "M"]);
        assert_eq!(split("a  b"), ["a", " ", " b"]);
        assert_eq!(split("a\n\nb"), ["a", "\n", "\n", "b"]);
        assert_eq!(split("a \n b "), ["a", " \n", " b", " "]);
        assert_eq!(split("x   "), ["x", "   "]);
        assert_eq!(split(" 123abc !?"), [" 123", "abc", " !?"]);
        assert_eq!(split("?'s"), ["?'", "s"]);
        assert_eq!(split("'sam'"), ["'s", "am", "'"]);
        assert_eq!(split("日本 語"), ["日本", " 語"]);
        assert_eq!(split("\u{a0}x"), ["\u{a0}", "x"]);
        assert_eq!(split(""), Vec::<&str>::new());
    }
}
