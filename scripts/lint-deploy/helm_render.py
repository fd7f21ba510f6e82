"""Lints and renders the Helm chart with the Helm v4 Go SDK (helm-python-sdk).

usage: helm_render.py CHART PARENT_FIXTURE OUT_DIR CONFIG_TOML

- `helm lint --strict` and render for every CHART/ci/*.yaml value set (the
  documented examples: TLS to Postgres, Kafka SASL from a Secret, a NATS .creds
  file, retention, HTTP auth, ...); each rendering goes to OUT_DIR/<value set>.yaml
  for the Kubernetes validation, whose strict schemas and config contract apply;
- values that the schema must reject are rejected (so a lax values.schema.json
  cannot pass unnoticed), and values the schema lets through but the templates
  must refuse (secrets through extraConfig, a grace period shorter than the drain)
  fail to render, naming the problem;
- round trip: every key of CONFIG_TOML (config/outboxd.toml, set or commented out),
  given as `config` values, passes the schema and renders into the ConfigMap's
  outboxd.toml unchanged, once for each broker (secret values and the chart's own
  keys excepted: they are refused above);
- a key values.yaml sets explicitly has the binary's default (CONFIG_TOML's value),
  or is listed in CHART_DEFAULTS with the reason it differs;
- the parent-chart fixture (an app chart that depends on outboxd and includes
  "outboxd.sidecar" in its own pod spec) lints and renders too, and its
  sidecar uses the outboxd chart's appVersion, not the parent's;
- a rendered PrometheusRule's spec is CHART/files/alerts.yml unchanged (the
  rules' own {{ $labels }} templates must reach Prometheus untouched).
Exit status 1 if anything failed.
"""

import json
import pathlib
import shutil
import sys
import tomllib

import helm_python as helm
import yaml

import config_keys

KUBE_VERSION = "v1.33.0"
MUST_REJECT = {
    "unknown sink": {"config": {"sink": {"kind": "rabbitmq"}}},
    "kafka without brokers": {"config": {"sink": {"kind": "kafka"}}},
    "secret.create without a URL": {"secret": {"create": True}},
    "unknown top-level key": {"replicaCount": 2},
    "slot name with a dash": {"config": {"postgres": {"slot": "my-slot"}}},
    "unknown config key (postgres.slott)": {"config": {"postgres": {"slott": "x"}}},
    "unknown config key (retention.enable)": {"config": {"retention": {"enable": True}}},
    "unknown config section": {"config": {"metrics": {"enabled": True}}},
    "unknown TLS mode": {"config": {"postgres": {"tls": {"mode": "allow"}}}},
    "a number as a string (http.max_connections)": {"config": {"http": {"max_connections": "64"}}},
    "the 0.1 value name createStream": {"config": {"nats": {"createStream": True}}},
    "a secret in config (nats.password)": {"config": {"nats": {"password": "pw"}}},
    "a secret in config (postgres.url)": {"config": {"postgres": {"url": "postgres://u:pw@db/app"}}},
    "a Kafka password in properties": {"config": {"kafka": {"properties": {"sasl.password": "pw"}}}},
    "the chart's own key (http.listen)": {"config": {"http": {"listen": "127.0.0.1:9187"}}},
    "a relative *_file path": {"config": {"nats": {"creds_file": "outboxd.creds"}}},
    "an extraSecrets path with ..": {"secret": {"extraSecrets": [{"name": "s", "items": [{"key": "k", "path": "../k"}]}]}},
    "an unknown key under example": {"example": {"nodeselector": {}}},
}
MUST_FAIL_RENDER = {
    "a secret through extraConfig": ({"extraConfig": {"http": {"bearer_token": "t"}}}, "http.bearer_token is a secret"),
    "a Kafka password through extraConfig": (
        {"config": {"sink": {"kind": "kafka"}, "kafka": {"brokers": "k:9092"}},
         "extraConfig": {"kafka": {"properties": {"sasl.password": "pw"}}}}, "kafka.properties.sasl.password is a secret"),
    "credentials in nats.url": ({"config": {"nats": {"url": "nats://u:pw@nats:4222"}}}, "nats.url carries credentials"),
    "the chart's own key through extraConfig": ({"extraConfig": {"postgres": {"url_file": "/x"}}}, "postgres.url_file is set by the chart"),
    "a grace period shorter than the drain": (
        {"example": {"enabled": True}, "extraConfig": {"sink": {"shutdown_timeout_secs": 30}}},
        "terminationGracePeriodSeconds (30) must exceed"),
}
# Keys values.yaml sets to something else than the binary's default, and why.
CHART_DEFAULTS = {
    "sink.kind": "the chart is for a broker; the binary's default is stdout",
    "nats.url": "a Service named nats in the release's namespace",
    "cloudevents.source": "empty: the chart makes /<namespace>/<release>",
    "kafka.brokers": "empty: required once sink.kind is kafka (the schema says so)",
}
failed = 0


def report(ok, what, detail=""):
    global failed
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def lint(chart, values, what):
    result = helm.lint(str(chart), values, strict=True, kube_version=KUBE_VERSION, with_subcharts=True)
    bad = [m["error"] for m in result["messages"] if m["severity"] >= 2] or result.get("errors", [])
    notes = [m["error"] for m in result["messages"] if m["severity"] < 2]
    report(not bad, f"helm lint --strict {what}", "; ".join(map(str, bad)) or "; ".join(notes))


def render(chart, values, out_file):
    """Renders into one multi-document YAML file; returns its text."""
    with helm.Chart.load(str(chart)) as c:
        manifests = c.render(values, name="ci", namespace="ci", is_install=True)
    docs = [f"# Source: {path}\n{text.strip()}\n" for path, text in sorted(manifests.items())
            if not path.endswith("NOTES.txt") and text.strip()]
    text = "---\n".join(docs)
    out_file.write_text(text)
    return text


def check_rules(chart, rendered):
    """Every rendered PrometheusRule carries files/alerts.yml as its spec."""
    want = yaml.safe_load((chart / "files" / "alerts.yml").read_text())
    rules = [(name, doc) for name, text in rendered for doc in yaml.safe_load_all(text)
             if doc and doc.get("kind") == "PrometheusRule"]
    report(bool(rules), "a value set renders the PrometheusRule")
    for name, doc in rules:
        report(doc.get("spec") == want, f"PrometheusRule of {name} is files/alerts.yml",
               f"{len(want['groups'][0]['rules'])} rules")


def configmap_toml(text):
    for doc in yaml.safe_load_all(text):
        if doc and doc.get("kind") == "ConfigMap":
            return tomllib.loads(doc["data"]["outboxd.toml"])
    raise ValueError("no ConfigMap rendered")


def round_trip(chart, config_toml, out):
    """Every documented key, given as values, comes out in outboxd.toml unchanged."""
    doc = config_keys.documented(config_toml)
    skip = set(config_keys.SECRETS) | set(config_keys.CHART_OWNED)
    config = {}
    for dotted, value in doc.items():
        if dotted in skip:
            continue
        node, parts = config, dotted.split(".")
        # kafka.properties."a.b" keys: the section path is known, the rest is the key.
        depth = 2 if parts[:2] in (["kafka", "properties"], ["kafka", "properties_files"]) else len(parts) - 1
        for part in parts[:depth]:
            node = node.setdefault(part, {})
        node[".".join(parts[depth:])] = value
    for kind in ("nats", "kafka"):
        values = {"config": {**config, "sink": {**config["sink"], "kind": kind}}}
        name = f"round trip of {config_toml}, sink {kind}"
        try:
            text = render(chart, values, out / f"roundtrip-{kind}.yaml")
            got = configmap_toml(text)
        except (helm.HelmError, ValueError) as e:
            report(False, name, str(e))
            continue
        want = json.loads(json.dumps(values["config"]))
        want.setdefault("http", {})["listen"] = "0.0.0.0:9187"
        want.pop("kafka" if kind == "nats" else "nats")
        want["kafka" if kind == "kafka" else "nats"].setdefault("properties", {})
        got.get(kind, {}).setdefault("properties", {})
        if kind == "nats":
            want["nats"].pop("properties")
            got["nats"].pop("properties")
        diff = sorted(f"{s}.{k}" for s in set(want) | set(got)
                      for k in set(want.get(s, {})) | set(got.get(s, {}))
                      if want.get(s, {}).get(k) != got.get(s, {}).get(k))
        n = len(config_keys.rust_config.flatten(got))
        report(not diff, name, "differs: " + ", ".join(diff) if diff else f"{n} keys rendered back as given -> {out / f'roundtrip-{kind}.yaml'}")


def defaults_agree(chart, config_toml):
    doc = config_keys.documented(config_toml)
    values = yaml.safe_load((chart / "values.yaml").read_text())["config"]
    differ = []

    def walk(node, prefix):
        for k, v in node.items():
            name = prefix + k
            if isinstance(v, dict):
                walk(v, name + ".")
            elif name in doc and doc[name] != v and name not in CHART_DEFAULTS:
                differ.append(f"{name}: values.yaml {v!r}, binary {doc[name]!r}")
    walk(values, "")
    report(not differ, "values.yaml's config agrees with the binary's defaults",
           "; ".join(differ) or "except " + "; ".join(f"{k} ({v})" for k, v in CHART_DEFAULTS.items()))


def main(chart, fixture, out, config_toml):
    out.mkdir(parents=True, exist_ok=True)
    value_sets = sorted((chart / "ci").glob("*.yaml"))
    report(len(value_sets) >= 8, f"{len(value_sets)} value sets in {chart}/ci")
    rendered = []
    for path in value_sets:
        values = yaml.safe_load(path.read_text()) or {}
        lint(chart, values, path.name)
        try:
            text = render(chart, values, out / path.name)
            rendered.append((path.name, text))
            report(True, f"helm template {path.name}", f"{text.count('# Source:')} objects -> {out / path.name}")
        except helm.HelmError as e:
            report(False, f"helm template {path.name}", str(e))
    check_rules(chart, rendered)

    with helm.Chart.load(str(chart)) as c:
        for what, values in MUST_REJECT.items():
            try:
                c.validate_schema(values)
                report(False, f"values.schema.json rejects {what}", "it was accepted")
            except helm.HelmError:
                report(True, f"values.schema.json rejects {what}")
    for what, (values, message) in MUST_FAIL_RENDER.items():
        try:
            with helm.Chart.load(str(chart)) as c:
                c.validate_schema(values)
            render(chart, values, out / "must-fail.yaml")
            report(False, f"the chart refuses {what}", "it rendered")
        except helm.HelmError as e:
            report(message in str(e), f"the chart refuses {what}", message if message in str(e) else f"other error: {e}")
    (out / "must-fail.yaml").unlink(missing_ok=True)
    round_trip(chart, config_toml, out)
    defaults_agree(chart, config_toml)

    parent = out / "parent" / fixture.name
    shutil.rmtree(out / "parent", ignore_errors=True)
    shutil.copytree(fixture, parent)
    shutil.copytree(chart, parent / "charts" / chart.name)
    lint(parent, {}, "parent-chart fixture")
    try:
        text = render(parent, {}, out / "parent-chart.yaml")
        app_version = yaml.safe_load((chart / "Chart.yaml").read_text())["appVersion"]
        ok = f":{app_version}\"" in text and "name: outboxd" in text
        report(ok, "parent chart includes outboxd.sidecar", f"image tag {app_version} -> {out / 'parent-chart.yaml'}")
    except helm.HelmError as e:
        report(False, "helm template parent-chart fixture", str(e))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*map(pathlib.Path, sys.argv[1:5])))
