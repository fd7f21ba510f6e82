"""Checks an outboxd.toml against the daemon's config contract.

Used for the compose configs and for every ConfigMap that carries an
outboxd.toml (deploy/kubernetes and the rendered chart). It knows the sections
and keys outboxd accepts; it does not know defaults or semantics beyond the
few rules below, which catch the mistakes a deployment file can make.
"""

import tomllib

COLUMNS = {"id", "aggregate_type", "aggregate_id", "event_type", "payload",
           "correlation_id", "causation_id", "headers", "created_at"}
SECTIONS = {
    "postgres": {"url", "url_file", "slot", "publication", "table", "columns"},
    "cloudevents": {"source", "type_prefix"},
    "sink": {"kind"},
    "nats": {"url", "url_file", "subject", "stream", "create_stream"},
    "kafka": {"brokers", "topic", "properties"},
    "http": {"listen"},
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
