//! Replication decisions, sans-IO: the node's replication module drives these with sockets,
//! tasks and a monotonic clock, and they are tested on virtual time.
//!
//! - [`peers`]: the member table and when to dial, reconcile with and compare clocks with
//!   each member.
//! - [`backoff`]: when to dial an unreachable peer again.
//! - [`deliveries`]: batches sent to the relay and not yet confirmed, and acknowledgements
//!   writers wait for.
//! - [`doc_sync`]: whose turn it is in one document's sync session between nodes, and when
//!   the session is over.
//! - [`stability`]: whether a proposal to compact a document is stable, from members' reports.
//! - [`timers`]: the timers a machine asked for, in one queue.
//!
//! Batching and routing are in [`crate::gossip`], reconciliation in [`crate::anti_entropy`],
//! failure detection in [`crate::membership`].

pub mod backoff;
pub mod deliveries;
pub mod doc_sync;
pub mod peers;
pub mod stability;
pub mod timers;
