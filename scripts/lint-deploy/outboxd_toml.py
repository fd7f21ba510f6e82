"""Checks an outboxd.toml against the daemon's config contract.

Used for the compose configs and for every ConfigMap that carries an
outboxd.toml (deploy/kubernetes and the rendered chart). The keys it accepts are
read from the Rust config structs (rust_config.py; src/ is the one source, with
deny_unknown_fields there, and tests load the shipped configs with the real
parser as well); beyond that it knows only the few rules below, which catch the
mistakes a deployment file can make.
"""

import re
import tomllib

import rust_config

# Secret values: never in a ConfigMap (the *_file keys are the way there).
SECRET_KEYS = {"postgres.url", "nats.password", "nats.token", "nats.nkey_seed",
               "http.bearer_token", "http.basic_auth_password"}
SECRET_PROPERTY = re.compile(r"password|secret|^ssl\.key\.pem$|^sasl\.oauthbearer\.config$")
_KEYS = None


def known_keys():
    global _KEYS
    if _KEYS is None:
        _KEYS = rust_config.keys("src")
    return _KEYS


def unknown_keys(cfg, tree, prefix=""):
    problems = []
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if key not in tree:
            problems.append(f"unknown {'section' if not prefix else 'key'} {name}")
        elif isinstance(tree[key], dict):
            if not isinstance(value, dict):
                problems.append(f"{name} must be a table")
            else:
                problems += unknown_keys(value, tree[key], name + ".")
        elif tree[key] is None and isinstance(value, dict):
            problems.append(f"{name} is a value, not a table")
    return problems


def check(text, in_configmap=False):
    """Returns a list of problems (empty when the config is fine)."""
    try:
        cfg = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        return [f"not valid TOML: {e}"]
    problems = unknown_keys(cfg, known_keys())
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
    if in_configmap:
        for dotted in sorted(SECRET_KEYS):
            section, key = dotted.split(".")
            if key in cfg.get(section, {}):
                problems.append(f"{dotted} is a secret: use {dotted}_file with a Secret, not a ConfigMap")
        problems += [f"kafka.properties.{k} is a secret: use kafka.properties_files with a Secret"
                     for k in props if SECRET_PROPERTY.search(k)]
        if re.search(r"://[^/,]*@", str(cfg.get("nats", {}).get("url", ""))):
            problems.append("nats.url carries credentials: use url_file with a Secret, not a ConfigMap")
    return problems
