//! What Kafka can never accept, checked before a record is produced: a topic name
//! Kafka refuses, and a record larger than the producer's `message.max.bytes` or the
//! topic's `max.message.bytes` (when the broker reports it).
//!
//! Why before: a record that is refused by the broker fails its whole batch, and with
//! the idempotent producer the failed batch leaves a gap in the partition's sequence
//! that librdkafka closes by bumping the producer's epoch, which disturbs every other
//! record in flight (and a broker that does not follow the bump fences the producer).
//! A topic name librdkafka cannot even create a handle for comes back as a local
//! error that no retry cures. Checked here, such an event becomes
//! [`SinkError::Rejected`] without touching the producer, and the relay's
//! `sink.on_rejected` policy dead-letters (or halts on) it.
//!
//! Sizes are counted as librdkafka counts them (`rd_kafka_msg_max_wire_size`: key,
//! value, serialized headers, and the largest per-record framing), so a record that
//! passes here is one librdkafka accepts. The topic's `max.message.bytes` bounds a
//! whole record batch on the broker, compressed: it is checked (with the batch
//! header) only when the producer does not compress, and left to the broker's own
//! answer (`too_large`) when it does. The topic's value is asked for with
//! DescribeConfigs once per topic and kept for [`RELEARN_AFTER`]; a broker that does
//! not answer (no permission, no such request) leaves only the producer's limit.
//!
//! This module never logs or returns record contents, only sizes and topic names.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::config::ClientConfig;

use super::client::Context;
use super::{OffThread, SINK};
use crate::sink::SinkError;

/// librdkafka's default `message.max.bytes`.
const DEFAULT_MESSAGE_MAX_BYTES: usize = 1_000_000;

/// `RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: the largest framing of one record (length,
/// attributes, timestamp and offset deltas, key and value lengths, header count).
const RECORD_MAX_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;

/// `RD_KAFKAP_MSGSET_V2_SIZE`: the header of a record batch (v2).
const BATCH_OVERHEAD: usize = 61;

/// Kafka's longest topic name (`Topic.MAX_NAME_LENGTH`).
const MAX_TOPIC_NAME: usize = 249;

/// How long a topic's `max.message.bytes` is trusted before it is asked for again
/// (an operator may raise it).
const RELEARN_AFTER: Duration = Duration::from_secs(300);

/// After a failed or timed-out DescribeConfigs, when to ask again.
const RETRY_AFTER: Duration = Duration::from_secs(30);

/// How long one DescribeConfigs may take before the topic is treated as unknown.
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(5);

/// Topics whose limit is remembered at most (a topic template with `{aggregate_id}`
/// makes a topic per aggregate); beyond that, only the producer's limit applies.
const MAX_TOPICS: usize = 1_000;

/// The sizes of one record, as librdkafka counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordSize {
    /// Key bytes.
    pub key: usize,
    /// Value bytes (0 for a record without value).
    pub value: usize,
    /// Serialized headers: each name and value with their varint lengths.
    pub headers: usize,
}

impl RecordSize {
    /// The sizes of a record with `key`, `value` and `headers` (name, value).
    pub fn of<'a>(
        key: &[u8],
        value: Option<&[u8]>,
        headers: impl IntoIterator<Item = (&'a str, &'a [u8])>,
    ) -> Self {
        let headers = headers
            .into_iter()
            .map(|(n, v)| n.len() + v.len() + varint_len(n.len()) + varint_len(v.len()))
            .sum();
        Self {
            key: key.len(),
            value: value.map_or(0, <[u8]>::len),
            headers,
        }
    }

    /// librdkafka's upper bound of the record on the wire, which it compares with
    /// `message.max.bytes`.
    pub fn wire(&self) -> usize {
        RECORD_MAX_OVERHEAD + self.key + self.value + self.headers
    }
}

/// Bytes of a zig-zag varint of `n` (Kafka's record-field lengths).
fn varint_len(n: usize) -> usize {
    let mut v = (n as u64) << 1;
    let mut len = 1;
    while v >= 0x80 {
        v >>= 7;
        len += 1;
    }
    len
}

/// Why Kafka refuses `name` as a topic (`Topic.validate`), if it does.
pub fn topic_error(name: &str) -> Option<String> {
    if name.is_empty() {
        return Some("the topic name is empty".into());
    }
    if name == "." || name == ".." {
        return Some(format!("the topic name {name:?} is reserved"));
    }
    let chars = name.chars().count();
    if chars > MAX_TOPIC_NAME {
        // The name itself can be as long as an aggregate type: name its start only.
        let start: String = name.chars().take(40).collect();
        return Some(format!(
            "the topic name ({start}…) has {chars} characters, Kafka allows {MAX_TOPIC_NAME}"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Some(format!(
            "the topic name {name} contains {c:?}; Kafka allows [A-Za-z0-9._-]"
        ));
    }
    None
}

/// A topic's `max.message.bytes` as last learned.
#[derive(Debug, Clone, Copy)]
struct Learned {
    max: Option<usize>,
    until: Instant,
}

/// The limits one producer works under.
pub struct Limits {
    /// The producer's `message.max.bytes`.
    producer_max: usize,
    /// Whether the producer compresses (then the topic limit is the broker's to check).
    compressed: bool,
    /// Asks the broker for topic configs; `None`: do not ask (tests, or it could not
    /// be created).
    admin: Option<OffThread<AdminClient<Context>>>,
    topics: Mutex<HashMap<String, Learned>>,
    /// One DescribeConfigs at a time: many events for a new topic ask once.
    learning: tokio::sync::Mutex<()>,
}

impl Limits {
    /// The limits of a producer with `settings`, learning topic limits with `admin`.
    pub fn new(settings: &ClientConfig, admin: Option<AdminClient<Context>>) -> Self {
        let admin = admin.map(OffThread::new);
        let producer_max = settings
            .get("message.max.bytes")
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(DEFAULT_MESSAGE_MAX_BYTES);
        let codec = settings
            .get("compression.type")
            .or_else(|| settings.get("compression.codec"))
            .map(|v| v.trim().to_ascii_lowercase());
        Self {
            producer_max,
            compressed: codec.is_some_and(|c| c != "none"),
            admin,
            topics: Mutex::new(HashMap::new()),
            learning: tokio::sync::Mutex::new(()),
        }
    }

    /// `Ok` when a record of `size` to `topic` can be accepted, else the rejection.
    pub async fn check(&self, topic: &str, size: RecordSize) -> Result<(), SinkError> {
        if let Some(why) = topic_error(topic) {
            return Err(rejected("invalid_topic", why));
        }
        let wire = size.wire();
        let detail = |limit: usize, what: &str| {
            format!(
                "topic {topic}: a {wire}-byte record (key {} B, value {} B, headers {} B, \
                 counted as librdkafka does) exceeds {what} ({limit} bytes)",
                size.key, size.value, size.headers
            )
        };
        if wire > self.producer_max {
            return Err(rejected(
                "too_large",
                detail(self.producer_max, "the producer's message.max.bytes"),
            ));
        }
        if let Some(max) = self.topic_max(topic).await {
            if wire + BATCH_OVERHEAD > max {
                return Err(rejected(
                    "too_large",
                    detail(max, "the topic's max.message.bytes, less the batch header,"),
                ));
            }
        }
        Ok(())
    }

    /// The topic's `max.message.bytes` when it applies and the broker reported it.
    async fn topic_max(&self, topic: &str) -> Option<usize> {
        if self.compressed {
            return None;
        }
        let admin = self.admin.as_ref()?;
        if let Some(known) = self.known(topic) {
            return known;
        }
        let _one = self.learning.lock().await;
        // Another publish may have learned it while this one waited.
        if let Some(known) = self.known(topic) {
            return known;
        }
        if !self.room() {
            return None;
        }
        let (max, valid) = match describe(admin, topic).await {
            Ok(max) => (max, RELEARN_AFTER),
            Err(e) => {
                tracing::debug!(topic, error = %e, "cannot learn the topic's max.message.bytes; the producer's limit applies");
                (None, RETRY_AFTER)
            }
        };
        let until = Instant::now() + valid;
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics.insert(topic.to_string(), Learned { max, until });
        max
    }

    /// Whether one more topic may be remembered (after forgetting the stale ones).
    fn room(&self) -> bool {
        let mut topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        if topics.len() >= MAX_TOPICS {
            let now = Instant::now();
            topics.retain(|_, l| l.until > now);
        }
        topics.len() < MAX_TOPICS
    }

    /// The remembered limit of `topic` (`Some(None)`: known to be unreported), if fresh.
    fn known(&self, topic: &str) -> Option<Option<usize>> {
        let topics = self.topics.lock().unwrap_or_else(|p| p.into_inner());
        topics
            .get(topic)
            .filter(|l| l.until > Instant::now())
            .map(|l| l.max)
    }
}

/// The topic's `max.message.bytes` from DescribeConfigs (`None`: not reported).
async fn describe(admin: &AdminClient<Context>, topic: &str) -> Result<Option<usize>, String> {
    let opts = AdminOptions::new().request_timeout(Some(DESCRIBE_TIMEOUT));
    let resource = ResourceSpecifier::Topic(topic);
    let answer = tokio::time::timeout(DESCRIBE_TIMEOUT, admin.describe_configs([&resource], &opts))
        .await
        .map_err(|_| format!("no answer within {DESCRIBE_TIMEOUT:?}"))?
        .map_err(|e| e.to_string())?;
    let mut max = None;
    for result in answer {
        let resource = result.map_err(|e| format!("{e:?}"))?;
        max = resource
            .get("max.message.bytes")
            .and_then(|e| e.value.as_deref())
            .and_then(|v| v.trim().parse().ok());
    }
    Ok(max)
}

fn rejected(reason: &'static str, detail: String) -> SinkError {
    SinkError::Rejected {
        sink: SINK,
        reason,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(props: &[(&str, &str)]) -> Limits {
        let mut c = ClientConfig::new();
        for (k, v) in props {
            c.set(*k, *v);
        }
        Limits::new(&c, None)
    }

    fn reason(r: Result<(), SinkError>) -> Option<&'static str> {
        r.err().map(|e| e.reason())
    }

    #[test]
    fn topic_names_follow_kafka_s_rules() {
        assert_eq!(topic_error("outbox.event.Order_1-x"), None);
        assert_eq!(topic_error(&"a".repeat(249)), None);
        for bad in ["", ".", "..", "a b", "ordér", "a/b"] {
            assert!(topic_error(bad).is_some(), "{bad:?}");
        }
        let long = topic_error(&"a".repeat(250)).expect("too long");
        assert!(long.contains("250 characters"), "{long}");
        // a 5,000-character name is not repeated in full
        assert!(topic_error(&"a".repeat(5_000)).expect("too long").len() < 200);
    }

    #[test]
    fn sizes_are_counted_as_librdkafka_counts_them() {
        // Given a record with a 3-byte key, a 10-byte value and two headers
        let s = RecordSize::of(
            b"o-1",
            Some(b"0123456789"),
            [("ce_id", &b"e-1"[..]), ("big", &[b'x'; 200][..])],
        );
        // Then each header costs its name, value and their zig-zag varint lengths
        // (200 needs two bytes: 400 >= 128)
        assert_eq!(s.headers, (5 + 3 + 1 + 1) + (3 + 200 + 1 + 2));
        assert_eq!(s.wire(), 36 + 3 + 10 + s.headers);
        assert_eq!(varint_len(0), 1);
        assert_eq!(varint_len(63), 1);
        assert_eq!(varint_len(64), 2);
        assert_eq!(varint_len(2_000_000), 4);
    }

    #[tokio::test]
    async fn the_count_is_librdkafka_s_to_the_byte() {
        use rdkafka::message::{Header, OwnedHeaders};
        use rdkafka::producer::{BaseProducer, BaseRecord};
        // Given a record with key, value and headers, and producers whose
        // message.max.bytes is exactly the size counted here, and one byte less
        let value = vec![b'x'; 2_000];
        let big = vec![b'y'; 300];
        let headers = [("ce_id", &b"e-1"[..]), ("ce_big", &big[..])];
        let size = RecordSize::of(b"key-1", Some(&value), headers);
        for (max, fits) in [(size.wire(), true), (size.wire() - 1, false)] {
            let max = max.to_string();
            let props = [("message.max.bytes", max.as_str())];
            let mut config = ClientConfig::new();
            config.set("bootstrap.servers", "127.0.0.1:9");
            config.set("message.max.bytes", &max);
            let producer: BaseProducer = config.create().expect("producer");
            let h = headers.iter().fold(OwnedHeaders::new(), |h, (key, value)| {
                h.insert(Header {
                    key,
                    value: Some(*value),
                })
            });
            let record = BaseRecord::to("t").key("key-1").payload(&value).headers(h);
            // When librdkafka takes the record (it checks the size before queueing it)
            let taken = producer.send(record).map_err(|(e, _)| e);
            // Then it agrees with the check here
            assert_eq!(taken.is_ok(), fits, "{max}: {taken:?}");
            let ours = limits(&props).check("t", size).await;
            assert_eq!(ours.is_ok(), fits, "{max}: {ours:?}");
        }
    }

    #[tokio::test]
    async fn a_record_over_the_producer_limit_is_rejected_before_sending() {
        let l = limits(&[("message.max.bytes", "1000")]);
        let fits = RecordSize::of(b"k", Some(&[0; 900]), []);
        let over = RecordSize::of(b"k", Some(&[0; 1000]), []);
        assert_eq!(reason(l.check("t", fits).await), None);
        assert_eq!(reason(l.check("t", over).await), Some("too_large"));
        // the default is librdkafka's 1,000,000 bytes, headers and key included
        let l = limits(&[]);
        let header = vec![b'x'; 999_900];
        let big = RecordSize::of(&[b'k'; 100], None, [("ce_big", &header[..])]);
        let err = l.check("t", big).await.expect_err("too large");
        assert_eq!(err.reason(), "too_large");
        assert!(
            err.to_string().contains("message.max.bytes (1000000"),
            "{err}"
        );
    }

    #[tokio::test]
    async fn an_invalid_topic_is_rejected_before_sending() {
        let l = limits(&[]);
        let small = RecordSize::of(b"k", None, []);
        let topic = format!("outbox.event.{}", "A".repeat(5_000));
        assert_eq!(reason(l.check(&topic, small).await), Some("invalid_topic"));
    }

    #[test]
    fn at_most_max_topics_are_remembered_and_stale_ones_make_room() {
        // Given as many remembered topics as allowed, all fresh
        let l = limits(&[]);
        let fresh = Instant::now() + RELEARN_AFTER;
        let mut topics = l.topics.lock().expect("not poisoned");
        for i in 0..MAX_TOPICS {
            let learned = Learned {
                max: Some(1),
                until: fresh,
            };
            topics.insert(format!("t{i}"), learned);
        }
        drop(topics);
        // Then no new topic is asked about
        assert!(!l.room());
        // until one of them is stale
        l.topics.lock().expect("not poisoned").insert(
            "t0".into(),
            Learned {
                max: None,
                until: Instant::now(),
            },
        );
        assert!(l.room());
        assert_eq!(l.topics.lock().expect("not poisoned").len(), MAX_TOPICS - 1);
    }

    #[test]
    fn compression_leaves_the_topic_limit_to_the_broker() {
        assert!(!limits(&[]).compressed);
        assert!(!limits(&[("compression.type", "none")]).compressed);
        assert!(limits(&[("compression.type", "lz4")]).compressed);
        assert!(limits(&[("compression.codec", "gzip")]).compressed);
    }
}
