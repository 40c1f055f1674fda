//! When a proposal to compact a document is stable: every member holds it, and no member can
//! hold a proposal this node does not know (`docs/compaction.md`, "The protocol").
//!
//! A node holding a proposal asks every member of its member table for a [`Report`] on the
//! document: its lineage, its heads and a digest of its own member table. The proposal `W`
//! that wins (the smallest hash among the proposals for the next generation) is stable here
//! when every member answered, from the same generation and with the same member table, naming
//! heads this node holds whose past contains `W`. Then every proposal any member made before
//! holding `W` is in some member's reported heads, so in this node's document: every node that
//! finds a proposal stable finds the same winner, and builds the same generation from it.
//!
//! This module decides; the node asks, collects the answers and compacts.

use std::collections::{BTreeMap, HashSet};

use automerge::{Automerge, ChangeHash, ROOT, ReadDoc, ScalarValue, Value};
use bincode::{Decode, Encode};
use sha2::{Digest, Sha256};

use crate::DocId;
use crate::generation::{self, PROPOSAL_KEY};
use crate::lineage::Lineage;

/// What a member says of one document when asked whether a proposal is stable.
#[derive(Debug, Clone, PartialEq, Eq, Encode, Decode)]
pub struct Report {
    /// The document.
    pub doc: DocId,
    /// Its incarnation at the member.
    pub incarnation: u64,
    /// Its generation at the member.
    pub generation: u64,
    /// Its heads at the member (none when the member does not hold it).
    pub heads: Vec<[u8; 32]>,
    /// The digest of the member's member table ([`members_digest`]).
    pub members: [u8; 32],
}

impl Report {
    /// The report of `doc` at a node whose member table digests to `members`.
    pub fn of(doc_id: DocId, doc: &Automerge, members: [u8; 32]) -> Self {
        let lineage = Lineage::of(doc);
        Report {
            doc: doc_id,
            incarnation: lineage.incarnation,
            generation: lineage.generation,
            heads: doc.get_heads().iter().map(|h| h.0).collect(),
            members,
        }
    }

    /// The member's lineage of the document.
    pub fn lineage(&self) -> Lineage {
        Lineage {
            incarnation: self.incarnation,
            generation: self.generation,
        }
    }
}

/// A digest of a member table: every member's address, this node's own included, sorted. Two
/// nodes with the same digest know the same members, so neither can hold a proposal from a
/// node the other never heard of.
pub fn members_digest<'a>(addrs: impl IntoIterator<Item = &'a str>) -> [u8; 32] {
    let mut sorted: Vec<&str> = addrs.into_iter().collect();
    sorted.sort_unstable();
    sorted.dedup();
    let mut h = Sha256::new();
    h.update(b"verge/members/v1\0");
    for addr in sorted {
        h.update((addr.len() as u64).to_be_bytes());
        h.update(addr.as_bytes());
    }
    h.finalize().into()
}

/// The proposals for `doc`'s next generation that it holds, by hash, smallest first. Nodes
/// propose only while they hold no proposal for that generation, so these are all concurrent
/// and all visible as the values of [`PROPOSAL_KEY`].
pub fn proposals(doc: &Automerge) -> Vec<ChangeHash> {
    let next = generation::of(doc) + 1;
    let Ok(values) = doc.get_all(ROOT, PROPOSAL_KEY) else {
        return Vec::new();
    };
    let mut hashes: Vec<ChangeHash> = values
        .iter()
        .filter(|(value, _)| match value {
            Value::Scalar(s) => match s.as_ref() {
                ScalarValue::Int(n) => u64::try_from(*n).ok() == Some(next),
                ScalarValue::Uint(n) => *n == next,
                _ => false,
            },
            _ => false,
        })
        .filter_map(|(_, id)| doc.hash_for_opid(id))
        .collect();
    hashes.sort_unstable();
    hashes.dedup();
    hashes
}

/// Why a proposal is not stable (yet).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NotStable {
    /// The document holds no proposal for its next generation.
    #[error("no proposal")]
    NoProposal,
    /// A member has not answered.
    #[error("member {0} has not reported")]
    Missing(String),
    /// A member is in another lineage of the document: an older one (it catches up by
    /// anti-entropy) or a newer one (this node moves to it by syncing with that member).
    #[error("member {member} is in {theirs}, this node in {ours}")]
    Lineage {
        /// The member.
        member: String,
        /// Its lineage.
        theirs: Lineage,
        /// This node's.
        ours: Lineage,
    },
    /// A member knows other members than this node does.
    #[error("member {0} knows other members")]
    Members(String),
    /// A member holds changes this node does not (a sync with it brings them).
    #[error("member {0} holds changes this node lacks")]
    Lacking(String),
    /// A member does not hold the winning proposal yet.
    #[error("member {0} does not hold the proposal yet")]
    NotHeld(String),
}

/// The winning proposal of `doc`'s next generation if it is stable here, given `reports` from
/// every member (keyed by member address; this node's own table, `members`, lists them) and
/// this node's member digest `own_digest`. A node with no members finds its proposal stable at
/// once.
pub fn stable_point(
    doc: &Automerge,
    members: &[String],
    reports: &BTreeMap<String, Report>,
    own_digest: &[u8; 32],
) -> Result<ChangeHash, NotStable> {
    let winner = *proposals(doc).first().ok_or(NotStable::NoProposal)?;
    let ours = Lineage::of(doc);
    for member in members {
        let report = reports
            .get(member)
            .ok_or_else(|| NotStable::Missing(member.clone()))?;
        if report.lineage() != ours {
            return Err(NotStable::Lineage {
                member: member.clone(),
                theirs: report.lineage(),
                ours,
            });
        }
        if &report.members != own_digest {
            return Err(NotStable::Members(member.clone()));
        }
        let heads: Vec<ChangeHash> = report.heads.iter().map(|h| ChangeHash(*h)).collect();
        if heads
            .iter()
            .any(|h| doc.get_change_meta_by_hash(h).is_none())
        {
            return Err(NotStable::Lacking(member.clone()));
        }
        // The changes after the member's heads: the winner must not be among them.
        let after: HashSet<ChangeHash> = doc.get_changes(&heads).iter().map(|c| c.hash()).collect();
        if after.contains(&winner) {
            return Err(NotStable::NotHeld(member.clone()));
        }
    }
    Ok(winner)
}

#[cfg(test)]
mod tests {
    use automerge::ActorId;
    use serde_json::json;

    use super::*;
    use crate::Write;
    use crate::document::{self, Expiry, new_document};
    use crate::ops::Op;

    fn replica(n: u8) -> Automerge {
        new_document(ActorId::from(vec![n; 16]))
    }

    fn write(doc: &mut Automerge, key: &str) {
        let ops = Op::parse_list(&json!([{"op": "inc", "path": [key], "by": 1}])).expect("ops");
        document::apply(doc, &Write::Ops(ops), Expiry::Keep, 0).expect("apply");
    }

    fn merge(to: &mut Automerge, from: &Automerge) {
        to.apply_changes(from.get_changes(&[])).expect("merge");
    }

    fn digest() -> [u8; 32] {
        members_digest(["a", "b", "c"])
    }

    fn report(doc: &Automerge) -> Report {
        Report::of(DocId::new("d").expect("id"), doc, digest())
    }

    fn members() -> Vec<String> {
        vec!["b".into(), "c".into()]
    }

    #[test]
    fn the_digest_is_of_the_set_of_members() {
        assert_eq!(members_digest(["b", "a"]), members_digest(["a", "b", "a"]));
        assert_ne!(members_digest(["a", "b"]), members_digest(["a", "bc"]));
    }

    #[test]
    fn a_proposal_is_stable_once_every_member_reports_holding_it() {
        let mut a = replica(1);
        write(&mut a, "n");
        let (mut b, mut c) = (replica(2), replica(3));
        merge(&mut b, &a);
        merge(&mut c, &a);
        let w = generation::propose(&mut a, 0).expect("propose");
        let mut reports = BTreeMap::new();
        assert_eq!(
            stable_point(&a, &members(), &reports, &digest()),
            Err(NotStable::Missing("b".into()))
        );
        reports.insert("b".to_owned(), report(&b));
        reports.insert("c".to_owned(), report(&c));
        assert_eq!(
            stable_point(&a, &members(), &reports, &digest()),
            Err(NotStable::NotHeld("b".into()))
        );
        merge(&mut b, &a);
        merge(&mut c, &a);
        reports.insert("b".to_owned(), report(&b));
        reports.insert("c".to_owned(), report(&c));
        assert_eq!(stable_point(&a, &members(), &reports, &digest()), Ok(w));
        // b wrote since: a must hold that too before it may compact.
        write(&mut b, "m");
        reports.insert("b".to_owned(), report(&b));
        assert_eq!(
            stable_point(&a, &members(), &reports, &digest()),
            Err(NotStable::Lacking("b".into()))
        );
        merge(&mut a, &b);
        assert_eq!(stable_point(&a, &members(), &reports, &digest()), Ok(w));
    }

    #[test]
    fn concurrent_proposals_have_one_winner_everywhere() {
        let mut a = replica(1);
        write(&mut a, "n");
        let mut b = replica(2);
        merge(&mut b, &a);
        let pa = generation::propose(&mut a, 0).expect("propose");
        let pb = generation::propose(&mut b, 0).expect("propose");
        merge(&mut a, &b);
        merge(&mut b, &a);
        let winner = pa.min(pb);
        assert_eq!(proposals(&a), proposals(&b));
        assert_eq!(proposals(&a)[0], winner);
        let members_a = vec!["b".to_owned()];
        let mut reports = BTreeMap::new();
        reports.insert("b".to_owned(), report(&b));
        assert_eq!(
            stable_point(&a, &members_a, &reports, &digest()),
            Ok(winner)
        );
    }

    #[test]
    fn other_members_or_generations_are_not_stable() {
        let mut a = replica(1);
        write(&mut a, "n");
        let mut b = replica(2);
        merge(&mut b, &a);
        generation::propose(&mut a, 0).expect("propose");
        merge(&mut b, &a);
        let mut reports = BTreeMap::new();
        let mut other = report(&b);
        other.members = members_digest(["a", "b", "c", "d"]);
        reports.insert("b".to_owned(), other);
        let only_b = vec!["b".to_owned()];
        assert_eq!(
            stable_point(&a, &only_b, &reports, &digest()),
            Err(NotStable::Members("b".into()))
        );
        let mut ahead = report(&b);
        ahead.generation = 1;
        reports.insert("b".to_owned(), ahead);
        assert!(matches!(
            stable_point(&a, &only_b, &reports, &digest()),
            Err(NotStable::Lineage { .. })
        ));
    }

    #[test]
    fn alone_a_proposal_is_stable_at_once() {
        let mut a = replica(1);
        write(&mut a, "n");
        assert_eq!(
            stable_point(&a, &[], &BTreeMap::new(), &digest()),
            Err(NotStable::NoProposal)
        );
        let w = generation::propose(&mut a, 0).expect("propose");
        assert_eq!(stable_point(&a, &[], &BTreeMap::new(), &digest()), Ok(w));
    }
}
