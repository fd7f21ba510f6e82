//! The broker's part of `outboxd check`: NATS reachable and its stream ready, or
//! Kafka's cluster metadata and which target topics exist.

use super::{check, warning, Check, BROKER_TIMEOUT};
use crate::config::Config;
use crate::route::{Field, Fields, Sanitize, Template};
use crate::sink::kafka::client::{self as kafka_client, ClusterView};
use crate::sink::nats::stream::review_stream;
use crate::sink::{Routes, Sink};

pub(super) async fn sink_check(
    cfg: &Config,
    routes: &Routes,
    aggregate_types: &[String],
) -> Vec<Check> {
    match routes {
        Routes::Stdout => vec![check("sink", true, "stdout needs no broker")],
        Routes::Nats { .. } => nats_checks(cfg, routes).await,
        Routes::Kafka { topic, .. } => kafka_checks(cfg, topic, aggregate_types).await,
    }
}

/// The server answers and the stream is ready; then what the stream's duplicate
/// window and limits mean for a restart (a WARN, not a FAIL).
async fn nats_checks(cfg: &Config, routes: &Routes) -> Vec<Check> {
    let sink = match tokio::time::timeout(BROKER_TIMEOUT, Sink::connect(cfg, routes, None)).await {
        Ok(Ok(Sink::Nats(sink))) => sink,
        Ok(Ok(_)) => unreachable!("NATS routes make a NATS sink"),
        Ok(Err(e)) => {
            return vec![check(
                "nats broker",
                false,
                format!("{e}: check the [nats] section and that the broker runs"),
            )]
        }
        Err(_) => {
            return vec![check(
                "nats broker",
                false,
                "no answer within 10 s: check the URL and the network",
            )]
        }
    };
    let broker = check(
        "nats broker",
        true,
        format!(
            "{} reachable; stream ready",
            crate::config::redact_url(cfg.nats.url.expose())
        ),
    );
    let stream = match tokio::time::timeout(BROKER_TIMEOUT, sink.stream_settings()).await {
        Ok(Ok(settings)) => match review_stream(&settings, cfg.sink.shutdown_timeout_secs) {
            Ok(fine) => check("nats stream", true, fine),
            Err(problem) => warning("nats stream", problem),
        },
        Ok(Err(e)) => check("nats stream", false, e),
        Err(_) => check("nats stream", false, "no stream info within 10 s"),
    };
    vec![broker, stream]
}

async fn kafka_checks(cfg: &Config, topic: &Template, aggregate_types: &[String]) -> Vec<Check> {
    let k = &cfg.kafka;
    let view = match kafka_client::inspect(k, BROKER_TIMEOUT).await {
        Ok(v) => v,
        Err(e) => {
            return vec![check(
                "kafka broker",
                false,
                format!("{e}: check kafka.brokers, the security keys of [kafka.properties] and that the broker runs"),
            )]
        }
    };
    let mut out = vec![check(
        "kafka broker",
        true,
        format!(
            "{} reachable: {} broker(s), {} topic(s)",
            k.brokers,
            view.brokers,
            view.topics.len()
        ),
    )];
    out.extend(topic_checks(topic, &view, aggregate_types));
    out
}

/// Which target topics exist, and where the relay would rely on auto-creation.
fn topic_checks(template: &Template, view: &ClusterView, samples: &[String]) -> Vec<Check> {
    let auto = match view.auto_create {
        Some(true) => "the broker creates missing topics (auto.create.topics.enable=true) with its default partitions and replication",
        Some(false) => "the broker does not create topics (auto.create.topics.enable=false)",
        None => "the broker did not report auto.create.topics.enable",
    };
    let named = |name: &str| {
        match (view.topics.get(name), view.auto_create) {
        (Some(p), _) => check("kafka topic", true, format!("{name} exists ({p} partitions)")),
        (None, Some(true)) => check(
            "kafka topic",
            true,
            format!("{name} does not exist yet; relies on auto-creation: {auto}"),
        ),
        (None, Some(false)) => check(
            "kafka topic",
            false,
            format!("{name} does not exist and {auto}: create it"),
        ),
        (None, None) => check(
            "kafka topic",
            true,
            format!("{name} does not exist; publishing relies on auto-creation, not confirmed ({auto}): create it to be sure"),
        ),
    }
    };
    if template.is_literal() {
        return vec![named(template.literal_prefix())];
    }
    let prefix = template.literal_prefix();
    let matching: Vec<&str> = view
        .topics
        .keys()
        .filter(|t| t.starts_with(prefix))
        .map(String::as_str)
        .collect();
    let shown = matching
        .iter()
        .take(5)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    let more = if matching.len() > 5 { ", …" } else { "" };
    let mut out = vec![check(
        "kafka topics",
        !(matching.is_empty() && view.auto_create == Some(false)),
        format!(
            "kafka.topic is the template {template}: {} existing topic(s) start with {prefix:?} ({shown}{more}); \
             a topic for any other value must be created first, or {auto}",
            matching.len()
        ),
    )];
    if !samples.is_empty() {
        if template.uses(Field::AggregateId) || template.uses(Field::EventType) {
            out.push(check(
                "kafka topic",
                true,
                "kafka.topic depends on {aggregate_id} or {event_type}: --aggregate-type alone cannot name a topic",
            ));
        } else {
            for sample in samples {
                let fields = Fields {
                    aggregate_type: sample,
                    aggregate_id: "",
                    event_type: "",
                };
                out.push(named(&template.render(&fields, Sanitize::KafkaTopic)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(topics: &[(&str, usize)], auto_create: Option<bool>) -> ClusterView {
        ClusterView {
            brokers: 1,
            topics: topics.iter().map(|(t, p)| (t.to_string(), *p)).collect(),
            auto_create,
        }
    }

    fn template(t: &str) -> Template {
        Template::parse(t).expect("valid")
    }

    #[test]
    fn a_literal_topic_is_checked_by_name() {
        let t = template("orders");
        let ok = topic_checks(&t, &view(&[("orders", 6)], Some(false)), &[]);
        assert_eq!(ok.len(), 1);
        assert!(ok[0].ok && ok[0].detail.contains("orders exists (6 partitions)"));
        let fail = topic_checks(&t, &view(&[], Some(false)), &[]);
        assert!(!fail[0].ok, "missing and no auto-creation: {fail:?}");
        let relied = topic_checks(&t, &view(&[], Some(true)), &[]);
        assert!(relied[0].ok && relied[0].detail.contains("relies on auto-creation"));
        let unknown = topic_checks(&t, &view(&[], None), &[]);
        assert!(unknown[0].ok && unknown[0].detail.contains("not confirmed"));
    }

    #[test]
    fn a_template_reports_its_prefix_and_the_sample_types() {
        // Given topics for one aggregate type under the default template
        let t = template("outbox.event.{aggregate_type}");
        let v = view(&[("outbox.event.Order", 3), ("other", 1)], Some(false));
        // When Order and Customer are checked
        let c = topic_checks(&t, &v, &["Order".into(), "Customer".into()]);
        // Then the prefix line names the match, Order passes, Customer fails
        assert_eq!(c.len(), 3, "{c:?}");
        assert!(
            c[0].ok && c[0].detail.contains("1 existing topic(s)"),
            "{c:?}"
        );
        assert!(c[0].detail.contains("outbox.event.Order"));
        assert!(c[1].ok && c[1].detail.starts_with("outbox.event.Order exists"));
        assert!(
            !c[2].ok
                && c[2]
                    .detail
                    .starts_with("outbox.event.Customer does not exist")
        );
    }

    #[test]
    fn no_matching_topic_without_auto_creation_fails() {
        let t = template("outbox.event.{aggregate_type}");
        let c = topic_checks(&t, &view(&[], Some(false)), &[]);
        assert!(!c[0].ok);
        let c = topic_checks(&t, &view(&[], None), &[]);
        assert!(c[0].ok, "unknown auto-creation is reported, not failed");
    }
}
