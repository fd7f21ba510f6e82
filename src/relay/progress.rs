//! Which LSN may be confirmed: the end LSN of the newest transaction such that it and
//! every earlier transaction have all their events acknowledged.
//!
//! Transactions are numbered in stream (commit) order; a `VecDeque` holds the ones not
//! yet confirmed. Acks arrive in any order (many events are in flight), but the
//! confirmed position only ever moves over a contiguous, fully acknowledged prefix:
//! that is what makes a crash at any moment lose nothing.

use std::collections::VecDeque;

/// Stream-order number of a transaction.
pub type TxnId = u64;

#[derive(Debug)]
struct Txn {
    /// Commit time in Unix microseconds (for the lag in seconds).
    commit_micros: i64,
    /// Set at Commit; `None` while rows are still arriving.
    end_lsn: Option<u64>,
    /// Events handed out and not yet acknowledged.
    remaining: usize,
}

/// Tracks unconfirmed transactions.
#[derive(Debug, Default)]
pub struct Progress {
    txns: VecDeque<Txn>,
    /// `TxnId` of `txns[0]`.
    front: TxnId,
    /// Commit time (Unix µs) of the newest confirmed transaction.
    confirmed_commit_micros: Option<i64>,
}

impl Progress {
    /// Starts a transaction committed at `commit_micros` (Unix µs); it cannot be
    /// confirmed before its `commit`.
    pub fn begin(&mut self, commit_micros: i64) -> TxnId {
        self.txns.push_back(Txn {
            commit_micros,
            end_lsn: None,
            remaining: 0,
        });
        self.front + self.txns.len() as u64 - 1
    }

    /// One more event of `txn` must be acknowledged.
    pub fn add(&mut self, txn: TxnId) {
        if let Some(t) = self.get(txn) {
            t.remaining += 1;
        }
    }

    /// `txn` has no more rows; returns a newly confirmable LSN, if any.
    pub fn commit(&mut self, txn: TxnId, end_lsn: u64) -> Option<u64> {
        if let Some(t) = self.get(txn) {
            t.end_lsn = Some(end_lsn);
        }
        self.advance()
    }

    /// An event of `txn` was acknowledged; returns a newly confirmable LSN, if any.
    pub fn ack(&mut self, txn: TxnId) -> Option<u64> {
        if let Some(t) = self.get(txn) {
            debug_assert!(t.remaining > 0, "ack without a pending event");
            t.remaining = t.remaining.saturating_sub(1);
        }
        self.advance()
    }

    /// Nothing is pending and no transaction is open.
    pub fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    /// Commit time (Unix µs) of the oldest transaction not yet confirmed.
    pub fn oldest_commit_micros(&self) -> Option<i64> {
        self.txns.front().map(|t| t.commit_micros)
    }

    /// Commit time (Unix µs) of the newest transaction confirmed so far.
    pub fn confirmed_commit_micros(&self) -> Option<i64> {
        self.confirmed_commit_micros
    }

    /// Transactions not yet confirmed (open or waiting for acks).
    pub fn pending_transactions(&self) -> usize {
        self.txns.len()
    }

    fn get(&mut self, txn: TxnId) -> Option<&mut Txn> {
        let idx = txn.checked_sub(self.front)?;
        self.txns.get_mut(usize::try_from(idx).ok()?)
    }

    fn advance(&mut self) -> Option<u64> {
        let mut confirmed = None;
        while let Some(t) = self.txns.front() {
            match t.end_lsn {
                Some(lsn) if t.remaining == 0 => {
                    confirmed = Some(lsn);
                    self.confirmed_commit_micros = Some(t.commit_micros);
                    self.txns.pop_front();
                    self.front += 1;
                }
                _ => break,
            }
        }
        confirmed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn confirms_only_a_fully_acknowledged_prefix() {
        let mut p = Progress::default();
        let a = p.begin(0);
        p.add(a);
        p.add(a);
        assert_eq!(p.commit(a, 100), None);
        let b = p.begin(0);
        p.add(b);
        assert_eq!(p.commit(b, 200), None);
        // b's event is acknowledged first: nothing may move, a is still pending.
        assert_eq!(p.ack(b), None);
        assert_eq!(p.ack(a), None);
        // The last of a's events releases both, at once, to b's end.
        assert_eq!(p.ack(a), Some(200));
        assert!(p.is_idle());
        assert_eq!(p.oldest_commit_micros(), None);
    }

    #[test]
    fn the_confirmed_commit_time_is_the_newest_confirmed_transaction() {
        let mut p = Progress::default();
        let a = p.begin(1_000);
        let b = p.begin(2_000);
        p.add(b);
        assert_eq!(p.commit(a, 10), Some(10));
        assert_eq!(p.confirmed_commit_micros(), Some(1_000));
        assert_eq!(p.commit(b, 20), None);
        assert_eq!(
            p.confirmed_commit_micros(),
            Some(1_000),
            "b is not acknowledged"
        );
        assert_eq!(p.ack(b), Some(20));
        assert_eq!(p.confirmed_commit_micros(), Some(2_000));
    }

    #[test]
    fn an_open_transaction_blocks_even_when_acked() {
        let mut p = Progress::default();
        let a = p.begin(0);
        p.add(a);
        assert_eq!(p.ack(a), None, "rows may still come");
        assert_eq!(p.commit(a, 10), Some(10));
    }

    #[test]
    fn empty_transactions_confirm_at_commit() {
        let mut p = Progress::default();
        let a = p.begin(0);
        assert_eq!(p.commit(a, 42), Some(42));
        assert_eq!(p.pending_transactions(), 0);
    }

    #[test]
    fn ids_stay_valid_after_the_front_moves() {
        let mut p = Progress::default();
        for i in 0..1000u64 {
            let t = p.begin(0);
            assert_eq!(t, i);
            p.add(t);
            assert_eq!(p.commit(t, i * 10), None);
            assert_eq!(p.ack(t), Some(i * 10));
        }
        assert_eq!(p.ack(5), None, "an old id is ignored");
    }
}
