//! Asking the members whether a proposal to compact a document is stable, and compacting it
//! when it is (`docs/compaction.md`). The decision is `verge_core::replication::stability`'s;
//! this is its driver: one round per [`STABILITY_ROUND`] over the documents holding a
//! proposal, each member asked once per round on a stream of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use quinn::{RecvStream, SendStream};
use tokio::sync::watch;
use verge_core::DocId;
use verge_core::limits::WIRE_STABILITY_DOCS_MAX;
use verge_core::replication::stability::{self, NotStable, Report};
use verge_core::wire::PeerMessage;

use super::{Replication, session, tick_or_stop, ticker, transport};
use crate::documents::DocError;

/// How often the documents holding a proposal are asked about.
pub const STABILITY_ROUND: Duration = Duration::from_secs(1);
/// How long a member has to answer a stability query.
const STABILITY_ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

impl Replication {
    /// This node's member digest, and its members' addresses (itself excluded).
    fn member_digest(&self) -> ([u8; 32], Vec<String>) {
        let members: Vec<String> = self
            .peer_addrs()
            .iter()
            .map(SocketAddr::to_string)
            .collect();
        let own = self.local_addr.to_string();
        let digest = stability::members_digest(
            members
                .iter()
                .map(String::as_str)
                .chain(std::iter::once(own.as_str())),
        );
        (digest, members)
    }

    /// Runs stability rounds until `stop` turns true.
    pub(super) async fn stability_loop(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut ticker = ticker(STABILITY_ROUND);
        while tick_or_stop(&mut ticker, &mut stop).await {
            let docs = self.docs.pending_proposals(WIRE_STABILITY_DOCS_MAX);
            if !docs.is_empty() {
                self.stability_round(docs).await;
            }
        }
    }

    /// Asks every member about `docs` and compacts those whose proposal is stable. A member
    /// whose report shows the document elsewhere (changes this node lacks, a proposal it lacks,
    /// another generation) gets a sync of the document, which moves whichever side is behind.
    async fn stability_round(self: &Arc<Self>, docs: Vec<DocId>) {
        let (digest, members) = self.member_digest();
        let mut asks = Vec::with_capacity(members.len());
        for member in &members {
            let Ok(addr) = member.parse::<SocketAddr>() else {
                continue;
            };
            let this = Arc::clone(self);
            let docs = docs.clone();
            let member = member.clone();
            asks.push(tokio::spawn(async move {
                let reports = this.ask_stability(addr, docs).await;
                (member, reports)
            }));
        }
        let mut by_doc: BTreeMap<DocId, BTreeMap<String, Report>> = BTreeMap::new();
        for ask in asks {
            let Ok((member, Some(reports))) = ask.await else {
                continue;
            };
            for report in reports {
                by_doc
                    .entry(report.doc.clone())
                    .or_default()
                    .insert(member.clone(), report);
            }
        }
        for doc in docs {
            let reports = by_doc.remove(&doc).unwrap_or_default();
            match self
                .docs
                .compact_if_stable(&doc, &members, &reports, &digest)
                .await
            {
                Ok(Ok(())) => {
                    tracing::debug!(doc = %doc, "a stable proposal started a new generation");
                }
                Ok(Err(
                    NotStable::Lacking(member)
                    | NotStable::NotHeld(member)
                    | NotStable::Lineage { member, .. },
                )) => {
                    if let Ok(addr) = member.parse::<SocketAddr>() {
                        self.sync_doc_with(addr, doc);
                    }
                }
                Ok(Err(why)) => {
                    tracing::trace!(doc = %doc, why = %why, "a proposal is not stable yet");
                }
                Err(DocError::ShuttingDown) => return,
                Err(e) => {
                    tracing::warn!(doc = %doc, error = %e, "compacting a document failed");
                }
            }
        }
    }

    /// One member's reports on `docs`, or `None` when it does not answer in time.
    async fn ask_stability(
        self: &Arc<Self>,
        addr: SocketAddr,
        docs: Vec<DocId>,
    ) -> Option<Vec<Report>> {
        let asked = async {
            let conn = self.connect(addr).await.ok()?;
            let (mut send, mut recv) = conn.open_bi().await.ok()?;
            let query = PeerMessage::StabilityQuery { docs };
            transport::write_frame(&mut send, &query, &self.metrics)
                .await
                .ok()?;
            transport::finish(send);
            match transport::read_frame(&mut recv).await {
                Ok(Some(PeerMessage::StabilityReports { reports })) => Some(reports),
                _ => None,
            }
        };
        tokio::time::timeout(STABILITY_ANSWER_TIMEOUT, asked)
            .await
            .ok()
            .flatten()
    }

    /// Syncs `doc` with the member at `addr`, in the background.
    fn sync_doc_with(self: &Arc<Self>, addr: SocketAddr, doc: DocId) {
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let Ok(conn) = this.connect(addr).await else {
                return;
            };
            if let Err(e) = session::initiate_doc_sync(&this.docs, &this.metrics, &conn, &doc).await
            {
                tracing::debug!(doc = %doc, peer = %addr, error = %e, "document sync for a proposal failed");
            }
        });
    }

    /// Answers a member's stability query on the stream it opened.
    pub(super) async fn answer_stability(
        &self,
        mut send: SendStream,
        _recv: RecvStream,
        docs: Vec<DocId>,
    ) -> Result<(), transport::TransportError> {
        let (digest, _) = self.member_digest();
        let reports = docs
            .iter()
            .filter_map(|doc| self.docs.stability_report(doc, digest).ok().flatten())
            .collect();
        let written = transport::write_frame(
            &mut send,
            &PeerMessage::StabilityReports { reports },
            &self.metrics,
        )
        .await;
        transport::finish(send);
        written
    }
}
