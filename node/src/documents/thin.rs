//! Thin replicas' writes (`POST /v1/ops/{id}`, `verge_core::thin`): made here, on a copy of the
//! document at the heads the replica read, then taken as a full replica's changes are (the
//! same checks, carrying and durability), so that nothing downstream tells them apart.

use automerge::sync::{BloomFilter, Have, Message, MessageVersion, State as SyncState};
use automerge::{Automerge, ChangeHash, ReadDoc};
use verge_core::DocId;
use verge_core::document::load_document;
use verge_core::shadow::Shadow;
use verge_core::thin::{self, Answer, BuildError, Push};

use super::{DocError, Documents, Origin};

impl Documents {
    /// Makes a thin replica's writes at its base and answers the heads that hold them, with
    /// the state when it is not just the base and those writes. The same push again (a retry
    /// after a lost answer, here or on another node) makes the same changes, so its writes
    /// count once.
    pub async fn push(&self, id: &DocId, push: Push) -> Result<Answer, DocError> {
        self.metrics.thin_pushes.inc();
        let at_current = {
            let entry = self.entry(id);
            let guard = self.load(&entry)?;
            let slot = guard.as_ref().expect("load fills the slot");
            at_base(&slot.doc, &push.base)?
        };
        let (mut fork, retained) = match at_current {
            Some(fork) => (fork, false),
            // Writes made on an earlier generation: built there, and carried onto the current
            // one by the sync path, as a full replica's would be.
            None => (
                self.retained_at(id, &push.base)?
                    .ok_or_else(|| DocError::CatchingUp(id.clone()))?,
                true,
            ),
        };
        thin::build(&mut fork, &push).map_err(|e| match e {
            BuildError::NotApplicable { error, .. } => DocError::Apply(error),
            BuildError::NotLive { .. } => DocError::NotLive(id.clone()),
            _ => DocError::Internal("an unknown thin build error"),
        })?;
        let built = fork.get_heads();
        let made = fork.get_changes(&push.base);
        let mut carried = false;
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
            match self
                .exchange(id, &mut SyncState::new(), Some(message), Origin::Client)
                .await
            {
                Ok(_) => {}
                // Carried onto the current generation, durably: answered like any other push.
                Err(DocError::ChangesCarried { .. }) => carried = true,
                Err(e) => return Err(e),
            }
        }
        let entry = self.entry(id);
        let guard = self.load(&entry)?;
        let slot = guard.as_ref().expect("load fills the slot");
        if !carried && !slot.doc.get_missing_deps(&built).is_empty() {
            // The changes did not apply (their history is not all here after all): nothing is
            // acknowledged, and the same push later makes the same changes.
            self.metrics.thin_not_applied.inc();
            return Err(DocError::CatchingUp(id.clone()));
        }
        let heads = slot.doc.get_heads();
        let state = (heads != built).then(|| Shadow::of(&slot.doc));
        Ok(Answer { heads, state })
    }

    /// A copy of the history at `base` from a generation of the document this node retains.
    fn retained_at(&self, id: &DocId, base: &[ChangeHash]) -> Result<Option<Automerge>, DocError> {
        for (generation, bytes) in self.store.retained(id)?.into_iter().rev() {
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
}

/// A copy of `doc` holding exactly the history up to `base`, when `doc` holds all of it.
fn at_base(doc: &Automerge, base: &[ChangeHash]) -> Result<Option<Automerge>, DocError> {
    if !doc.get_missing_deps(base).is_empty() {
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
