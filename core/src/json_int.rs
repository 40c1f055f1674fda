//! Integers in JSON text that no 64-bit integer holds.
//!
//! A document stores integers as 64-bit values (signed, or unsigned above `i64::MAX`). A JSON
//! parser hands a larger integer literal over as the nearest float, so `18446744073709551617`
//! would be stored as `18446744073709551616` without a word: writes with such a literal are
//! refused instead. The text is scanned once, outside strings, before it is parsed.

/// The first integer literal in `json` (outside strings, without fraction or exponent) that
/// fits neither `i64` nor `u64`, if any. Malformed JSON is left to the parser.
pub fn first_beyond_64_bits(json: &[u8]) -> Option<&str> {
    let mut i = 0;
    while i < json.len() {
        match json[i] {
            b'"' => i = skip_string(json, i + 1),
            b'-' | b'0'..=b'9' => {
                let start = i;
                if json[i] == b'-' {
                    i += 1;
                }
                let digits = i;
                while i < json.len() && json[i].is_ascii_digit() {
                    i += 1;
                }
                let integer = !matches!(json.get(i), Some(b'.' | b'e' | b'E'));
                // Skip the rest of a number with a fraction or an exponent.
                while i < json.len()
                    && matches!(json[i], b'0'..=b'9' | b'.' | b'e' | b'E' | b'+' | b'-')
                {
                    i += 1;
                }
                if integer && i - digits > 18 {
                    let literal = std::str::from_utf8(&json[start..i]).ok()?;
                    if literal.parse::<i64>().is_err() && literal.parse::<u64>().is_err() {
                        return Some(literal);
                    }
                }
            }
            _ => i += 1,
        }
    }
    None
}

/// The index just past the string whose contents start at `i`.
fn skip_string(json: &[u8], mut i: usize) -> usize {
    while i < json.len() {
        match json[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_integers_beyond_64_bits_and_nothing_else() {
        assert_eq!(
            first_beyond_64_bits(br#"{"a": 1, "b": [-2, 3.5e300]}"#),
            None
        );
        let edges = format!(
            r#"[{}, {}, {}, 9007199254740993]"#,
            i64::MIN,
            i64::MAX,
            u64::MAX
        );
        assert_eq!(
            first_beyond_64_bits(edges.as_bytes()),
            None,
            "the 64-bit range fits"
        );
        assert_eq!(
            first_beyond_64_bits(br#"{"n": 18446744073709551616}"#),
            Some("18446744073709551616")
        );
        assert_eq!(
            first_beyond_64_bits(br#"[-9223372036854775809]"#),
            Some("-9223372036854775809")
        );
        assert_eq!(
            first_beyond_64_bits(
                br#"{"s": "123456789012345678901234 \" 99999999999999999999999"}"#
            ),
            None,
            "digits inside strings are text"
        );
        assert_eq!(
            first_beyond_64_bits(
                br#"[123456789012345678901234.5, 1e400, 99999999999999999999e-2]"#
            ),
            None,
            "numbers with a fraction or an exponent are floats by intent"
        );
        assert_eq!(
            first_beyond_64_bits(b"[99999999999999999999"),
            Some("99999999999999999999")
        );
    }
}
