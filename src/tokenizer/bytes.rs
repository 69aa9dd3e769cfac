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
pub fn char_to_byte(c: char) -> Option<u8> {
    let c = c as u32;
    match c {
        0x21..=0x7E | 0xA1..=0xAC | 0xAE..=0xFF => Some(c as u8),
        0x100..=0x143 => {
            // The n-th non-printable byte, in byte order.
            let n = c - 0x100;
            (0u32..256)
                .filter(|&b| {
                    !((0x21..=0x7E).contains(&b)
                        || (0xA1..=0xAC).contains(&b)
                        || (0xAE..=0xFF).contains(&b))
                })
                .nth(n as usize)
                .map(|b| b as u8)
        }
        _ => None,
    }
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
