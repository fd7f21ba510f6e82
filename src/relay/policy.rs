//! What to do with a poison row or a failed publish: retry, dead-letter, record, halt
//! or fail. One set of pure decisions (no I/O, no clock, no randomness), used by the
//! stream, the initial snapshot and `outboxd replay`, so the three can never disagree;
//! the callers count, log and act on the answer.
//!
//! Why these answers:
//! - A retryable error (broker down, timeout) is retried, never dead-lettered: the
//!   event is fine, the broker is not. The stream and the snapshot retry for as long
//!   as it takes (the slot holds the position meanwhile); an interactive replay gives
//!   up after a cap and says so. The wait is `backoff::delay(&cfg.retry, attempt)`.
//! - A rejection (this event can never be accepted) follows `sink.on_rejected`. A dead
//!   letter that is itself too large is recorded in the log and counted as handled: it
//!   carries no payload, so nothing smaller can be sent instead. A dead letter refused
//!   for another reason (its destination is off limits) halts whatever the policy:
//!   only an operator can fix that.
//! - A fatal error (the sink cannot work at all) stops.

use crate::config::PoisonPolicy;
use crate::sink::SinkError;

/// What to do after a failed publish, or with a poison row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Publish the same event again, after `backoff::delay(&cfg.retry, attempt)`.
    Retry,
    /// Publish a dead letter in the event's (or row's) place.
    DeadLetter,
    /// Record the event in the log and count it as handled.
    Log,
    /// Stop before the event: the slot does not move past it.
    Halt,
    /// Stop with the error (the sink cannot work, or the retries ran out).
    Fail,
}

impl Action {
    /// The `action` label of `outboxd_poison_events_total`.
    pub fn label(self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::DeadLetter => "dead_letter",
            Action::Log => "logged",
            Action::Halt => "halt",
            Action::Fail => "fail",
        }
    }
}

/// A row that is not a valid event (`sink.on_invalid`): its dead letter or the halt.
pub fn on_invalid(policy: PoisonPolicy) -> Action {
    match policy {
        PoisonPolicy::DeadLetter => Action::DeadLetter,
        PoisonPolicy::Halt => Action::Halt,
    }
}

/// A failed publish of an event (`dead_letter`: the event is itself a dead letter)
/// after `attempt` retries; `max_retries` caps them (`None`: retry until it works).
pub fn on_error(
    e: &SinkError,
    attempt: u32,
    max_retries: Option<u32>,
    on_rejected: PoisonPolicy,
    dead_letter: bool,
) -> Action {
    match e {
        SinkError::Retryable { .. } if max_retries.is_none_or(|max| attempt < max) => Action::Retry,
        SinkError::Retryable { .. } | SinkError::Aborted { .. } | SinkError::Fatal { .. } => {
            Action::Fail
        }
        SinkError::Rejected { reason, .. } => {
            if dead_letter && *reason == "too_large" {
                Action::Log
            } else if dead_letter || on_rejected == PoisonPolicy::Halt {
                Action::Halt
            } else {
                Action::DeadLetter
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn retryable() -> SinkError {
        SinkError::Retryable {
            sink: "nats",
            reason: "timeout",
            detail: String::new(),
        }
    }

    fn rejected(reason: &'static str) -> SinkError {
        SinkError::Rejected {
            sink: "nats",
            reason,
            detail: String::new(),
        }
    }

    #[test]
    fn invalid_rows_follow_on_invalid() {
        assert_eq!(on_invalid(PoisonPolicy::DeadLetter), Action::DeadLetter);
        assert_eq!(on_invalid(PoisonPolicy::Halt), Action::Halt);
    }

    #[test]
    fn retryable_errors_are_retried_until_the_cap() {
        let dl = PoisonPolicy::DeadLetter;
        // Given no cap (the stream, the snapshot): retried for ever
        assert_eq!(
            on_error(&retryable(), 1_000, None, dl, false),
            Action::Retry
        );
        // Given a cap of 10 (replay): ten retries, then it fails
        assert_eq!(
            on_error(&retryable(), 9, Some(10), dl, false),
            Action::Retry
        );
        assert_eq!(
            on_error(&retryable(), 10, Some(10), dl, false),
            Action::Fail
        );
        // Never dead-lettered, whatever the policy
        let halt = PoisonPolicy::Halt;
        assert_eq!(on_error(&retryable(), 0, None, halt, true), Action::Retry);
    }

    #[test]
    fn rejections_follow_on_rejected() {
        let e = rejected("invalid_subject");
        assert_eq!(
            on_error(&e, 0, None, PoisonPolicy::DeadLetter, false),
            Action::DeadLetter
        );
        assert_eq!(
            on_error(&e, 0, None, PoisonPolicy::Halt, false),
            Action::Halt
        );
    }

    #[test]
    fn a_rejected_dead_letter_is_logged_when_too_large_else_halts() {
        let dl = PoisonPolicy::DeadLetter;
        assert_eq!(
            on_error(&rejected("too_large"), 0, None, dl, true),
            Action::Log
        );
        assert_eq!(
            on_error(&rejected("permission"), 0, None, dl, true),
            Action::Halt
        );
        // An ordinary event that is too large is dead-lettered, not logged
        assert_eq!(
            on_error(&rejected("too_large"), 0, None, dl, false),
            Action::DeadLetter
        );
    }

    #[test]
    fn fatal_errors_stop() {
        let e = SinkError::Fatal {
            sink: "kafka",
            detail: String::new(),
        };
        assert_eq!(
            on_error(&e, 0, None, PoisonPolicy::DeadLetter, false),
            Action::Fail
        );
    }

    #[test]
    fn poison_labels_are_the_exported_actions() {
        // The actions counted in outboxd_poison_events_total are exported at 0 from
        // the start (telemetry::POISON_ACTIONS); the policy must not invent others.
        for action in [Action::DeadLetter, Action::Log, Action::Halt] {
            assert!(
                crate::telemetry::POISON_ACTIONS.contains(&action.label()),
                "{action:?}"
            );
        }
    }
}
