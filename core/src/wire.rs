//! Messages between nodes and their framing.
//!
//! A frame is `[u32 big-endian length][u8 protocol version][bincode payload]`. Decoding checks
//! the length against [`FRAME_BYTES_MAX`] before reading the payload and bincode's own limit
//! while decoding, so a hostile peer can make a node allocate at most one frame's worth; every
//! error is returned, none panics.

use bincode::de::{BorrowDecoder, Decoder};
use bincode::enc::Encoder;
use bincode::error::{DecodeError, EncodeError};
use bincode::{BorrowDecode, Decode, Encode};

use crate::doc_id::DocId;
use crate::limits::{
    DOC_BYTES_MAX, WIRE_CHANGES_PER_BATCH_MAX, WIRE_DIGESTS_PER_MESSAGE_MAX, WIRE_REPORT_HEADS_MAX,
    WIRE_STABILITY_DOCS_MAX,
};
use crate::replication::stability::Report;

/// Version byte of every frame; a frame of another version is refused.
pub const PROTOCOL_VERSION: u8 = 1;
/// Largest frame payload: a per-document sync message may carry a whole document.
pub const FRAME_BYTES_MAX: usize = DOC_BYTES_MAX + 64 * 1024;

const fn config() -> bincode::config::Configuration<
    bincode::config::BigEndian,
    bincode::config::Varint,
    bincode::config::Limit<FRAME_BYTES_MAX>,
> {
    bincode::config::standard()
        .with_big_endian()
        .with_variable_int_encoding()
        .with_limit::<FRAME_BYTES_MAX>()
}

/// One message between two nodes.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub enum PeerMessage {
    /// Committed changes, for the receiver to apply and, when it is the sender's relay,
    /// forward. Sent on its own stream; the receiver answers [`PeerMessage::Persisted`] when
    /// the batch asks for it ([`ChangeBatch::ack`]), else just finishes the stream.
    Changes(ChangeBatch),
    /// The receiver of a batch applied it and made it durable.
    Persisted {
        /// The batch.
        batch_id: u64,
    },
    /// A step of range-based set reconciliation over document digests (negentropy).
    Reconcile {
        /// The negentropy message.
        message: Vec<u8>,
    },
    /// Reconciliation found documents whose digests the sender holds and the receiver does
    /// not know; the receiver syncs them (it knows which documents they are).
    SyncRequest {
        /// Digests of the receiver's documents to sync.
        digests: Vec<[u8; 32]>,
        /// The session runs because the connection is new: the peer may have missed any
        /// broadcast, so every document is synced, even one that just changed (periodic
        /// rounds leave those to the broadcast delivering them).
        catch_up: bool,
    },
    /// One message of an Automerge sync session for one document, on its own stream.
    /// `None` means the sender has nothing more to say for now.
    DocSync {
        /// The document.
        doc: DocId,
        /// The Automerge sync message.
        message: Option<Vec<u8>>,
    },
    /// A membership protocol packet.
    Membership(Vec<u8>),
    /// The sender's wall clock, in milliseconds since the Unix epoch: a node sends it to each
    /// peer now and then, and the peer answers with its own, so that the sender learns how far
    /// apart their clocks are (expiry, purges and tombstone retention read the wall clock).
    /// Appended last: a node that predates it refuses the stream and nothing else.
    Clock {
        /// Milliseconds since the Unix epoch.
        now_ms: i64,
    },
    /// Asks the receiver for a [`Report`] on each document, to tell whether a proposal to
    /// compact it is stable (`docs/compaction.md`). Answered with
    /// [`PeerMessage::StabilityReports`] on the same stream. Appended after `Clock`, for the
    /// same reason.
    StabilityQuery {
        /// The documents.
        docs: Vec<DocId>,
    },
    /// The answer to a [`PeerMessage::StabilityQuery`]: one report per document asked about.
    StabilityReports {
        /// The reports.
        reports: Vec<Report>,
    },
}

/// Changes to several documents, sent together to keep messages per write low under load.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct ChangeBatch {
    /// Unique per sender; echoed by [`PeerMessage::Persisted`].
    pub batch_id: u64,
    /// What the receiver does with it: `0` (sent to the relay) forwards the changes new to it
    /// to every other member, `1` or more applies them only (see `gossip::HOPS_TO_RELAY`).
    pub hops: u8,
    /// Whether the sender waits for [`PeerMessage::Persisted`]: only when a writer waits for
    /// replicas, so a plain broadcast costs one message per receiver, not two.
    pub ack: bool,
    /// The changes, grouped by document.
    pub docs: Vec<DocChanges>,
}

/// Encoded Automerge changes of one document.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct DocChanges {
    /// The document.
    pub doc: DocId,
    /// The changes, each as `Change::raw_bytes`.
    pub changes: Vec<Vec<u8>>,
}

impl Encode for DocId {
    fn encode<E: Encoder>(&self, encoder: &mut E) -> Result<(), EncodeError> {
        self.as_str().encode(encoder)
    }
}

impl<Context> Decode<Context> for DocId {
    fn decode<D: Decoder<Context = Context>>(decoder: &mut D) -> Result<Self, DecodeError> {
        let raw = String::decode(decoder)?;
        DocId::new(raw).map_err(|e| DecodeError::OtherString(e.to_string()))
    }
}

impl<'de, Context> BorrowDecode<'de, Context> for DocId {
    fn borrow_decode<D: BorrowDecoder<'de, Context = Context>>(
        decoder: &mut D,
    ) -> Result<Self, DecodeError> {
        let raw = String::borrow_decode(decoder)?;
        DocId::new(raw).map_err(|e| DecodeError::OtherString(e.to_string()))
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WireError {
    /// The announced length exceeds [`FRAME_BYTES_MAX`].
    #[error("frame of {0} bytes exceeds the {FRAME_BYTES_MAX} byte limit")]
    TooLarge(usize),
    /// The frame is empty.
    #[error("empty frame")]
    Empty,
    /// The frame is of another protocol version.
    #[error("protocol version {0}, this node speaks {PROTOCOL_VERSION}")]
    Version(u8),
    /// The payload is malformed.
    #[error("malformed message: {0}")]
    Decode(#[from] DecodeError),
    /// The payload has bytes after the message.
    #[error("{0} trailing bytes after the message")]
    Trailing(usize),
    /// A message exceeds a count limit.
    #[error("{count} {what} exceed the limit of {max}")]
    Limit {
        /// What was counted.
        what: &'static str,
        /// How many the message holds.
        count: usize,
        /// The limit.
        max: usize,
    },
    /// Encoding failed (a message over the size limit).
    #[error("encoding: {0}")]
    Encode(#[from] EncodeError),
}

impl PeerMessage {
    /// The message's kind as a metric label: `changes`, `persisted`, `reconcile`,
    /// `sync_request`, `doc_sync`, `membership`, `clock`, `stability_query` or
    /// `stability_reports`.
    pub fn kind(&self) -> &'static str {
        match self {
            PeerMessage::Changes(_) => "changes",
            PeerMessage::Persisted { .. } => "persisted",
            PeerMessage::Reconcile { .. } => "reconcile",
            PeerMessage::SyncRequest { .. } => "sync_request",
            PeerMessage::DocSync { .. } => "doc_sync",
            PeerMessage::Membership(_) => "membership",
            PeerMessage::Clock { .. } => "clock",
            PeerMessage::StabilityQuery { .. } => "stability_query",
            PeerMessage::StabilityReports { .. } => "stability_reports",
        }
    }

    /// Encodes the message as a whole frame, length prefix included.
    pub fn to_frame(&self) -> Result<Vec<u8>, WireError> {
        let payload = bincode::encode_to_vec(self, config())?;
        let len = payload.len() + 1;
        if len > FRAME_BYTES_MAX {
            return Err(WireError::TooLarge(len));
        }
        let mut frame = Vec::with_capacity(4 + len);
        // Bounded by FRAME_BYTES_MAX, far below u32::MAX.
        frame.extend_from_slice(&(len as u32).to_be_bytes());
        frame.push(PROTOCOL_VERSION);
        frame.extend_from_slice(&payload);
        Ok(frame)
    }

    /// Checks a frame's length prefix before its body is read.
    pub fn check_len(prefix: [u8; 4]) -> Result<usize, WireError> {
        let len = u32::from_be_bytes(prefix) as usize;
        if len == 0 {
            return Err(WireError::Empty);
        }
        if len > FRAME_BYTES_MAX {
            return Err(WireError::TooLarge(len));
        }
        Ok(len)
    }

    /// Decodes a frame body (what follows the length prefix).
    pub fn from_body(body: &[u8]) -> Result<Self, WireError> {
        let (&version, payload) = body.split_first().ok_or(WireError::Empty)?;
        if version != PROTOCOL_VERSION {
            return Err(WireError::Version(version));
        }
        let (message, read): (PeerMessage, usize) = bincode::decode_from_slice(payload, config())?;
        if read != payload.len() {
            return Err(WireError::Trailing(payload.len() - read));
        }
        message.check_limits()?;
        Ok(message)
    }

    fn check_limits(&self) -> Result<(), WireError> {
        match self {
            PeerMessage::Changes(batch) => {
                let n: usize = batch.docs.iter().map(|d| d.changes.len()).sum();
                if n > WIRE_CHANGES_PER_BATCH_MAX {
                    return Err(WireError::Limit {
                        what: "changes in one batch",
                        count: n,
                        max: WIRE_CHANGES_PER_BATCH_MAX,
                    });
                }
            }
            PeerMessage::SyncRequest { digests, .. }
                if digests.len() > WIRE_DIGESTS_PER_MESSAGE_MAX =>
            {
                return Err(WireError::Limit {
                    what: "digests in one message",
                    count: digests.len(),
                    max: WIRE_DIGESTS_PER_MESSAGE_MAX,
                });
            }
            PeerMessage::StabilityQuery { docs } if docs.len() > WIRE_STABILITY_DOCS_MAX => {
                return Err(WireError::Limit {
                    what: "documents in one stability query",
                    count: docs.len(),
                    max: WIRE_STABILITY_DOCS_MAX,
                });
            }
            PeerMessage::StabilityReports { reports } => {
                if reports.len() > WIRE_STABILITY_DOCS_MAX {
                    return Err(WireError::Limit {
                        what: "reports in one answer",
                        count: reports.len(),
                        max: WIRE_STABILITY_DOCS_MAX,
                    });
                }
                if let Some(r) = reports
                    .iter()
                    .find(|r| r.heads.len() > WIRE_REPORT_HEADS_MAX)
                {
                    return Err(WireError::Limit {
                        what: "heads in one report",
                        count: r.heads.len(),
                        max: WIRE_REPORT_HEADS_MAX,
                    });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    fn round_trip(m: &PeerMessage) -> PeerMessage {
        let frame = m.to_frame().expect("encodes");
        let len =
            PeerMessage::check_len(frame[..4].try_into().expect("4 bytes")).expect("length ok");
        assert_eq!(len, frame.len() - 4);
        PeerMessage::from_body(&frame[4..]).expect("decodes")
    }

    #[test]
    fn stability_messages_are_bounded() {
        let query = PeerMessage::StabilityQuery {
            docs: vec![id("a"); WIRE_STABILITY_DOCS_MAX + 1],
        };
        let frame = query.to_frame().expect("encodes");
        assert!(matches!(
            PeerMessage::from_body(&frame[4..]),
            Err(WireError::Limit { .. })
        ));
        let reports = PeerMessage::StabilityReports {
            reports: vec![Report {
                doc: id("a"),
                incarnation: 0,
                generation: 0,
                heads: vec![[0; 32]; WIRE_REPORT_HEADS_MAX + 1],
                members: [0; 32],
            }],
        };
        let frame = reports.to_frame().expect("encodes");
        assert!(matches!(
            PeerMessage::from_body(&frame[4..]),
            Err(WireError::Limit { .. })
        ));
    }

    #[test]
    fn every_message_round_trips() {
        let messages = [
            PeerMessage::Changes(ChangeBatch {
                batch_id: 7,
                hops: 1,
                ack: true,
                docs: vec![DocChanges {
                    doc: id("cart/1"),
                    changes: vec![vec![1, 2, 3], vec![]],
                }],
            }),
            PeerMessage::Persisted { batch_id: u64::MAX },
            PeerMessage::StabilityQuery {
                docs: vec![id("a"), id("cart/1")],
            },
            PeerMessage::StabilityReports {
                reports: vec![Report {
                    doc: id("a"),
                    incarnation: 2,
                    generation: u64::MAX,
                    heads: vec![[3; 32], [4; 32]],
                    members: [5; 32],
                }],
            },
            PeerMessage::Reconcile {
                message: vec![0x61; 100],
            },
            PeerMessage::SyncRequest {
                digests: vec![[9; 32]],
                catch_up: true,
            },
            PeerMessage::DocSync {
                doc: id("a"),
                message: Some(vec![0x42]),
            },
            PeerMessage::DocSync {
                doc: id("a"),
                message: None,
            },
            PeerMessage::Membership(vec![1; 10]),
            PeerMessage::Clock { now_ms: -5 },
            PeerMessage::Clock { now_ms: i64::MAX },
        ];
        for m in &messages {
            assert_eq!(&round_trip(m), m);
        }
    }

    #[test]
    fn refuses_bad_frames() {
        assert!(matches!(
            PeerMessage::check_len([0, 0, 0, 0]),
            Err(WireError::Empty)
        ));
        assert!(matches!(
            PeerMessage::check_len([0xff; 4]),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(PeerMessage::from_body(&[]), Err(WireError::Empty)));
        assert!(matches!(
            PeerMessage::from_body(&[9, 0]),
            Err(WireError::Version(9))
        ));
        let mut frame = PeerMessage::Persisted { batch_id: 1 }
            .to_frame()
            .expect("encodes");
        frame.push(0);
        assert!(matches!(
            PeerMessage::from_body(&frame[4..]),
            Err(WireError::Trailing(1))
        ));
        // An invalid document id inside a valid encoding.
        let bad = PeerMessage::DocSync {
            doc: id("a"),
            message: None,
        }
        .to_frame()
        .expect("encodes");
        let mut body = bad[4..].to_vec();
        if let Some(pos) = body.iter().position(|b| *b == b'a') {
            body[pos] = b' ';
        }
        assert!(PeerMessage::from_body(&body).is_err());
    }

    #[test]
    fn a_batch_says_whether_it_wants_an_acknowledgement() {
        let batch = |ack| {
            PeerMessage::Changes(ChangeBatch {
                batch_id: 3,
                hops: 0,
                ack,
                docs: Vec::new(),
            })
        };
        for ack in [false, true] {
            assert_eq!(round_trip(&batch(ack)), batch(ack));
        }
        // Body: version, variant, batch id (one varint byte), hops, ack, docs length.
        let frame = batch(false).to_frame().expect("encodes");
        let mut body = frame[4..].to_vec();
        assert_eq!(body, [PROTOCOL_VERSION, 0, 3, 0, 0, 0]);
        body[4] = 2;
        assert!(matches!(
            PeerMessage::from_body(&body),
            Err(WireError::Decode(_))
        ));
    }

    #[test]
    fn refuses_oversized_counts() {
        let digests = vec![[0u8; 32]; WIRE_DIGESTS_PER_MESSAGE_MAX + 1];
        let frame = PeerMessage::SyncRequest {
            digests,
            catch_up: false,
        }
        .to_frame()
        .expect("encodes");
        assert!(matches!(
            PeerMessage::from_body(&frame[4..]),
            Err(WireError::Limit {
                what: "digests in one message",
                ..
            })
        ));
    }

    proptest! {
        #[test]
        fn garbage_never_panics(body in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = PeerMessage::from_body(&body);
        }

        #[test]
        fn truncation_is_an_error(cut in 0usize..40) {
            let m = PeerMessage::Changes(ChangeBatch { batch_id: 3, hops: 0, ack: false, docs: vec![DocChanges { doc: id("doc/x"), changes: vec![vec![7; 30]] }] });
            let frame = m.to_frame().expect("encodes");
            let body = &frame[4..];
            let cut = cut.min(body.len() - 1);
            prop_assert!(PeerMessage::from_body(&body[..cut]).is_err());
        }
    }
}
