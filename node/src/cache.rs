//! The bounded set of documents held in memory.
//!
//! Loading a document means reading its bytes and replaying them into an `Automerge` value, so
//! hot documents stay loaded. The cache is bounded by an estimate of their memory; when it is
//! over, the least recently used documents that nobody is using go. An entry in use (a request
//! or an unacknowledged write holds it) is never evicted: two live copies of one document would
//! write conflicting changes under the same actor.

use std::sync::Arc;

use lru::LruCache;
use verge_core::DocId;

/// How many entries one eviction pass looks at before giving up on finding an idle one.
const EVICTION_SCAN_MAX: usize = 64;

/// Memory estimate of a loaded document per stored byte: Automerge's in-memory op set is
/// several times larger than its compressed encoding.
pub const MEMORY_PER_STORED_BYTE: usize = 8;
/// Memory estimate of a loaded document beyond its bytes (the value, the slot, the key).
pub const MEMORY_PER_DOC: usize = 2 * 1024;

/// An LRU of shared entries with a byte budget.
#[derive(Debug)]
pub struct DocCache<T> {
    lru: LruCache<DocId, (Arc<T>, usize)>,
    bytes: usize,
    budget_bytes: usize,
}

impl<T> DocCache<T> {
    /// An empty cache holding about `budget_bytes` of documents.
    pub fn new(budget_bytes: usize) -> Self {
        Self {
            lru: LruCache::unbounded(),
            bytes: 0,
            budget_bytes,
        }
    }

    /// The entry for `id`, marked most recently used; `None` when absent.
    pub fn get(&mut self, id: &DocId) -> Option<Arc<T>> {
        self.lru.get(id).map(|(entry, _)| Arc::clone(entry))
    }

    /// Inserts an entry and evicts idle ones while over budget.
    pub fn insert(&mut self, id: DocId, entry: Arc<T>, size: usize) {
        if let Some((_, old)) = self.lru.put(id, (entry, size)) {
            self.bytes -= old;
        }
        self.bytes += size;
        self.evict();
    }

    /// Updates the memory estimate of a present entry.
    pub fn resize(&mut self, id: &DocId, size: usize) {
        if let Some((_, old)) = self.lru.peek_mut(id) {
            self.bytes = self.bytes - *old + size;
            *old = size;
        }
        self.evict();
    }

    /// Removes `id` if it still maps to `entry` (a newer entry for the same id stays).
    pub fn remove_if_same(&mut self, id: &DocId, entry: &Arc<T>) {
        if self
            .lru
            .peek(id)
            .is_some_and(|(e, _)| Arc::ptr_eq(e, entry))
            && let Some((_, size)) = self.lru.pop(id)
        {
            self.bytes -= size;
        }
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.lru.len()
    }

    /// Whether the cache is empty.
    pub fn is_empty(&self) -> bool {
        self.lru.is_empty()
    }

    /// Estimated bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn evict(&mut self) {
        while self.bytes > self.budget_bytes {
            let idle = self
                .lru
                .iter()
                .rev()
                .take(EVICTION_SCAN_MAX)
                .find(|(_, (entry, _))| Arc::strong_count(entry) == 1)
                .map(|(id, _)| id.clone());
            let Some(id) = idle else {
                return; // Everything old is in use; the budget is exceeded until it is not.
            };
            if let Some((_, size)) = self.lru.pop(&id) {
                self.bytes -= size;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> DocId {
        DocId::new(s).expect("valid id")
    }

    #[test]
    fn evicts_least_recently_used_idle_entries() {
        let mut cache = DocCache::new(100);
        cache.insert(id("a"), Arc::new(1), 40);
        cache.insert(id("b"), Arc::new(2), 40);
        assert!(cache.get(&id("a")).is_some()); // a is now more recent than b
        cache.insert(id("c"), Arc::new(3), 40);
        assert!(cache.get(&id("b")).is_none(), "b was least recently used");
        assert!(cache.get(&id("a")).is_some());
        assert_eq!(cache.bytes(), 80);
    }

    #[test]
    fn never_evicts_entries_in_use() {
        let mut cache = DocCache::new(50);
        let held = Arc::new(1);
        cache.insert(id("a"), Arc::clone(&held), 40);
        cache.insert(id("b"), Arc::new(2), 40);
        assert!(cache.get(&id("a")).is_some(), "a is in use");
        assert!(cache.get(&id("b")).is_none());
        drop(held);
        cache.resize(&id("a"), 60);
        assert_eq!(cache.len(), 0, "idle and over budget");
    }

    #[test]
    fn remove_only_the_same_entry() {
        let mut cache = DocCache::new(1000);
        let first = Arc::new(1);
        cache.insert(id("a"), Arc::clone(&first), 10);
        let second = Arc::new(2);
        cache.insert(id("a"), Arc::clone(&second), 10);
        cache.remove_if_same(&id("a"), &first);
        assert_eq!(cache.len(), 1);
        cache.remove_if_same(&id("a"), &second);
        assert!(cache.is_empty());
        assert_eq!(cache.bytes(), 0);
    }
}
