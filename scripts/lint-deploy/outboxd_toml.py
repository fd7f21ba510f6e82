"""Checks an outboxd.toml against the daemon's config contract.

Used for the compose configs and for every ConfigMap that carries an
outboxd.toml (deploy/kubernetes and the rendered chart). It knows the sections
and keys outboxd accepts; it does not know defaults or semantics beyond the
few rules below, which catch the mistakes a deployment file can make.
"""

import tomllib

COLUMNS = {"id", "aggregate_type", "aggregate_id", "event_type", "payload",
           "correlation_id", "causation_id", "headers", "created_at", "content_type"}
# Mirrors the structs of src/config.rs (deny_unknown_fields there); tests/cli.rs loads
# the shipped config files with the real parser as well.
SECTIONS = {
    "postgres": {"url", "url_file", "password_file", "slot", "publication", "table",
                 "create_publication", "create_slot", "status_interval_ms",
                 "heartbeat_interval_secs", "monitor_interval_secs", "message_prefix",
                 "allow_new_slot", "failover_slot", "standby_poll_ms", "initial_snapshot",
                 "columns"},
    "cloudevents": {"source", "type_prefix", "default_content_type"},
    "sink": {"kind", "max_in_flight", "on_invalid", "on_rejected", "shutdown_timeout_secs"},
    "nats": {"url", "url_file", "subject", "stream", "stream_subjects", "create_stream",
             "dead_letter_subject", "content_mode", "ack_timeout_ms"},
    "kafka": {"brokers", "topic", "key", "dead_letter_topic", "content_mode",
              "message_timeout_ms", "properties", "properties_files"},
    "retry": {"initial_backoff_ms", "max_backoff_ms"},
    "retention": {"enabled", "older_than_secs", "batch_size", "interval_secs"},
    "http": {"listen", "header_read_timeout_ms", "max_connection_age_secs", "max_connections"},
    "log": {"format", "level"},
}


def check(text, in_configmap=False):
    """Returns a list of problems (empty when the config is fine)."""
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"not valid TOML: {e}"]
    problems = []
    for section, body in cfg.items():
        if section not in SECTIONS:
            problems.append(f"unknown section [{section}]")
            continue
        for key in body:
            if key not in SECTIONS[section]:
                problems.append(f"unknown key {section}.{key}")
    columns = cfg.get("postgres", {}).get("columns", {})
    problems += [f"unknown column mapping postgres.columns.{c}" for c in columns if c not in COLUMNS]
    props = cfg.get("kafka", {}).get("properties", {})
    problems += [f"kafka.properties.{k} must be a string" for k, v in props.items() if not isinstance(v, str)]

    kind = cfg.get("sink", {}).get("kind")
    if kind not in ("nats", "kafka", "stdout"):
        problems.append(f"sink.kind must be nats, kafka or stdout, not {kind!r}")
    if kind == "kafka" and not cfg.get("kafka", {}).get("brokers"):
        problems.append("sink.kind is kafka but kafka.brokers is not set")
    if cfg.get("log", {}).get("format", "json") not in ("json", "text"):
        problems.append("log.format must be json or text")
    if not cfg.get("cloudevents", {}).get("source"):
        problems.append("cloudevents.source is empty")
    if in_configmap and "url" in cfg.get("postgres", {}):
        problems.append("postgres.url holds credentials: use url_file with a Secret, not a ConfigMap")
    return problems
