//! Verge's client: a local replica of one document that reads and writes in memory and syncs
//! with a node in one round trip.
//!
//! Edge functions are short-lived and far from any database, so the client keeps the document
//! next to the code: [`Replica::get`] and [`Replica::apply`] never do I/O, and
//! [`Replica::sync`] exchanges only what changed since the last sync, in one `POST
//! /v1/sync/{id}` of standard Automerge sync messages. The same crate is the npm package
//! `@verge/client` (through wasm-bindgen, on wasm32) and a plain Rust library for Rust edge
//! runtimes, which bring their HTTP client as a [`Transport`].
//!
//! ```no_run
//! use verge_client::{ClientError, DocId, Replica};
//! # // Your runtime's HTTP client: POST `body`, return the response body.
//! # fn post(_url: &str, _body: &[u8]) -> Result<Vec<u8>, ClientError> { Ok(Vec::new()) }
//! let mut transport = |id: &DocId, body: &[u8]| post(&format!("http://127.0.0.1:7070/v1/sync/{id}"), body);
//! let id = DocId::new("cart/u-42")?;
//! let mut cart = Replica::open(id, &mut transport)?;
//! cart.apply_json(r#"[{"op": "inc", "path": ["items", "sku-1", "qty"], "by": 1}]"#, 1_700_000_000_000)?;
//! cart.sync(&mut transport)?;
//! println!("{}", cart.to_json());
//! # Ok::<(), ClientError>(())
//! ```

pub mod decoded;
pub mod error;
pub mod replica;
pub mod thin;
#[cfg(target_arch = "wasm32")]
mod wasm;

pub use error::ClientError;
pub use replica::{MAX_ROUND_TRIPS, Replica, SyncStats, Transport};
pub use thin::ThinReplica;
pub use verge_core::{DocId, Op, Path, PathSegment};
