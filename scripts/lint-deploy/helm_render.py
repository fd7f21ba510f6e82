"""Lints and renders the Helm chart with the Helm v4 Go SDK (helm-python-sdk).

usage: helm_render.py CHART PARENT_FIXTURE OUT_DIR

- `helm lint --strict` and render for every CHART/ci/*.yaml value set; each
  rendering goes to OUT_DIR/<value set>.yaml for the Kubernetes validation;
- values that the schema must reject are rejected (so a lax values.schema.json
  cannot pass unnoticed);
- the parent-chart fixture (an app chart that depends on outboxd and includes
  "outboxd.sidecar" in its own pod spec) lints and renders too, and its
  sidecar uses the outboxd chart's appVersion, not the parent's;
- a rendered PrometheusRule's spec is CHART/files/alerts.yml unchanged (the
  rules' own {{ $labels }} templates must reach Prometheus untouched).
Exit status 1 if anything failed.
"""

import pathlib
import shutil
import sys

import helm_python as helm
import yaml

KUBE_VERSION = "v1.33.0"
MUST_REJECT = {
    "unknown sink": {"config": {"sink": {"kind": "rabbitmq"}}},
    "kafka without brokers": {"config": {"sink": {"kind": "kafka"}}},
    "secret.create without a URL": {"secret": {"create": True}},
    "unknown top-level key": {"replicaCount": 2},
    "slot name with a dash": {"config": {"postgres": {"slot": "my-slot"}}},
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


def main(chart, fixture, out):
    out.mkdir(parents=True, exist_ok=True)
    value_sets = sorted((chart / "ci").glob("*.yaml"))
    report(len(value_sets) >= 3, f"{len(value_sets)} value sets in {chart}/ci")
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
    sys.exit(main(*map(pathlib.Path, sys.argv[1:4])))
