//! Per-key ordering: at most one event of an aggregate is with the broker at a time.
//!
//! Pipelining many events is what makes the relay fast; retrying one of them is
//! what could reorder an aggregate (event 2 stored while event 1 is being retried).
//! The gate forbids that: an event whose key already has one in flight waits, in
//! arrival (commit) order, until the earlier one is acknowledged or given up on.
//! Events of other aggregates pass freely.

use std::collections::{HashMap, VecDeque};

/// Keys with an event in flight, and the events waiting behind each.
#[derive(Debug)]
pub struct Gate<T> {
    busy: HashMap<String, VecDeque<T>>,
    parked: usize,
}

impl<T> Default for Gate<T> {
    fn default() -> Self {
        Self {
            busy: HashMap::new(),
            parked: 0,
        }
    }
}

impl<T> Gate<T> {
    /// Returns the item if it may go now (its key becomes busy), or parks it.
    pub fn admit(&mut self, key: &str, item: T) -> Option<T> {
        match self.busy.get_mut(key) {
            Some(queue) => {
                queue.push_back(item);
                self.parked += 1;
                None
            }
            None => {
                self.busy.insert(key.to_string(), VecDeque::new());
                Some(item)
            }
        }
    }

    /// The in-flight event of `key` is done: returns the next one to send (the key
    /// stays busy), or frees the key.
    pub fn release(&mut self, key: &str) -> Option<T> {
        let queue = self.busy.get_mut(key)?;
        match queue.pop_front() {
            Some(next) => {
                self.parked -= 1;
                Some(next)
            }
            None => {
                self.busy.remove(key);
                None
            }
        }
    }

    /// Events waiting behind a busy key.
    pub fn parked(&self) -> usize {
        self.parked
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_key_waits_in_order_other_keys_pass() {
        let mut g = Gate::default();
        assert_eq!(g.admit("a", 1), Some(1));
        assert_eq!(g.admit("a", 2), None);
        assert_eq!(g.admit("b", 3), Some(3));
        assert_eq!(g.admit("a", 4), None);
        assert_eq!(g.parked(), 2);
        assert_eq!(g.release("a"), Some(2));
        assert_eq!(g.release("a"), Some(4));
        assert_eq!(g.release("a"), None);
        assert_eq!(g.admit("a", 5), Some(5), "key is free again");
        assert_eq!(g.parked(), 0);
    }
}
