//! The bytes of a backup object: a header, then frames of entries.
//!
//! ```text
//! object  = MAGIC (8) kind (1: 'S' snapshot, 'G' segment) encrypted (1) frame*
//! frame   = len (u32 BE) body
//! body    = payload sha256(name, index, payload)   (plain store)
//!         | seal(name, index, payload)             (encrypted store: XChaCha20-Poly1305)
//! payload = last (1) entry*
//! entry   = 'D' id                  (segment: drop the document's rows; its state follows)
//!         | 's' id value | 'c' id seq value | 'm' id value
//!         | 'r' id generation value | 'a' id generation at_ms
//! id      = len (u16 BE) bytes; value = len (u32 BE) bytes; seq, generation, at_ms: 8 bytes BE
//! ```
//!
//! Every frame is bound to its object's name and its index, and the last one says so: a
//! frame altered, moved, dropped or cut off is detected before anything is written from it.
//! Values are the store's rows as stored (sealed when the store is encrypted), so an
//! encrypted store's backup holds no plaintext, ids included.

use std::sync::Arc;

use sha2::{Digest, Sha256};

use crate::store::FrameCipher;
use crate::store::backup::BackupRow;

/// First bytes of every backup object.
const MAGIC: &[u8; 8] = b"VERGEBK1";
/// Bytes of the header.
const HEADER_BYTES: usize = MAGIC.len() + 2;
/// A frame is closed once its payload reaches this size (a single larger row makes a larger
/// frame).
pub const FRAME_TARGET_BYTES: usize = 1024 * 1024;
/// Largest frame read: a row is at most a document's snapshot (`DOC_BYTES_MAX`) sealed, and a
/// frame holds one such row beyond the target.
pub const FRAME_BYTES_MAX: usize = 16 * 1024 * 1024;
/// Bytes of the checksum of a plain frame.
const CHECKSUM_BYTES: usize = 32;

/// What an object holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Every document row of the store at one feed position.
    Snapshot,
    /// The rows of the documents changed between two feed positions.
    Segment,
}

impl Kind {
    fn byte(self) -> u8 {
        match self {
            Kind::Snapshot => b'S',
            Kind::Segment => b'G',
        }
    }
}

/// One entry of a backup object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// Drop every row of the document: its rows as of the object's position follow.
    Clear(String),
    /// A stored row.
    Row(BackupRow),
}

/// Why an object cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    /// It does not start like a backup object.
    #[error("not a Verge backup object")]
    NotBackup,
    /// It is a snapshot where a segment was expected, or the reverse.
    #[error("the object holds a {found}, not a {expected}")]
    WrongKind {
        /// What the name says.
        expected: &'static str,
        /// What the header says.
        found: &'static str,
    },
    /// The backup is encrypted and no key was given.
    #[error(
        "the backup is encrypted: give the store's key (--encryption-key-file or VERGE_ENCRYPTION_KEY_FILE)"
    )]
    KeyMissing,
    /// A key was given for a plaintext backup.
    #[error("the backup is not encrypted, but an encryption key was given")]
    NotEncrypted,
    /// A frame does not open under the key given: another key, or the frame was altered.
    #[error("frame {index} does not open with the key given (another key, or a damaged object)")]
    Unauthentic {
        /// The frame.
        index: u64,
    },
    /// A plain frame's checksum does not match.
    #[error("frame {index} is damaged (checksum mismatch)")]
    Checksum {
        /// The frame.
        index: u64,
    },
    /// A frame is larger than any this version writes.
    #[error("frame {index} claims {len} bytes (at most {FRAME_BYTES_MAX})")]
    FrameTooLarge {
        /// The frame.
        index: u64,
        /// Its length.
        len: usize,
    },
    /// The object ends before its last frame.
    #[error("the object is cut short (no last frame)")]
    Truncated,
    /// Bytes follow the last frame.
    #[error("bytes follow the last frame")]
    Trailing,
    /// A frame's entries do not decode.
    #[error("frame {index} holds a malformed entry: {what}")]
    Malformed {
        /// The frame.
        index: u64,
        /// What was wrong.
        what: &'static str,
    },
}

fn kind_name(byte: u8) -> &'static str {
    match byte {
        b'S' => "snapshot",
        b'G' => "segment",
        _ => "unknown object",
    }
}

/// Encodes one object as a stream of byte chunks (header, then one chunk per frame).
pub struct ObjectEncoder {
    name: String,
    cipher: Option<Arc<FrameCipher>>,
    payload: Vec<u8>,
    index: u64,
    header: Option<Vec<u8>>,
}

impl std::fmt::Debug for ObjectEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectEncoder")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl ObjectEncoder {
    /// An encoder of object `name` (its full name under the backup location).
    pub fn new(name: &str, kind: Kind, cipher: Option<Arc<FrameCipher>>) -> Self {
        let mut header = Vec::with_capacity(HEADER_BYTES);
        header.extend_from_slice(MAGIC);
        header.push(kind.byte());
        header.push(u8::from(cipher.is_some()));
        Self {
            name: name.to_owned(),
            cipher,
            payload: vec![0],
            index: 0,
            header: Some(header),
        }
    }

    /// Adds an entry; returns the chunks ready to upload (the header, a full frame).
    pub fn push(&mut self, entry: &Entry) -> Vec<Vec<u8>> {
        encode_entry(&mut self.payload, entry);
        let mut out: Vec<Vec<u8>> = self.header.take().into_iter().collect();
        if self.payload.len() >= FRAME_TARGET_BYTES {
            out.push(self.frame(false));
        }
        out
    }

    /// Closes the object: the remaining chunks, ending with the last frame.
    pub fn finish(mut self) -> Vec<Vec<u8>> {
        let mut out: Vec<Vec<u8>> = self.header.take().into_iter().collect();
        out.push(self.frame(true));
        out
    }

    fn frame(&mut self, last: bool) -> Vec<u8> {
        let mut payload = std::mem::replace(&mut self.payload, vec![0]);
        payload[0] = u8::from(last);
        let body = match &self.cipher {
            Some(cipher) => cipher.seal(&self.name, self.index, &payload),
            None => {
                let sum = checksum(&self.name, self.index, &payload);
                payload.extend_from_slice(&sum);
                payload
            }
        };
        self.index += 1;
        let mut frame = Vec::with_capacity(4 + body.len());
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
        frame.extend_from_slice(&body);
        frame
    }
}

fn checksum(name: &str, index: u64, payload: &[u8]) -> [u8; CHECKSUM_BYTES] {
    let mut h = Sha256::new();
    h.update((name.len() as u32).to_be_bytes());
    h.update(name.as_bytes());
    h.update(index.to_be_bytes());
    h.update(payload);
    h.finalize().into()
}

fn put_id(out: &mut Vec<u8>, id: &str) {
    out.extend_from_slice(&(id.len() as u16).to_be_bytes());
    out.extend_from_slice(id.as_bytes());
}

fn put_value(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(&(value.len() as u32).to_be_bytes());
    out.extend_from_slice(value);
}

fn encode_entry(out: &mut Vec<u8>, entry: &Entry) {
    match entry {
        Entry::Clear(id) => {
            out.push(b'D');
            put_id(out, id);
        }
        Entry::Row(BackupRow::Snapshot { id, value }) => {
            out.push(b's');
            put_id(out, id);
            put_value(out, value);
        }
        Entry::Row(BackupRow::Change { id, seq, value }) => {
            out.push(b'c');
            put_id(out, id);
            out.extend_from_slice(&seq.to_be_bytes());
            put_value(out, value);
        }
        Entry::Row(BackupRow::Meta { id, value }) => {
            out.push(b'm');
            put_id(out, id);
            put_value(out, value);
        }
        Entry::Row(BackupRow::Retained {
            id,
            generation,
            value,
        }) => {
            out.push(b'r');
            put_id(out, id);
            out.extend_from_slice(&generation.to_be_bytes());
            put_value(out, value);
        }
        Entry::Row(BackupRow::RetainedAt {
            id,
            generation,
            at_ms,
        }) => {
            out.push(b'a');
            put_id(out, id);
            out.extend_from_slice(&generation.to_be_bytes());
            out.extend_from_slice(&at_ms.to_be_bytes());
        }
    }
}

/// Decodes an object fed in chunks of any size, holding at most one frame in memory.
pub struct ObjectDecoder<'c> {
    name: String,
    kind: Kind,
    cipher: Option<&'c FrameCipher>,
    buf: Vec<u8>,
    header_seen: bool,
    index: u64,
    done: bool,
}

impl std::fmt::Debug for ObjectDecoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectDecoder")
            .field("name", &self.name)
            .field("index", &self.index)
            .finish_non_exhaustive()
    }
}

impl<'c> ObjectDecoder<'c> {
    /// A decoder of object `name`, expected to be a `kind`.
    pub fn new(name: &str, kind: Kind, cipher: Option<&'c FrameCipher>) -> Self {
        Self {
            name: name.to_owned(),
            kind,
            cipher,
            buf: Vec::new(),
            header_seen: false,
            index: 0,
            done: false,
        }
    }

    /// Feeds bytes; calls `entry` for every entry of each complete frame.
    pub fn push(&mut self, bytes: &[u8], entry: &mut dyn FnMut(Entry)) -> Result<(), FormatError> {
        if self.done && !bytes.is_empty() {
            return Err(FormatError::Trailing);
        }
        self.buf.extend_from_slice(bytes);
        if !self.header_seen {
            if self.buf.len() < HEADER_BYTES {
                return Ok(());
            }
            self.header()?;
            self.buf.drain(..HEADER_BYTES);
            self.header_seen = true;
        }
        while !self.done && self.buf.len() >= 4 {
            let len = u32::from_be_bytes(self.buf[..4].try_into().expect("4 bytes")) as usize;
            if len > FRAME_BYTES_MAX {
                return Err(FormatError::FrameTooLarge {
                    index: self.index,
                    len,
                });
            }
            if self.buf.len() < 4 + len {
                break;
            }
            let body: Vec<u8> = self.buf.drain(..4 + len).skip(4).collect();
            self.frame(&body, entry)?;
        }
        if self.done && !self.buf.is_empty() {
            return Err(FormatError::Trailing);
        }
        Ok(())
    }

    /// Ends the object: an error unless its last frame was read.
    pub fn finish(self) -> Result<(), FormatError> {
        if self.done {
            Ok(())
        } else {
            Err(FormatError::Truncated)
        }
    }

    fn header(&self) -> Result<(), FormatError> {
        if &self.buf[..MAGIC.len()] != MAGIC {
            return Err(FormatError::NotBackup);
        }
        let kind = self.buf[MAGIC.len()];
        if kind != self.kind.byte() {
            return Err(FormatError::WrongKind {
                expected: kind_name(self.kind.byte()),
                found: kind_name(kind),
            });
        }
        match (self.buf[MAGIC.len() + 1], self.cipher.is_some()) {
            (0, false) | (1, true) => Ok(()),
            (1, false) => Err(FormatError::KeyMissing),
            (0, true) => Err(FormatError::NotEncrypted),
            _ => Err(FormatError::NotBackup),
        }
    }

    fn frame(&mut self, body: &[u8], entry: &mut dyn FnMut(Entry)) -> Result<(), FormatError> {
        let index = self.index;
        let payload = match self.cipher {
            Some(cipher) => cipher
                .open(&self.name, index, body)
                .ok_or(FormatError::Unauthentic { index })?,
            None => {
                if body.len() < CHECKSUM_BYTES {
                    return Err(FormatError::Checksum { index });
                }
                let (payload, sum) = body.split_at(body.len() - CHECKSUM_BYTES);
                if checksum(&self.name, index, payload) != sum {
                    return Err(FormatError::Checksum { index });
                }
                payload.to_vec()
            }
        };
        let Some((&last, mut rest)) = payload.split_first() else {
            return Err(FormatError::Malformed {
                index,
                what: "empty frame",
            });
        };
        // Decode the whole frame before handing out any of it.
        let mut entries = Vec::new();
        while !rest.is_empty() {
            entries.push(
                decode_entry(&mut rest).map_err(|what| FormatError::Malformed { index, what })?,
            );
        }
        entries.into_iter().for_each(entry);
        self.index += 1;
        match last {
            0 => Ok(()),
            1 => {
                self.done = true;
                Ok(())
            }
            _ => Err(FormatError::Malformed {
                index,
                what: "bad last-frame flag",
            }),
        }
    }
}

fn take<'a>(rest: &mut &'a [u8], n: usize) -> Result<&'a [u8], &'static str> {
    if rest.len() < n {
        return Err("entry cut short");
    }
    let (head, tail) = rest.split_at(n);
    *rest = tail;
    Ok(head)
}

fn take_u64(rest: &mut &[u8]) -> Result<u64, &'static str> {
    Ok(u64::from_be_bytes(
        take(rest, 8)?.try_into().expect("8 bytes"),
    ))
}

fn take_id(rest: &mut &[u8]) -> Result<String, &'static str> {
    let len = u16::from_be_bytes(take(rest, 2)?.try_into().expect("2 bytes")) as usize;
    if len == 0 || len > verge_core::limits::DOC_ID_BYTES_MAX {
        return Err("document id length out of range");
    }
    String::from_utf8(take(rest, len)?.to_vec()).map_err(|_| "document id is not UTF-8")
}

fn take_value(rest: &mut &[u8]) -> Result<Vec<u8>, &'static str> {
    let len = u32::from_be_bytes(take(rest, 4)?.try_into().expect("4 bytes")) as usize;
    Ok(take(rest, len)?.to_vec())
}

fn decode_entry(rest: &mut &[u8]) -> Result<Entry, &'static str> {
    let tag = take(rest, 1)?[0];
    let id = take_id(rest)?;
    Ok(match tag {
        b'D' => Entry::Clear(id),
        b's' => Entry::Row(BackupRow::Snapshot {
            id,
            value: take_value(rest)?,
        }),
        b'c' => {
            let seq = take_u64(rest)?;
            Entry::Row(BackupRow::Change {
                id,
                seq,
                value: take_value(rest)?,
            })
        }
        b'm' => Entry::Row(BackupRow::Meta {
            id,
            value: take_value(rest)?,
        }),
        b'r' => {
            let generation = take_u64(rest)?;
            Entry::Row(BackupRow::Retained {
                id,
                generation,
                value: take_value(rest)?,
            })
        }
        b'a' => {
            let generation = take_u64(rest)?;
            let at_ms = take_u64(rest)? as i64;
            Entry::Row(BackupRow::RetainedAt {
                id,
                generation,
                at_ms,
            })
        }
        _ => return Err("unknown entry tag"),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::store::EncryptionKey;

    fn entries() -> Vec<Entry> {
        vec![
            Entry::Clear("cart/1".into()),
            Entry::Row(BackupRow::Snapshot {
                id: "cart/1".into(),
                value: vec![1; 100],
            }),
            Entry::Row(BackupRow::Change {
                id: "cart/1".into(),
                seq: 7,
                value: vec![2; FRAME_TARGET_BYTES],
            }),
            Entry::Row(BackupRow::Meta {
                id: "cart/1".into(),
                value: b"meta".to_vec(),
            }),
            Entry::Row(BackupRow::Retained {
                id: "cart/1".into(),
                generation: 3,
                value: vec![3; 10],
            }),
            Entry::Row(BackupRow::RetainedAt {
                id: "cart/1".into(),
                generation: 3,
                at_ms: -5,
            }),
        ]
    }

    fn encode(name: &str, kind: Kind, cipher: Option<Arc<FrameCipher>>) -> Vec<u8> {
        let mut enc = ObjectEncoder::new(name, kind, cipher);
        let mut out = Vec::new();
        for e in entries() {
            enc.push(&e).into_iter().for_each(|c| out.extend(c));
        }
        enc.finish().into_iter().for_each(|c| out.extend(c));
        out
    }

    fn decode(
        name: &str,
        kind: Kind,
        cipher: Option<&FrameCipher>,
        bytes: &[u8],
        chunk: usize,
    ) -> Result<Vec<Entry>, FormatError> {
        let mut dec = ObjectDecoder::new(name, kind, cipher);
        let mut got = Vec::new();
        for c in bytes.chunks(chunk) {
            dec.push(c, &mut |e| got.push(e))?;
        }
        dec.finish()?;
        Ok(got)
    }

    #[test]
    fn round_trips_in_any_chunking_plain_and_sealed() {
        let key = EncryptionKey::from_bytes([9; 32]);
        let cipher = Arc::new(FrameCipher::new(&key, [1; 32]));
        for c in [None, Some(&*cipher)] {
            let bytes = encode(
                "b/segments/x",
                Kind::Segment,
                c.map(|_| Arc::clone(&cipher)),
            );
            for chunk in [1usize, 7, 4096, bytes.len()] {
                assert_eq!(
                    decode("b/segments/x", Kind::Segment, c, &bytes, chunk).unwrap(),
                    entries()
                );
            }
        }
    }

    #[test]
    fn damage_is_detected_before_anything_is_handed_out() {
        let key = EncryptionKey::from_bytes([9; 32]);
        let cipher = Arc::new(FrameCipher::new(&key, [1; 32]));
        for c in [None, Some(&*cipher)] {
            let bytes = encode("n", Kind::Snapshot, c.map(|_| Arc::clone(&cipher)));
            // A flipped byte in every position of the first frame's body.
            for at in [HEADER_BYTES + 5, HEADER_BYTES + 200, bytes.len() - 3] {
                let mut bad = bytes.clone();
                bad[at] ^= 0x40;
                assert!(decode("n", Kind::Snapshot, c, &bad, 4096).is_err(), "{at}");
            }
            // Cut short anywhere.
            for cut in [3, HEADER_BYTES, HEADER_BYTES + 10, bytes.len() - 1] {
                assert!(decode("n", Kind::Snapshot, c, &bytes[..cut], 4096).is_err());
            }
            // Trailing bytes.
            let mut long = bytes.clone();
            long.push(0);
            assert_eq!(
                decode("n", Kind::Snapshot, c, &long, 4096),
                Err(FormatError::Trailing)
            );
            // Another object's name (a renamed or copied object).
            assert!(decode("m", Kind::Snapshot, c, &bytes, 4096).is_err());
            // The wrong kind.
            assert!(matches!(
                decode("n", Kind::Segment, c, &bytes, 4096),
                Err(FormatError::WrongKind { .. })
            ));
        }
    }

    #[test]
    fn keys_must_match_the_backup() {
        let key = EncryptionKey::from_bytes([9; 32]);
        let other = EncryptionKey::from_bytes([8; 32]);
        let cipher = Arc::new(FrameCipher::new(&key, [1; 32]));
        let wrong = FrameCipher::new(&other, [1; 32]);
        let sealed = encode("n", Kind::Snapshot, Some(Arc::clone(&cipher)));
        let plain = encode("n", Kind::Snapshot, None);
        assert_eq!(
            decode("n", Kind::Snapshot, None, &sealed, 64),
            Err(FormatError::KeyMissing)
        );
        assert_eq!(
            decode("n", Kind::Snapshot, Some(&*cipher), &plain, 64),
            Err(FormatError::NotEncrypted)
        );
        assert_eq!(
            decode("n", Kind::Snapshot, Some(&wrong), &sealed, 1 << 20),
            Err(FormatError::Unauthentic { index: 0 })
        );
        // The sealed object carries no document id in the clear.
        assert!(!sealed.windows(6).any(|w| w == b"cart/1"));
    }

    #[test]
    fn garbage_never_panics() {
        let mut x = 0x1234_5678_u64;
        for len in 0..300 {
            let mut bytes = MAGIC.to_vec();
            bytes.extend_from_slice(&[b'G', 0]);
            for _ in 0..len {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                bytes.push(x as u8);
            }
            let _ = decode("g", Kind::Segment, None, &bytes, 16);
        }
    }
}
