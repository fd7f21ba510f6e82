"""Every configuration key is documented, and settable from the Helm chart.

usage: config_keys.py SRC_DIR CONFIG_TOML REFERENCE_MD VALUES_SCHEMA

The keys are those of the Rust config structs (rust_config.py). Checks that
- CONFIG_TOML (config/outboxd.toml, "every key with its default") names each one,
  set or commented out, under its section header;
- REFERENCE_MD (docs/configuration.md) names each one as `section.key`, and names
  no `section.key` that does not exist (a typo or a removed key);
- VALUES_SCHEMA (the chart's values.schema.json) accepts each one under `config`,
  except the chart's own keys and the secret values, which it must refuse, and
  accepts nothing else there.
Exit status 1 on failure.
"""

import json
import pathlib
import re
import sys
import tomllib

import rust_config

# Set by the chart from other values, or secret values that must not reach a ConfigMap.
CHART_OWNED = {"postgres.url_file": "secret.postgresUrlKey", "nats.url_file": "secret.natsUrlKey",
               "http.listen": "httpPort"}
SECRETS = {"postgres.url", "nats.password", "nats.token", "nats.nkey_seed",
           "http.bearer_token", "http.basic_auth_password"}
HEADER = re.compile(r"^#?\s*\[([A-Za-z0-9_.]+)\]")
failed = 0


def report(ok, what, detail=""):
    global failed
    failed += not ok
    print(f"{'ok  ' if ok else 'FAIL'} {what}{': ' + detail if detail else ''}")


def documented(config_toml):
    """{section: {key: value}} of every key line of the file, commented out or not.

    A commented line counts when it parses as TOML on its own (`# url_file = "/x"  #
    why`); prose comments do not. Returns the keys in dotted form and the values.
    """
    section, found = None, {}
    for line in pathlib.Path(config_toml).read_text().splitlines():
        m = HEADER.match(line)
        if m:
            section = m.group(1)
            continue
        body = line[1:] if line.startswith("#") else line
        if section is None or "=" not in body:
            continue
        try:
            kv = tomllib.loads(body.strip())
        except tomllib.TOMLDecodeError:
            continue
        for key, value in kv.items():
            if not isinstance(value, dict):
                found[f"{section}.{key}"] = value
    return found


def schema_keys(schema, prefix=""):
    """Dotted keys the schema's `config` accepts; a free-form map counts as a leaf."""
    out = set()
    for key, sub in (schema.get("properties") or {}).items():
        name = f"{prefix}{key}"
        if sub.get("type") == "object" and sub.get("additionalProperties") is False:
            out |= schema_keys(sub, name + ".")
        else:
            out.add(name)
    return out


def main(src, config_toml, reference, values_schema):
    tree = rust_config.keys(src)
    keys = set(rust_config.flatten(tree))
    maps = {k for k in keys if _is_map(tree, k)}
    report(len(keys) > 50, f"{len(keys)} keys in the config structs under {src}")

    doc = documented(config_toml)
    names = {k for k in doc if not any(k.startswith(m + ".") for m in maps)}
    missing = sorted(keys - names - maps) + sorted(m for m in maps if not any(k.startswith(m + ".") for k in doc))
    report(not missing, f"{config_toml} names every key", ", ".join(missing) or f"{len(keys)} keys")
    extra = sorted(names - keys)
    report(not extra, f"{config_toml} names no unknown key", ", ".join(extra))

    text = pathlib.Path(reference).read_text()
    mentioned = set(re.findall(r"`((?:%s)\.[a-z_.]+)`" % "|".join(tree), text))
    missing = sorted(keys - mentioned)
    report(not missing, f"{reference} names every key", ", ".join(missing) or f"{len(keys)} keys")
    unknown = sorted(m for m in mentioned - keys
                     if not any(m.startswith(k + ".") for k in maps) and m not in tree_tables(tree))
    report(not unknown, f"{reference} names no unknown key", ", ".join(unknown))

    schema = json.loads(pathlib.Path(values_schema).read_text())
    accepted = schema_keys(schema["properties"]["config"])
    want = keys - set(CHART_OWNED) - SECRETS
    missing = sorted(want - accepted)
    report(not missing, f"{values_schema} accepts every key under config",
           ", ".join(missing) or f"{len(want)} keys; set by the chart: "
           + ", ".join(f"{k} ({v})" for k, v in CHART_OWNED.items()))
    wrong = sorted(accepted - want)
    report(not wrong, f"{values_schema} accepts no secret, chart-owned or unknown key under config",
           ", ".join(wrong) or "refused: " + ", ".join(sorted(SECRETS)))
    return 1 if failed else 0


def _is_map(tree, dotted):
    node = tree
    for part in dotted.split("."):
        node = node[part]
    return node == "map"


def tree_tables(tree, prefix=""):
    out = set()
    for k, v in tree.items():
        if isinstance(v, dict):
            out.add(prefix + k)
            out |= tree_tables(v, prefix + k + ".")
    return out


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:5]))
