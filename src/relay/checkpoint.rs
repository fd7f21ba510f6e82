//! Exactly-once bookkeeping of one session: which rows the broker already holds (read
//! back at the start), when the next checkpoint is due, and which slot position may be
//! confirmed only once it is written.
//!
//! The checkpoint is a barrier. When one is due, the loop stops reading, waits until
//! every event in flight is acknowledged (nothing then waits behind a key either), and
//! hands the sink the position of the last row read: every row up to it is in the
//! broker, none after it. Kafka commits the transaction with that checkpoint; NATS
//! stores it with the stream's sequence. A crash before that leaves the previous
//! checkpoint, and the rows after it are sent again, except those the broker shows it
//! already holds ([`Resume::ids`]). The barrier costs a pause per checkpoint
//! (`sink.checkpoint_interval_ms`), but gives one exact position, also inside a large
//! Postgres transaction, so a restart skips exactly what was written.
//!
//! In exactly-once mode the slot is confirmed only after the checkpoint covering the
//! confirmed transactions is written: with Kafka, rows acknowledged inside a
//! transaction that is later aborted are not in the topic for read_committed readers.

use std::time::Duration;

use tokio::time::Instant;

use crate::sink::{Checkpoint, Resume};

/// One session's checkpoint state. With exactly-once off, every method lets the
/// at-least-once behaviour through unchanged.
#[derive(Debug)]
pub struct Checkpoints {
    enabled: bool,
    interval: Duration,
    max_events: usize,
    /// What the broker held when the session started.
    resume: Resume,
    /// The last row read (published, dead-lettered or skipped).
    last_read: Option<Checkpoint>,
    /// Events handed to the sink since the last checkpoint.
    uncommitted: usize,
    /// The newest slot position that waits for the next checkpoint.
    pending_confirm: Option<u64>,
    /// When the last checkpoint was written (or the session started).
    since: Instant,
}

impl Checkpoints {
    /// At-least-once: no checkpoints, nothing skipped, positions confirmed at once.
    pub fn off() -> Self {
        Self::new(false, Duration::MAX, usize::MAX, Resume::default())
    }

    /// Exactly-once, starting from what the broker holds.
    pub fn on(interval: Duration, max_events: usize, resume: Resume) -> Self {
        Self::new(true, interval, max_events, resume)
    }

    fn new(enabled: bool, interval: Duration, max_events: usize, resume: Resume) -> Self {
        Self {
            enabled,
            interval,
            max_events,
            resume,
            last_read: None,
            uncommitted: 0,
            pending_confirm: None,
            since: Instant::now(),
        }
    }

    /// True when exactly-once is on.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// A row was read at `at`. True when the broker already holds it (its event is
    /// not sent again); otherwise one more event waits for the next checkpoint.
    pub fn read(&mut self, at: Checkpoint, id: &str) -> bool {
        if !self.enabled {
            return false;
        }
        self.last_read = Some(at);
        if self.resume.covers(at, id) {
            return true;
        }
        self.uncommitted += 1;
        false
    }

    /// The slot may move to `lsn` once what precedes it is in the broker: returns it
    /// when it may be confirmed now, or keeps it for the next checkpoint.
    pub fn confirmable(&mut self, lsn: u64) -> Option<u64> {
        if !self.enabled || self.uncommitted == 0 {
            return Some(lsn);
        }
        self.pending_confirm = Some(self.pending_confirm.map_or(lsn, |p| p.max(lsn)));
        None
    }

    /// Nothing was sent since the last checkpoint (the slot may follow an idle stream).
    pub fn settled(&self) -> bool {
        self.uncommitted == 0
    }

    /// When the next checkpoint is due by time, if one is waited for at all.
    pub fn due_at(&self) -> Option<Instant> {
        (self.enabled && self.uncommitted > 0).then(|| self.since + self.interval)
    }

    /// A checkpoint is due: by time, or by the number of events since the last one.
    pub fn due(&self, now: Instant) -> bool {
        self.enabled
            && self.uncommitted > 0
            && (self.uncommitted >= self.max_events || now >= self.since + self.interval)
    }

    /// The position to write: the last row read.
    pub fn position(&self) -> Option<Checkpoint> {
        self.last_read
    }

    /// The sink wrote the checkpoint: returns the slot position that waited for it.
    pub fn written(&mut self, now: Instant) -> Option<u64> {
        self.uncommitted = 0;
        self.since = now;
        self.pending_confirm.take()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(commit_lsn: u64, index: u64) -> Checkpoint {
        Checkpoint { commit_lsn, index }
    }

    #[test]
    fn off_confirms_at_once_and_skips_nothing() {
        let mut c = Checkpoints::off();
        assert!(!c.read(at(1, 0), "a"));
        assert_eq!(c.confirmable(10), Some(10));
        // An idle stream may still move the slot (the at-least-once relay confirms the
        // server's WAL end when nothing is pending; Postgres's shutdown waits for it).
        assert!(
            c.settled(),
            "rows read with exactly-once off never unsettle"
        );
        assert!(!c.due(Instant::now() + Duration::from_secs(3600)));
        assert_eq!(c.due_at(), None);
    }

    #[test]
    fn rows_the_broker_holds_are_skipped_by_position_and_by_id() {
        let resume = Resume {
            through: Some(at(100, 2)),
            ids: ["late".to_string()].into(),
        };
        let mut c = Checkpoints::on(Duration::from_secs(1), 10, resume);
        assert!(c.read(at(50, 9), "x"), "an earlier transaction");
        assert!(c.read(at(100, 2), "y"), "the checkpoint's own row");
        assert!(!c.read(at(100, 3), "z"), "the next row of that transaction");
        assert!(c.read(at(200, 0), "late"), "stored after the checkpoint");
        assert!(!c.read(at(200, 1), "new"));
        assert_eq!(c.position(), Some(at(200, 1)));
    }

    #[test]
    fn the_slot_waits_for_the_checkpoint_that_covers_it() {
        let start = Instant::now();
        let mut c = Checkpoints::on(Duration::from_millis(200), 3, Resume::default());
        assert_eq!(c.confirmable(5), Some(5), "nothing sent yet");
        c.read(at(10, 0), "a");
        assert_eq!(c.confirmable(20), None, "a is not in a checkpoint yet");
        assert_eq!(c.confirmable(15), None);
        assert!(!c.settled());
        assert!(!c.due(start), "neither time nor count");
        assert!(c.due(start + Duration::from_millis(250)), "by time");
        c.read(at(30, 0), "b");
        c.read(at(30, 1), "c");
        assert!(c.due(start), "by count");
        assert_eq!(c.written(start), Some(20), "the newest waiting position");
        assert!(c.settled());
        assert_eq!(c.written(start), None);
        assert_eq!(c.confirmable(40), Some(40));
    }
}
