//! The Verge node: durable Automerge documents in redb, served over HTTP.
//!
//! The `verge` binary is a thin shell over this library: [`node::run`] runs a node, [`cli`]
//! holds the client commands. Storage, the document service and the API are separate modules
//! so that the simulator can drive the same code with its own clock, network and disk.

pub mod auth;
pub mod backup;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod documents;
pub mod http;
pub mod metrics;
pub mod node;
pub mod replication;
pub mod store;
pub mod subscriptions;
pub mod tls;
