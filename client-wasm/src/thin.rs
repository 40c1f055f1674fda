//! A thin replica: the document's state and the writes made since, without Automerge.
//!
//! A [`crate::Replica`] makes every write an Automerge change before it syncs, which costs
//! tens of microseconds per op in Wasm: milliseconds for an edge request that makes a few dozen
//! writes. A [`ThinReplica`] keeps the state as a [`Shadow`] (reads and writes cost a map
//! lookup, and a write is checked as the node would check it) and its writes as ops. A sync
//! sends them in one `POST /v1/ops/{id}` with the heads of the state they were made on; the
//! node makes the changes at those heads and answers its heads, with its state when someone
//! else wrote meanwhile (`verge_core::thin`).
//!
//! Writes count exactly once: a batch of ops never changes once it was sent, and every sync
//! sends all batches since the base again, so a push repeated after a lost answer makes the
//! same changes on any node. What a thin replica cannot do: work from a document the node does
//! not hold yet (`catching_up`), revive a deleted or expired document, or `replace`/`delete`
//! it; a full replica or the HTTP API does those.

use std::cell::RefCell;
use std::collections::VecDeque;

use automerge::{ActorId, ChangeHash};
use serde_json::{Map, Value as Json};
use sha2::{Digest, Sha256};
use verge_core::limits::OPS_PER_WRITE_MAX;
use verge_core::lineage::Lineage;
use verge_core::shadow::Shadow;
use verge_core::thin::{
    Answer, Batch, Group, THIN_BATCHES_MAX, THIN_GROUPS_MAX, THIN_OPS_MAX, push_json,
};
use verge_core::{DocId, Op, PathSegment};

use crate::error::ClientError;
use crate::replica::{self, Actors, SyncStats};

/// What starts the bytes of [`ThinReplica::save`].
const SAVE_MAGIC: &[u8; 5] = b"VRGT\x01";

/// Saves of this thread whose actor the next load may take (see [`ThinReplica::save`]).
const HANDED_MAX: usize = 32;

thread_local! {
    static HANDED: RefCell<VecDeque<([u8; 32], ActorId)>> = const { RefCell::new(VecDeque::new()) };
}

/// Where a thin replica's sync stands.
#[derive(Debug)]
enum Pending {
    /// A push of this many batches of each group is on its way.
    Push(Vec<usize>),
    /// The node's state is being fetched, to make these writes again on it.
    Fetch(Vec<Batch>),
}

/// A replica of one document that keeps its JSON state and its writes, and lets the node make
/// the changes (see the module).
#[derive(Debug)]
pub struct ThinReplica {
    id: DocId,
    actors: Actors,
    /// The actor this replica's own writes are made as.
    actor: ActorId,
    /// Heads of the state the writes were made on.
    base: Vec<ChangeHash>,
    /// The history `base` is in, as the node named it (`None` before the first answer).
    lineage: Option<Lineage>,
    /// The state at `base` with the writes made on it.
    shadow: Shadow,
    /// The writes since `base`, in order: groups handed over by earlier savers, then this
    /// replica's own (the last group, when its actor is `actor`).
    groups: Vec<Group>,
    /// Leading batches of the last group that may no longer change: sent, or saved.
    frozen: usize,
    /// Whether later writes may join the last batch (it holds only joinable ops).
    open: bool,
    /// Writes set aside after `document_compacted`, made again when the node's state arrives.
    replay: Vec<Batch>,
    pending: Option<Pending>,
    last_sync: SyncStats,
}

impl ThinReplica {
    /// An empty thin replica of `id` that has read nothing yet; its first sync fetches the
    /// state.
    pub fn new(id: DocId) -> Self {
        Self::with_actors(id, Actors::Random)
    }

    /// Like [`ThinReplica::new`] with actors drawn from `seed` (deterministic tests and the
    /// simulator).
    pub fn new_seeded(id: DocId, seed: u64) -> Self {
        Self::with_actors(id, Actors::Seeded(seed))
    }

    fn with_actors(id: DocId, mut actors: Actors) -> Self {
        Self {
            id,
            actor: actors.next(),
            actors,
            base: Vec::new(),
            lineage: None,
            shadow: Shadow::default(),
            groups: Vec::new(),
            frozen: 0,
            open: false,
            replay: Vec::new(),
            pending: None,
            last_sync: SyncStats::default(),
        }
    }

    /// The document id.
    pub fn id(&self) -> &DocId {
        &self.id
    }

    /// The heads of the last state read from the node (local writes since are not in them).
    pub fn heads(&self) -> &[ChangeHash] {
        &self.base
    }

    /// The document's user keys as JSON.
    pub fn to_json(&self) -> Json {
        self.shadow.to_json()
    }

    /// The value at `path`; the whole document for an empty path.
    pub fn get(&self, path: &[PathSegment]) -> Option<Json> {
        if path.is_empty() {
            return Some(self.to_json());
        }
        self.shadow.get(path).map(|node| node.to_json())
    }

    /// The document's tombstone and expiry, as last read.
    pub fn lifecycle(&self) -> verge_core::Lifecycle {
        self.shadow.lifecycle()
    }

    /// Whether writes wait for a sync.
    pub fn has_unsynced_changes(&self) -> bool {
        self.groups.iter().any(|g| !g.batches.is_empty()) || !self.replay.is_empty()
    }

    fn unsynced(&self) -> (usize, usize) {
        let batches = self.groups.iter().flat_map(|g| &g.batches);
        let ops = batches.clone().map(|b| b.ops.len()).sum::<usize>()
            + self.replay.iter().map(|b| b.ops.len()).sum::<usize>();
        (ops, batches.count() + self.replay.len())
    }

    /// Applies `ops` in order as one write stamped `now_ms`, checked as the node checks it.
    /// Returns whether anything changed. On error nothing is changed.
    pub fn apply(&mut self, ops: Vec<Op>, now_ms: i64) -> Result<bool, ClientError> {
        let lifecycle = self.shadow.lifecycle();
        if lifecycle.deleted || lifecycle.expired(now_ms) {
            return Err(ClientError::NotLive(self.id.to_string()));
        }
        let (unsynced_ops, unsynced_batches) = self.unsynced();
        let new_group = self.groups.last().is_none_or(|g| g.actor != self.actor);
        if unsynced_ops + ops.len() > THIN_OPS_MAX
            || unsynced_batches >= THIN_BATCHES_MAX
            || (new_group && self.groups.len() >= THIN_GROUPS_MAX)
        {
            return Err(ClientError::TooManyUnsynced {
                ops: unsynced_ops,
                batches: unsynced_batches,
            });
        }
        let changed = self.shadow.apply(&ops, now_ms)?;
        if changed {
            self.record(ops, now_ms);
        }
        Ok(changed)
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

    /// Adds a write the shadow took as a batch of this replica's own group, joining the last
    /// batch when both may share a change and that batch was never sent or saved.
    fn record(&mut self, ops: Vec<Op>, at_ms: i64) {
        if self.groups.last().is_none_or(|g| g.actor != self.actor) {
            self.groups.push(Group {
                actor: self.actor.clone(),
                batches: Vec::new(),
            });
            self.frozen = 0;
            self.open = false;
        }
        let joins = ops.iter().all(replica::Batch::joinable);
        let group = self.groups.last_mut().expect("pushed above");
        let unsent = group.batches.len() > self.frozen;
        match group.batches.last_mut() {
            Some(last)
                if joins
                    && self.open
                    && unsent
                    && last.ops.len() + ops.len() <= OPS_PER_WRITE_MAX =>
            {
                for op in ops {
                    replica::join(&mut last.ops, op);
                }
                last.at_ms = at_ms;
            }
            _ => {
                group.batches.push(Batch { at_ms, ops });
                self.open = joins;
            }
        }
    }

    /// Starts a sync: the body of `POST /v1/ops/{id}`, JSON.
    pub fn push_begin(&mut self) -> String {
        let body = if self.replay.is_empty() {
            self.begin_push()
        } else {
            // The node's state first: the set-aside writes are made again on it.
            self.pending = Some(Pending::Fetch(std::mem::take(&mut self.replay)));
            push_json(&[], None, &[]).to_string()
        };
        self.last_sync = SyncStats {
            round_trips: 1,
            bytes_sent: body.len(),
            ..SyncStats::default()
        };
        body
    }

    /// The push of every batch since the base, which from now on never change.
    fn begin_push(&mut self) -> String {
        self.pending = Some(Pending::Push(
            self.groups.iter().map(|g| g.batches.len()).collect(),
        ));
        // What is sent never changes again: a retry must make the same changes.
        if let Some(last) = self.groups.last() {
            self.frozen = last.batches.len();
        }
        push_json(&self.base, self.lineage, &self.groups).to_string()
    }

    /// Consumes the node's answer. Returns the next request body when the sync goes on (after
    /// fetching the state to make set-aside writes again), `None` when it is done.
    pub fn push_receive(&mut self, reply: &[u8]) -> Result<Option<String>, ClientError> {
        let json: Json = serde_json::from_slice(reply)
            .map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        let answer =
            Answer::from_json(&json).map_err(|e| ClientError::InvalidSyncMessage(e.to_string()))?;
        let bytes_received = reply.len();
        match self.pending.take().ok_or(ClientError::NoSyncInProgress)? {
            Pending::Push(sent) => {
                for (group, n) in self.groups.iter_mut().zip(sent) {
                    group.batches.drain(..n.min(group.batches.len()));
                }
                self.groups.retain(|g| !g.batches.is_empty());
                self.frozen = 0;
                self.last_sync.bytes_received += bytes_received;
                self.base = answer.heads;
                self.lineage = Some(answer.lineage);
                if let Some(state) = answer.state {
                    // Someone else wrote: the node's state, with the writes made since the push.
                    self.shadow = state;
                    self.last_sync.changed = true;
                    let refused = self.remake_unsent();
                    self.last_sync.replay_refused += refused;
                }
                Ok(None)
            }
            Pending::Fetch(writes) => {
                self.last_sync.bytes_received += bytes_received;
                self.last_sync.changed = true;
                self.base = answer.heads;
                self.lineage = Some(answer.lineage);
                self.shadow = answer.state.unwrap_or_default();
                let unsent: Vec<Batch> = self.take_batches();
                for batch in writes.into_iter().chain(unsent) {
                    match self.shadow.apply(&batch.ops, batch.at_ms) {
                        Ok(true) => {
                            self.record(batch.ops, batch.at_ms);
                            self.last_sync.replayed += 1;
                        }
                        Ok(false) => {}
                        Err(_) => self.last_sync.replay_refused += 1,
                    }
                }
                if !self.has_unsynced_changes() {
                    return Ok(None);
                }
                let body = self.begin_push();
                self.last_sync.round_trips += 1;
                self.last_sync.bytes_sent += body.len();
                Ok(Some(body))
            }
        }
    }

    /// Makes the unsent batches again on a new shadow; returns how many no longer apply (they
    /// are dropped: the node would refuse them too).
    fn remake_unsent(&mut self) -> u32 {
        let mut refused = 0;
        for group in &mut self.groups {
            group
                .batches
                .retain(|b| match self.shadow.apply(&b.ops, b.at_ms) {
                    Ok(_) => true,
                    Err(_) => {
                        refused += 1;
                        false
                    }
                });
        }
        self.groups.retain(|g| !g.batches.is_empty());
        refused
    }

    fn take_batches(&mut self) -> Vec<Batch> {
        self.frozen = 0;
        self.open = false;
        std::mem::take(&mut self.groups)
            .into_iter()
            .flat_map(|g| g.batches)
            .collect()
    }

    /// Abandons the sync in progress (after a transport failure or an error answer). Nothing
    /// is lost: the next sync sends the same batches again.
    pub fn push_abort(&mut self) {
        if let Some(Pending::Fetch(writes)) = self.pending.take() {
            self.replay = writes;
        }
    }

    /// After the node answered `document_compacted` (the base is of a generation the node no
    /// longer retains): fetches the current state on the next sync and makes the unsynced
    /// writes again on it, as this replica's own. A write whose push a node took before its
    /// answer was lost is then made twice, as for a full replica.
    pub fn start_over_keeping_writes(&mut self) {
        self.pending = None;
        let mut writes = std::mem::take(&mut self.replay);
        writes.extend(self.take_batches());
        self.replay = writes;
        self.base.clear();
        self.lineage = None;
        self.actor = self.actors.next();
    }

    /// After the node answered `document_replaced` (deleted or expired and written again since
    /// the base): the writes made on the old document go with it; the next sync fetches the
    /// current one.
    pub fn start_over(&mut self) {
        self.pending = None;
        self.take_batches();
        self.replay.clear();
        self.base.clear();
        self.lineage = None;
        self.shadow = Shadow::default();
        self.actor = self.actors.next();
    }

    /// What the last completed sync did.
    pub fn last_sync(&self) -> SyncStats {
        self.last_sync
    }

    /// Serialises the replica (state, base and unsynced writes) for a cache. The replica
    /// writes as a fresh actor afterwards; the first [`ThinReplica::load`] of these bytes in
    /// this thread takes its actor, others get fresh ones, so no two replicas write as one
    /// actor, and a cart loaded and saved on every request keeps one actor.
    pub fn save(&mut self) -> Vec<u8> {
        let mut json = Map::new();
        json.insert("id".into(), Json::String(self.id.as_str().to_owned()));
        json.insert("state".into(), self.shadow.to_wire());
        let mut writes = push_json(&self.base, self.lineage, &self.groups);
        if let Json::Object(push) = &mut writes {
            json.append(push);
        }
        // Writes set aside to make again on the node's state (after `document_compacted`),
        // including those of a fetch under way.
        let mut replay: Vec<Batch> = self.replay.clone();
        if let Some(Pending::Fetch(writes)) = &self.pending {
            replay.splice(0..0, writes.iter().cloned());
        }
        if !replay.is_empty() {
            json.insert(
                "replay".into(),
                Json::Array(replay.iter().map(Batch::to_json).collect()),
            );
        }
        let mut out = SAVE_MAGIC.to_vec();
        out.extend_from_slice(Json::Object(json).to_string().as_bytes());
        let key: [u8; 32] = Sha256::digest(&out).into();
        HANDED.with(|handed| {
            let mut handed = handed.borrow_mut();
            if handed.len() >= HANDED_MAX {
                handed.pop_front();
            }
            handed.push_back((key, self.actor.clone()));
        });
        self.actor = self.actors.next();
        // Saved batches go with the bytes unchanged; new writes start a group of the new actor.
        self.open = false;
        out
    }

    /// Whether `bytes` look like [`ThinReplica::save`]'s.
    pub fn is_save(bytes: &[u8]) -> bool {
        bytes.starts_with(SAVE_MAGIC)
    }

    /// Loads bytes from [`ThinReplica::save`].
    pub fn load(bytes: &[u8]) -> Result<Self, ClientError> {
        Self::load_with(bytes, Actors::Random)
    }

    /// Like [`ThinReplica::load`], with fresh actors drawn from `seed` (the simulator).
    pub fn load_seeded(bytes: &[u8], seed: u64) -> Result<Self, ClientError> {
        Self::load_with(bytes, Actors::Seeded(seed))
    }

    fn load_with(bytes: &[u8], mut actors: Actors) -> Result<Self, ClientError> {
        let bad = |m: String| ClientError::InvalidSave(m);
        let body = bytes
            .strip_prefix(SAVE_MAGIC.as_slice())
            .ok_or_else(|| bad("not bytes from a thin replica's save()".into()))?;
        let json: Json = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
        let id = json
            .get("id")
            .and_then(Json::as_str)
            .ok_or_else(|| bad("no id".into()))?;
        let id = DocId::new(id)?;
        let shadow = Shadow::from_wire(json.get("state").unwrap_or(&Json::Null)).map_err(bad)?;
        let push = verge_core::thin::Push::from_json(&json).map_err(|e| bad(e.to_string()))?;
        let replay = match json.get("replay") {
            None => Vec::new(),
            Some(Json::Array(batches)) if batches.len() <= THIN_BATCHES_MAX => batches
                .iter()
                .enumerate()
                .map(|(b, batch)| Batch::from_json(batch, &format!("replay[{b}]")))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| bad(e.to_string()))?,
            Some(_) => {
                return Err(bad(format!(
                    "\"replay\" is not an array of at most {THIN_BATCHES_MAX} writes"
                )));
            }
        };
        if replay.iter().map(|b| b.ops.len()).sum::<usize>() > THIN_OPS_MAX {
            return Err(bad(format!(
                "\"replay\" holds more than {THIN_OPS_MAX} ops"
            )));
        }
        let key: [u8; 32] = Sha256::digest(bytes).into();
        let handed = HANDED.with(|handed| {
            let mut handed = handed.borrow_mut();
            let at = handed.iter().position(|(k, _)| *k == key)?;
            handed.remove(at).map(|(_, actor)| actor)
        });
        let actor = handed.unwrap_or_else(|| actors.next());
        let frozen = match push.groups.last() {
            Some(g) if g.actor == actor => g.batches.len(),
            _ => 0,
        };
        Ok(Self {
            id,
            actors,
            actor,
            base: push.base,
            lineage: push.lineage,
            shadow,
            groups: push.groups,
            frozen,
            open: false,
            replay,
            pending: None,
            last_sync: SyncStats::default(),
        })
    }

    /// Pushes the writes and pulls the state over `transport` (which posts to `POST
    /// /v1/ops/{id}`): one round trip in the steady state. On a transport error the call may
    /// simply be repeated.
    pub fn sync(
        &mut self,
        transport: &mut impl FnMut(&DocId, &[u8]) -> Result<Vec<u8>, ClientError>,
    ) -> Result<SyncStats, ClientError> {
        match self.sync_once(transport) {
            Err(e) if e.code() == "document_replaced" => {
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

    fn sync_once(
        &mut self,
        transport: &mut impl FnMut(&DocId, &[u8]) -> Result<Vec<u8>, ClientError>,
    ) -> Result<SyncStats, ClientError> {
        let mut body = self.push_begin();
        loop {
            let reply = match transport(&self.id, body.as_bytes()) {
                Ok(reply) => reply,
                Err(e) => {
                    self.push_abort();
                    return Err(e);
                }
            };
            match self.push_receive(&reply) {
                Ok(Some(next)) => body = next,
                Ok(None) => return Ok(self.last_sync),
                Err(e) => {
                    self.push_abort();
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use automerge::Automerge;
    use serde_json::json;
    use verge_core::thin::{Push, build};

    /// A stand-in node: makes a push at its base and answers as `POST /v1/ops/{id}` does.
    fn serve(node: &mut Automerge, body: &[u8]) -> Vec<u8> {
        let push = Push::from_json(&serde_json::from_slice(body).unwrap()).unwrap();
        let mut fork = node.fork_at(&push.base).unwrap();
        build(&mut fork, &push).unwrap();
        let built = fork.get_heads();
        node.apply_changes(fork.get_changes(&push.base)).unwrap();
        let heads = node.get_heads();
        let state = (heads != built).then(|| Shadow::of(&*node));
        Answer {
            heads,
            lineage: Lineage::of(node),
            state,
        }
        .to_json()
        .to_string()
        .into_bytes()
    }

    fn id() -> DocId {
        DocId::new("thin-test").unwrap()
    }

    fn ops(v: Json) -> Vec<Op> {
        Op::parse_list(&v).unwrap()
    }

    fn sync(r: &mut ThinReplica, node: &mut Automerge) -> SyncStats {
        r.sync(&mut |_: &DocId, body: &[u8]| Ok(serve(node, body)))
            .unwrap()
    }

    #[test]
    fn writes_sync_in_one_round_trip_and_others_writes_arrive() {
        let mut node = Automerge::new();
        let mut a = ThinReplica::new_seeded(id(), 1);
        let mut b = ThinReplica::new_seeded(id(), 2);
        for j in 0..20 {
            a.apply(
                ops(json!([{"op": "inc", "path": ["items", format!("sku-{j}")], "by": 1}])),
                10,
            )
            .unwrap();
        }
        // Twenty increments make one change.
        assert_eq!(a.groups[0].batches.len(), 1);
        let stats = sync(&mut a, &mut node);
        assert_eq!(stats.round_trips, 1);
        assert!(!stats.changed, "the node holds just what the replica shows");
        assert_eq!(a.heads(), node.get_heads().as_slice());
        assert!(!a.has_unsynced_changes());

        b.apply(
            ops(json!([{"op": "set", "path": ["owner"], "value": "bo"}])),
            11,
        )
        .unwrap();
        let stats = sync(&mut b, &mut node);
        assert!(stats.changed);
        assert_eq!(b.to_json(), verge_core::to_json(&node));
        sync(&mut a, &mut node);
        assert_eq!(
            a.get(&[PathSegment::Key("owner".into())]),
            Some(json!("bo"))
        );
        assert_eq!(a.to_json()["items"]["sku-3"], json!(1));
    }

    #[test]
    fn a_lost_answer_or_a_second_load_of_a_save_counts_once() {
        let mut node = Automerge::new();
        let mut a = ThinReplica::new_seeded(id(), 3);
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
            .unwrap();
        sync(&mut a, &mut node);
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 10}])), 2)
            .unwrap();
        // The node takes the push; its answer is lost.
        let lost = a.sync(&mut |_: &DocId, body: &[u8]| {
            serve(&mut node, body);
            Err(ClientError::Network("answer lost".into()))
        });
        assert!(lost.is_err());
        // A later write must not join the batch the node may hold.
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 100}])), 3)
            .unwrap();
        let saved = a.save();
        let mut first = ThinReplica::load(&saved).unwrap();
        let mut second = ThinReplica::load(&saved).unwrap();
        assert_ne!(first.actor, second.actor);
        first
            .apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1000}])), 4)
            .unwrap();
        second
            .apply(ops(json!([{"op": "inc", "path": ["m"], "by": 1}])), 4)
            .unwrap();
        for r in [&mut a, &mut first, &mut second] {
            sync(r, &mut node);
        }
        for r in [&mut a, &mut first, &mut second] {
            sync(r, &mut node);
            assert_eq!(r.to_json(), verge_core::to_json(&node));
        }
        assert_eq!(verge_core::to_json(&node)["n"], json!(1111));
        assert_eq!(verge_core::to_json(&node)["m"], json!(1));
    }

    /// The node tells a base it no longer holds from one it has not received yet by the
    /// lineage a push names: the one its last answer named, kept across a save, and none after
    /// a start over (which reads the state afresh).
    #[test]
    fn a_push_names_the_lineage_of_its_base() {
        let mut node = Automerge::new();
        let mut a = ThinReplica::new_seeded(id(), 6);
        let first: Json = serde_json::from_str(&a.push_begin()).unwrap();
        assert!(first.get("lineage").is_none(), "{first}");
        a.push_abort();
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
            .unwrap();
        sync(&mut a, &mut node);
        let named = json!({"incarnation": 0, "generation": 0});
        let push: Json = serde_json::from_str(&a.push_begin()).unwrap();
        assert_eq!(push["lineage"], named);
        a.push_abort();
        let mut loaded = ThinReplica::load_seeded(&a.save(), 7).unwrap();
        let push: Json = serde_json::from_str(&loaded.push_begin()).unwrap();
        assert_eq!(push["lineage"], named);
        loaded.push_abort();
        loaded.start_over_keeping_writes();
        let push: Json = serde_json::from_str(&loaded.push_begin()).unwrap();
        assert!(push.get("lineage").is_none(), "{push}");
    }

    #[test]
    fn writes_set_aside_after_a_compaction_survive_a_save() {
        let mut node = Automerge::new();
        let mut a = ThinReplica::new_seeded(id(), 5);
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 1}])), 1)
            .unwrap();
        sync(&mut a, &mut node);
        a.apply(ops(json!([{"op": "inc", "path": ["n"], "by": 10}])), 2)
            .unwrap();
        // As after `document_compacted`: the writes wait for the node's state.
        a.start_over_keeping_writes();
        let mut loaded = ThinReplica::load_seeded(&a.save(), 9).unwrap();
        let stats = sync(&mut loaded, &mut node);
        assert_eq!(stats.replayed, 1);
        assert_eq!(verge_core::to_json(&node)["n"], json!(11));
        assert_eq!(loaded.to_json(), verge_core::to_json(&node));
    }

    #[test]
    fn refusals_are_local_and_leave_the_replica_as_it_was() {
        let mut a = ThinReplica::new_seeded(id(), 4);
        a.apply(ops(json!([{"op": "set", "path": ["s"], "value": "x"}])), 1)
            .unwrap();
        let err = a
            .apply(ops(json!([{"op": "inc", "path": ["s"], "by": 1}])), 2)
            .unwrap_err();
        assert_eq!(err.code(), "op_not_applicable");
        assert_eq!(a.unsynced(), (1, 1));
        assert!(matches!(
            ThinReplica::load(b"VRGT\x01{"),
            Err(ClientError::InvalidSave(_))
        ));
        assert!(!ThinReplica::is_save(b"VRGC\x02"));
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Two thin replicas and a full replica write random ops, sync in any order, lose
        /// answers and reload from saves; in the end every replica shows the node's state,
        /// and a counter each write also bumps counts every write exactly once.
        #[test]
        fn thin_replicas_converge_and_count_each_write_once(
            steps in proptest::collection::vec(
                (0usize..3, crate::replica::tests::arb_op(), 0u8..6),
                1..40,
            )
        ) {
            let mut node = Automerge::new();
            let mut thin = [ThinReplica::new_seeded(id(), 10), ThinReplica::new_seeded(id(), 11)];
            let mut full = crate::Replica::new_seeded(id(), 12);
            let mut writes = 0i64;
            for (t, (who, op, action)) in steps.into_iter().enumerate() {
                let now = t as i64 + 1;
                let mut batch = vec![Op::parse(&op).unwrap()];
                batch.push(Op::parse(&json!({"op": "inc", "path": ["writes"], "by": 1})).unwrap());
                let applied = if who < 2 {
                    thin[who].apply(batch, now).is_ok()
                } else {
                    full.apply(batch, now).is_ok()
                };
                // A write the replica refused made nothing; one that failed on the op alone
                // bumped nothing either (a write is all or nothing).
                if applied {
                    writes += 1;
                }
                match (who, action) {
                    (0 | 1, 0) => { sync(&mut thin[who], &mut node); }
                    (0 | 1, 1) => {
                        let _ = thin[who].sync(&mut |_: &DocId, body: &[u8]| {
                            serve(&mut node, body);
                            Err(ClientError::Network("lost".into()))
                        });
                    }
                    (0 | 1, 2) => {
                        let saved = thin[who].save();
                        thin[who] = ThinReplica::load(&saved).unwrap();
                    }
                    (2, 0) => {
                        full.sync(&mut |_: &DocId, body: &[u8]| {
                            Ok(crate::replica::tests::answer(&mut node, body))
                        }).unwrap();
                    }
                    _ => {}
                }
            }
            for _ in 0..2 {
                for r in thin.iter_mut() {
                    sync(r, &mut node);
                }
                full.sync(&mut |_: &DocId, body: &[u8]| {
                    Ok(crate::replica::tests::answer(&mut node, body))
                }).unwrap();
            }
            let expected = verge_core::to_json(&node);
            // A run whose writes were all refused leaves no counter: it reads as 0.
            proptest::prop_assert_eq!(expected["writes"].as_i64().unwrap_or(0), writes);
            for r in &thin {
                proptest::prop_assert_eq!(&r.to_json(), &expected);
            }
            proptest::prop_assert_eq!(&full.to_json(), &expected);
        }
    }
}
