"""Checks the Grafana dashboard and the alert rules against the metrics outboxd exports.

usage: metrics_check.py METRICS_RS DASHBOARD RULES RULE_TESTS [--promtool PATH]

- the exported names are the "outboxd_..." string literals of METRICS_RS
  (src/telemetry/metrics.rs, the one place that registers metrics), plus _bucket, _sum and
  _count for its histograms;
- DASHBOARD: valid JSON with title, uid, schemaVersion, time, panels and a
  datasource template variable of type prometheus; every panel except rows has
  that variable as its datasource, a gridPos inside the 24-column grid, and
  targets that each have a non-empty expr; panel ids are unique;
- every metric name in the dashboard's queries (panels and template variables),
  in the rules' exprs, in the tests' input series and exprs, and every
  "outboxd_..." word in the rules' and tests' text (annotations included) is
  exported: a typo in a metric name fails here instead of drawing an empty panel
  or an alert that can never fire;
- with --promtool: every dashboard query, its Grafana variables replaced, parses
  as PromQL (`promtool check rules` on recording rules made from them).
Exit status 1 if anything failed.
"""

import json
import pathlib
import re
import subprocess
import sys
import tempfile

import yaml

# Metrics any Prometheus has for its targets; the rules may use them.
PROMETHEUS_NAMES = {"up"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool",
            "and", "or", "unless", "atan2", "inf", "nan"}
GRID_COLUMNS = 24
failed = 0


def report(ok, what, detail=""):
    global failed
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def exported_names(metrics_rs):
    """Names registered in src/telemetry/metrics.rs (its tests excluded), histogram series included."""
    text = metrics_rs.read_text().split("#[cfg(test)]")[0]
    names = set(re.findall(r'"(outboxd_[a-z0-9_]+)"', text))
    for hist in re.findall(r'HistogramOpts::new\(\s*"(outboxd_[a-z0-9_]+)"', text):
        names |= {hist + "_bucket", hist + "_sum", hist + "_count"}
    if "ProcessCollector" in text:  # the prometheus crate's process metrics (Linux)
        names |= {"process_cpu_seconds_total", "process_open_fds", "process_max_fds",
                  "process_virtual_memory_bytes", "process_resident_memory_bytes",
                  "process_start_time_seconds"}
    return names


def promql_metric_names(expr):
    """Metric names selected by a PromQL expression (Grafana variables allowed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)  # strings
    s = re.sub(r"\{[^}]*\}", "", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", "", s)  # ranges and subqueries
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", s)  # label lists
    s = re.sub(r"\$\{?\w+\}?", "", s)  # Grafana variables
    names = []
    for m in re.finditer(r"(?<![\w.:])[a-zA-Z_:][\w:]*", s):
        if m.group(0) in KEYWORDS or re.match(r"\s*\(", s[m.end():]):
            continue  # a keyword or a function
        names.append(m.group(0))
    return names


def variable_query_names(query):
    """Metric names of a Prometheus template variable query (label_values, query_result)."""
    m = re.fullmatch(r"\s*label_values\((.*)\)\s*", query, re.S)
    if m:
        args = m.group(1).rsplit(",", 1)
        return promql_metric_names(args[0]) if len(args) == 2 else []
    m = re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S)
    return promql_metric_names(m.group(1) if m else query)


def check_names(where, names, known):
    unknown = sorted(set(names) - known)
    report(not unknown, f"{where}: metric names",
           f"not exported by outboxd: {', '.join(unknown)}" if unknown else ", ".join(sorted(set(names))))


def all_panels(panels):
    for p in panels:
        yield p
        yield from all_panels(p.get("panels", []))  # collapsed rows nest their panels


def check_dashboard(path, known, promtool):
    try:
        d = json.loads(path.read_text())
    except ValueError as e:
        report(False, f"{path} is JSON", str(e))
        return
    report(True, f"{path} is JSON")
    missing = [k for k in ("title", "uid", "schemaVersion", "time", "panels", "templating") if not d.get(k)]
    report(not missing, f"{path} top-level fields", f"missing or empty: {', '.join(missing)}" if missing
           else f"title {d['title']!r}, uid {d['uid']!r}, schemaVersion {d['schemaVersion']}")
    if missing:
        return
    variables = d["templating"].get("list", [])
    ds_vars = [v["name"] for v in variables if v.get("type") == "datasource" and v.get("query") == "prometheus"]
    report(bool(ds_vars), f"{path} has a Prometheus datasource variable", ", ".join(ds_vars))
    ds_uids = {f"${{{n}}}" for n in ds_vars} | {f"${n}" for n in ds_vars}

    queries = []  # (panel_<id>_<refId>, expr)
    for v in variables:
        if v.get("type") != "query":
            continue
        where = f"variable ${v.get('name')}"
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else q or ""
        report((v.get("datasource") or {}).get("uid") in ds_uids, f"{where} datasource", str(v.get("datasource")))
        check_names(where, variable_query_names(q), known)

    panels = list(all_panels(d["panels"]))
    ids = [p.get("id") for p in panels]
    report(len(ids) == len(set(ids)) and None not in ids, f"{path} panel ids are unique")
    for p in panels:
        where = f"panel {p.get('id')} {p.get('title')!r}"
        grid = p.get("gridPos") or {}
        fits = all(isinstance(grid.get(k), int) for k in "hwxy") and grid["x"] + grid["w"] <= GRID_COLUMNS
        if p.get("type") == "row":
            report(fits, f"{where} (row) gridPos", str(grid))
            continue
        problems = []
        if not fits:
            problems.append(f"gridPos {grid} is not inside the grid")
        if (p.get("datasource") or {}).get("uid") not in ds_uids:
            problems.append(f"datasource {p.get('datasource')} is not the datasource variable")
        targets = p.get("targets") or []
        if not targets:
            problems.append("no targets")
        for t in targets:
            if not (t.get("expr") or "").strip():
                problems.append(f"target {t.get('refId')} has no expr")
            if "datasource" in t and (t["datasource"] or {}).get("uid") not in ds_uids:
                problems.append(f"target {t.get('refId')} datasource {t['datasource']}")
            queries.append((f"panel_{p.get('id')}_{t.get('refId')}", t.get("expr") or ""))
        names = sorted({n for t in targets for n in promql_metric_names(t.get("expr") or "")})
        unknown = [n for n in names if n not in known]
        if unknown:
            problems.append(f"metrics not exported by outboxd: {', '.join(unknown)}")
        if targets and not any(n.startswith(("outboxd_", "process_")) for n in names):
            problems.append("queries no outboxd metric")
        report(not problems, where, "; ".join(problems) or f"{len(targets)} target(s), metrics {', '.join(names)}")

    shown = {n for _, e in queries for n in promql_metric_names(e)}
    unused = sorted(n for n in known - shown - PROMETHEUS_NAMES
                    if not n.endswith(("_bucket", "_sum", "_count")) and n + "_bucket" not in known)
    print(f"note {path}: exported metrics not on the dashboard: {', '.join(unused) or 'none'}")
    if promtool:
        check_promql(path, queries, promtool)


def check_promql(path, queries, promtool):
    """Parses every query with promtool, as recording rules (YAML is a superset of JSON)."""
    def concrete(expr):
        expr = re.sub(r"\$\{?__\w+\}?", "5m", expr)  # $__rate_interval, $__interval, ...
        return re.sub(r"\$\{?[a-zA-Z_]\w*\}?", ".*", expr)  # $namespace, ${job}; "$1" stays
    rules = [{"record": name, "expr": concrete(e)} for name, e in queries]  # name: panel_<id>_<refId>
    with tempfile.NamedTemporaryFile("w", suffix=".rules.json", delete=False) as f:
        json.dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    try:
        proc = subprocess.run([promtool, "check", "rules", f.name], capture_output=True, text=True)
    except OSError as e:
        report(False, f"{path}: queries parse as PromQL", f"cannot run promtool: {e}")
        return
    finally:
        pathlib.Path(f.name).unlink()
    detail = (proc.stdout + proc.stderr).strip().splitlines()
    report(proc.returncode == 0, f"{path}: {len(queries)} queries parse as PromQL (promtool)",
           detail[-1].strip() if proc.returncode == 0 else " | ".join(detail))


def check_rules(rules_path, tests_path, known):
    rules = yaml.safe_load(rules_path.read_text())
    for group in rules.get("groups", []):
        for rule in group.get("rules", []):
            name = rule.get("alert") or rule.get("record")
            check_names(f"{rules_path} {name}", promql_metric_names(str(rule.get("expr", ""))), known)
    tests = yaml.safe_load(tests_path.read_text())
    series, exprs = [], []
    for test in tests.get("tests", []):
        series += [s["series"].split("{")[0].strip() for s in test.get("input_series", [])]
        exprs += [e["expr"] for e in test.get("promql_expr_test", [])]
    check_names(f"{tests_path} input series", series, known)
    check_names(f"{tests_path} exprs", [n for e in exprs for n in promql_metric_names(e)], known)
    for path in (rules_path, tests_path):  # annotations and comments too
        words = re.findall(r"(?<![\w])outboxd_[a-z0-9_]+", path.read_text())
        check_names(f"{path} text", words, known)


def main(args):
    promtool = None
    if "--promtool" in args:
        i = args.index("--promtool")
        promtool = args[i + 1]
        del args[i:i + 2]
    metrics_rs, dashboard, rules, tests = map(pathlib.Path, args)
    known = exported_names(metrics_rs)
    report(len(known) >= 20, f"{metrics_rs} registers {len(known)} metric series names")
    known |= PROMETHEUS_NAMES
    check_dashboard(dashboard, known, promtool)
    check_rules(rules, tests, known)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
