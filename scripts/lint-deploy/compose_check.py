"""Checks docker-compose.yml beyond its schema: what `docker compose config`
would resolve, without a Docker engine or the compose plugin.

usage: compose_check.py docker-compose.yml

- bind-mounted files, secret files and build contexts exist;
- named volumes and secrets are declared;
- for each profile set ("", nats, kafka, nats+kafka) every depends_on target
  is enabled, and no two enabled services publish the same host port;
- the outboxd configs follow the config contract and use distinct slots;
- Prometheus scrapes every outboxd service on its [http] listen port.
Exit status 1 on failure.
"""

import itertools
import pathlib
import sys
import tomllib

import yaml

import outboxd_toml

failed = 0


def report(ok, what, detail=""):
    global failed
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def main(compose_file):
    root = pathlib.Path(compose_file).parent
    spec = yaml.safe_load(pathlib.Path(compose_file).read_text())
    services = spec["services"]

    missing, undeclared = [], []
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            src = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if src.startswith((".", "/")):
                if not (root / src).exists():
                    missing.append(f"{name}: {src}")
            elif src not in (spec.get("volumes") or {}):
                undeclared.append(f"{name}: volume {src}")
        for sec in svc.get("secrets", []):
            src = sec if isinstance(sec, str) else sec["source"]
            if src not in (spec.get("secrets") or {}):
                undeclared.append(f"{name}: secret {src}")
        if "build" in svc:
            ctx = svc["build"] if isinstance(svc["build"], str) else svc["build"].get("context", ".")
            if not (root / ctx / "Dockerfile").exists():
                missing.append(f"{name}: {ctx}/Dockerfile")
    for name, sec in (spec.get("secrets") or {}).items():
        if "file" in sec and not (root / sec["file"]).exists():
            missing.append(f"secret {name}: {sec['file']}")
    report(not missing, "compose: referenced files exist", ", ".join(missing))
    report(not undeclared, "compose: volumes and secrets are declared", ", ".join(undeclared))

    profiles = sorted({p for svc in services.values() for p in svc.get("profiles", [])})
    for n in range(len(profiles) + 1):
        for active in itertools.combinations(profiles, n):
            enabled = {s for s, svc in services.items()
                       if not svc.get("profiles") or set(svc["profiles"]) & set(active)}
            problems = [f"{s} needs {d}" for s in enabled for d in services[s].get("depends_on", [])
                        if d not in enabled]
            ports = [str(p).split(":")[0] for s in enabled for p in services[s].get("ports", [])]
            problems += [f"host port {p} published twice" for p in set(ports) if ports.count(p) > 1]
            label = "+".join(active) or "no profile"
            report(not problems, f"compose --profile {label}: {len(enabled)} services", "; ".join(problems))

    slots, listen_ports = {}, {}
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            if isinstance(vol, str) and vol.split(":")[1] == "/etc/outboxd/outboxd.toml":
                text = (root / vol.split(":")[0]).read_text()
                problems = outboxd_toml.check(text)
                report(not problems, f"compose: {name} {vol.split(':')[0]}", "; ".join(problems) or "outboxd config contract")
                cfg = tomllib.loads(text)
                slots[name] = cfg.get("postgres", {}).get("slot", "outboxd")
                listen_ports[name] = cfg.get("http", {}).get("listen", "0.0.0.0:9187").rsplit(":", 1)[1]
    report(len(set(slots.values())) == len(slots), "compose: each outboxd has its own slot", str(slots))

    prom = next(((root / v.split(":")[0]) for svc in services.values() for v in svc.get("volumes", [])
                 if isinstance(v, str) and v.split(":")[1] == "/etc/prometheus/prometheus.yml"), None)
    targets = set()
    if prom is not None:
        for job in yaml.safe_load(prom.read_text()).get("scrape_configs", []):
            for sc in job.get("static_configs", []):
                targets.update(sc.get("targets", []))
    expected = {f"{name}:{port}" for name, port in listen_ports.items()}
    report(expected <= targets, "compose: prometheus scrapes every outboxd",
           f"missing {sorted(expected - targets)}" if expected - targets else ", ".join(sorted(expected)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
