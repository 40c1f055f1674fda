//! Documents this process saved lately, kept decoded, so that loading the same bytes again
//! costs a copy instead of a parse.
//!
//! An edge function caches `save()` between requests and loads it on the next one. Automerge
//! cannot load a document without rebuilding every change of its history from the saved
//! columns and hashing it (about 20 µs per change in Wasm), which made loading the larger part
//! of an edge request. The isolate that saved the bytes usually still runs when they are loaded
//! again, so [`Replica::save`](crate::Replica::save) keeps a copy of the document and its
//! shadow here, under the SHA-256 of the document's bytes, and
//! [`Replica::load`](crate::Replica::load) of bytes with the same hash takes a copy instead of
//! parsing them. Equal bytes are an equal document, so a hit is indistinguishable from a parse;
//! bytes from elsewhere (another isolate, a store) miss and are parsed as before.
//!
//! The copy may also take over the saver's actor. Every change an actor makes stays in the
//! document's history (until the node compacts it), and Automerge's costs grow with the
//! number of actors: a replica loaded and saved once per request would add one per request.
//! So `save()` hands its actor to the saved bytes and writes on as a fresh one, and the first
//! recall of those bytes writes as that actor again; later recalls of the same bytes (requests
//! running at once) and every parse take fresh ones, so no two replicas ever share an actor.
//!
//! Bounded by [`DECODED_ENTRIES_MAX`] documents and [`DECODED_BYTES_MAX`] saved bytes; the
//! least recently used go first. Each thread has its own (a Wasm instance has one).

use std::cell::RefCell;
use std::collections::VecDeque;

use automerge::{ActorId, Automerge};
use sha2::{Digest, Sha256};
use verge_core::shadow::Shadow;

/// Most documents kept decoded.
pub const DECODED_ENTRIES_MAX: usize = 32;

/// Most saved bytes (of the documents kept decoded, together) the cache answers for. A decoded
/// document takes several times its saved size in memory.
pub const DECODED_BYTES_MAX: usize = 8 << 20;

struct Entry {
    key: [u8; 32],
    saved_len: usize,
    doc: Automerge,
    shadow: Shadow,
    /// The actor the saver handed over, until one recall takes it.
    actor: Option<ActorId>,
}

thread_local! {
    static CACHE: RefCell<VecDeque<Entry>> = const { RefCell::new(VecDeque::new()) };
}

fn key(saved: &[u8]) -> [u8; 32] {
    Sha256::digest(saved).into()
}

/// Keeps `doc` (whose `save()` is `saved`) and its shadow for a later [`recall`], with the
/// `actor` the saver hands over (it must never write as it again).
pub fn remember(saved: &[u8], doc: &Automerge, shadow: &Shadow, actor: Option<ActorId>) {
    if saved.len() > DECODED_BYTES_MAX {
        return;
    }
    let key = key(saved);
    CACHE.with_borrow_mut(|cache| {
        cache.retain(|e| e.key != key);
        let mut total: usize = cache.iter().map(|e| e.saved_len).sum();
        while !cache.is_empty()
            && (cache.len() >= DECODED_ENTRIES_MAX || total + saved.len() > DECODED_BYTES_MAX)
        {
            if let Some(old) = cache.pop_back() {
                total -= old.saved_len;
            }
        }
        cache.push_front(Entry {
            key,
            saved_len: saved.len(),
            doc: doc.clone(),
            shadow: shadow.clone(),
            actor,
        });
    });
}

/// A copy of the document whose `save()` is `saved`, its shadow, and the actor the saver handed
/// over if no recall took it yet, when this thread saved those bytes lately. Without an actor,
/// the caller must set a fresh one before writing.
pub fn recall(saved: &[u8]) -> Option<(Automerge, Shadow, Option<ActorId>)> {
    let key = key(saved);
    CACHE.with_borrow_mut(|cache| {
        let at = cache.iter().position(|e| e.key == key)?;
        let mut entry = cache.remove(at)?;
        let copy = (entry.doc.clone(), entry.shadow.clone(), entry.actor.take());
        cache.push_front(entry);
        Some(copy)
    })
}

/// Forgets every document (for tests that must parse).
pub fn clear() {
    CACHE.with_borrow_mut(VecDeque::clear);
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::ROOT;
    use automerge::transaction::Transactable;

    fn doc_with(n: i64) -> Automerge {
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        tx.put(ROOT, "n", n).expect("put");
        tx.commit();
        doc
    }

    #[test]
    fn recalls_only_the_bytes_it_was_given_and_stays_bounded() {
        clear();
        let a = doc_with(1);
        let saved = a.save();
        remember(&saved, &a, &Shadow::of(&a), Some(a.get_actor().clone()));
        let (copy, shadow, actor) = recall(&saved).expect("remembered");
        assert_eq!(copy.get_heads(), a.get_heads());
        assert_eq!(shadow, Shadow::of(&a));
        assert_eq!(
            actor.as_ref(),
            Some(a.get_actor()),
            "the first recall takes the actor"
        );
        let (_, _, again) = recall(&saved).expect("still remembered");
        assert_eq!(again, None, "no second recall writes as the same actor");
        let mut other = saved.clone();
        let last = other.len() - 1;
        other[last] ^= 1;
        assert!(
            recall(&other).is_none(),
            "different bytes are a different document"
        );
        for n in 0..DECODED_ENTRIES_MAX as i64 + 5 {
            let d = doc_with(n + 10);
            remember(&d.save(), &d, &Shadow::of(&d), None);
        }
        assert!(
            recall(&saved).is_none(),
            "the least recently used went first"
        );
        CACHE.with_borrow(|c| assert_eq!(c.len(), DECODED_ENTRIES_MAX));
        clear();
    }
}
