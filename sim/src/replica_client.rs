//! Clients that write through a local replica and sync it with their node, as edge functions
//! do with `@verge/client`: the client's Rust core (`verge-client`'s [`Replica`]) writes
//! offline, then pushes and pulls over `POST /v1/sync/{id}`.
//!
//! Every simulated run compacts documents every few changes, so a replica's unsynced writes
//! routinely predate a compaction when it syncs: the node carries them onto the new generation
//! (`changes_carried`), or, when it no longer retains the replica's generation, the replica
//! makes them again (`document_compacted`). A sync whose answer is lost leaves writes the node
//! may hold; the next sync, across compactions or not, must not apply them twice.
//!
//! A replica's write is recorded as unknown when it is made, and becomes acknowledged once a
//! sync that carried it completed, or once the node answered `changes_carried`; it stays
//! unknown when the run ends before either (the node may hold it from a sync whose answer was
//! lost).
//!
//! Some copies are thin replicas ([`ThinReplica`], `POST /v1/ops/{id}`): the node makes their
//! changes at the heads the copy read. A thin copy syncs with any node, picked at random each
//! time, so that a push whose answer was lost is often sent again to another node, which must
//! make the same changes. Copies of both kinds are now and then saved and loaded again, as an
//! edge function does between requests (the load taking over the saver's actor).

use std::time::Duration;

use rand::Rng;
use rand::rngs::StdRng;
use verge_client::{ClientError, Replica, ThinReplica};
use verge_core::{DocId, Op};

use crate::api::NodeApi;
use crate::lock;
use crate::trace::Trace;
use crate::workload::{
    Outcome, SharedHistory, WorkloadConfig, Write, WriteOp, client_rng, doc_id, wait_ready,
};

/// Most writes a replica makes between two syncs.
const WRITES_BETWEEN_SYNCS_MAX: usize = 4;
/// Percent of sync answers the client loses after the node sent them (the node took the
/// changes, the client cannot tell): each such write is then held by the node and still
/// pending at the client, whose next sync must not apply it twice.
const LOST_ANSWER_PERCENT: u32 = 10;
/// Percent of copies that are thin replicas.
const THIN_PERCENT: u32 = 40;
/// Percent of syncs before which the copy is saved and loaded again.
const RELOAD_PERCENT: u32 = 20;
/// How long after the workload's end the replicas keep trying to sync what is left (the run
/// gives clients 10 s).
const FINAL_SYNC_WINDOW: Duration = Duration::from_secs(8);

/// One replica client: which it is and where it syncs.
#[derive(Debug, Clone)]
pub struct ReplicaClient {
    /// Its index among all clients (its own key is `c<client>`).
    pub client: usize,
    /// The node its full replicas sync with.
    pub node: usize,
    /// How many nodes there are (thin replicas sync with any).
    pub nodes: usize,
    /// The run's seed.
    pub seed: u64,
    /// When the workload ends, simulated time since the start.
    pub until: Duration,
}

/// A replica of one document and the writes made in it whose fate is not known yet (their
/// places in the history).
struct Copy {
    replica: Kind,
    pending: Vec<usize>,
}

/// A full replica (Automerge in the client) or a thin one (the node makes the changes).
#[allow(clippy::large_enum_variant)] // a few copies per client
enum Kind {
    Full(Replica),
    Thin(ThinReplica),
}

impl Kind {
    fn apply(&mut self, ops: Vec<Op>, now_ms: i64) -> Result<bool, ClientError> {
        match self {
            Kind::Full(r) => r.apply(ops, now_ms),
            Kind::Thin(r) => r.apply(ops, now_ms),
        }
    }

    /// Saves the copy and loads it again, as an edge function does between two requests;
    /// fresh actors come from `seed`.
    fn reload(&mut self, seed: u64) -> Result<(), ClientError> {
        match self {
            Kind::Full(r) => *r = Replica::load_seeded(&r.save()?, seed)?,
            Kind::Thin(r) => *r = ThinReplica::load_seeded(&r.save(), seed)?,
        }
        Ok(())
    }
}

/// How a sync ended for the writes it carried.
enum Synced {
    /// The node holds them.
    Acked,
    /// Not known: the writes stay pending.
    Failed(String),
    /// The replica dropped them (its copy predates a delete and a new write of the document):
    /// they may be visible only if a sync whose answer was lost brought them.
    Dropped,
}

/// Runs a replica client over the upfront documents until `rc.until`, then syncs what is left.
pub async fn replica_client(
    rc: ReplicaClient,
    node: NodeApi,
    config: WorkloadConfig,
    history: SharedHistory,
    trace: Trace,
) {
    let mut rng = client_rng(rc.seed, rc.client);
    // Thin copies, reloads and thin copies' nodes are drawn from their own stream, so that the
    // rest of a seed's run stays what it was before they existed.
    let mut extra = client_rng(rc.seed ^ 0x7448_494e, rc.client);
    wait_ready(&history).await;
    let mut copies: Vec<Option<Copy>> = (0..config.docs).map(|_| None).collect();
    let mut seq = 0u64;
    while crate::now() < rc.until {
        let pause = rng.random_range(config.pause_ms.0..=config.pause_ms.1);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let doc = rng.random_range(0..config.docs);
        let copy = copies[doc].get_or_insert_with(|| {
            let thin = extra.random_ratio(THIN_PERCENT, 100);
            let id = DocId::new(doc_id(doc)).expect("workload ids are valid");
            let seed = rc.seed ^ crate::workload::splitmix(((rc.client as u64) << 16) | doc as u64);
            Copy {
                replica: if thin {
                    Kind::Thin(ThinReplica::new_seeded(id, seed))
                } else {
                    Kind::Full(Replica::new_seeded(id, seed))
                },
                pending: Vec::new(),
            }
        });
        for _ in 0..rng.random_range(1..=WRITES_BETWEEN_SYNCS_MAX) {
            seq += 1;
            let unique = format!("c{}.{seq}", rc.client);
            let op = match rng.random_range(0..100) {
                0..20 => WriteOp::Set(unique),
                20..60 => WriteOp::Inc(rng.random_range(1..=5)),
                60..85 => WriteOp::Push(unique),
                _ => WriteOp::Splice(format!("<{unique}>")),
            };
            let ops = Op::parse_list(&op.ops(rc.client)).expect("workload ops parse");
            let now_ms = crate::now().as_millis() as i64;
            match copy.replica.apply(ops, now_ms) {
                Ok(_) => {
                    trace.event(format!("r{} {op:?} {} local", rc.client, doc_id(doc)));
                    let mut history = lock(&history);
                    copy.pending.push(history.writes.len());
                    history.writes.push(Write {
                        client: rc.client,
                        doc,
                        cycle: 0,
                        op,
                        outcome: Outcome::Unknown,
                        at: crate::now(),
                    });
                }
                Err(e) => trace.event(format!(
                    "r{} {op:?} {} refused locally: {}",
                    rc.client,
                    doc_id(doc),
                    e.code()
                )),
            }
        }
        // Half the time the writes stay offline for a while, across other documents' syncs.
        if rng.random_bool(0.5) {
            sync_and_record(
                &mut rng, &mut extra, &rc, &node, doc, copy, &history, &trace,
            )
            .await;
        }
    }
    let deadline = rc.until + FINAL_SYNC_WINDOW;
    while crate::now() < deadline {
        let mut left = false;
        for (doc, copy) in copies.iter_mut().enumerate() {
            let Some(copy) = copy else { continue };
            if !copy.pending.is_empty() && crate::now() < deadline {
                sync_and_record(
                    &mut rng, &mut extra, &rc, &node, doc, copy, &history, &trace,
                )
                .await;
                left |= !copy.pending.is_empty();
            }
        }
        if !left {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Syncs `copy` and records its pending writes as acknowledged when the sync says so.
#[allow(clippy::too_many_arguments)]
async fn sync_and_record(
    rng: &mut StdRng,
    extra: &mut StdRng,
    rc: &ReplicaClient,
    node: &NodeApi,
    doc: usize,
    copy: &mut Copy,
    history: &SharedHistory,
    trace: &Trace,
) {
    let id = doc_id(doc);
    if extra.random_ratio(RELOAD_PERCENT, 100) {
        match copy.replica.reload(extra.random()) {
            Ok(()) => trace.event(format!("r{} reload {id}", rc.client)),
            Err(e) => trace.event(format!("r{} reload {id} failed: {}", rc.client, e.code())),
        }
    }
    let synced = match &mut copy.replica {
        Kind::Full(replica) => sync(replica, node, &id, trace, rc.client, rng).await,
        Kind::Thin(replica) => {
            let at = NodeApi::of(&crate::cluster::host_name(extra.random_range(0..rc.nodes)));
            sync_thin(replica, &at, &id, trace, rc.client, rng).await
        }
    };
    match synced {
        Synced::Acked => {
            let (stats, lineage) = match &mut copy.replica {
                Kind::Full(replica) => (
                    replica.last_sync(),
                    replica
                        .automerge()
                        .map(|doc| verge_core::lineage::Lineage::of(doc).generation.to_string())
                        .unwrap_or_default(),
                ),
                Kind::Thin(replica) => (replica.last_sync(), "(thin)".to_owned()),
            };
            trace.event(format!(
                "r{} sync {id} -> acked {} in generation {lineage} (round trips {}, replayed {}, refused {})",
                rc.client,
                copy.pending.len(),
                stats.round_trips,
                stats.replayed,
                stats.replay_refused
            ));
            acknowledge(copy, history);
        }
        Synced::Failed(why) => trace.event(format!("r{} sync {id} -> {why}", rc.client)),
        Synced::Dropped => {
            trace.event(format!(
                "r{} sync {id} -> dropped {}",
                rc.client,
                copy.pending.len()
            ));
            copy.pending.clear();
        }
    }
}

/// Records `copy`'s pending writes as acknowledged, now.
fn acknowledge(copy: &mut Copy, history: &SharedHistory) {
    let at = crate::now();
    let mut history = lock(history);
    for index in copy.pending.drain(..) {
        let write = &mut history.writes[index];
        write.outcome = Outcome::Acked;
        write.at = at;
    }
}

/// What `Replica::sync` does, over the simulator's HTTP: a sync, and after `changes_carried`,
/// `document_compacted` or `document_replaced`, the matching start over and one more sync.
async fn sync(
    replica: &mut Replica,
    node: &NodeApi,
    id: &str,
    trace: &Trace,
    client: usize,
    rng: &mut StdRng,
) -> Synced {
    let first = match sync_once(replica, node, id, rng).await {
        Ok(()) => return Synced::Acked,
        Err(e) => e,
    };
    let lineage = replica
        .automerge()
        .map(|doc| verge_core::lineage::Lineage::of(doc).to_string())
        .unwrap_or_default();
    trace.event(format!(
        "r{client} sync {id} answered {} (copy in {lineage})",
        first.code()
    ));
    let carried = match first.code() {
        // The node carried the copy's changes onto the new generation, durably.
        "changes_carried" => {
            replica.start_over();
            true
        }
        "document_compacted" => {
            replica.start_over_keeping_writes();
            false
        }
        "document_replaced" => {
            replica.start_over();
            return Synced::Dropped;
        }
        _ => return Synced::Failed(first.to_string()),
    };
    match sync_once(replica, node, id, rng).await {
        Ok(()) => Synced::Acked,
        // The writes are in the node's copy whatever happened to the sync after that answer.
        Err(_) if carried => Synced::Acked,
        Err(e) => Synced::Failed(e.to_string()),
    }
}

/// One exchange until the replica and the node hold the same changes; loses an answer now
/// and then ([`LOST_ANSWER_PERCENT`]).
async fn sync_once(
    replica: &mut Replica,
    node: &NodeApi,
    id: &str,
    rng: &mut StdRng,
) -> Result<(), ClientError> {
    let mut body = replica.sync_begin()?;
    loop {
        let answer = match node.sync(id, body).await {
            Ok(_) if rng.random_ratio(LOST_ANSWER_PERCENT, 100) => {
                replica.sync_abort();
                return Err(ClientError::Network("answer lost".into()));
            }
            Ok(answer) => answer,
            Err(e) => {
                replica.sync_abort();
                return Err(ClientError::Network(e.to_string()));
            }
        };
        if !answer.status.is_success() {
            replica.sync_abort();
            return Err(ClientError::from_response(
                answer.status.as_u16(),
                &answer.body,
            ));
        }
        match replica.sync_receive(&answer.body) {
            Ok(Some(next)) => body = next,
            Ok(None) => return Ok(()),
            Err(e) => {
                replica.sync_abort();
                return Err(e);
            }
        }
    }
}

/// What `ThinReplica::sync` does, over the simulator's HTTP: a push, and after
/// `document_compacted` or `document_replaced`, the matching start over and one more push.
async fn sync_thin(
    replica: &mut ThinReplica,
    node: &NodeApi,
    id: &str,
    trace: &Trace,
    client: usize,
    rng: &mut StdRng,
) -> Synced {
    let first = match push_once(replica, node, id, rng).await {
        Ok(()) => return Synced::Acked,
        Err(e) => e,
    };
    trace.event(format!("r{client} push {id} answered {}", first.code()));
    match first.code() {
        "document_compacted" => replica.start_over_keeping_writes(),
        "document_replaced" => {
            replica.start_over();
            return Synced::Dropped;
        }
        _ => return Synced::Failed(first.to_string()),
    }
    match push_once(replica, node, id, rng).await {
        Ok(()) => Synced::Acked,
        Err(e) => Synced::Failed(e.to_string()),
    }
}

/// One push (and, after a start over, the fetch before it); loses an answer now and then
/// ([`LOST_ANSWER_PERCENT`]).
async fn push_once(
    replica: &mut ThinReplica,
    node: &NodeApi,
    id: &str,
    rng: &mut StdRng,
) -> Result<(), ClientError> {
    let mut body = replica.push_begin();
    loop {
        let answer = match node.push(id, body).await {
            Ok(_) if rng.random_ratio(LOST_ANSWER_PERCENT, 100) => {
                replica.push_abort();
                return Err(ClientError::Network("answer lost".into()));
            }
            Ok(answer) => answer,
            Err(e) => {
                replica.push_abort();
                return Err(ClientError::Network(e.to_string()));
            }
        };
        if !answer.status.is_success() {
            replica.push_abort();
            return Err(ClientError::from_response(
                answer.status.as_u16(),
                &answer.body,
            ));
        }
        match replica.push_receive(&answer.body) {
            Ok(Some(next)) => body = next,
            Ok(None) => return Ok(()),
            Err(e) => {
                replica.push_abort();
                return Err(e);
            }
        }
    }
}
