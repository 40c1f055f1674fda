//! Every bound Verge enforces, in one place.
//!
//! Inputs from the network and from users are checked against these before any work is done
//! on them, so a hostile or buggy client costs the node a bounded amount of memory and CPU.
//! The node may be configured with lower values for some of them, never higher.

/// Longest document id in bytes. Long enough for URLs, user ids and automerge-repo ids.
pub const DOC_ID_BYTES_MAX: usize = 256;

/// Largest JSON request body (`PUT`, `PATCH`). A document larger than this is edited with ops.
pub const REQUEST_BODY_BYTES_MAX: usize = 1024 * 1024;

/// Largest sync message accepted on `POST /v1/sync/{id}`: a client bootstrapping a document
/// sends its whole history once, so this is the document limit.
pub const SYNC_MESSAGE_BYTES_MAX: usize = DOC_BYTES_MAX;

/// Largest stored document (snapshot plus incremental changes). Documents are replicated and
/// held in memory whole, so they stay small; larger data belongs in many documents.
pub const DOC_BYTES_MAX: usize = 4 * 1024 * 1024;

/// Most ops in one `PATCH`; they form one change, applied atomically.
pub const OPS_PER_WRITE_MAX: usize = 1000;

/// Most elements in an op path.
pub const PATH_DEPTH_MAX: usize = 32;

/// Deepest nesting of a JSON value written into a document (objects and arrays).
pub const JSON_DEPTH_MAX: usize = 32;

/// Longest map key in bytes.
pub const KEY_BYTES_MAX: usize = 1024;

/// Most generations of one implicitly created container that a write scans past: each is a
/// delete and a re-creation at the same key, and each costs one hash when the key is created
/// again. A document at [`DOC_BYTES_MAX`] holds far fewer.
pub const IMPLICIT_GENERATIONS_MAX: u64 = 1 << 20;

/// Default and largest page of `GET /v1/docs`.
pub const LIST_LIMIT_DEFAULT: usize = 100;
/// See [`LIST_LIMIT_DEFAULT`].
pub const LIST_LIMIT_MAX: usize = 1000;

/// Longest time to live of a document: ten years, in seconds.
pub const TTL_SECONDS_MAX: u64 = 10 * 365 * 24 * 3600;

/// Most changes in one broadcast batch between nodes.
pub const WIRE_CHANGES_PER_BATCH_MAX: usize = 65_536;

/// Most members a node tracks and announces.
pub const WIRE_MEMBERS_MAX: usize = 1024;

/// Most departed members (left or forgotten) a node remembers, so as not to dial them or take
/// stale gossip about them for a return; beyond it the oldest departure is forgotten.
pub const DEPARTED_MEMBERS_MAX: usize = WIRE_MEMBERS_MAX;

/// Most document digests in one anti-entropy sync request.
pub const WIRE_DIGESTS_PER_MESSAGE_MAX: usize = 100_000;

/// Most documents one stability query asks about (and one answer reports on).
pub const WIRE_STABILITY_DOCS_MAX: usize = 256;

/// Most heads one stability report names; a document with more concurrent heads is reported
/// on once they merge.
pub const WIRE_REPORT_HEADS_MAX: usize = 1024;

// Replication's queues and sessions. Every queue between a node's replication tasks is bounded;
// what does not fit is dropped and left to anti-entropy (or, for a membership packet, to SWIM,
// which is built for loss), and counted.

/// Local changes waiting to be batched for the broadcast.
pub const BROADCAST_FEED_MAX: usize = 16_384;
/// Batches a relay received, waiting to be merged into its window.
pub const RELAY_QUEUE_MAX: usize = 1024;
/// Membership packets waiting for the membership task.
pub const MEMBERSHIP_QUEUE_MAX: usize = 4096;
/// Stream outcomes (acknowledgements, relay confirmations) waiting for the broadcast task.
pub const DELIVERY_EVENTS_MAX: usize = 4096;
/// Anti-entropy document sessions running at once with one peer.
pub const SYNC_SESSIONS_PER_PEER_MAX: usize = 16;
/// Messages each way in one document's Automerge sync session between nodes.
pub const DOC_SYNC_ROUNDS_MAX: usize = 64;

// A sync message must be able to carry a whole document, a document must hold at least one
// maximal request, and a path must fit in a value's nesting. Checked when compiling.
const _: () = {
    assert!(SYNC_MESSAGE_BYTES_MAX >= DOC_BYTES_MAX);
    assert!(DOC_BYTES_MAX >= REQUEST_BODY_BYTES_MAX);
    assert!(LIST_LIMIT_DEFAULT <= LIST_LIMIT_MAX);
    assert!(PATH_DEPTH_MAX <= JSON_DEPTH_MAX);
};
