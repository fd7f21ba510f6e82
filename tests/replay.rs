//! Black-box: `outboxd replay` republishes exactly the selected rows, with their
//! original ids, in order, without touching the slot.

use crate::support;

use std::collections::BTreeSet;
use std::process::Command;

use support::{config, read_stream, Nats, Postgres};

fn id(n: u32) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

fn replay(cfg: &str, args: &[&str]) -> (bool, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("outboxd.toml");
    std::fs::write(&path, cfg).expect("config");
    let o = Command::new(env!("CARGO_BIN_EXE_outboxd"))
        .args(["replay", "--config"])
        .arg(&path)
        .args(args)
        .output()
        .expect("replay");
    let out = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_selects_by_time_id_type_and_aggregate() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    // Given six rows: ids 1..6, a minute apart, over two types and two aggregates
    let db = pg.client().await;
    for n in 1..=6u32 {
        let (ty, agg) = if n % 2 == 0 {
            ("Payment", "a-2")
        } else {
            ("Order", "a-1")
        };
        db.execute(
            "INSERT INTO outbox (id, aggregate_type, aggregate_id, event_type, payload, created_at) \
             VALUES ($1::text::uuid, $2, $3, 'Happened', jsonb_build_object('n', $4::int), \
                     '2026-01-01T00:00:00Z'::timestamptz + make_interval(mins => $4::int))",
            &[&id(n), &ty, &agg, &(n as i32)],
        )
        .await
        .expect("insert");
    }
    let nats = Nats::start();
    let cfg = config(
        &pg,
        Some(&nats),
        &[("nats", "stream_subjects", r#"["outbox.>", "replay.>"]"#)],
    );
    let js = nats.jetstream().await;

    let cases: Vec<(Vec<&str>, Vec<u32>)> = vec![
        (vec![], vec![1, 2, 3, 4, 5, 6]),
        (
            vec![
                "--from",
                "2026-01-01T00:02:00Z",
                "--to",
                "2026-01-01T00:05:00Z",
            ],
            vec![2, 3, 4],
        ),
        (
            vec![
                "--from-id",
                "00000000-0000-4000-8000-000000000004",
                "--to-id",
                "00000000-0000-4000-8000-000000000005",
            ],
            vec![4, 5],
        ),
        (vec!["--aggregate-type", "Payment"], vec![2, 4, 6]),
        (
            vec![
                "--aggregate-id",
                "a-1",
                "--from-id",
                "00000000-0000-4000-8000-000000000002",
            ],
            vec![3, 5],
        ),
    ];
    for (args, want) in cases {
        // When the selection is replayed (into a fresh stream, so dedup cannot hide repeats)
        let _ = js.delete_stream("OUTBOX").await;
        let (ok, out) = replay(&cfg, &args);
        assert!(ok, "{args:?}: {out}");
        // Then exactly the matching rows arrive, with their original ids, in order
        let msgs = read_stream(&js, "OUTBOX").await;
        let got: Vec<String> = msgs
            .iter()
            .map(|m| m.header("ce-id").expect("id").to_string())
            .collect();
        let want: Vec<String> = want.into_iter().map(id).collect();
        assert_eq!(got, want, "{args:?}");
        assert!(
            out.contains(&format!("{} rows matched", got.len())),
            "{out}"
        );
    }

    // A destination prefix sends to other subjects; a dry run sends nothing
    let _ = js.delete_stream("OUTBOX").await;
    let (ok, out) = replay(
        &cfg,
        &[
            "--aggregate-type",
            "Order",
            "--destination-prefix",
            "replay.",
        ],
    );
    assert!(ok, "{out}");
    let subjects: BTreeSet<String> = read_stream(&js, "OUTBOX")
        .await
        .into_iter()
        .map(|m| m.subject)
        .collect();
    assert_eq!(
        subjects.into_iter().collect::<Vec<_>>(),
        ["replay.outbox.Order"]
    );
    let _ = js.delete_stream("OUTBOX").await;
    let (ok, out) = replay(&cfg, &["--dry-run", "--aggregate-id", "a-2"]);
    assert!(ok, "{out}");
    assert!(out.contains("3 rows matched, would publish 3"), "{out}");
    assert!(out.contains(&format!("would send {}", id(2))), "{out}");
    assert!(
        read_stream(&js, "OUTBOX").await.is_empty(),
        "a dry run publishes nothing"
    );
    // and no replay created or moved a slot
    assert_eq!(pg.confirmed_lsn("outboxd").await, None);
}
