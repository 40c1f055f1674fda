//! Encryption at rest of the values the store writes.
//!
//! Every snapshot, change row and metadata record is sealed with XChaCha20-Poly1305 under the
//! node's 32-byte key. A sealed value is `VERSION || nonce (24 bytes) || ciphertext || tag`;
//! the nonce is random, drawn from a CSPRNG seeded once per open (the seed is a parameter, so a
//! simulator can make runs reproducible). The row's key (table, document id and, for change
//! rows, the sequence number) is authenticated as associated data, so a value copied or moved
//! to another row fails to open instead of being read as that row's data.

use std::fmt;
use std::fs;
use std::path::Path;
use std::sync::Mutex;

use base64::Engine as _;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use rand::rngs::StdRng;
use rand::{RngCore, SeedableRng};

/// Bytes of a key.
pub const KEY_BYTES: usize = 32;
/// Bytes of a nonce.
const NONCE_BYTES: usize = 24;
/// Bytes of the authentication tag.
const TAG_BYTES: usize = 16;
/// First byte of every sealed value; bumped if the layout changes.
const SEALED_VERSION: u8 = 1;
/// Largest key file read: a key is 32 raw bytes or at most 64 characters of text.
const KEY_FILE_BYTES_MAX: u64 = 4096;
/// What a key looks like, for error messages.
const KEY_FORMAT: &str = "an encryption key must be 32 bytes, written as 64 hex digits or in \
    base64 (or, in a key file, as the 32 raw bytes)";

/// The table a sealed value belongs to, part of its associated data.
#[derive(Debug, Clone, Copy)]
pub(super) enum Row<'a> {
    /// A snapshot of document `id`.
    Snapshot(&'a str),
    /// Change row `seq` of document `id`.
    Change(&'a str, u64),
    /// The metadata record of document `id`.
    Meta(&'a str),
    /// A node-level value.
    Node(&'a str),
    /// The retained snapshot of generation `generation` of document `id`.
    Retained(&'a str, u64),
    /// Record `seq` of the change feed.
    Feed(u64),
    /// The idempotency record of a key hash (hex).
    Idempotency(&'a str),
    /// Frame `index` of backup object `name`.
    BackupFrame(&'a str, u64),
}

impl Row<'_> {
    fn associated_data(self) -> Vec<u8> {
        let (tag, id, seq) = match self {
            Row::Snapshot(id) => (b's', id, None),
            Row::Change(id, seq) => (b'c', id, Some(seq)),
            Row::Meta(id) => (b'm', id, None),
            Row::Node(key) => (b'n', key, None),
            Row::Retained(id, generation) => (b'r', id, Some(generation)),
            Row::Feed(seq) => (b'f', "", Some(seq)),
            Row::Idempotency(key) => (b'i', key, None),
            Row::BackupFrame(name, index) => (b'b', name, Some(index)),
        };
        let mut ad = Vec::with_capacity(1 + id.len() + 8);
        ad.push(tag);
        ad.extend_from_slice(id.as_bytes());
        if let Some(seq) = seq {
            ad.extend_from_slice(&seq.to_be_bytes());
        }
        ad
    }
}

/// A 32-byte storage key. Its `Debug` output never shows the bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct EncryptionKey([u8; KEY_BYTES]);

impl fmt::Debug for EncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("EncryptionKey(<redacted>)")
    }
}

/// Why a key could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

impl EncryptionKey {
    /// A key from its 32 bytes.
    pub fn from_bytes(bytes: [u8; KEY_BYTES]) -> Self {
        Self(bytes)
    }

    /// Parses a key written as 64 hex digits or as base64 (standard alphabet, padding
    /// optional) of 32 bytes. Surrounding whitespace is ignored.
    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let text = text.trim();
        let bytes = if text.len() == 2 * KEY_BYTES && text.bytes().all(|b| b.is_ascii_hexdigit()) {
            hex::decode(text).ok()
        } else {
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
                .ok()
        };
        match bytes.map(<[u8; KEY_BYTES]>::try_from) {
            Some(Ok(key)) => Ok(Self(key)),
            _ => Err(KeyError(KEY_FORMAT.to_owned())),
        }
    }

    /// A short public name of the key (HMAC-SHA256 of a fixed label under it): tells whether
    /// two keys are the same without revealing either.
    pub fn fingerprint(&self) -> String {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.0);
        hex::encode(&ring::hmac::sign(&key, b"verge-key-fingerprint-1").as_ref()[..8])
    }

    /// Reads a key file: exactly 32 raw bytes, or the key as hex or base64 text.
    pub fn from_file(path: &Path) -> Result<Self, KeyError> {
        let io = |e: std::io::Error| KeyError(format!("reading key file {}: {e}", path.display()));
        let len = fs::metadata(path).map_err(io)?.len();
        if len > KEY_FILE_BYTES_MAX {
            return Err(KeyError(format!(
                "key file {} is {len} bytes; a key is {KEY_BYTES} bytes",
                path.display()
            )));
        }
        let bytes = fs::read(path).map_err(io)?;
        if let Ok(text) = std::str::from_utf8(&bytes)
            && let Ok(key) = Self::parse(text)
        {
            return Ok(key);
        }
        match <[u8; KEY_BYTES]>::try_from(bytes.as_slice()) {
            Ok(key) => Ok(Self(key)),
            Err(_) => Err(KeyError(format!(
                "key file {}: {KEY_FORMAT}",
                path.display()
            ))),
        }
    }
}

/// Why a sealed value could not be opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// Too short, or an unknown layout version.
    #[error("not a sealed value")]
    Malformed,
    /// The tag does not verify: another key, another row, or damaged bytes.
    #[error("authentication failed (another key, a moved row or damaged bytes)")]
    Unauthentic,
}

/// Seals and opens values under one key.
pub(super) struct Cipher {
    aead: XChaCha20Poly1305,
    rng: Mutex<StdRng>,
}

impl fmt::Debug for Cipher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Cipher(XChaCha20-Poly1305, <key redacted>)")
    }
}

impl Cipher {
    /// A cipher under `key` whose nonces come from a CSPRNG seeded with `nonce_seed`. The seed
    /// must be fresh for every open: the same seed with the same key repeats nonces.
    pub(super) fn new(key: &EncryptionKey, nonce_seed: [u8; 32]) -> Self {
        Self {
            aead: XChaCha20Poly1305::new(&key.0.into()),
            rng: Mutex::new(StdRng::from_seed(nonce_seed)),
        }
    }

    /// Encrypts `plain` for `row`.
    pub(super) fn seal(&self, row: Row<'_>, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_BYTES];
        self.rng
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .fill_bytes(&mut nonce);
        let ad = row.associated_data();
        // Encryption fails only for plaintexts beyond 256 GiB, far above any stored value.
        let sealed = self
            .aead
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: plain,
                    aad: &ad,
                },
            )
            .unwrap_or_default();
        let mut out = Vec::with_capacity(1 + NONCE_BYTES + sealed.len());
        out.push(SEALED_VERSION);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a value sealed for `row`.
    pub(super) fn open(&self, row: Row<'_>, sealed: &[u8]) -> Result<Vec<u8>, OpenError> {
        if sealed.len() < 1 + NONCE_BYTES + TAG_BYTES || sealed[0] != SEALED_VERSION {
            return Err(OpenError::Malformed);
        }
        let (nonce, body) = sealed[1..].split_at(NONCE_BYTES);
        let ad = row.associated_data();
        self.aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: body,
                    aad: &ad,
                },
            )
            .map_err(|_| OpenError::Unauthentic)
    }
}

/// Seals the frames of backup objects under a store's key, each bound to its object's name
/// and its place in it, so a frame moved, dropped or swapped fails to open.
#[derive(Debug)]
pub struct FrameCipher(Cipher);

impl FrameCipher {
    /// A frame cipher under `key`; `nonce_seed` must be fresh (drawn from the OS).
    pub fn new(key: &EncryptionKey, nonce_seed: [u8; 32]) -> Self {
        Self(Cipher::new(key, nonce_seed))
    }

    /// Encrypts frame `index` of object `name`.
    pub fn seal(&self, name: &str, index: u64, plain: &[u8]) -> Vec<u8> {
        self.0.seal(Row::BackupFrame(name, index), plain)
    }

    /// Decrypts frame `index` of object `name`; `None` when it is not authentic under this key.
    pub fn open(&self, name: &str, index: u64, sealed: &[u8]) -> Option<Vec<u8>> {
        self.0.open(Row::BackupFrame(name, index), sealed).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cipher(k: u8) -> Cipher {
        Cipher::new(&EncryptionKey::from_bytes([k; KEY_BYTES]), [7; 32])
    }

    #[test]
    fn seal_open_round_trip_and_binding() {
        let c = cipher(1);
        let sealed = c.seal(Row::Change("a/1", 3), b"secret");
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(
            c.open(Row::Change("a/1", 3), &sealed).expect("opens"),
            b"secret"
        );
        // Another row, another table, another key, a flipped bit: all refused.
        assert_eq!(
            c.open(Row::Change("a/1", 4), &sealed),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(
            c.open(Row::Snapshot("a/1"), &sealed),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(
            cipher(2).open(Row::Change("a/1", 3), &sealed),
            Err(OpenError::Unauthentic)
        );
        let mut flipped = sealed.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert_eq!(
            c.open(Row::Change("a/1", 3), &flipped),
            Err(OpenError::Unauthentic)
        );
        assert_eq!(
            c.open(Row::Change("a/1", 3), &sealed[..10]),
            Err(OpenError::Malformed)
        );
        // Fresh nonces: sealing twice gives different bytes.
        assert_ne!(sealed, c.seal(Row::Change("a/1", 3), b"secret"));
    }

    #[test]
    fn keys_parse_from_hex_base64_and_raw_files() {
        let raw = [0xabu8; KEY_BYTES];
        let hex_text = hex::encode(raw);
        let b64 = base64::engine::general_purpose::STANDARD.encode(raw);
        assert_eq!(
            EncryptionKey::parse(&hex_text).expect("hex"),
            EncryptionKey(raw)
        );
        assert_eq!(
            EncryptionKey::parse(&format!(" {b64}\n")).expect("base64"),
            EncryptionKey(raw)
        );
        assert_eq!(
            EncryptionKey::parse(b64.trim_end_matches('=')).expect("unpadded"),
            EncryptionKey(raw)
        );
        assert!(EncryptionKey::parse("abcd").is_err());
        assert!(EncryptionKey::parse(&hex_text[2..]).is_err());
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("key");
        fs::write(&file, raw).expect("write");
        assert_eq!(
            EncryptionKey::from_file(&file).expect("raw"),
            EncryptionKey(raw)
        );
        fs::write(&file, format!("{hex_text}\n")).expect("write");
        assert_eq!(
            EncryptionKey::from_file(&file).expect("hex file"),
            EncryptionKey(raw)
        );
        fs::write(&file, [1u8; 31]).expect("write");
        assert!(EncryptionKey::from_file(&file).is_err());
        assert!(!format!("{:?}", EncryptionKey(raw)).contains("abab"));
    }
}
