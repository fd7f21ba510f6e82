"""The operations page lists every metric and every alert.

usage: docs_lists.py METRICS_RS ALERTS_YML OPERATIONS_MD

Every metric src/telemetry/metrics.rs registers has a row in OPERATIONS_MD's metrics table
(the house rule: each metric is documented with its meaning), and every alert of
ALERTS_YML has a row in its alerts table; neither table names one that does not
exist. Exit status 1 on failure.
"""

import re
import sys

import yaml

from metrics_check import exported_names


def rows(text, pattern):
    return set(re.findall(r"^\| `(%s)` \|" % pattern, text, re.M))


def main(metrics_rs, alerts_yml, operations_md):
    import pathlib
    failed = 0
    text = pathlib.Path(operations_md).read_text()
    names = {n for n in exported_names(pathlib.Path(metrics_rs))
             if not re.search(r"_(bucket|sum|count)$", n)}
    alerts = {r["alert"] for g in yaml.safe_load(pathlib.Path(alerts_yml).read_text())["groups"] for r in g["rules"]}
    for what, want, have in (("metric", names, rows(text, r"(?:outboxd|process)_[a-z0-9_]+")),
                             ("alert", alerts, rows(text, r"Outboxd[A-Za-z]+"))):
        missing, unknown = sorted(want - have), sorted(have - want)
        ok = not missing and not unknown
        failed += not ok
        detail = "; ".join(filter(None, [missing and "missing: " + ", ".join(missing),
                                          unknown and "unknown: " + ", ".join(unknown)]))
        print(f"{'ok  ' if ok else 'FAIL'} {operations_md} lists every {what}: {detail or f'{len(want)} rows'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
