//! Document identifiers.

use std::fmt;

use crate::limits::DOC_ID_BYTES_MAX;

/// A validated document id: 1 to [`DOC_ID_BYTES_MAX`] bytes of `[A-Za-z0-9._~:/@+-]`.
///
/// The alphabet is URL-safe (ids appear in routes unescaped), filesystem-agnostic and a superset
/// of automerge-repo's bs58check ids. Holding a `DocId` proves the id was checked once at the
/// edge; everything behind it can use the id as a key without re-validating.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DocId(String);

/// Why a string is not a [`DocId`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DocIdError {
    /// The id is the empty string.
    #[error("document id is empty")]
    Empty,
    /// The id is longer than [`DOC_ID_BYTES_MAX`].
    #[error("document id is {len} bytes, more than the {DOC_ID_BYTES_MAX} allowed")]
    TooLong {
        /// Length of the rejected id in bytes.
        len: usize,
    },
    /// The id contains a byte outside the id alphabet.
    #[error("document id has byte 0x{byte:02x} at offset {offset}, outside [A-Za-z0-9._~:/@+-]")]
    InvalidByte {
        /// The offending byte.
        byte: u8,
        /// Its offset in the id.
        offset: usize,
    },
}

impl DocId {
    /// Checks `id` and wraps it.
    pub fn new(id: impl Into<String>) -> Result<Self, DocIdError> {
        let id = id.into();
        if id.is_empty() {
            return Err(DocIdError::Empty);
        }
        if id.len() > DOC_ID_BYTES_MAX {
            return Err(DocIdError::TooLong { len: id.len() });
        }
        if let Some((offset, &byte)) = id
            .as_bytes()
            .iter()
            .enumerate()
            .find(|(_, b)| !is_id_byte(**b))
        {
            return Err(DocIdError::InvalidByte { byte, offset });
        }
        Ok(Self(id))
    }

    /// The id as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Whether this id starts with `prefix` (used by listings and watches).
    pub fn has_prefix(&self, prefix: &str) -> bool {
        self.0.starts_with(prefix)
    }
}

/// Whether `b` may appear in a document id.
pub fn is_id_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'~' | b':' | b'/' | b'@' | b'+' | b'-')
}

impl fmt::Display for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for DocId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "DocId({:?})", self.0)
    }
}

impl std::str::FromStr for DocId {
    type Err = DocIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for DocId {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn accepts_typical_ids() {
        for id in [
            "cart/u-42",
            "a",
            "user@example.com",
            "2NEpo7TZRRrLZSi2U",
            "x:y~z+1.2_3",
        ] {
            assert_eq!(DocId::new(id).map(|d| d.to_string()), Ok(id.to_string()));
        }
    }

    #[test]
    fn rejects_bad_ids() {
        assert_eq!(DocId::new(""), Err(DocIdError::Empty));
        assert_eq!(
            DocId::new("a b"),
            Err(DocIdError::InvalidByte {
                byte: b' ',
                offset: 1
            })
        );
        assert_eq!(
            DocId::new("a\0"),
            Err(DocIdError::InvalidByte { byte: 0, offset: 1 })
        );
        assert!(matches!(
            DocId::new("é"),
            Err(DocIdError::InvalidByte { offset: 0, .. })
        ));
        assert!(matches!(
            DocId::new("a?b"),
            Err(DocIdError::InvalidByte { .. })
        ));
        assert!(matches!(
            DocId::new("a%2Fb"),
            Err(DocIdError::InvalidByte { .. })
        ));
    }

    #[test]
    fn length_boundary() {
        assert!(DocId::new("a".repeat(DOC_ID_BYTES_MAX)).is_ok());
        assert_eq!(
            DocId::new("a".repeat(DOC_ID_BYTES_MAX + 1)),
            Err(DocIdError::TooLong {
                len: DOC_ID_BYTES_MAX + 1
            })
        );
    }

    proptest! {
        #[test]
        fn valid_iff_alphabet(s in "\\PC{0,40}") {
            let ok = !s.is_empty() && s.len() <= DOC_ID_BYTES_MAX && s.bytes().all(is_id_byte);
            prop_assert_eq!(DocId::new(s.clone()).is_ok(), ok);
        }
    }
}
