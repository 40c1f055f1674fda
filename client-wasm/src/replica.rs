//! A local replica of one document and its sync with a node.
//!
//! Reads and writes touch only memory, and on the hot path not even Automerge: a write is
//! checked and applied to a [`Shadow`] (`verge_core`'s typed JSON state, held by a property test
//! to exactly what `apply` does and refuses) and queued; reads answer from the shadow. The
//! queued writes reach Automerge, through the same `apply` the node runs, when something needs
//! the document itself: a sync, `save`, `heads`. Consecutive writes that only set scalars,
//! increment, splice or insert scalars share one Automerge change (increments of one counter
//! add up into one); a write that deletes or writes an object or array is a change of its own,
//! so that what it creates or removes is scoped exactly as if it had been applied at once. Sync is sans-IO:
//! [`Replica::sync_begin`] returns the request body for `POST /v1/sync/{id}` and
//! [`Replica::sync_receive`] consumes the answer, returning the next body when another round
//! trip is needed. The JavaScript wrapper does the `fetch` between the two, and
//! [`Replica::sync`] drives them over any [`Transport`] for Rust runtimes.

use std::collections::HashSet;

use automerge::sync::{BloomFilter, Have, Message, MessageFlags, MessageVersion, State, SyncDoc};
use automerge::{ActorId, Automerge, ChangeHash, ReadDoc};
use serde_json::{Map, Value as Json};
use verge_core::document::{Lifecycle, load_document, new_document};
use verge_core::lineage::{self, Lineage, Local, Move, Settled};
use verge_core::shadow::Shadow;
use verge_core::{DocId, Expiry, Op, PathSegment, Write, apply};

use crate::decoded;
use crate::error::ClientError;

/// Most round trips one [`Replica::sync`] makes before giving up. The steady state needs one; a
/// Bloom filter false positive or a node that lost history needs a few more.
pub const MAX_ROUND_TRIPS: u32 = 8;

/// First bytes of [`Replica::save`]'s output, so `load` rejects anything else clearly.
const SAVE_MAGIC: &[u8; 5] = b"VRGC\x02";
/// The first version of the format (no log of unacknowledged ops), still loaded.
const SAVE_MAGIC_V1: &[u8; 5] = b"VRGC\x01";

/// Most ops of unacknowledged writes a replica keeps for replay; beyond it the oldest are
/// dropped (and [`Replica::log_complete`] turns false). A replica that far ahead of its node
/// has more to fear from the 4 MiB sync message limit.
pub const UNACKED_OPS_MAX: usize = 100_000;

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
    /// Ops made again on a new generation of the document (`docs/compaction.md`): writes the
    /// node had not acknowledged when it compacted the document.
    pub replayed: u32,
    /// Of those, ops that no longer applied there (another writer changed what they wrote
    /// into), and were skipped.
    pub replay_refused: u32,
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
    /// The first message asked as an empty replica: the replica's writes are made again on
    /// the copy the answer brings ([`Replica::sync_begin`]).
    rebase: bool,
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
/// No two replicas ever write as one actor: [`Replica::new`] takes a fresh one, and
/// [`Replica::save`] hands its actor to the saved bytes and writes on as a fresh one. The first
/// [`Replica::load`] of those bytes on the thread that saved them writes as the handed-over
/// actor; every other load of them takes a fresh one (see [`crate::decoded`]).
#[derive(Debug)]
pub struct Replica {
    id: DocId,
    doc: Automerge,
    /// What the document shows, with the queued writes applied.
    shadow: Shadow,
    /// Writes applied to the shadow and not yet to `doc`, in batches of one change each.
    queued: Vec<Batch>,
    /// The ops of writes already in `doc` that no sync has brought to the node yet, in order:
    /// what this replica replays when the node answers that its copy can no longer merge (a
    /// document compacted into a new generation, `docs/compaction.md`).
    unacked: Vec<Op>,
    /// How many of `unacked` the sync in progress carries.
    in_flight: usize,
    /// `unacked` holds every unacknowledged write (none was dropped for the bound).
    log_complete: bool,
    /// Unacknowledged ops set aside by [`Replica::start_over_keeping_writes`], made again once
    /// a sync brings the node's new generation.
    replay_pending: Vec<Op>,
    /// The time of the latest local write, which replayed writes are stamped with.
    last_write_ms: i64,
    /// Heads that this replica and the node both hold, as of the last answer. Everything after
    /// them is what a sync has to exchange.
    shared: Vec<ChangeHash>,
    session: Option<Session>,
    last_sync: SyncStats,
    /// Where fresh actor ids come from.
    actors: Actors,
    /// The replica dropped the copy it had ([`Replica::start_over`]) and no answer of the node
    /// has come since: writes made meanwhile were made on an empty copy.
    dropped_copy: bool,
}

/// Where a replica's fresh actor ids come from: the host's randomness, or, in a deterministic
/// simulation, a seed.
#[derive(Debug, Clone)]
pub(crate) enum Actors {
    Random,
    Seeded(u64),
}

impl Actors {
    pub(crate) fn next(&mut self) -> ActorId {
        match self {
            Actors::Random => ActorId::random(),
            Actors::Seeded(state) => {
                let mut bytes = [0u8; 16];
                for half in bytes.chunks_mut(8) {
                    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
                    let mut z = *state;
                    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
                    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
                    half.copy_from_slice(&(z ^ (z >> 31)).to_be_bytes());
                }
                ActorId::from(bytes.to_vec())
            }
        }
    }
}

impl Replica {
    /// An empty replica of `id`, knowing nothing of the node's copy yet.
    pub fn new(id: DocId) -> Self {
        Self::with_actors(id, Actors::Random)
    }

    /// An empty replica of `id` whose actor ids (its first, and the fresh ones it takes when
    /// it starts over) come from `seed` instead of the host's randomness, so that a
    /// deterministic simulation replays the same changes. Replicas must not share a seed.
    pub fn new_seeded(id: DocId, seed: u64) -> Self {
        Self::with_actors(id, Actors::Seeded(seed))
    }

    fn with_actors(id: DocId, mut actors: Actors) -> Self {
        let doc = new_document(actors.next());
        Self {
            id,
            shadow: Shadow::of(&doc),
            queued: Vec::new(),
            unacked: Vec::new(),
            in_flight: 0,
            log_complete: true,
            replay_pending: Vec::new(),
            last_write_ms: 0,
            doc,
            shared: Vec::new(),
            session: None,
            last_sync: SyncStats::default(),
            actors,
            dropped_copy: false,
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
    pub fn heads(&mut self) -> Result<Vec<ChangeHash>, ClientError> {
        self.flush()?;
        Ok(self.doc.get_heads())
    }

    /// The heads this replica knows the node holds, as of the last sync.
    pub fn shared_heads(&self) -> &[ChangeHash] {
        &self.shared
    }

    /// The Automerge document, for reads beyond JSON, with every queued write in it.
    pub fn automerge(&mut self) -> Result<&Automerge, ClientError> {
        self.flush()?;
        Ok(&self.doc)
    }

    /// The document's user keys as JSON (counters as numbers, text as strings).
    pub fn to_json(&self) -> Json {
        self.shadow.to_json()
    }

    /// The tombstone and expiry the document carries.
    pub fn lifecycle(&self) -> Lifecycle {
        self.shadow.lifecycle()
    }

    /// The JSON value at `path` (the whole document for an empty path), or `None` when absent.
    /// Verge's reserved root keys read as absent.
    pub fn get(&self, path: &[PathSegment]) -> Option<Json> {
        if path.is_empty() {
            return Some(self.to_json());
        }
        self.shadow.get(path).map(|node| node.to_json())
    }

    /// Applies `ops` in order as one local change stamped `now_ms`. Returns whether anything
    /// changed. On error nothing is changed.
    pub fn apply(&mut self, ops: Vec<Op>, now_ms: i64) -> Result<bool, ClientError> {
        self.last_write_ms = self.last_write_ms.max(now_ms);
        let lifecycle = self.shadow.lifecycle();
        if lifecycle.deleted || lifecycle.expired(now_ms) {
            // A revival starts a new history: made at once, in Automerge.
            let changed = self.write(&Write::Ops(ops.clone()), now_ms)?;
            self.unacked.extend(ops);
            return Ok(changed);
        }
        let changed = self.shadow.apply(&ops, now_ms)?;
        if changed {
            self.queue(ops, now_ms);
        }
        Ok(changed)
    }

    /// Queues a write the shadow took, joining the last batch when both may share a change.
    fn queue(&mut self, ops: Vec<Op>, now_ms: i64) {
        let joins = ops.iter().all(Batch::joinable);
        match self.queued.last_mut() {
            Some(last) if joins && last.open => {
                for op in ops {
                    last.push(op);
                }
                last.at_ms = now_ms;
            }
            _ => self.queued.push(Batch {
                ops,
                at_ms: now_ms,
                open: joins,
            }),
        }
    }

    /// Applies the queued writes to the Automerge document. They were checked against the
    /// shadow, which refuses what `apply` refuses, so they apply; if one did not (a defect),
    /// the shadow is read again from the document and the error returned.
    pub fn flush(&mut self) -> Result<(), ClientError> {
        for batch in std::mem::take(&mut self.queued) {
            let write = Write::Ops(batch.ops);
            if let Err(e) = apply(&mut self.doc, &write, Expiry::Keep, batch.at_ms) {
                self.shadow = Shadow::of(&self.doc);
                return Err(e.into());
            }
            if let Write::Ops(ops) = write {
                self.unacked.extend(ops);
            }
        }
        if self.unacked.len() > UNACKED_OPS_MAX {
            let excess = self.unacked.len() - UNACKED_OPS_MAX;
            self.unacked.drain(..excess);
            self.in_flight = self.in_flight.saturating_sub(excess);
            self.log_complete = false;
        }
        Ok(())
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
        self.flush()?;
        let applied = apply(&mut self.doc, write, Expiry::Keep, now_ms);
        // Read again: a replace or a revival reshapes the document.
        self.shadow = Shadow::of(&self.doc);
        let applied = applied?;
        if applied.replaced {
            // A revival started a new history: the node holds none of it yet.
            self.shared.clear();
        }
        Ok(applied.changed())
    }

    /// The ops of local writes the node has not acknowledged yet, oldest first (queued ones
    /// included): what this replica would replay on a copy that replaced its own. Whole-document
    /// writes (`replace`, `delete`) are not ops and are not in it.
    pub fn unacknowledged_ops(&self) -> impl Iterator<Item = &Op> {
        self.unacked
            .iter()
            .chain(self.queued.iter().flat_map(|b| b.ops.iter()))
    }

    /// Whether [`Replica::unacknowledged_ops`] holds every unacknowledged write (it keeps at
    /// most [`UNACKED_OPS_MAX`]).
    pub fn log_complete(&self) -> bool {
        self.log_complete
    }

    /// Whether this replica holds changes the node has not acknowledged.
    pub fn has_unsynced_changes(&self) -> bool {
        !self.queued.is_empty()
            || (self.doc.get_heads() != self.shared
                && !self.doc.get_changes(&self.shared).is_empty())
    }

    /// Serialises the replica (document and sync position) for a cache. [`Replica::load`] of
    /// these bytes syncs in one round trip, like the replica that saved them. The replica
    /// writes as a fresh actor afterwards: its own goes with the bytes.
    pub fn save(&mut self) -> Result<Vec<u8>, ClientError> {
        self.flush()?;
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
        let log = Json::Array(self.unacked.iter().map(Op::to_json).collect()).to_string();
        // Flags: the log is complete; the copy was dropped (its writes are to be made again
        // on the node's copy); writes set aside for that follow the log.
        let replaying = !self.replay_pending.is_empty();
        out.push(
            u8::from(self.log_complete)
                | (u8::from(self.dropped_copy) << 1)
                | (u8::from(replaying) << 2),
        );
        out.extend_from_slice(&(log.len() as u32).to_be_bytes());
        out.extend_from_slice(log.as_bytes());
        if replaying {
            let replay = serde_json::json!({
                "at": self.last_write_ms,
                "ops": self.replay_pending.iter().map(Op::to_json).collect::<Vec<_>>(),
            })
            .to_string();
            out.extend_from_slice(&(replay.len() as u32).to_be_bytes());
            out.extend_from_slice(replay.as_bytes());
        }
        out.extend_from_slice(&doc);
        // Loading these bytes again in this isolate takes a copy, and the first copy writes on
        // as this actor; this replica writes as a fresh one from now on (`decoded`).
        decoded::remember(
            &doc,
            &self.doc,
            &self.shadow,
            Some(self.doc.get_actor().clone()),
        );
        let fresh = lineage::writer_actor(&self.actors.next(), Lineage::of(&self.doc));
        self.doc.set_actor(fresh);
        Ok(out)
    }

    /// Loads bytes from [`Replica::save`]: a copy of the document when this thread saved them
    /// lately ([`crate::decoded`]), otherwise a parse. It writes as the actor the saver handed
    /// over (on the first load of a copy) or a fresh one.
    pub fn load(bytes: &[u8]) -> Result<Self, ClientError> {
        Self::load_with(bytes, Actors::Random)
    }

    /// Like [`Replica::load`], with fresh actors drawn from `seed` (deterministic tests and the
    /// simulator).
    pub fn load_seeded(bytes: &[u8], seed: u64) -> Result<Self, ClientError> {
        Self::load_with(bytes, Actors::Seeded(seed))
    }

    fn load_with(bytes: &[u8], mut actors: Actors) -> Result<Self, ClientError> {
        let bad = |m: &str| ClientError::InvalidSave(m.to_owned());
        let (rest, with_log) = match bytes.strip_prefix(SAVE_MAGIC.as_slice()) {
            Some(rest) => (rest, true),
            None => (
                bytes
                    .strip_prefix(SAVE_MAGIC_V1.as_slice())
                    .ok_or_else(|| bad("not bytes from save()"))?,
                false,
            ),
        };
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
        let (mut unacked, mut log_complete) = (Vec::new(), true);
        let (mut dropped_copy, mut replay_pending, mut last_write_ms) = (false, Vec::new(), 0);
        if with_log {
            let (flag, r) = split(rest, 1).ok_or_else(|| bad("truncated log"))?;
            let (len, r) = split(r, 4).ok_or_else(|| bad("truncated log"))?;
            let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
            let (log, r) = split(r, len).ok_or_else(|| bad("truncated log"))?;
            let log: Json = serde_json::from_slice(log).map_err(|_| bad("malformed log"))?;
            // One by one: the log is not one write, and may hold more ops than a write may.
            unacked = log
                .as_array()
                .ok_or_else(|| bad("malformed log"))?
                .iter()
                .map(Op::parse)
                .collect::<Result<_, _>>()
                .map_err(|_| bad("malformed log"))?;
            log_complete = flag[0] & 1 == 1;
            dropped_copy = flag[0] & 2 == 2;
            rest = r;
            if flag[0] & 4 == 4 {
                let (len, r) = split(rest, 4).ok_or_else(|| bad("truncated replay"))?;
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let (replay, r) = split(r, len).ok_or_else(|| bad("truncated replay"))?;
                let replay: Json =
                    serde_json::from_slice(replay).map_err(|_| bad("malformed replay"))?;
                last_write_ms = replay
                    .get("at")
                    .and_then(Json::as_i64)
                    .ok_or_else(|| bad("malformed replay"))?;
                replay_pending = replay
                    .get("ops")
                    .and_then(Json::as_array)
                    .ok_or_else(|| bad("malformed replay"))?
                    .iter()
                    .map(Op::parse)
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad("malformed replay"))?;
                rest = r;
            }
        }
        let (doc, shadow) = match decoded::recall(rest) {
            Some((mut doc, shadow, handed_over)) => {
                if handed_over.is_none() {
                    let actor = lineage::writer_actor(&actors.next(), Lineage::of(&doc));
                    doc.set_actor(actor);
                }
                (doc, shadow)
            }
            None => {
                let doc = load_document(rest, actors.next())
                    .map_err(|e| ClientError::InvalidSave(e.to_string()))?;
                let shadow = Shadow::of(&doc);
                (doc, shadow)
            }
        };
        // Only heads the document really holds count as shared.
        let missing = doc.get_missing_deps(&shared);
        shared.retain(|h| !missing.contains(h));
        Ok(Self {
            id,
            shadow,
            queued: Vec::new(),
            unacked,
            in_flight: 0,
            log_complete,
            replay_pending,
            last_write_ms,
            doc,
            shared,
            session: None,
            last_sync: SyncStats::default(),
            actors,
            dropped_copy,
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
    ///
    ///
    /// A replica that dropped its copy ([`Replica::start_over`]) and wrote before an answer
    /// brought the node's does not send those writes as made: made on an empty copy, they
    /// would be concurrent with everything the document holds, its own earlier writes
    /// included, and belong to its first generation. It asks for the node's copy as an empty
    /// replica would and makes them again on it when the answer comes (its own view keeps
    /// them meanwhile).
    pub fn sync_begin(&mut self) -> Result<Vec<u8>, ClientError> {
        self.flush()?;
        let rebase = self.dropped_copy && !self.unacked.is_empty() && self.log_complete;
        self.in_flight = if rebase { 0 } else { self.unacked.len() };
        let (heads, changes) = if rebase {
            (Vec::new(), Vec::new())
        } else {
            (self.doc.get_heads(), self.doc.get_changes(&self.shared))
        };
        let message = first_message(&heads, &changes);
        let body = message.encode();
        let mut state = State::new();
        state.shared_heads.clone_from(&self.shared);
        state.last_sent_heads.clone_from(&heads);
        self.session = Some(Session {
            state,
            rebase,
            claimed_history: !heads.is_empty(),
            sent_heads: heads,
            stats: SyncStats {
                round_trips: 1,
                bytes_sent: body.len(),
                ..SyncStats::default()
            },
        });
        Ok(body)
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
        // Writes made while the answer was on its way become changes first, so that the
        // shadow read below from the document holds them.
        self.flush()?;
        self.dropped_copy = false;
        if std::mem::take(&mut s.rebase) {
            // The answer is to an empty replica: the writes are set aside and made again on
            // the node's copy, below.
            let mut ops = std::mem::take(&mut self.replay_pending);
            ops.append(&mut self.unacked);
            self.doc = new_document(self.actors.next());
            self.shadow = Shadow::of(&self.doc);
            self.in_flight = 0;
            self.replay_pending = ops;
        }
        let before = self.doc.get_heads();
        let local = Local::of(&self.doc);
        self.doc
            .receive_sync_message(&mut s.state, message)
            .map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        let new = self.doc.get_changes(&before);
        let settled = lineage::settle(&mut self.doc, &local, &new, Move::Replace)
            .map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        if let Settled::Replaced { from } = settled {
            // The node's copy is a newer history: ours was replaced by it, and the exchange so
            // far describes histories that are gone. A node may yet carry our older changes
            // under the actor the new history derives from ours, so we write as a fresh one.
            s.state = State::new();
            self.shared.clear();
            let actor = self.actors.next();
            self.doc.set_actor(actor);
            if from.incarnation == Lineage::of(&self.doc).incarnation {
                // A new generation (not a delete and rewrite): our unacknowledged writes are
                // made again on it.
                self.replay_pending.append(&mut self.unacked);
                self.in_flight = 0;
            }
        }
        if self.doc.get_heads() != before {
            s.stats.changed = true;
            self.shadow = Shadow::of(&self.doc);
        }
        // The node's copy arrived (or the node has none): the set-aside writes are made on it.
        if !self.replay_pending.is_empty()
            && (!self.doc.get_heads().is_empty() || node_heads.is_empty())
        {
            let (replayed, refused) = self.replay()?;
            s.stats.replayed += replayed;
            s.stats.replay_refused += refused;
            // The session goes on until the node holds them.
            self.in_flight = self.unacked.len();
            s.sent_heads = self.doc.get_heads();
        }
        let missing = self.doc.get_missing_deps(&node_heads);
        let known: Vec<ChangeHash> = node_heads
            .iter()
            .copied()
            .filter(|h| !missing.contains(h))
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
                    self.acknowledged();
                    self.last_sync = s.stats;
                    return Ok(None);
                }
            }
        }
        if s.stats.round_trips >= MAX_ROUND_TRIPS {
            return Err(ClientError::SyncIncomplete(s.stats.round_trips));
        }
        if reset {
            // Only what the node just announced is known to be on both sides. Everything after
            // it goes in the next message, as in the first one: Automerge's protocol would pick
            // it through the node's Bloom filter, whose false positives leave out a change now
            // and then. A node of a newer generation needs the copy's changes whole to carry
            // them (`docs/compaction.md`).
            s.state.shared_heads.clone_from(&known);
            let heads = self.doc.get_heads();
            let changes = self.doc.get_changes(&known);
            let message = first_message(&heads, &changes);
            let body = message.encode();
            s.state.last_sent_heads.clone_from(&heads);
            s.sent_heads = heads;
            s.stats.round_trips += 1;
            s.stats.bytes_sent += body.len();
            self.session = Some(s);
            return Ok(Some(body));
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
                self.acknowledged();
                self.last_sync = s.stats;
                Ok(None)
            }
        }
    }

    /// The sync in progress ended with the node holding what it carried.
    fn acknowledged(&mut self) {
        let n = self.in_flight.min(self.unacked.len());
        self.unacked.drain(..n);
        self.in_flight = 0;
    }

    /// Drops the local copy after the node answered `document_replaced`: the document was
    /// deleted or expired and written again since this copy was made, so the copy can never
    /// merge with the node's. Local writes not yet synced (made without seeing that delete or
    /// expiry) go with it. The next sync fetches the current document. A fresh actor keeps any
    /// changes of the dropped copy from ever clashing with new ones.
    ///
    /// Also what the node's `changes_carried` asks for: the document started a new generation
    /// since this copy was made, and the node carried the copy's changes onto it, durably, so
    /// its writes are acknowledged and the copy is dropped with them. (Writes set aside by
    /// [`Replica::start_over_keeping_writes`] and not made again yet stay set aside.)
    pub fn start_over(&mut self) {
        self.doc = new_document(self.actors.next());
        self.shadow = Shadow::of(&self.doc);
        self.queued.clear();
        self.unacked.clear();
        self.in_flight = 0;
        self.shared.clear();
        self.session = None;
        self.dropped_copy = true;
    }

    /// Drops the local copy after the node answered `document_compacted`: the document started
    /// a new generation since this copy was made, and the node did not take the copy's changes.
    /// The writes it has not acknowledged are set aside and made again on the new generation
    /// when the next sync brings it.
    ///
    /// The node answers so only when it cannot carry the copy's changes itself (it no longer
    /// retains the copy's generation: `[compaction] retain_previous_s`, or more generations
    /// passed than it keeps). Then a write whose sync failed in transport after a node had
    /// taken it is made twice: the replica cannot tell it from one no node got.
    pub fn start_over_keeping_writes(&mut self) {
        let mut ops: Vec<Op> = std::mem::take(&mut self.replay_pending);
        ops.extend(self.unacknowledged_ops().cloned());
        self.start_over();
        self.replay_pending = ops;
    }

    /// Makes the set-aside writes again on the new generation, op by op; an op that no longer
    /// applies is skipped. Returns how many were made and how many skipped.
    fn replay(&mut self) -> Result<(u32, u32), ClientError> {
        let (mut made, mut refused) = (0u32, 0u32);
        let at = self.last_write_ms;
        for op in std::mem::take(&mut self.replay_pending) {
            match self.apply(vec![op], at) {
                Ok(_) => made += 1,
                Err(_) => refused += 1,
            }
        }
        self.flush()?;
        Ok((made, refused))
    }

    /// Abandons the sync in progress (after a transport failure). Nothing is lost: the next
    /// sync resends whatever the node may not have.
    pub fn sync_abort(&mut self) {
        self.session = None;
        self.in_flight = 0;
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
    /// and syncs again, once; when it answers `changes_carried` (the node carried this copy's
    /// changes onto the document's new generation), it starts over too; when it answers
    /// `document_compacted`, it starts over keeping its unacknowledged writes
    /// ([`Replica::start_over_keeping_writes`]) and syncs again, once.
    pub fn sync(&mut self, transport: &mut impl Transport) -> Result<SyncStats, ClientError> {
        match self.sync_once(transport) {
            Err(e) if e.code() == "document_replaced" || e.code() == "changes_carried" => {
                self.start_over();
                self.sync_once(transport)
            }
            Err(e) if e.code() == "document_compacted" => {
                self.start_over_keeping_writes();
                self.sync_once(transport)
            }
            other => other,
        }
    }

    fn sync_once(&mut self, transport: &mut impl Transport) -> Result<SyncStats, ClientError> {
        let mut body = self.sync_begin()?;
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

/// Writes queued for one Automerge change.
#[derive(Debug)]
pub(crate) struct Batch {
    ops: Vec<Op>,
    /// The time of the last write in it.
    at_ms: i64,
    /// Later writes may join: it holds only ops that create or remove nothing of their own.
    open: bool,
}

impl Batch {
    /// Whether `op` may share a change with the writes before it without changing what it
    /// does: it deletes nothing and writes no object or array (whose contents a later write
    /// in the same change would treat as its own, creating containers there in its change
    /// rather than as the shared creations every replica makes alike).
    pub(crate) fn joinable(op: &Op) -> bool {
        match op {
            Op::Inc { .. } | Op::Splice { .. } => true,
            Op::Set { value, .. } | Op::Insert { value, .. } | Op::Push { value, .. } => {
                !value.is_object() && !value.is_array()
            }
            Op::Del { .. } => false,
        }
    }

    /// Adds `op`, folding an increment into one of the same counter just before it.
    fn push(&mut self, op: Op) {
        join(&mut self.ops, op);
    }
}

/// Appends `op` to the ops of one change, folding an increment into one of the same counter
/// just before it.
pub(crate) fn join(ops: &mut Vec<Op>, op: Op) {
    if let (
        Some(Op::Inc {
            path: last,
            by: sum,
        }),
        Op::Inc { path, by },
    ) = (ops.last_mut(), &op)
        && last == path
        && let Some(total) = sum.checked_add(*by)
    {
        *sum = total;
        return;
    }
    ops.push(op);
}

/// A message that carries `changes` and announces `heads` both as our heads and as our
/// `last_sync`, with an empty Bloom filter ([`Replica::sync_begin`]).
fn first_message(heads: &[ChangeHash], changes: &[automerge::Change]) -> Message {
    let mut flags = MessageFlags::new();
    flags.set(MessageFlags::SUPPORTS_SYNC_RESET);
    Message {
        heads: heads.to_vec(),
        need: Vec::new(),
        have: vec![Have {
            last_sync: heads.to_vec(),
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
    }
}

fn split(bytes: &[u8], n: usize) -> Option<(&[u8], &[u8])> {
    (bytes.len() >= n).then(|| bytes.split_at(n))
}

#[cfg(test)]
pub(crate) mod tests {
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
        r.shared = r.heads().expect("flushes");
        let loaded = Replica::load(&r.save().expect("saves")).expect("loads");
        assert_eq!(loaded.id(), r.id());
        assert_eq!(
            loaded.unacknowledged_ops().collect::<Vec<_>>(),
            r.unacknowledged_ops().collect::<Vec<_>>(),
            "the log of unacknowledged writes is saved too"
        );
        assert_eq!(loaded.unacknowledged_ops().count(), 1);
        // Bytes saved by the first format (no log) still load.
        let v2 = r.save().expect("saves");
        let head = SAVE_MAGIC.len() + 2 + r.id().as_str().len() + 4 + 32 * r.shared.len();
        let log_len = u32::from_be_bytes(v2[head + 1..head + 5].try_into().expect("4 bytes"));
        let mut v1 = SAVE_MAGIC_V1.to_vec();
        v1.extend_from_slice(&v2[SAVE_MAGIC.len()..head]);
        v1.extend_from_slice(&v2[head + 5 + log_len as usize..]);
        let old = Replica::load(&v1).expect("a v1 save loads");
        assert_eq!(old.to_json(), r.to_json());
        assert_eq!(old.unacknowledged_ops().count(), 0);
        assert_eq!(loaded.to_json(), r.to_json());
        assert_eq!(loaded.shared_heads(), r.shared_heads());
        assert_ne!(loaded.doc.get_actor(), r.doc.get_actor());
        assert_eq!(
            Replica::load(b"nope").expect_err("garbage").code(),
            "invalid_save"
        );
    }

    #[test]
    fn loads_of_one_save_never_share_an_actor_and_a_copy_is_a_parse() {
        let mut server = Automerge::new();
        let mut r = Replica::new(id());
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
            .expect("applies");
        r.sync(&mut |_: &DocId, b: &[u8]| Ok(answer(&mut server, b)))
            .expect("syncs");
        let saver = r.doc.get_actor().clone();
        let bytes = r.save().expect("saves");
        assert_ne!(
            r.doc.get_actor(),
            &saver,
            "the saver hands its actor to the bytes"
        );
        let mut first = Replica::load(&bytes).expect("loads");
        let mut second = Replica::load(&bytes).expect("loads");
        assert_eq!(first.doc.get_actor(), &saver, "the first copy writes as it");
        assert_ne!(second.doc.get_actor(), &saver);
        assert_ne!(second.doc.get_actor(), r.doc.get_actor());
        crate::decoded::clear();
        let mut parsed = Replica::load(&bytes).expect("parses");
        for other in [&first, &second, &r] {
            assert_ne!(parsed.doc.get_actor(), other.doc.get_actor());
        }
        assert_eq!(parsed.to_json(), first.to_json());
        assert_eq!(parsed.shared_heads(), first.shared_heads());
        assert_eq!(
            parsed.heads().expect("heads"),
            first.heads().expect("heads")
        );
        // Every one of them writes, and every write counts once at the node.
        for replica in [&mut first, &mut second, &mut parsed, &mut r] {
            replica
                .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 10}])), 2)
                .expect("applies");
            replica
                .sync(&mut |_: &DocId, b: &[u8]| Ok(answer(&mut server, b)))
                .expect("syncs");
        }
        assert_eq!(
            verge_core::to_json(&server)["n"],
            json!(41),
            "four writes of 10 after the first 1"
        );
    }

    #[test]
    fn queued_writes_share_changes_only_where_that_changes_nothing() {
        let mut r = Replica::new(id());
        for _ in 0..1000 {
            r.apply(ops(json!([{"op": "inc", "path": ["n"]}])), 1)
                .expect("applies");
        }
        r.apply(ops(json!([{"op": "set", "path": ["s"], "value": "x"}])), 2)
            .expect("applies");
        r.apply(
            ops(json!([{"op": "set", "path": ["m"], "value": {"k": 1}}])),
            3,
        )
        .expect("applies");
        r.apply(
            ops(json!([{"op": "push", "path": ["m", "l"], "value": 1}])),
            4,
        )
        .expect("applies");
        r.apply(ops(json!([{"op": "del", "path": ["s"]}])), 5)
            .expect("applies");
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": -1}])), 6)
            .expect("applies");
        assert_eq!(r.to_json(), json!({"n": 999, "m": {"k": 1, "l": [1]}}));
        assert!(r.has_unsynced_changes());
        let doc = r.automerge().expect("flushes");
        assert_eq!(
            verge_core::to_json(doc),
            json!({"n": 999, "m": {"k": 1, "l": [1]}})
        );
        // The counter's creation, the incs and the scalar set (one change), the map, the list
        // created in it, the push, the del and the last inc.
        let changes = doc.get_changes(&[]);
        assert!(changes.len() <= 8, "{} changes", changes.len());
        // The thousand increments became one op.
        assert!(changes.iter().all(|c| c.len() < 10));
    }

    /// A random op for the replica test: valid or not, over a few keys.
    pub(crate) fn arb_op() -> impl proptest::strategy::Strategy<Value = Json> {
        use proptest::prelude::*;
        let key = prop::sample::select(vec!["a", "b", "l", "t", "n"]);
        let value = prop_oneof![
            any::<i8>().prop_map(Json::from),
            Just(json!({"k": [1]})),
            Just(json!([1, 2])),
        ];
        prop_oneof![
            (key.clone(), value.clone())
                .prop_map(|(k, v)| json!({"op": "set", "path": [k], "value": v})),
            (key.clone(), "[a-z]")
                .prop_map(|(k, v)| json!({"op": "set", "path": [k, "x"], "value": v})),
            key.clone().prop_map(|k| json!({"op": "del", "path": [k]})),
            (key.clone(), -3i64..4).prop_map(|(k, by)| json!({"op": "inc", "path": [k], "by": by})),
            (key.clone(), value.clone())
                .prop_map(|(k, v)| json!({"op": "push", "path": [k], "value": v})),
            (key.clone(), 0usize..3, value)
                .prop_map(|(k, i, v)| json!({"op": "insert", "path": [k, i], "value": v})),
            (key, 0usize..3, "[a-z]{0,2}")
                .prop_map(|(k, i, t)| json!({"op": "splice", "path": [k], "index": i, "text": t})),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(128))]

        /// Writes through a replica (shadow, queue, batches) end in the document that applying
        /// each write at once gives, refusal for refusal, and two replicas that exchange
        /// changes now and then converge. (After an exchange the reference is the merged
        /// document: which of two concurrent values wins depends on op ids, which batching
        /// numbers differently, and either is a correct outcome.)
        #[test]
        fn queued_writes_end_as_writes_applied_at_once(
            writes in proptest::collection::vec((proptest::collection::vec(arb_op(), 1..3), proptest::prelude::any::<bool>(), proptest::prelude::any::<bool>()), 1..30)
        ) {
            let mut replicas = [Replica::new(id()), Replica::new(id())];
            let mut direct: Vec<Automerge> = replicas.iter().map(|r| r.doc.clone()).collect();
            for (ops, second, exchange) in &writes {
                let Ok(ops) = Op::parse_list(&Json::Array(ops.clone())) else {
                    continue;
                };
                let i = usize::from(*second);
                let want = apply(&mut direct[i], &Write::Ops(ops.clone()), Expiry::Keep, 1_000);
                let got = replicas[i].apply(ops, 1_000);
                proptest::prop_assert_eq!(want.is_ok(), got.is_ok(), "{:?} vs {:?}", want, got);
                proptest::prop_assert_eq!(replicas[i].to_json(), verge_core::to_json(&direct[i]));
                if *exchange {
                    exchange_all(&mut replicas);
                    for (d, r) in direct.iter_mut().zip(&replicas) {
                        *d = r.doc.clone();
                    }
                }
            }
            exchange_all(&mut replicas);
            let [a, b] = &mut replicas;
            proptest::prop_assert_eq!(a.to_json(), b.to_json());
            proptest::prop_assert_eq!(a.heads().expect("heads"), b.heads().expect("heads"));
        }
    }

    /// Both replicas take in each other's changes (as two syncs through a node would).
    fn exchange_all(replicas: &mut [Replica; 2]) {
        let [a, b] = replicas;
        let mut b_doc = b.automerge().expect("flushes").clone();
        a.automerge().expect("flushes");
        a.doc.merge(&mut b_doc).expect("merges");
        a.shadow = Shadow::of(&a.doc);
        let mut a_doc = a.doc.clone();
        b.doc.merge(&mut a_doc).expect("merges");
        b.shadow = Shadow::of(&b.doc);
    }

    /// A stand-in for the node's sync route: `server` answers `body` from a fresh sync state,
    /// exactly as `POST /v1/sync` does.
    pub(crate) fn answer(server: &mut Automerge, body: &[u8]) -> Vec<u8> {
        let mut state = State::new();
        let msg = Message::decode(body).expect("decodes");
        server
            .receive_sync_message(&mut state, msg)
            .expect("applies");
        server
            .generate_sync_message(&mut state)
            .map(Message::encode)
            .unwrap_or_default()
    }

    #[test]
    fn ops_stay_logged_until_a_sync_brings_them_to_the_node() {
        let mut server = new_document(ActorId::random());
        let up = std::cell::Cell::new(true);
        let mut r = Replica::new(id());
        r.apply(ops(json!([{"op": "inc", "path": ["n"]}])), 1)
            .expect("applies");
        r.apply(
            ops(json!([{"op": "set", "path": ["m"], "value": {"a": 1}}])),
            2,
        )
        .expect("applies");
        assert_eq!(r.unacknowledged_ops().count(), 2);
        let mut transport = |_: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
            if !up.get() {
                return Err(ClientError::Network("down".into()));
            }
            Ok(answer(&mut server, body))
        };
        up.set(false);
        r.sync(&mut transport).expect_err("the node is down");
        assert_eq!(
            r.unacknowledged_ops().count(),
            2,
            "a failed sync keeps the log"
        );
        up.set(true);
        r.sync(&mut transport).expect("syncs");
        assert_eq!(r.unacknowledged_ops().count(), 0);
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 2}])), 3)
            .expect("applies");
        let logged: Vec<&Op> = r.unacknowledged_ops().collect();
        assert!(matches!(logged.as_slice(), [Op::Inc { by: 2, .. }]));
    }

    #[test]
    fn two_replicas_sync_through_a_stateless_peer() {
        // A stand-in for the node's sync route: a document answering each message from a
        // fresh sync state, exactly as `POST /v1/sync` does.
        let mut server = new_document(ActorId::random());
        let mut transport = |_: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
            Ok(answer(&mut server, body))
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
        assert_eq!(a.heads().expect("heads"), b.heads().expect("heads"));
        assert_eq!(a.to_json(), json!({"n": 7}));
        assert_eq!(b.to_json(), json!({"n": 7}));
    }

    #[test]
    fn a_save_keeps_writes_waiting_to_be_made_again() {
        let mut server = new_document(ActorId::random());
        let mut transport = |_: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
            Ok(answer(&mut server, body))
        };
        let mut r = Replica::open(id(), &mut transport).expect("opens");
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
            .expect("applies");
        r.sync(&mut transport).expect("syncs");
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 10}])), 2)
            .expect("applies");
        // As after `document_compacted`, then a dropped copy written on before any sync.
        r.start_over_keeping_writes();
        r.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 100}])), 3)
            .expect("applies");
        let mut loaded = Replica::load_seeded(&r.save().expect("saves"), 7).expect("loads");
        let stats = loaded.sync(&mut transport).expect("syncs");
        assert_eq!(
            stats.replayed, 2,
            "both writes are made again on the node's copy"
        );
        assert_eq!(verge_core::document::to_json(&server), json!({"n": 111}));
        assert_eq!(loaded.to_json(), json!({"n": 111}));
    }

    #[test]
    fn writes_made_after_dropping_the_copy_are_made_again_on_the_nodes() {
        let mut server = new_document(ActorId::random());
        let mut transport = |_: &DocId, body: &[u8]| -> Result<Vec<u8>, ClientError> {
            Ok(answer(&mut server, body))
        };
        let mut r = Replica::open(id(), &mut transport).expect("opens");
        r.apply(
            ops(json!([{"op": "set", "path": ["k"], "value": "old"}])),
            1,
        )
        .expect("applies");
        r.sync(&mut transport).expect("syncs");
        // The copy is dropped (as after `changes_carried`), and the next answer is lost: the
        // replica writes on an empty copy.
        r.start_over();
        r.apply(
            ops(json!([{"op": "set", "path": ["k"], "value": "new"}])),
            2,
        )
        .expect("applies");
        let first = r.sync_begin().expect("begins");
        let message = Message::decode(&first).expect("decodes");
        assert!(message.changes.is_empty(), "the write is not sent as made");
        assert!(message.heads.is_empty(), "it asks as an empty replica");
        r.sync_abort();
        assert_eq!(r.to_json(), json!({"k": "new"}), "its view keeps the write");
        let stats = r.sync(&mut transport).expect("syncs");
        assert_eq!(stats.replayed, 1);
        // Made on the node's copy, the write follows the old one instead of racing it.
        assert_eq!(r.to_json(), json!({"k": "new"}));
        assert_eq!(verge_core::document::to_json(&server), json!({"k": "new"}));
        assert_eq!(r.unacknowledged_ops().count(), 0);
    }
}
