//! A local replica of one document and its sync with a node.
//!
//! Reads and writes touch only memory: they go through `verge_core`'s `apply` and `to_json`, the
//! same code the node runs, so a write that succeeds here succeeds on the node. Sync is sans-IO:
//! [`Replica::sync_begin`] returns the request body for `POST /v1/sync/{id}` and
//! [`Replica::sync_receive`] consumes the answer, returning the next body when another round
//! trip is needed. The JavaScript wrapper does the `fetch` between the two, and
//! [`Replica::sync`] drives them over any [`Transport`] for Rust runtimes.

use std::collections::HashSet;

use automerge::sync::{BloomFilter, Have, Message, MessageFlags, MessageVersion, State, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash, ObjId, Prop, ROOT, ReadDoc, Value};
use serde_json::{Map, Value as Json};
use verge_core::document::{Lifecycle, load_document, new_document, value_json};
use verge_core::incarnation;
use verge_core::ops::RESERVED_KEY_PREFIX;
use verge_core::{DocId, Expiry, Op, PathSegment, Write, apply, to_json};

use crate::error::ClientError;

/// Most round trips one [`Replica::sync`] makes before giving up. The steady state needs one; a
/// Bloom filter false positive or a node that lost history needs a few more.
pub const MAX_ROUND_TRIPS: u32 = 8;

/// First bytes of [`Replica::save`]'s output, so `load` rejects anything else clearly.
const SAVE_MAGIC: &[u8; 5] = b"VRGC\x01";

/// What one completed sync did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncStats {
    /// HTTP requests made.
    pub round_trips: u32,
    /// Request body bytes sent.
    pub bytes_sent: usize,
    /// Response body bytes received.
    pub bytes_received: usize,
    /// Whether changes from the node altered this replica.
    pub changed: bool,
}

/// The sync in progress between `sync_begin` and the last `sync_receive`.
#[derive(Debug)]
struct Session {
    /// Automerge's bookkeeping for the rounds after the first; the first message is built by
    /// hand (see [`Replica::sync_begin`]).
    state: State,
    /// Our heads when the exchange started: the node must hold them for the sync to be done.
    sent_heads: Vec<ChangeHash>,
    /// Whether the first message's `last_sync` was non-empty (so an empty `have` back is a
    /// reset, not an empty document).
    claimed_history: bool,
    stats: SyncStats,
}

/// Transports a sync message to the node serving a document and returns its answer.
///
/// Rust edge runtimes (Spin, Fastly, a plain server) implement this over their HTTP client:
/// POST `body` to `{url}/v1/sync/{id}` with `Content-Type: application/octet-stream` (and
/// `Authorization: Bearer <token>` when the node wants one) and return the response body of a
/// `200`. A non-`200` answer should become [`ClientError::from_response`]; a failure to get an
/// answer [`ClientError::Network`]. Any closure of the same shape is a transport.
pub trait Transport {
    /// Posts one sync message and returns the node's.
    fn post_sync(&mut self, id: &DocId, body: &[u8]) -> Result<Vec<u8>, ClientError>;
}

impl<F> Transport for F
where
    F: FnMut(&DocId, &[u8]) -> Result<Vec<u8>, ClientError>,
{
    fn post_sync(&mut self, id: &DocId, body: &[u8]) -> Result<Vec<u8>, ClientError> {
        self(id, body)
    }
}

/// A local replica of one document.
///
/// It writes as one actor for its whole life (a fresh one on [`Replica::new`] and on
/// [`Replica::load`]: two replicas loaded from the same saved bytes must never share an actor).
#[derive(Debug)]
pub struct Replica {
    id: DocId,
    doc: Automerge,
    /// Heads that this replica and the node both hold, as of the last answer. Everything after
    /// them is what a sync has to exchange.
    shared: Vec<ChangeHash>,
    session: Option<Session>,
    last_sync: SyncStats,
}

impl Replica {
    /// An empty replica of `id`, knowing nothing of the node's copy yet.
    pub fn new(id: DocId) -> Self {
        Self {
            id,
            doc: new_document(ActorId::random()),
            shared: Vec::new(),
            session: None,
            last_sync: SyncStats::default(),
        }
    }

    /// Opens `id` from the node behind `transport`: one round trip.
    pub fn open(id: DocId, transport: &mut impl Transport) -> Result<Self, ClientError> {
        let mut replica = Self::new(id);
        replica.sync(transport)?;
        Ok(replica)
    }

    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The current heads (sorted), which change with every local write and every sync.
    pub fn heads(&self) -> Vec<ChangeHash> {
        self.doc.get_heads()
    }

    /// The heads this replica knows the node holds, as of the last sync.
    pub fn shared_heads(&self) -> &[ChangeHash] {
        &self.shared
    }

    /// The Automerge document, for reads beyond JSON.
    pub fn automerge(&self) -> &Automerge {
        &self.doc
    }

    /// The document's user keys as JSON (counters as numbers, text as strings).
    pub fn to_json(&self) -> Json {
        to_json(&self.doc)
    }

    /// The tombstone and expiry the document carries.
    pub fn lifecycle(&self) -> Lifecycle {
        Lifecycle::of(&self.doc)
    }

    /// The JSON value at `path` (the whole document for an empty path), or `None` when absent.
    /// Verge's reserved root keys read as absent.
    pub fn get(&self, path: &[PathSegment]) -> Option<Json> {
        let Some((last, parents)) = path.split_last() else {
            return Some(self.to_json());
        };
        if let Some(PathSegment::Key(k)) = path.first()
            && k.starts_with(RESERVED_KEY_PREFIX)
        {
            return None;
        }
        let prop = |seg: &PathSegment| match seg {
            PathSegment::Key(k) => Prop::Map(k.clone()),
            PathSegment::Index(n) => Prop::Seq(*n),
        };
        let mut obj: ObjId = ROOT;
        for seg in parents {
            match self.doc.get(&obj, prop(seg)) {
                Ok(Some((Value::Object(_), id))) => obj = id,
                _ => return None,
            }
        }
        match self.doc.get(&obj, prop(last)) {
            Ok(Some(_)) => Some(value_json(&self.doc, &obj, prop(last))),
            _ => None,
        }
    }

    /// Applies `ops` in order as one local change stamped `now_ms`. Returns whether anything
    /// changed. On error nothing is changed.
    pub fn apply(&mut self, ops: Vec<Op>, now_ms: i64) -> Result<bool, ClientError> {
        self.write(&Write::Ops(ops), now_ms)
    }

    /// Applies a JSON array of ops (the `ops` of a `PATCH` body) or a single op object.
    pub fn apply_json(&mut self, ops: &str, now_ms: i64) -> Result<bool, ClientError> {
        let json: Json =
            serde_json::from_str(ops).map_err(|e| ClientError::InvalidJson(e.to_string()))?;
        let ops = match &json {
            Json::Array(_) => Op::parse_list(&json)?,
            _ => vec![Op::parse(&json)?],
        };
        self.apply(ops, now_ms)
    }

    /// Makes the document equal to `doc`, changing only what differs, like `PUT`.
    pub fn replace(&mut self, doc: Map<String, Json>, now_ms: i64) -> Result<bool, ClientError> {
        self.write(&Write::Replace(doc), now_ms)
    }

    /// Deletes the document (a tombstone that syncs like any change), like `DELETE`.
    pub fn delete(&mut self, now_ms: i64) -> Result<bool, ClientError> {
        self.write(&Write::Delete, now_ms)
    }

    fn write(&mut self, write: &Write, now_ms: i64) -> Result<bool, ClientError> {
        let applied = apply(&mut self.doc, write, Expiry::Keep, now_ms)?;
        if applied.replaced {
            // A revival started a new history: the node holds none of it yet.
            self.shared.clear();
        }
        Ok(applied.changed())
    }

    /// Whether this replica holds changes the node has not acknowledged.
    pub fn has_unsynced_changes(&self) -> bool {
        self.doc.get_heads() != self.shared && !self.doc.get_changes(&self.shared).is_empty()
    }

    /// Serialises the replica (document and sync position) for a cache. [`Replica::load`] of
    /// these bytes syncs in one round trip, like the replica that saved them.
    pub fn save(&self) -> Vec<u8> {
        let doc = self.doc.save();
        let id = self.id.as_str().as_bytes();
        let mut out = Vec::with_capacity(SAVE_MAGIC.len() + 3 + id.len() + 32 * 2 + doc.len());
        out.extend_from_slice(SAVE_MAGIC);
        // DocId is at most 256 bytes, so its length fits in two bytes.
        out.extend_from_slice(&(id.len() as u16).to_be_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(self.shared.len() as u32).to_be_bytes());
        for h in &self.shared {
            out.extend_from_slice(&h.0);
        }
        out.extend_from_slice(&doc);
        out
    }

    /// Loads bytes from [`Replica::save`], writing as a fresh actor.
    pub fn load(bytes: &[u8]) -> Result<Self, ClientError> {
        let bad = |m: &str| ClientError::InvalidSave(m.to_owned());
        let rest = bytes
            .strip_prefix(SAVE_MAGIC.as_slice())
            .ok_or_else(|| bad("not bytes from save()"))?;
        let (len, rest) = split(rest, 2).ok_or_else(|| bad("truncated id"))?;
        let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
        let (id, rest) = split(rest, len).ok_or_else(|| bad("truncated id"))?;
        let id = std::str::from_utf8(id).map_err(|_| bad("id is not UTF-8"))?;
        let id = DocId::new(id)?;
        let (n, mut rest) = split(rest, 4).ok_or_else(|| bad("truncated heads"))?;
        let n = u32::from_be_bytes([n[0], n[1], n[2], n[3]]);
        let mut shared = Vec::new();
        for _ in 0..n {
            let (h, r) = split(rest, 32).ok_or_else(|| bad("truncated heads"))?;
            let mut hash = [0u8; 32];
            hash.copy_from_slice(h);
            shared.push(ChangeHash(hash));
            rest = r;
        }
        let doc = load_document(rest, ActorId::random())
            .map_err(|e| ClientError::InvalidSave(e.to_string()))?;
        // Only heads the document really holds count as shared.
        shared.retain(|h| doc.get_change_by_hash(h).is_some());
        Ok(Self {
            id,
            doc,
            shared,
            session: None,
            last_sync: SyncStats::default(),
        })
    }

    /// Starts a sync and returns the first request body.
    ///
    /// Standard Automerge sends no changes until it has heard the peer's `have`, which costs a
    /// round trip per sync. This message carries every change made since the shared heads and
    /// a `have` whose `last_sync` is our own current heads with an empty Bloom filter. A node
    /// holding the shared heads (the normal case) applies the changes first, so it then holds
    /// our heads too, and answers with exactly the changes that are not ancestors of them: what
    /// we lack, without echoing ours and without the false positives of a Bloom filter (about 1
    /// in 100 per change, each costing another round trip). One round trip. Starting again
    /// after a lost answer resends the same changes, which the node ignores as duplicates, so
    /// retrying is always safe. A node lacking the shared heads answers with a reset, and the
    /// exchange continues with Automerge's own protocol.
    pub fn sync_begin(&mut self) -> Vec<u8> {
        let heads = self.doc.get_heads();
        let changes = self.doc.get_changes(&self.shared);
        let mut flags = MessageFlags::new();
        flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
        let message = Message {
            heads: heads.clone(),
            need: Vec::new(),
            have: vec![Have {
                last_sync: heads.clone(),
                bloom: BloomFilter::default(),
            }],
            changes: changes
                .iter()
                .map(|c| c.raw_bytes().to_vec())
                .collect::<Vec<_>>()
                .into(),
            // Advertises V2 so that a node answering an empty replica sends one compressed
            // document instead of every change.
            flags: Some(flags),
            version: MessageVersion::V1,
        };
        let body = message.encode();
        let mut state = State::new();
        state.shared_heads.clone_from(&self.shared);
        state.last_sent_heads.clone_from(&heads);
        self.session = Some(Session {
            state,
            claimed_history: !heads.is_empty(),
            sent_heads: heads,
            stats: SyncStats {
                round_trips: 1,
                bytes_sent: body.len(),
                ..SyncStats::default()
            },
        });
        body
    }

    /// Consumes the node's answer. Returns the next request body, or `None` when the sync is
    /// done (then [`Replica::last_sync`] tells what it did).
    pub fn sync_receive(&mut self, reply: &[u8]) -> Result<Option<Vec<u8>>, ClientError> {
        let mut s = self.session.take().ok_or(ClientError::NoSyncInProgress)?;
        s.stats.bytes_received += reply.len();
        let message =
            Message::decode(reply).map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        // A node that does not hold our `last_sync` (it lost history, or it is another node
        // that has not caught up) answers with a reset: no changes and an empty `have`.
        let reset = s.claimed_history
            && message.changes.is_empty()
            && message.have.as_slice() == [Have::default()];
        let node_heads = message.heads.clone();
        let node_needs = !message.need.is_empty();
        let before = self.doc.get_heads();
        let incarnation_before = incarnation::of(&self.doc);
        self.doc
            .receive_sync_message(&mut s.state, message)
            .map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        let new = self.doc.get_changes(&before);
        let settled = incarnation::settle(&mut self.doc, incarnation_before, &new)
            .map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        if matches!(settled, incarnation::Settled::Replaced) {
            // The node's copy is a newer incarnation (the document was deleted or expired and
            // written again): ours was replaced by it, and the exchange so far describes
            // histories that are gone.
            s.state = State::new();
            self.shared.clear();
        }
        if self.doc.get_heads() != before {
            s.stats.changed = true;
        }
        let known: Vec<ChangeHash> = node_heads
            .iter()
            .copied()
            .filter(|h| self.doc.get_change_by_hash(h).is_some())
            .collect();
        if known.len() == node_heads.len() {
            // Both sides hold everything up to the node's heads.
            self.shared = node_heads.clone();
            if !node_needs && !reset {
                let after_node: HashSet<ChangeHash> = self
                    .doc
                    .get_changes(&node_heads)
                    .iter()
                    .map(|c| c.hash())
                    .collect();
                if s.sent_heads.iter().all(|h| !after_node.contains(h)) {
                    // The node holds all we sent and we hold all it has: done.
                    self.last_sync = s.stats;
                    return Ok(None);
                }
            }
        }
        if reset {
            // Only what the node just announced is known to be on both sides.
            s.state.shared_heads = known;
        }
        if s.stats.round_trips >= MAX_ROUND_TRIPS {
            return Err(ClientError::SyncIncomplete(s.stats.round_trips));
        }
        // Off the fast path: let Automerge's protocol finish the exchange.
        match self.doc.generate_sync_message(&mut s.state) {
            Some(next) => {
                let body = next.encode();
                s.stats.round_trips += 1;
                s.stats.bytes_sent += body.len();
                self.session = Some(s);
                Ok(Some(body))
            }
            None => {
                self.last_sync = s.stats;
                Ok(None)
            }
        }
    }

    /// Drops the local copy after the node answered `document_replaced`: the document was
    /// deleted or expired and written again since this copy was made, so the copy can never
    /// merge with the node's. Local writes not yet synced (made without seeing that delete or
    /// expiry) go with it. The next sync fetches the current document. A fresh actor keeps any
    /// changes of the dropped copy from ever clashing with new ones.
    pub fn start_over(&mut self) {
        self.doc = new_document(ActorId::random());
        self.shared.clear();
        self.session = None;
    }

    /// Abandons the sync in progress (after a transport failure). Nothing is lost: the next
    /// sync resends whatever the node may not have.
    pub fn sync_abort(&mut self) {
        self.session = None;
    }

    /// What the last completed sync did.
    pub fn last_sync(&self) -> SyncStats {
        self.last_sync
    }

    /// Pushes local changes and pulls the node's over `transport`: one round trip in the steady
    /// state. On error the replica is unchanged apart from changes already received, and the
    /// call may simply be repeated.
    ///
    /// When the node answers `document_replaced`, the replica starts over ([`Replica::start_over`])
    /// and syncs again, once.
    pub fn sync(&mut self, transport: &mut impl Transport) -> Result<SyncStats, ClientError> {
        match self.sync_once(transport) {
            Err(e) if e.code() == "document_replaced" => {
                self.start_over();
                self.sync_once(transport)
            }
            other => other,
        }
    }

    fn sync_once(&mut self, transport: &mut impl Transport) -> Result<SyncStats, ClientError> {
        let mut body = self.sync_begin();
        loop {
            let reply = match transport.post_sync(&self.id, &body) {
                Ok(reply) => reply,
                Err(e) => {
                    self.sync_abort();
                    return Err(e);
                }
            };
            match self.sync_receive(&reply)? {
                Some(next) => body = next,
                None => return Ok(self.last_sync),
            }
        }
    }
}

fn split(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= n).then(|| bytes.split_at(n))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id() -> DocId {
        DocId::new("t/1").expect("valid id")
    }

    fn ops(v: Json) -> Vec<Op> {
        Op::parse_list(&v).expect("valid ops")
    }

    #[test]
    fn reads_and_writes_locally() {
        let mut r = Replica::new(id());
        r.apply(
            ops(json!([
                {"op": "set", "path": ["a", "b"], "value": [1, {"c": true}]},
                {"op": "inc", "path": ["n"], "by": 3},
                {"op": "splice", "path": ["t"], "index": 0, "text": "hé"},
            ])),
            1,
        )
        .expect("applies");
        assert_eq!(
            r.to_json(),
            json!({"a": {"b": [1, {"c": true}]}, "n": 3, "t": "hé"})
        );
        let path = |v: Json| -> Vec<PathSegment> {
            v.as_array()
                .expect("array")
                .iter()
                .map(|s| match s {
                    Json::String(k) => PathSegment::Key(k.clone()),
                    n => PathSegment::Index(n.as_u64().expect("index") as usize),
                })
                .collect()
        };
        assert_eq!(r.get(&path(json!(["a", "b", 1, "c"]))), Some(json!(true)));
        assert_eq!(r.get(&path(json!(["n"]))), Some(json!(3)));
        assert_eq!(r.get(&path(json!(["a", "x"]))), None);
        assert_eq!(r.get(&path(json!(["_verge_deleted"]))), None);
        let err = r
            .apply(ops(json!([{"op": "inc", "path": ["t"]}])), 2)
            .expect_err("inc on text");
        assert_eq!(err.code(), "op_not_applicable");
    }

    #[test]
    fn save_and_load_keep_document_and_sync_position_with_a_new_actor() {
        let mut r = Replica::new(id());
        r.apply(ops(json!([{"op": "set", "path": ["k"], "value": 1}])), 1)
            .expect("applies");
        r.shared = r.heads();
        let loaded = Replica::load(&r.save()).expect("loads");
        assert_eq!(loaded.id(), r.id());
        assert_eq!(loaded.to_json(), r.to_json());
        assert_eq!(loaded.shared_heads(), r.shared_heads());
        assert_ne!(loaded.doc.get_actor(), r.doc.get_actor());
        assert_eq!(
            Replica::load(b"nope").expect_err("garbage").code(),
            "invalid_save"
        );
    }

    #[test]
    fn two_replicas_sync_through_a_stateless_peer() {
        // A stand-in for the node's sync route: a document answering each message from a
        // fresh sync state, exactly as `POST /v1/sync` does.
        let mut server = new_document(ActorId::random());
        let mut transport = |_: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
            let mut state = State::new();
            let msg = Message::decode(body).expect("decodes");
            server
                .receive_sync_message(&mut state, msg)
                .expect("applies");
            Ok(server
                .generate_sync_message(&mut state)
                .map(Message::encode)
                .unwrap_or_default())
        };
        let mut a = Replica::open(id(), &mut transport).expect("opens");
        let mut b = Replica::open(id(), &mut transport).expect("opens");
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 2}])), 1)
            .expect("applies");
        b.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 5}])), 1)
            .expect("applies");
        assert!(a.has_unsynced_changes());
        let stats = a.sync(&mut transport).expect("syncs");
        assert_eq!(stats.round_trips, 1);
        assert!(!a.has_unsynced_changes());
        let stats = b.sync(&mut transport).expect("syncs");
        assert_eq!(stats.round_trips, 1);
        assert!(stats.changed);
        a.sync(&mut transport).expect("syncs");
        assert_eq!(a.heads(), b.heads());
        assert_eq!(a.to_json(), json!({"n": 7}));
        assert_eq!(b.to_json(), json!({"n": 7}));
    }
}
