"""outboxd's configuration keys, read from the Rust structs that define them.

The config structs carry `#[serde(deny_unknown_fields, ...)]`; starting from
`struct Config`, every field is a key, and a field whose type is another such struct
is a table of its own. Scans every src/**/*.rs file, so it does not depend on which
file holds which struct. No serde renames are used on these fields (checked: a
`#[serde(rename` or `alias` on a field makes this module fail rather than guess).

    keys(root) -> {"postgres": {"slot": None, ..., "columns": {...}, "tls": {...}}, ...}

A leaf is None; a map-typed field (BTreeMap, HashMap) is the string "map": its keys
are free (kafka.properties).
"""

import pathlib
import re

STRUCT = re.compile(r"#\[serde\(([^)]*)\)\]\s*pub(?:\([a-z]+\))?\s+struct\s+(\w+)\s*\{(.*?)\n\}", re.S)
FIELD = re.compile(r"^\s*(?:pub(?:\([a-z]+\))?\s+)?(\w+)\s*:\s*([^\n]+?),\s*$", re.M)


class ParseError(Exception):
    pass


def _structs(src_dir):
    structs = {}
    for path in sorted(pathlib.Path(src_dir).rglob("*.rs")):
        text = path.read_text()
        for m in STRUCT.finditer(text):
            attrs, name, body = m.groups()
            if "deny_unknown_fields" not in attrs:
                continue
            if re.search(r"#\[serde\((rename|alias)", body):
                raise ParseError(f"{path}: struct {name} renames a field; teach rust_config.py")
            # Drop comments, so that doc text cannot look like a field.
            body = re.sub(r"//[^\n]*", "", body)
            structs[name] = [(f, t.strip()) for f, t in FIELD.findall(body)]
    return structs


def keys(src_dir="src", root="Config"):
    structs = _structs(src_dir)
    if root not in structs:
        raise ParseError(f"no `struct {root}` with deny_unknown_fields under {src_dir}")

    def walk(name, seen):
        table = {}
        for field, ty in structs[name]:
            base = re.sub(r"^Option<(.*)>$", r"\1", ty)
            if base in structs and base not in seen:
                table[field] = walk(base, seen | {base})
            elif re.match(r"^(BTreeMap|HashMap)<", base):
                table[field] = "map"
            else:
                table[field] = None
        if not table:
            raise ParseError(f"struct {name} has no fields that rust_config.py can read")
        return table

    return walk(root, {root})


def flatten(tree, prefix=""):
    """Dotted names of every key: postgres.slot, postgres.tls.mode, kafka.properties, ..."""
    out = []
    for k, v in tree.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out += flatten(v, name + ".")
        else:
            out.append(name)
    return out


if __name__ == "__main__":
    import sys
    print("\n".join(flatten(keys(sys.argv[1] if len(sys.argv) > 1 else "src"))))
