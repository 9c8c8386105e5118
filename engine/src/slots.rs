//! Sequence slots of a device KV cache: a backend owns a fixed number of slots; a sequence's
//! [`super::cpu::KvCache`] holds a [`SlotLease`] while it lives, and dropping the cache (the
//! sequence finished or its client left) returns the slot.

use std::sync::{Arc, Mutex};

/// The free slots of one backend.
#[derive(Debug, Clone)]
pub struct SlotPool {
    free: Arc<Mutex<Vec<usize>>>,
    total: usize,
}

/// One leased slot; returned to its pool on drop.
#[derive(Debug)]
pub struct SlotLease {
    id: usize,
    free: Arc<Mutex<Vec<usize>>>,
}

impl SlotPool {
    /// A pool of slots `0..total`.
    pub fn new(total: usize) -> Self {
        SlotPool { free: Arc::new(Mutex::new((0..total).rev().collect())), total }
    }

    /// How many slots the pool has.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Takes a free slot, if any.
    pub fn lease(&self) -> Option<SlotLease> {
        let id = self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()?;
        Some(SlotLease { id, free: self.free.clone() })
    }

    /// Whether `lease` came from this pool.
    pub fn owns(&self, lease: &SlotLease) -> bool {
        Arc::ptr_eq(&self.free, &lease.free)
    }
}

impl SlotLease {
    /// The slot index.
    pub fn id(&self) -> usize {
        self.id
    }
}

impl Drop for SlotLease {
    fn drop(&mut self) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(self.id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leases_return_on_drop() {
        let pool = SlotPool::new(2);
        let a = pool.lease().unwrap();
        let b = pool.lease().unwrap();
        assert_ne!(a.id(), b.id());
        assert!(pool.lease().is_none());
        assert!(pool.owns(&a) && !SlotPool::new(1).owns(&a));
        drop(a);
        assert!(pool.lease().is_some());
    }
}
