//! A small byte-bounded cache for immutable, content-addressed values (decoded recipes):
//! a `_thaw` pull names the blob's recipe in every fetch request, and a 2 GiB memory file
//! cut into 4 KiB pages has a recipe of several MiB, so reading it from storage each time
//! would cost a GET and its bytes per request.
//!
//! Values never change under their key, so a cached value is never stale; only GC (which
//! deletes) must evict. Eviction is first in, first out: good enough for a working set of
//! a few recipes being pulled at once.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::{Arc, Mutex};

pub(crate) struct Cache<K, V> {
    inner: Mutex<Inner<K, V>>,
    capacity: usize,
}

struct Inner<K, V> {
    map: HashMap<K, (Arc<V>, usize)>,
    order: VecDeque<K>,
    bytes: usize,
}

impl<K: Hash + Eq + Clone, V> Cache<K, V> {
    /// A cache holding values worth at most `capacity` bytes.
    pub(crate) fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(Inner { map: HashMap::new(), order: VecDeque::new(), bytes: 0 }), capacity }
    }

    pub(crate) fn get(&self, key: &K) -> Option<Arc<V>> {
        self.inner.lock().expect("cache lock").map.get(key).map(|(v, _)| v.clone())
    }

    /// Remembers `value`, worth `bytes`; values larger than the whole cache are not kept.
    pub(crate) fn insert(&self, key: K, value: Arc<V>, bytes: usize) {
        if bytes > self.capacity {
            return;
        }
        let mut inner = self.inner.lock().expect("cache lock");
        if inner.map.contains_key(&key) {
            return;
        }
        while inner.bytes + bytes > self.capacity {
            let Some(old) = inner.order.pop_front() else { break };
            if let Some((_, b)) = inner.map.remove(&old) {
                inner.bytes -= b;
            }
        }
        inner.bytes += bytes;
        inner.order.push_back(key.clone());
        inner.map.insert(key, (value, bytes));
    }

    /// Forgets `key` (GC deleted what it stood for).
    pub(crate) fn remove(&self, key: &K) {
        let mut inner = self.inner.lock().expect("cache lock");
        if let Some((_, b)) = inner.map.remove(key) {
            inner.bytes -= b;
            inner.order.retain(|k| k != key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_within_capacity_evicting_oldest_first() {
        let c: Cache<u32, &str> = Cache::new(10);
        c.insert(1, Arc::new("a"), 4);
        c.insert(2, Arc::new("b"), 4);
        c.insert(3, Arc::new("c"), 4); // evicts 1
        assert!(c.get(&1).is_none());
        assert_eq!(c.get(&2).as_deref(), Some(&"b"));
        assert_eq!(c.get(&3).as_deref(), Some(&"c"));
        c.insert(4, Arc::new("too big"), 11);
        assert!(c.get(&4).is_none());
        c.insert(3, Arc::new("again"), 4);
        assert_eq!(c.get(&3).as_deref(), Some(&"c"), "a present key keeps its value");
    }
}
