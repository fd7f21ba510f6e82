//! Kafka error codes sorted by what happens next. Decided here, once, where the
//! error is created; the relay only reads the class.
//!
//! | class | codes | why |
//! |---|---|---|
//! | retry (`broker_down`) | transport failure, all brokers down, network exception | the broker comes back; librdkafka reconnects |
//! | retry (`leader_election`) | leader not available, not leader for partition, fenced/unknown leader epoch | a new leader is elected within seconds |
//! | retry (`not_enough_replicas`) | not enough replicas (before/after append) | `acks=all` waits for the ISR to recover |
//! | retry (`timeout`) | request timed out, message timed out (`kafka.message_timeout_ms`), operation timed out | nothing is known to be wrong with the event |
//! | retry (`queue_full`) | local producer queue full | back-pressure, not failure |
//! | retry (`unknown_topic`) | unknown topic or partition | an operator can create the topic; see below |
//! | retry (`producer_fatal`) | librdkafka's fatal error (idempotence state lost) | the sink replaces its producer, then retries |
//! | retry (`producer_fenced`) | producer fenced, invalid producer epoch, unknown producer id, invalid producer id mapping, out-of-order sequence | the broker refuses this producer's id, epoch or sequence, and librdkafka does not recover a non-transactional producer from that: the sink replaces it, then retries |
//! | rejected (`too_large`) | message size too large, message batch too large | the same bytes will never fit |
//! | rejected (`unauthorized`) | topic authorization failed | this event's topic is off limits; others may not be |
//! | rejected (`invalid_topic`) | invalid topic | the rendered name is illegal (too long, `.`/`..`) |
//! | rejected (`invalid_record`) | invalid record, invalid timestamp | the broker's validation refuses this record |
//! | fatal | cluster authorization failed, authentication failed | nothing can be published: stop and tell the operator |
//! | retry (`broker_error`) | everything else | unknown means transient: never halt on what a retry may cure |
//!
//! An unknown topic (broker auto-creation off, topic not created yet) is retried, not
//! rejected: it is almost always a deployment step not yet done, it blocks only the
//! aggregates routed there, it ends by itself once the topic exists, and a future
//! dead-letter policy must not swallow a whole aggregate type for it. `outboxd check`
//! reports missing topics before the relay starts.

use rdkafka::error::{KafkaError, RDKafkaErrorCode as Code};

/// What to do with an event whose publish failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// Try the same event again later; the label is the metrics reason.
    Retry(&'static str),
    /// This event can never be accepted: the poison-row policy decides.
    Reject(&'static str),
    /// The producer is unusable for good: replace it, then retry the event. The label
    /// says why (`fatal`: librdkafka's fatal error; `fenced`: the broker refuses the
    /// producer's id, epoch or sequence) and is the metrics reason.
    ResetProducer(&'static str),
    /// Nothing can be published with this configuration: stop.
    Fatal(&'static str),
}

/// Sorts a librdkafka error code.
pub fn classify_code(code: Code) -> Class {
    match code {
        Code::MessageSizeTooLarge | Code::MessageBatchTooLarge => Class::Reject("too_large"),
        Code::TopicAuthorizationFailed => Class::Reject("unauthorized"),
        Code::InvalidTopic => Class::Reject("invalid_topic"),
        Code::InvalidRecord | Code::InvalidTimestamp => Class::Reject("invalid_record"),
        Code::ClusterAuthorizationFailed => Class::Fatal(
            "cluster authorization failed: the idempotent producer needs the IdempotentWrite \
             permission on the cluster (or set enable.idempotence = false in [kafka.properties])",
        ),
        Code::Authentication | Code::SaslAuthenticationFailed => Class::Fatal(
            "authentication failed: check the sasl.* and ssl.* keys of [kafka.properties]",
        ),
        Code::Fatal => Class::ResetProducer("fatal"),
        // A non-transactional producer never gets past these by itself: librdkafka bumps
        // the epoch of an idempotent producer after records timed out, and a broker that
        // does not know that epoch (or forgot the producer id) refuses every later
        // request. Apache Kafka answers an expired producer the same way. A fresh
        // producer gets a new id; records in flight may then be written twice, never
        // lost, and the relay's one-event-per-aggregate gate keeps their order.
        Code::ProducerFenced
        | Code::InvalidProducerEpoch
        | Code::UnknownProducerId
        | Code::InvalidProducerIdMapping
        | Code::OutOfOrderSequenceNumber => Class::ResetProducer("fenced"),
        Code::BrokerTransportFailure
        | Code::AllBrokersDown
        | Code::NetworkException
        | Code::Resolve => Class::Retry("broker_down"),
        Code::LeaderNotAvailable
        | Code::NotLeaderForPartition
        | Code::PreferredLeaderNotAvailable
        | Code::FencedLeaderEpoch
        | Code::UnknownLeaderEpoch => Class::Retry("leader_election"),
        Code::NotEnoughReplicas | Code::NotEnoughReplicasAfterAppend | Code::ISRInsufficient => {
            Class::Retry("not_enough_replicas")
        }
        Code::RequestTimedOut | Code::MessageTimedOut | Code::OperationTimedOut => {
            Class::Retry("timeout")
        }
        Code::QueueFull => Class::Retry("queue_full"),
        Code::UnknownTopicOrPartition | Code::UnknownTopic | Code::UnknownPartition => {
            Class::Retry("unknown_topic")
        }
        _ => Class::Retry("broker_error"),
    }
}

/// Sorts an error of `send` or of a delivery report.
pub fn classify(err: &KafkaError) -> Class {
    match err {
        KafkaError::Canceled => Class::Retry("canceled"),
        other => other
            .rdkafka_error_code()
            .map_or(Class::Retry("broker_error"), classify_code),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn produce(code: Code) -> Class {
        classify(&KafkaError::MessageProduction(code))
    }

    #[test]
    fn transient_broker_conditions_are_retried() {
        // Given the errors of a broker that is down, electing, short of replicas or slow
        for (code, reason) in [
            (Code::BrokerTransportFailure, "broker_down"),
            (Code::AllBrokersDown, "broker_down"),
            (Code::NetworkException, "broker_down"),
            (Code::LeaderNotAvailable, "leader_election"),
            (Code::NotLeaderForPartition, "leader_election"),
            (Code::NotEnoughReplicas, "not_enough_replicas"),
            (Code::NotEnoughReplicasAfterAppend, "not_enough_replicas"),
            (Code::RequestTimedOut, "timeout"),
            (Code::MessageTimedOut, "timeout"),
            (Code::QueueFull, "queue_full"),
            (Code::UnknownTopicOrPartition, "unknown_topic"),
            (Code::UnknownTopic, "unknown_topic"),
        ] {
            // Then each is retried with its label
            assert_eq!(produce(code), Class::Retry(reason), "{code:?}");
        }
    }

    #[test]
    fn what_no_retry_can_cure_is_rejected() {
        for (code, reason) in [
            (Code::MessageSizeTooLarge, "too_large"),
            (Code::MessageBatchTooLarge, "too_large"),
            (Code::TopicAuthorizationFailed, "unauthorized"),
            (Code::InvalidTopic, "invalid_topic"),
            (Code::InvalidRecord, "invalid_record"),
        ] {
            assert_eq!(produce(code), Class::Reject(reason), "{code:?}");
        }
    }

    #[test]
    fn credentials_refused_stop_and_a_fatal_producer_is_replaced() {
        assert!(matches!(
            produce(Code::ClusterAuthorizationFailed),
            Class::Fatal(_)
        ));
        assert!(matches!(
            produce(Code::SaslAuthenticationFailed),
            Class::Fatal(_)
        ));
        assert_eq!(produce(Code::Fatal), Class::ResetProducer("fatal"));
    }

    #[test]
    fn a_producer_the_broker_no_longer_accepts_is_replaced() {
        // Given the answers of a broker that fenced the producer or forgot its state
        for code in [
            Code::ProducerFenced,
            Code::InvalidProducerEpoch,
            Code::UnknownProducerId,
            Code::InvalidProducerIdMapping,
            Code::OutOfOrderSequenceNumber,
        ] {
            // Then the producer is replaced (and the event retried), not retried as is
            assert_eq!(produce(code), Class::ResetProducer("fenced"), "{code:?}");
        }
    }

    #[test]
    fn unknown_errors_count_as_retryable() {
        assert_eq!(produce(Code::InvalidMessage), Class::Retry("broker_error"));
        assert_eq!(classify(&KafkaError::Canceled), Class::Retry("canceled"));
        assert_eq!(
            classify(&KafkaError::ClientCreation("x".into())),
            Class::Retry("broker_error")
        );
    }
}
