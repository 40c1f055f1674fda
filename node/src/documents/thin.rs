//! Thin replicas' writes (`POST /v1/ops/{id}`, `verge_core::thin`): made here, on a copy of the
//! document at the heads the replica read, then taken as a full replica's changes are (the
//! same checks, carrying and durability), so that nothing downstream tells them apart.

use std::sync::Arc;

use automerge::sync::{BloomFilter, Have, Message, MessageVersion, State as SyncState};
use automerge::{Automerge, ChangeHash};
use verge_core::DocId;
use verge_core::document::load_document;
use verge_core::lineage::Lineage;
use verge_core::shadow::Shadow;
use verge_core::thin::{self, Answer, BuildError, Push};

use super::{DocError, Documents, Holds, Origin, holds_all};

/// Times a push is made when the document moved to a new generation between the push's build
/// and its receipt (its changes, made at a base the new generation folded away, are then not
/// taken). A generation starts at most every `[compaction] after_changes` changes, so the
/// next try finds the base among those the document left, and builds there.
const PUSH_ATTEMPTS: usize = 3;

impl Documents {
    /// Makes a thin replica's writes at its base and answers the heads that hold them, with
    /// the state when it is not just the base and those writes. The same push again (a retry
    /// after a lost answer, here or on another node) makes the same changes, so its writes
    /// count once.
    pub async fn push(&self, id: &DocId, push: Push) -> Result<Answer, DocError> {
        self.metrics.thin_pushes.inc();
        let mut attempt = 1;
        loop {
            match self.push_once(id, &push).await? {
                Some(answer) => return Ok(answer),
                None if attempt < PUSH_ATTEMPTS && self.base_moved(id, &push.base)? => {
                    self.metrics.thin_rebuilt.inc();
                    attempt += 1;
                }
                None => {
                    // Their history is not all here after all: nothing is acknowledged, and
                    // the same push later makes the same changes.
                    self.metrics.thin_not_applied.inc();
                    return Err(DocError::CatchingUp(id.clone()));
                }
            }
        }
    }

    /// One try of [`Documents::push`]: `None` when the changes it built did not apply.
    async fn push_once(&self, id: &DocId, push: &Push) -> Result<Option<Answer>, DocError> {
        let (at_current, left, current) = {
            let entry = self.entry(id);
            let guard = self.load(&entry)?;
            let slot = guard.as_ref().expect("load fills the slot");
            (
                at_base(&slot.doc, &push.base)?,
                slot.left.clone(),
                Lineage::of(&slot.doc),
            )
        };
        let (mut fork, retained) = match at_current {
            Some(fork) => (fork, false),
            // Writes made on an earlier generation: built there, and carried onto the current
            // one by the sync path, as a full replica's would be.
            None => match self.retained_at(id, &push.base, left)? {
                Some(fork) => (fork, true),
                None => {
                    let error = self.not_held(id, push.lineage, current);
                    if matches!(error, DocError::Compacted { .. }) {
                        self.metrics.stale_not_carried.inc();
                    }
                    return Err(error);
                }
            },
        };
        thin::build(&mut fork, push).map_err(|e| match e {
            BuildError::NotApplicable { error, .. } => DocError::Apply(error),
            BuildError::NotLive { .. } => DocError::NotLive(id.clone()),
            _ => DocError::Internal("an unknown thin build error"),
        })?;
        let built = fork.get_heads();
        let made = fork.get_changes(&push.base);
        if !made.is_empty() {
            self.metrics.thin_changes_built.inc_by(made.len() as u64);
            // Changes of an earlier generation go with that generation's whole history, as a
            // full replica's copy does after the node's reset: the current generation lacks
            // their deps, and the sync path carries them from it.
            let sent = if retained {
                fork.get_changes(&[])
            } else {
                made
            };
            let message = Message {
                heads: built.clone(),
                need: Vec::new(),
                have: vec![Have {
                    last_sync: push.base.clone(),
                    bloom: BloomFilter::default(),
                }],
                changes: sent
                    .iter()
                    .map(|c| c.raw_bytes().to_vec())
                    .collect::<Vec<_>>()
                    .into(),
                flags: None,
                version: MessageVersion::V1,
            };
            // Made at the base, which a message of only the new changes needs the document to
            // still hold (it may have moved to a new generation since the fork).
            let holds = Holds {
                before: if retained { &[] } else { &push.base },
                after: &built,
            };
            match self
                .exchange(
                    id,
                    &mut SyncState::new(),
                    Some(message),
                    Origin::Client,
                    Some(holds),
                )
                .await
            {
                Ok(exchanged) if !exchanged.held => return Ok(None),
                Ok(_) => {}
                // Carried onto the current generation, durably: answered like any other push.
                Err(DocError::ChangesCarried { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        // The writes are durable here, though the document may have moved to a new generation
        // since (folding them into its root): its heads hold them either way.
        let entry = self.entry(id);
        let guard = self.load(&entry)?;
        let slot = guard.as_ref().expect("load fills the slot");
        let heads = slot.doc.get_heads();
        let state = (heads != built).then(|| Shadow::of(&slot.doc));
        Ok(Some(Answer {
            heads,
            lineage: Lineage::of(&slot.doc),
            state,
        }))
    }

    /// Whether `base` is no longer in the document's current generation, which moved on.
    fn base_moved(&self, id: &DocId, base: &[ChangeHash]) -> Result<bool, DocError> {
        let entry = self.entry(id);
        let guard = self.load(&entry)?;
        let slot = guard.as_ref().expect("load fills the slot");
        Ok(!holds_all(&slot.doc, base))
    }

    /// A copy of the history at `base` from a generation of the document this node retains,
    /// or from `left`, the one it left last, whose retention may not be written down yet.
    fn retained_at(
        &self,
        id: &DocId,
        base: &[ChangeHash],
        left: Option<(u64, Arc<Vec<u8>>)>,
    ) -> Result<Option<Automerge>, DocError> {
        for (generation, bytes) in self.retained_with(id, left.as_ref())?.into_iter().rev() {
            let doc = load_document(&bytes, self.actor()).map_err(|e| {
                tracing::warn!(doc = %id, generation, error = %e, "a retained generation does not load");
                DocError::Internal("a retained generation does not load")
            })?;
            if let Some(fork) = at_base(&doc, base)? {
                return Ok(Some(fork));
            }
        }
        Ok(None)
    }

    /// Why a push's base is nowhere here, told by the history the replica says it is in
    /// (`lineage`) against the document's (`current`):
    /// - an earlier generation of the same incarnation that no node retains: further back than
    ///   nodes retain (the rule a full replica's copy is held to), or any earlier one on a node
    ///   alone (every generation was left here, so none is retained elsewhere). The replica
    ///   makes its writes again on the current state.
    /// - an earlier incarnation: the document was replaced, the replica starts over.
    /// - else `catching_up`, which keeps the writes for a retry here or elsewhere: this node
    ///   may not have received the base's generation yet, or may have moved past it taking a
    ///   newer one from a peer that still retains it. Making the writes again while a node may
    ///   hold them from a push whose answer was lost would count them twice.
    fn not_held(&self, id: &DocId, lineage: Option<Lineage>, current: Lineage) -> DocError {
        match lineage {
            Some(l)
                if l.incarnation == current.incarnation
                    && l.generation < current.generation
                    && (self.alone()
                        || self.beyond_retention(current.generation, l.generation)) =>
            {
                DocError::Compacted {
                    id: id.clone(),
                    generation: current.generation,
                }
            }
            Some(l) if l.incarnation < current.incarnation => DocError::Replaced(id.clone()),
            _ => DocError::CatchingUp(id.clone()),
        }
    }
}

/// A copy of `doc` holding exactly the history up to `base`, when `doc` holds all of it.
fn at_base(doc: &Automerge, base: &[ChangeHash]) -> Result<Option<Automerge>, DocError> {
    if !holds_all(doc, base) {
        return Ok(None);
    }
    let mut heads = doc.get_heads();
    heads.sort();
    let mut wanted = base.to_vec();
    wanted.sort();
    if heads == wanted {
        return Ok(Some(doc.clone()));
    }
    doc.fork_at(base)
        .map(Some)
        .map_err(|e| DocError::Automerge {
            context: "copying the document at a thin replica's base",
            source: Box::new(e),
        })
}
