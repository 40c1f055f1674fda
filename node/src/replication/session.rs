//! Anti-entropy sessions: reconcile digests, then one Automerge sync session per document.
//!
//! Automerge's sync protocol assumes a reliable, in-order channel and can loop on a lost
//! message, so every document session runs on its own QUIC stream with a fresh sync state. The
//! turn-taking, ending and round limit of a session are core's [`DocSync`] machine; both sides
//! here are one driver of it.

use std::sync::Arc;

use automerge::sync::State as SyncState;
use quinn::{Connection, RecvStream, SendStream};
use verge_core::DocId;
use verge_core::anti_entropy::{Initiator, ReconcileError, Responder};
use verge_core::replication::doc_sync::{DocSync, DocSyncError, Received, Role};
use verge_core::wire::PeerMessage;

use super::transport::{self, TransportError};
use super::{Replication, SYNC_SESSIONS_PER_PEER_MAX};
use crate::documents::Documents;
use crate::metrics::Metrics;

/// Why a session stopped early.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SessionError {
    /// The transport failed.
    #[error(transparent)]
    Transport(#[from] TransportError),
    /// The peer sent another message than the protocol's next (or ended the stream early).
    #[error("expected {expected}, got {got}")]
    Unexpected {
        /// What the protocol expected.
        expected: &'static str,
        /// The kind of message received ([`PeerMessage::kind`]), or `end of stream`.
        got: &'static str,
    },
    /// Digest reconciliation failed.
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    /// A document sync session broke its protocol.
    #[error(transparent)]
    DocSync(#[from] DocSyncError),
    /// Applying the peer's changes failed.
    #[error("document: {0}")]
    Doc(#[from] crate::documents::DocError),
}

impl From<quinn::ConnectionError> for SessionError {
    fn from(e: quinn::ConnectionError) -> Self {
        SessionError::Transport(e.into())
    }
}

/// The kind of `frame` for [`SessionError::Unexpected`].
fn kind_of(frame: &Option<PeerMessage>) -> &'static str {
    frame.as_ref().map_or("end of stream", PeerMessage::kind)
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
    let (mut init, first) = Initiator::start(repl.follower().digest_storage())?;
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
                return Err(SessionError::Unexpected {
                    expected: "reconcile",
                    got: kind_of(&other),
                });
            }
        };
        repl.metrics().anti_entropy_bytes.inc_by(reply.len() as u64);
        match init.step(&reply)? {
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
    let (send, recv) = conn.open_bi().await?;
    drive_doc_sync(docs, metrics, send, recv, id, DocSync::initiator(), None).await
}

/// Serves a document sync session a peer opened with `first`.
pub async fn respond_doc_sync(
    docs: &Documents,
    metrics: &Metrics,
    send: SendStream,
    recv: RecvStream,
    id: DocId,
    first: Option<Vec<u8>>,
) -> Result<(), SessionError> {
    let session = DocSync::responder();
    drive_doc_sync(docs, metrics, send, recv, &id, session, Some(first)).await
}

/// Drives one side of a document sync session (see [`DocSync`] for the protocol): the machine
/// decides whose turn it is and when the session is over; this moves its messages between the
/// stream and the document.
async fn drive_doc_sync(
    docs: &Documents,
    metrics: &Metrics,
    mut send: SendStream,
    mut recv: RecvStream,
    id: &DocId,
    mut session: DocSync,
    mut first: Option<Option<Vec<u8>>>,
) -> Result<(), SessionError> {
    let mut state = SyncState::new();
    if session.role() == Role::Initiator {
        let out = docs.peer_sync_step(id, &mut state, None).await?;
        let outgoing = session.send(out)?;
        write_doc_sync(&mut send, metrics, id, outgoing.message).await?;
    }
    loop {
        let message = match first.take() {
            Some(message) => message,
            None => match transport::read_frame(&mut recv).await? {
                Some(PeerMessage::DocSync { doc, message }) if doc == *id => message,
                other => {
                    return Err(SessionError::Unexpected {
                        expected: "doc_sync for this document",
                        got: kind_of(&other),
                    });
                }
            },
        };
        let incoming = match session.receive(message.as_deref())? {
            Received::Done => break,
            Received::Apply(m) => m,
        };
        let out = docs.peer_sync_step(id, &mut state, incoming).await?;
        let outgoing = session.send(out)?;
        write_doc_sync(&mut send, metrics, id, outgoing.message).await?;
        if outgoing.last {
            break;
        }
    }
    transport::finish(send);
    Ok(())
}

async fn write_doc_sync(
    send: &mut SendStream,
    metrics: &Metrics,
    id: &DocId,
    message: Option<Vec<u8>>,
) -> Result<(), TransportError> {
    let frame = PeerMessage::DocSync {
        doc: id.clone(),
        message,
    };
    transport::write_frame(send, &frame, metrics).await
}

/// Serves a reconciliation a peer started, then syncs the documents it asks for.
pub async fn respond_reconcile(
    repl: &Arc<Replication>,
    conn: Connection,
    mut send: SendStream,
    mut recv: RecvStream,
    first: Vec<u8>,
) -> Result<(), SessionError> {
    let mut responder = Responder::new(repl.follower().digest_storage())?;
    let mut message = first;
    loop {
        let reply = responder.reply(&message)?;
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
