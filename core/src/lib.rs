//! Verge's sans-IO core: the document model, its operations, JSON materialisation and limits.
//!
//! Everything here is plain data in, plain data out. Time and randomness are arguments, never
//! read from the environment, so the node, the Wasm client and the simulator share this code
//! and a simulated run replays exactly from its seed. This crate builds for
//! `wasm32-unknown-unknown`.

pub mod anti_entropy;
pub mod doc_id;
pub mod document;
pub mod generation;
pub mod gossip;
pub mod heads;
pub mod implicit;
pub mod incarnation;
pub mod json_int;
pub mod limits;
pub mod lineage;
pub mod membership;
pub mod ops;
pub mod replication;
pub mod shadow;
pub mod thin;
pub mod wire;

pub use doc_id::{DocId, DocIdError};
pub use document::{ApplyError, Expiry, Lifecycle, Write, apply, to_json};
pub use heads::{heads_from_hex, heads_to_hex};
pub use ops::{Op, OpError, Path, PathSegment};
