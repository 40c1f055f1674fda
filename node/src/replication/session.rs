//! Anti-entropy sessions: reconcile digests, then one Automerge sync session per document.
//!
//! Automerge's sync protocol assumes a reliable, in-order channel and can loop on a lost
//! message, so every document session runs on its own QUIC stream with a fresh sync state, and
//! ends when both sides have nothing more to say or after [`DOC_SYNC_ROUNDS_MAX`] rounds.

use std::sync::Arc;

use automerge::sync::{Message, State as SyncState};
use quinn::{Connection, RecvStream, SendStream};
use verge_core::DocId;
use verge_core::anti_entropy::{Initiator, Responder};
use verge_core::wire::PeerMessage;

use super::transport::{self, TransportError};
use super::{Replication, SYNC_SESSIONS_PER_PEER_MAX};
use crate::documents::Documents;
use crate::metrics::Metrics;

/// Most messages each way in one document's sync session.
pub const DOC_SYNC_ROUNDS_MAX: usize = verge_core::limits::DOC_SYNC_ROUNDS_MAX;

/// Why a session stopped early.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer broke the protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Applying the peer's changes failed.
    #[error("document: {0}")]
    Doc(#[from] crate::documents::DocError),
}

impl From<quinn::ConnectionError> for SessionError {
    fn from(e: quinn::ConnectionError) -> Self {
        SessionError::Transport(e.into())
    }
}

fn encode(message: Option<Message>) -> Option<Vec<u8>> {
    message.map(Message::encode)
}

fn decode(bytes: Option<Vec<u8>>) -> Result<Option<Message>, SessionError> {
    bytes
        .map(|b| {
            Message::decode(&b)
                .map_err(|e| SessionError::Protocol(format!("bad sync message: {e}")))
        })
        .transpose()
}

/// Reconciles with the peer on `conn` and syncs every document that differs. Returns how many
/// documents were synced from this side.
///
/// A `catch_up` session (the first on a new connection) syncs every differing document; a
/// periodic one leaves out documents that changed in the last moments, which the broadcast is
/// still delivering.
pub async fn run_anti_entropy(
    repl: &Arc<Replication>,
    conn: &Connection,
    catch_up: bool,
) -> Result<usize, SessionError> {
    let started = tokio::time::Instant::now();
    let (mut send, mut recv) = conn.open_bi().await?;
    let (mut init, first) = Initiator::start(repl.follower().digest_storage())
        .map_err(|e| SessionError::Protocol(e.to_string()))?;
    repl.metrics().anti_entropy_bytes.inc_by(first.len() as u64);
    transport::write_frame(
        &mut send,
        &PeerMessage::Reconcile { message: first },
        repl.metrics(),
    )
    .await?;
    loop {
        let reply = match transport::read_frame(&mut recv).await? {
            Some(PeerMessage::Reconcile { message }) => message,
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected a reconcile reply, got {other:?}"
                )));
            }
        };
        repl.metrics().anti_entropy_bytes.inc_by(reply.len() as u64);
        match init
            .step(&reply)
            .map_err(|e| SessionError::Protocol(e.to_string()))?
        {
            Some(next) => {
                repl.metrics().anti_entropy_bytes.inc_by(next.len() as u64);
                transport::write_frame(
                    &mut send,
                    &PeerMessage::Reconcile { message: next },
                    repl.metrics(),
                )
                .await?;
            }
            None => break,
        }
    }
    let elapsed = started.elapsed();
    repl.metrics()
        .anti_entropy_reconcile_seconds
        .observe(elapsed.as_secs_f64());
    tracing::debug!(
        peer = %conn.remote_address(),
        rounds = init.rounds(),
        have = init.have.len(),
        need = init.need.len(),
        elapsed_ms = elapsed.as_secs_f64() * 1000.0,
        "reconciled document digests"
    );
    // Documents the peer holds at other heads (or not at all): it knows which they are.
    if !init.need.is_empty() {
        transport::write_frame(
            &mut send,
            &PeerMessage::SyncRequest {
                digests: init.need.clone(),
                catch_up,
            },
            repl.metrics(),
        )
        .await?;
    }
    transport::finish(send);
    let docs = repl.docs_for_digests(&init.have, catch_up);
    let synced = docs.len();
    sync_docs(repl, conn.clone(), docs).await;
    repl.metrics().anti_entropy_docs.inc_by(synced as u64);
    Ok(synced)
}

/// Syncs `docs` with the peer on `conn`, a bounded number at a time.
async fn sync_docs(repl: &Arc<Replication>, conn: Connection, ids: Vec<DocId>) {
    let limit = Arc::new(tokio::sync::Semaphore::new(SYNC_SESSIONS_PER_PEER_MAX));
    let mut tasks = Vec::with_capacity(ids.len());
    for id in ids {
        let Ok(permit) = Arc::clone(&limit).acquire_owned().await else {
            break;
        };
        let docs = Arc::clone(repl.docs());
        let metrics = Arc::clone(repl.metrics());
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let result = initiate_doc_sync(&docs, &metrics, &conn, &id).await;
            drop(permit);
            if let Err(e) = result {
                tracing::debug!(doc = %id, error = %e, "document sync with a peer failed");
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

/// Runs an Automerge sync session for document `id` with the peer on `conn`, on a new stream.
pub(super) async fn initiate_doc_sync(
    docs: &Documents,
    metrics: &Metrics,
    conn: &Connection,
    id: &DocId,
) -> Result<(), SessionError> {
    let (mut send, mut recv) = conn.open_bi().await?;
    let mut state = SyncState::new();
    let mut out = docs.peer_sync_step(id, &mut state, None).await?;
    for _ in 0..DOC_SYNC_ROUNDS_MAX {
        let sent_nothing = out.is_none();
        transport::write_frame(
            &mut send,
            &PeerMessage::DocSync {
                doc: id.clone(),
                message: encode(out),
            },
            metrics,
        )
        .await?;
        let incoming = match transport::read_frame(&mut recv).await? {
            Some(PeerMessage::DocSync { doc, message }) if doc == *id => decode(message)?,
            other => {
                return Err(SessionError::Protocol(format!(
                    "expected a sync message for {id}, got {other:?}"
                )));
            }
        };
        if sent_nothing && incoming.is_none() {
            transport::finish(send);
            return Ok(());
        }
        out = docs.peer_sync_step(id, &mut state, incoming).await?;
    }
    Err(SessionError::Protocol(format!(
        "sync of {id} took more than {DOC_SYNC_ROUNDS_MAX} rounds"
    )))
}

/// Serves a document sync session a peer opened.
pub async fn respond_doc_sync(
    docs: &Documents,
    metrics: &Metrics,
    mut send: SendStream,
    mut recv: RecvStream,
    id: DocId,
    first: Option<Vec<u8>>,
) -> Result<(), TransportError> {
    let mut state = SyncState::new();
    let mut incoming = first;
    for _ in 0..DOC_SYNC_ROUNDS_MAX {
        let received_nothing = incoming.is_none();
        let message = match decode(incoming) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "malformed sync message from a peer");
                return Ok(());
            }
        };
        let out = match docs.peer_sync_step(&id, &mut state, message).await {
            Ok(out) => out,
            Err(e) => {
                tracing::warn!(doc = %id, error = %e, "a peer's sync message does not apply");
                return Ok(());
            }
        };
        let done = received_nothing && out.is_none();
        transport::write_frame(
            &mut send,
            &PeerMessage::DocSync {
                doc: id.clone(),
                message: encode(out),
            },
            metrics,
        )
        .await?;
        if done {
            transport::finish(send);
            return Ok(());
        }
        incoming = match transport::read_frame(&mut recv).await? {
            Some(PeerMessage::DocSync { doc, message }) if doc == id => message,
            _ => return Ok(()),
        };
    }
    Ok(())
}

/// Serves a reconciliation a peer started, then syncs the documents it asks for.
pub async fn respond_reconcile(
    repl: &Arc<Replication>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    first: Vec<u8>,
) -> Result<(), TransportError> {
    let mut responder = match Responder::new(repl.follower().digest_storage()) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "cannot answer reconciliation");
            return Ok(());
        }
    };
    let mut message = first;
    loop {
        let reply = match responder.reply(&message) {
            Ok(reply) => reply,
            Err(e) => {
                repl.metrics().peer_refused("reconcile");
                tracing::warn!(peer = %conn.remote_address(), error = %e, "malformed reconciliation message");
                return Ok(());
            }
        };
        transport::write_frame(
            &mut send,
            &PeerMessage::Reconcile { message: reply },
            repl.metrics(),
        )
        .await?;
        match transport::read_frame(&mut recv).await? {
            Some(PeerMessage::Reconcile { message: next }) => message = next,
            Some(PeerMessage::SyncRequest { digests, catch_up }) => {
                transport::finish(send);
                let docs = repl.docs_for_digests(&digests, catch_up);
                repl.metrics().anti_entropy_docs.inc_by(docs.len() as u64);
                sync_docs(repl, conn, docs).await;
                return Ok(());
            }
            _ => {
                transport::finish(send);
                return Ok(());
            }
        }
    }
}
