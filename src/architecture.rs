//! The dependency rule, enforced: every `crate::` path in `src/` must point down the
//! flow of a row,
//!
//! ```text
//! main → commands → relay → {retention, http} → sink → event → source
//!      → telemetry → {backoff, route, lsn} → config
//! ```
//!
//! never up it and never sideways to a module of the same floor, so no module loop can
//! form. `retention` and `http` are services the supervisor starts next to the relay;
//! `telemetry` prints positions with `lsn`, so it sits above the other leaves.
//! `config` also names no client crate (it checks shape; what a value means is checked
//! by the module that owns it). Imports inside one top-level module (`super::`,
//! `crate::source::…` from `source/`) are that module's own business.
//!
//! Reads the source text, so it also covers `#[cfg(test)]` code and `pub use`.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// Top-level modules from the top of the flow to the bottom; a module may import
/// only modules on a later floor.
const FLOORS: &[&[&str]] = &[
    &["commands"],
    &["relay"],
    &["retention", "http"],
    &["sink"],
    &["event"],
    &["source"],
    &["telemetry"],
    &["backoff", "route", "lsn"],
    &["config"],
];

/// Client crates that `config` must not name.
const CLIENT_CRATES: &[&str] = &[
    "async_nats",
    "tokio_postgres",
    "postgres_openssl",
    "rdkafka",
    "pgwire_replication",
    "rustls",
];

fn floor(module: &str) -> Option<usize> {
    FLOORS.iter().position(|f| f.contains(&module))
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let entries = std::fs::read_dir(dir).expect("src/ is readable");
    for entry in entries {
        let path = entry.expect("a directory entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The top-level module a file belongs to: `source` for `src/source/tls/mod.rs`,
/// `lsn` for `src/lsn.rs`; `None` for `lib.rs`, `main.rs` (above everything) and
/// this file (its test text names modules).
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).expect("a file under src/");
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (!matches!(name, "lib" | "main" | "architecture")).then(|| name.to_string())
}

/// The code of `text` without `//` comments (doc links are not dependencies); a
/// `//` right after a `:` is a URL in a string and stays.
fn code(text: &str) -> String {
    text.lines()
        .map(|line| {
            let mut cut = line.len();
            let bytes = line.as_bytes();
            for i in 0..bytes.len().saturating_sub(1) {
                if bytes[i] == b'/' && bytes[i + 1] == b'/' && (i == 0 || bytes[i - 1] != b':') {
                    cut = i;
                    break;
                }
            }
            &line[..cut]
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The top-level modules that `code` names through `crate::`: `crate::sink::Sink`,
/// and each member of a group, `use crate::{config::Config, event};`.
fn crate_imports(code: &str) -> BTreeSet<String> {
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        // `outboxd_crate::` or `some_crate::` are other paths.
        let before = rest[..i].chars().next_back();
        rest = &rest[i + "crate::".len()..];
        if before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest_trim = rest.trim_start();
        if let Some(group) = rest_trim.strip_prefix('{') {
            // Only the first segment of each top-level member of the group.
            let mut depth = 0;
            let mut member = String::new();
            let mut at_start = true;
            for c in group.chars() {
                match c {
                    '{' => depth += 1,
                    '}' if depth == 0 => break,
                    '}' => depth -= 1,
                    ',' if depth == 0 => {
                        at_start = true;
                        member.clear();
                        continue;
                    }
                    _ => {}
                }
                if depth == 0 && at_start {
                    if c.is_alphanumeric() || c == '_' {
                        member.push(c);
                    } else if !member.is_empty() {
                        found.insert(std::mem::take(&mut member));
                        at_start = false;
                    }
                }
            }
            if at_start && !member.is_empty() {
                found.insert(member);
            }
        } else {
            let name: String = rest_trim
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() {
                found.insert(name);
            }
        }
    }
    found
}

/// Every import in `src/` that breaks the rule, as `file: import (why)`.
fn violations(src: &Path) -> Vec<String> {
    let mut files = Vec::new();
    rust_files(src, &mut files);
    files.sort();
    let mut bad = Vec::new();
    for file in &files {
        let Some(module) = module_of(src, file) else {
            continue;
        };
        let shown = file
            .strip_prefix(src.parent().unwrap_or(src))
            .unwrap_or(file);
        let Some(own) = floor(&module) else {
            bad.push(format!(
                "{}: module `{module}` has no place in the flow (add it to FLOORS)",
                shown.display()
            ));
            continue;
        };
        let text = code(&std::fs::read_to_string(file).expect("a readable source file"));
        for target in crate_imports(&text) {
            if target == module {
                continue;
            }
            match floor(&target) {
                Some(f) if f > own => {}
                Some(f) if f == own => bad.push(format!(
                    "{}: imports `crate::{target}`, beside `{module}` on the same floor",
                    shown.display()
                )),
                Some(_) => bad.push(format!(
                    "{}: imports `crate::{target}`, which is upstream of `{module}`",
                    shown.display()
                )),
                None => bad.push(format!(
                    "{}: imports `crate::{target}`, which has no place in the flow",
                    shown.display()
                )),
            }
        }
        if module == "config" {
            for client in CLIENT_CRATES {
                if text.contains(&format!("{client}::")) {
                    bad.push(format!(
                        "{}: names the client crate `{client}`; config checks shape only",
                        shown.display()
                    ));
                }
            }
        }
    }
    bad
}

#[test]
fn imports_run_down_the_flow() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let bad = violations(&src);
    assert!(
        bad.is_empty(),
        "imports against the flow (see src/architecture.rs):\n  {}",
        bad.join("\n  ")
    );
}

#[test]
fn paths_and_groups_are_found() {
    let text = code(
        "use crate::config::{A, B};\nuse crate::{event::{self, E}, sink , lsn::lsn_text};\n\
         let x = crate::route::Template::parse(s); // crate::relay in a comment\n\
         let u = \"nats://h\"; other_crate::x;",
    );
    let found: Vec<String> = crate_imports(&text).into_iter().collect();
    assert_eq!(found, ["config", "event", "lsn", "route", "sink"]);
}
