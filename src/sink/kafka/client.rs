//! The librdkafka client: outboxd's producer settings layered under the operator's
//! `[kafka.properties]`, librdkafka's log lines forwarded to `tracing`, and the
//! read-only cluster view that `outboxd check` reports.
//!
//! This module never prints a property value: `[kafka.properties]` may hold SASL
//! passwords and keys, so errors name the property and redact any value librdkafka
//! echoes back, and [`ClientConfig`] (whose `Debug` shows every value) is never
//! formatted.

use std::collections::BTreeMap;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::ClientContext;
use rdkafka::config::{ClientConfig, RDKafkaLogLevel};
use rdkafka::error::KafkaError;
use rdkafka::producer::FutureProducer;

use super::SINK;
use crate::config::KafkaConfig;
use crate::sink::SinkError;

/// The producer outboxd uses.
pub type Producer = FutureProducer<Context>;

/// outboxd's producer defaults; any of them may be overridden in `[kafka.properties]`.
///
/// - idempotence with `acks=all` and at most 5 requests in flight: librdkafka's own
///   retries can neither duplicate nor reorder records within a partition;
/// - a bounded `message.timeout.ms`: a record that cannot be delivered fails its
///   delivery report, and the relay retries it (with backoff, in order);
/// - `murmur2_random`: the Java client's partitioner, so a key lands on the same
///   partition as it would from a Java producer (and Debezium).
pub fn defaults(cfg: &KafkaConfig) -> Vec<(&'static str, String)> {
    vec![
        ("bootstrap.servers", cfg.brokers.clone()),
        ("client.id", "outboxd".into()),
        ("enable.idempotence", "true".into()),
        ("acks", "all".into()),
        ("max.in.flight.requests.per.connection", "5".into()),
        ("message.timeout.ms", cfg.message_timeout_ms.to_string()),
        ("partitioner", "murmur2_random".into()),
    ]
}

/// The producer's configuration: [`defaults`], then `[kafka.properties]` on top.
pub fn producer_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut c = ClientConfig::new();
    for (k, v) in defaults(cfg) {
        c.set(k, v);
    }
    for (k, v) in &cfg.properties {
        c.set(k, v.expose());
    }
    // librdkafka's debug lines only flow when the operator asked for them with the
    // `debug` property; the `librdkafka` tracing target filters them further.
    c.set_log_level(if cfg.properties.contains_key("debug") {
        RDKafkaLogLevel::Debug
    } else {
        RDKafkaLogLevel::Info
    });
    c
}

/// Warnings for overrides that weaken a guarantee (names and values of these
/// properties are not secret).
pub fn weakened(props: &BTreeMap<String, crate::config::Secret>) -> Vec<String> {
    let get = |k: &str| props.get(k).map(|v| v.expose().trim().to_ascii_lowercase());
    let mut out = Vec::new();
    if let Some(v) = get("enable.idempotence") {
        if v == "false" || v == "0" {
            out.push(
                "enable.idempotence is off: librdkafka's internal retries may write a record \
                 twice, and consumers see more duplicates"
                    .to_string(),
            );
        }
    }
    if let Some(v) = get("acks") {
        if v != "all" && v != "-1" {
            out.push(format!(
                "acks={v}: a delivery report no longer means the record is on all in-sync \
                 replicas, so the slot may move past events a broker failure can still lose"
            ));
        }
    }
    if let Some(v) = get("partitioner") {
        if v != "murmur2_random" && v != "murmur2" {
            out.push(format!(
                "partitioner={v}: keys no longer land on the partitions Java producers choose"
            ));
        }
    }
    out
}

/// Creates a client of type `T` from `config`; errors name the property and never
/// its value.
pub fn create<T>(config: &ClientConfig, cfg: &KafkaConfig) -> Result<T, SinkError>
where
    T: rdkafka::config::FromClientConfigAndContext<Context>,
{
    config
        .create_with_context(Context::new(cfg))
        .map_err(|e| SinkError::Fatal {
            sink: SINK,
            detail: describe_create_error(&e, cfg),
        })
}

fn describe_create_error(e: &KafkaError, cfg: &KafkaConfig) -> String {
    let text = match e {
        KafkaError::ClientConfig(_, desc, key, _value) => {
            format!("invalid librdkafka property {key}: {desc}")
        }
        other => format!("cannot create the kafka client: {other}"),
    };
    Context::new(cfg).redact(&text).into_owned()
}

/// Checks the producer's properties with librdkafka itself, before anything
/// connects, so that a wrong name or value (or a codec this build lacks) is a
/// configuration error naming its key rather than a relay that fails at start.
/// `Err((dotted key, reason))`; sensitive values are redacted from the reason.
pub fn check_properties(cfg: &KafkaConfig) -> Result<(), (String, String)> {
    match producer_config(cfg).create_native_config() {
        Ok(_) => Ok(()),
        Err(KafkaError::ClientConfig(_, desc, key, _)) => {
            let section = if cfg.properties_files.contains_key(&key) {
                "kafka.properties_files"
            } else {
                "kafka.properties"
            };
            Err((
                format!("{section}.\"{key}\""),
                format!(
                    "librdkafka refuses it: {}; see https://github.com/confluentinc/librdkafka/blob/master/CONFIGURATION.md",
                    Context::new(cfg).redact(&desc)
                ),
            ))
        }
        Err(e) => Err((
            "kafka.properties".into(),
            Context::new(cfg).redact(&e.to_string()).into_owned(),
        )),
    }
}

/// Forwards librdkafka's log lines and client errors to `tracing` (target
/// `librdkafka`), so they share the daemon's format and filter. Every line first
/// loses the values of sensitive properties (names with `password`, `secret`, `key`,
/// `token`, `oauthbearer`, and every one from `[kafka.properties_files]`): librdkafka
/// redacts the properties it knows as sensitive in its own dumps (`debug = "conf"`),
/// and this catches the rest (e.g. a password echoed in a broker's error text).
#[derive(Debug, Clone, Default)]
pub struct Context {
    /// Property values to blank out; never formatted (the `Debug` of `Secret` hides them).
    secrets: std::sync::Arc<Vec<crate::config::Secret>>,
}

impl Context {
    fn new(cfg: &KafkaConfig) -> Self {
        // Only sensitive values: blanking every value would also blank words such as
        // `all` (acks) wherever they occur in a log line.
        let sensitive = |name: &str| {
            cfg.properties_files.contains_key(name)
                || ["password", "secret", "key", "token", "oauthbearer"]
                    .iter()
                    .any(|s| name.contains(s))
        };
        let secrets = cfg
            .properties
            .iter()
            .filter(|(k, v)| sensitive(k) && v.expose().len() >= 3)
            .map(|(_, v)| v.clone())
            .collect();
        Self {
            secrets: std::sync::Arc::new(secrets),
        }
    }

    fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut out = std::borrow::Cow::Borrowed(text);
        for s in self.secrets.iter() {
            if out.contains(s.expose()) {
                out = std::borrow::Cow::Owned(out.replace(s.expose(), "[redacted]"));
            }
        }
        out
    }
}

impl ClientContext for Context {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        let message = self.redact(message);
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", facility = fac, "{message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", facility = fac, "{message}")
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        // Broker-down and similar are reported here while librdkafka reconnects on its
        // own; the per-event consequences arrive as delivery reports. The end of a
        // partition is how the exactly-once checkpoint reader knows it read all.
        if matches!(
            error,
            KafkaError::PartitionEOF(_)
                | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF)
        ) {
            return;
        }
        let error = error.to_string();
        tracing::warn!(target: "librdkafka", error = %self.redact(&error), reason = %self.redact(reason), "kafka client error");
    }
}

/// The checkpoint reader of exactly-once mode is a plain consumer with the same logs.
impl rdkafka::consumer::ConsumerContext for Context {}

/// What `outboxd check` learns from the cluster, read-only.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterView {
    /// Brokers in the metadata.
    pub brokers: usize,
    /// Topic name -> partition count (internal topics left out).
    pub topics: BTreeMap<String, usize>,
    /// The broker's `auto.create.topics.enable`, when it reports it.
    pub auto_create: Option<bool>,
}

/// Fetches metadata (all topics: asking for one topic could create it) and the
/// broker's `auto.create.topics.enable`, within `timeout`.
pub async fn inspect(cfg: &KafkaConfig, timeout: Duration) -> Result<ClusterView, SinkError> {
    let mut config = producer_config(cfg);
    // This client sends nothing; it must not register an idempotent producer id.
    config.set("enable.idempotence", "false");
    let admin: AdminClient<Context> = create(&config, cfg)?;
    // Blocking calls, off the async workers: the metadata request, and on failure the
    // client's drop (librdkafka joins its threads).
    let (admin, broker_ids, topics) = tokio::task::spawn_blocking(move || {
        let answer = admin.inner().fetch_metadata(None, timeout);
        answer.map(|m| {
            let topics = m
                .topics()
                .iter()
                .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
                .map(|t| (t.name().to_string(), t.partitions().len()))
                .collect::<BTreeMap<_, _>>();
            let brokers = m.brokers().iter().map(|b| b.id()).collect::<Vec<_>>();
            (admin, brokers, topics)
        })
    })
    .await
    .map_err(|e| retryable("metadata", format!("metadata task failed: {e}")))?
    .map_err(|e| {
        retryable(
            "connect",
            format!("no metadata from {} within {timeout:?}: {e}", cfg.brokers),
        )
    })?;
    let mut auto_create = None;
    if let Some(id) = broker_ids.first() {
        let opts = AdminOptions::new().request_timeout(Some(timeout));
        let resource = ResourceSpecifier::Broker(*id);
        let described =
            tokio::time::timeout(timeout, admin.describe_configs([&resource], &opts)).await;
        if let Ok(Ok(results)) = described {
            auto_create = results
                .into_iter()
                .flatten()
                .flat_map(|r| r.entries)
                .find(|e| e.name == "auto.create.topics.enable")
                .and_then(|e| e.value)
                .map(|v| v.eq_ignore_ascii_case("true"));
        }
    }
    // librdkafka joins its threads on drop: keep that off the async workers.
    let _ = tokio::task::spawn_blocking(move || drop(admin)).await;
    Ok(ClusterView {
        brokers: broker_ids.len(),
        topics,
        auto_create,
    })
}

fn retryable(reason: &'static str, detail: String) -> SinkError {
    SinkError::Retryable {
        sink: SINK,
        reason,
        detail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    fn kafka(props: &[(&str, &str)]) -> KafkaConfig {
        KafkaConfig {
            properties: props
                .iter()
                .map(|(k, v)| (k.to_string(), Secret::new(*v)))
                .collect(),
            ..KafkaConfig::default()
        }
    }

    #[test]
    fn defaults_are_idempotent_ordered_and_java_compatible() {
        let d: BTreeMap<_, _> = defaults(&kafka(&[])).into_iter().collect();
        assert_eq!(d["enable.idempotence"], "true");
        assert_eq!(d["acks"], "all");
        assert_eq!(d["max.in.flight.requests.per.connection"], "5");
        assert_eq!(d["message.timeout.ms"], "30000");
        assert_eq!(d["partitioner"], "murmur2_random");
        assert_eq!(d["bootstrap.servers"], "127.0.0.1:9092");
    }

    #[test]
    fn properties_override_defaults() {
        // Given an operator override of a default
        let c = producer_config(&kafka(&[("linger.ms", "20"), ("acks", "1")]));
        // Then the override wins
        assert_eq!(c.get("acks"), Some("1"));
        assert_eq!(c.get("linger.ms"), Some("20"));
        assert_eq!(c.get("enable.idempotence"), Some("true"));
    }

    #[test]
    fn weakening_overrides_are_named() {
        assert!(weakened(&kafka(&[]).properties).is_empty());
        let w = weakened(
            &kafka(&[
                ("enable.idempotence", "false"),
                ("acks", "1"),
                ("partitioner", "consistent_random"),
            ])
            .properties,
        );
        assert_eq!(w.len(), 3, "{w:?}");
        assert!(w[0].starts_with("enable.idempotence is off"));
    }

    #[test]
    fn the_example_config_builds_a_producer() {
        // Given the [kafka] section of config/kafka.toml (what docs/kafka.md shows)
        use figment::providers::{Format, Toml};
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/kafka.toml");
        let cfg: KafkaConfig = figment::Figment::from(Toml::file_exact(path))
            .extract_inner("kafka")
            .expect("config/kafka.toml [kafka] parses");
        // Then librdkafka accepts every property (compression codec included)
        assert!(weakened(&cfg.properties).is_empty());
        let _producer = create::<Producer>(&producer_config(&cfg), &cfg).expect("producer");
    }

    #[test]
    fn log_lines_lose_property_values() {
        // Given SASL credentials among the properties (one read from a file)
        let cfg = kafka(&[
            ("sasl.username", "app"),
            ("sasl.password", "pa55-from-file"),
            ("security.protocol", "SASL_SSL"),
        ]);
        let ctx = Context::new(&cfg);
        // When librdkafka logs a line that echoes a value
        let line = ctx.redact("SASL authentication error: pa55-from-file rejected for SASL_SSL");
        // Then the password is gone; values of other properties stay readable
        assert_eq!(
            line,
            "SASL authentication error: [redacted] rejected for SASL_SSL"
        );
        assert!(!format!("{ctx:?}").contains("pa55"));
    }

    #[test]
    fn sasl_properties_reach_librdkafka() {
        // Given the SASL/SSL block of docs/kafka.md with the password from a file
        let cfg = kafka(&[
            ("security.protocol", "SASL_SSL"),
            ("sasl.mechanisms", "SCRAM-SHA-512"),
            ("sasl.username", "outboxd"),
            ("sasl.password", "from-file"),
        ]);
        // Then the producer config carries them and librdkafka accepts them
        let c = producer_config(&cfg);
        assert_eq!(c.get("sasl.password"), Some("from-file"));
        assert_eq!(c.get("sasl.mechanisms"), Some("SCRAM-SHA-512"));
        let _producer = create::<Producer>(&c, &cfg).expect("librdkafka accepts SASL_SSL");
    }

    #[test]
    fn creation_errors_show_only_what_is_not_secret() {
        // Given a value from [kafka.properties_files] (a secret) that librdkafka refuses
        let mut cfg = kafka(&[("security.protocol", "hunter2-protocol")]);
        cfg.properties_files
            .insert("security.protocol".into(), "/run/secrets/p".into());
        // When the client is created, then the error names the property, not the value
        let msg = create::<Producer>(&producer_config(&cfg), &cfg)
            .err()
            .expect("invalid value")
            .to_string();
        assert!(msg.contains("security.protocol"), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
        // Given a plain, refused value: it is shown, and so is the text around it
        // (redacting every value blanked 'zstd' out of 'libzstd' before)
        let cfg = kafka(&[("compression.type", "zstdx")]);
        let msg = create::<Producer>(&producer_config(&cfg), &cfg)
            .err()
            .expect("invalid value")
            .to_string();
        assert!(
            msg.contains("\"zstdx\"") && !msg.contains("[redacted]"),
            "{msg}"
        );
    }
}
