"""Validates Kubernetes manifests offline.

usage: k8s_validate.py NODE_DIR VERSIONS FILE...    (VERSIONS e.g. "1.29.0,1.37.0")

- built-in kinds: against the Kubernetes JSON schemas bundled in the
  kubernetes-validate wheel, strict (an unknown field fails), for each version;
- monitoring.coreos.com kinds (PodMonitor, PrometheusRule): against the
  Prometheus Operator CRD schemas compiled into the npm package
  @kubernetes-models/prometheus-operator, by crd_validate.mjs under node;
- every pod template: the "restricted" Pod Security Standard, plus
  readOnlyRootFilesystem on every container (outboxd needs no writes);
- every ConfigMap key ending in .toml: the outboxd config contract.
A kind with no schema (Kustomization) is skipped with a note. Exit 1 on failure.
"""

import json
import pathlib
import subprocess
import sys

import kubernetes_validate.utils as kv
import yaml

import outboxd_toml

SKIP = {"Kustomization": "kustomize build input, not an API object"}
POD_SPEC_PATHS = {
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
ALLOWED_VOLUMES = {"configMap", "secret", "emptyDir", "projected", "downwardAPI",
                   "persistentVolumeClaim", "csi", "ephemeral"}
failed = 0


def report(ok, what, detail=""):
    global failed
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def restricted_problems(pod):
    """The checks of the "restricted" Pod Security Standard that a manifest can fail."""
    problems = []
    psc = pod.get("securityContext", {})
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(field):
            problems.append(f"{field} is true")
    for vol in pod.get("volumes", []):
        kinds = set(vol) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            problems.append(f"volume {vol['name']} is of type {', '.join(kinds - ALLOWED_VOLUMES)}")
    containers = [c for key in ("initContainers", "containers") for c in pod.get(key, [])]
    for c in containers:
        sc = c.get("securityContext", {})
        name = c["name"]
        if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot is not true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            problems.append(f"{name}: runAsUser is 0")
        seccomp = sc.get("seccompProfile", psc.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile.type is {seccomp}")
        if sc.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation is not false")
        if sc.get("privileged"):
            problems.append(f"{name}: privileged")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            problems.append(f"{name}: capabilities.drop lacks ALL")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: adds capabilities {caps['add']}")
        if sc.get("readOnlyRootFilesystem") is not True:
            problems.append(f"{name}: readOnlyRootFilesystem is not true")
    return problems


def pod_spec(doc):
    node = doc
    for key in POD_SPEC_PATHS.get(doc["kind"], ()):
        node = node.get(key, {}) if node is not None else {}
    return node if doc["kind"] in POD_SPEC_PATHS else None


def check_doc(source, doc, versions, crds):
    name = f"{source} {doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '-')}"
    if doc.get("kind") in SKIP:
        print(f"skip {name}: {SKIP[doc['kind']]}")
        return
    if doc.get("apiVersion", "").startswith("monitoring.coreos.com/"):
        crds.append({"source": name, "doc": doc})
        return
    errors = []
    for version in versions:
        try:
            kv.validate(doc, version, strict=True)
        except kv.ValidationError as e:
            path = ".".join(str(p) for p in e.path)
            errors.append(f"k8s {version}: {path}: {e.message}")
        except kv.SchemaNotFoundError as e:
            errors.append(f"k8s {version}: no schema: {e.message}")
    report(not errors, name, "; ".join(errors) or f"schema k8s {', '.join(versions)} (strict)")

    pod = pod_spec(doc)
    if pod is not None:
        problems = restricted_problems(pod)
        report(not problems, f"{name} pod security", "; ".join(problems) or "restricted")
    if doc["kind"] == "ConfigMap":
        for key, text in (doc.get("data") or {}).items():
            if key.endswith(".toml"):
                problems = outboxd_toml.check(text, in_configmap=True)
                report(not problems, f"{name} {key}", "; ".join(problems) or "outboxd config contract")


def main(node_dir, versions, files):
    crds = []
    for path in files:
        try:
            docs = [d for d in yaml.safe_load_all(pathlib.Path(path).read_text()) if d]
        except yaml.YAMLError as e:
            report(False, path, f"not valid YAML: {e}")
            continue
        for doc in docs:
            check_doc(path, doc, versions, crds)
    if crds:
        proc = subprocess.run(["node", str(pathlib.Path(__file__).with_name("crd_validate.mjs")),
                               str(pathlib.Path(node_dir) / "node_modules")],
                              input=json.dumps(crds), text=True, capture_output=True)
        print(proc.stdout, end="")
        report(proc.returncode == 0, f"{len(crds)} Prometheus Operator objects against their CRD schemas",
               proc.stderr.strip())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2].split(","), sys.argv[3:]))
