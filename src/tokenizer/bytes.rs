//! GPT-2's reversible byte → printable-character map (`bytes_to_unicode` in OpenAI's encoder.py):
//! printable Latin-1 bytes stand for themselves, the other 68 are shifted to U+0100 and up, so
//! space is `Ġ` (U+0120) and `\n` is `Ċ` (U+010A).

/// The character each byte is written as in vocabulary files.
pub fn byte_to_char() -> [char; 256] {
    let printable = |b: u32| {
        (0x21..=0x7E).contains(&b) || (0xA1..=0xAC).contains(&b) || (0xAE..=0xFF).contains(&b)
    };
    let mut table = ['\0'; 256];
    let mut shifted = 0;
    for b in 0..256u32 {
        let c = if printable(b) {
            b
        } else {
            shifted += 1;
            255 + shifted
        };
        table[b as usize] = char::from_u32(c).expect("in the BMP");
    }
    table
}

/// The byte a vocabulary character stands for, if it is one of the 256.
#[inline]
pub fn char_to_byte(c: char) -> Option<u8> {
    static INVERSE: std::sync::OnceLock<[u8; 0x144]> = std::sync::OnceLock::new();
    let inv = INVERSE.get_or_init(|| {
        let mut t = [0u8; 0x144];
        for (b, c) in byte_to_char().iter().enumerate() {
            t[*c as usize] = b as u8;
        }
        t
    });
    let i = c as usize;
    // Only 0x21..=0x143 are used, and of those not 0x7F..=0xA0 and 0xAD (which are shifted).
    let used = (0x21..0x144).contains(&i) && !(0x7F..=0xA0).contains(&i) && i != 0xAD;
    used.then(|| inv[i])
}

/// Decode a vocabulary entry (`"Ġthe"`) to its bytes (`b" the"`).
pub fn token_to_bytes(token: &str) -> Option<Vec<u8>> {
    token.chars().map(char_to_byte).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_map_is_a_bijection_with_gpt2s_known_points() {
        let t = byte_to_char();
        assert_eq!(
            (t[b' ' as usize], t[b'\n' as usize], t[b'!' as usize], t[0]),
            ('Ġ', 'Ċ', '!', 'Ā')
        );
        for b in 0..=255u8 {
            assert_eq!(char_to_byte(t[b as usize]), Some(b));
        }
        assert_eq!(char_to_byte('a'), Some(b'a'));
        assert_eq!(char_to_byte(' '), None);
        assert_eq!(token_to_bytes("Ġthe"), Some(b" the".to_vec()));
    }
}
