//! Heads as they appear in APIs: lowercase hex strings.

use automerge::ChangeHash;

/// Encodes heads as lowercase hex, the form every API response uses.
pub fn heads_to_hex(heads: &[ChangeHash]) -> Vec<String> {
    heads.iter().map(|h| hex::encode(h.0)).collect()
}

/// Decodes hex heads; `None` when any is not 64 hex characters.
pub fn heads_from_hex<S: AsRef<str>>(heads: &[S]) -> Option<Vec<ChangeHash>> {
    heads
        .iter()
        .map(|h| h.as_ref().parse::<ChangeHash>().ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let heads = vec![ChangeHash([7; 32]), ChangeHash([0xab; 32])];
        let hex = heads_to_hex(&heads);
        assert_eq!(hex[0], "07".repeat(32));
        assert_eq!(heads_from_hex(&hex), Some(heads));
        assert_eq!(heads_from_hex(&["zz"]), None);
    }
}
