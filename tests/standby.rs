//! Black-box: three outboxd replicas on one slot. Exactly one streams, the others
//! are ready standbys; SIGKILL and SIGTERM hand the slot over while rows are written,
//! and every row still arrives in per-aggregate order.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use support::{
    config, free_port, http_get, metric, read_stream, stream_len, wait_for, Nats, Postgres, Relay,
};

/// How often standbys try to take over (the default is 1000).
const STANDBY_POLL_MS: &str = "200";

struct Replica {
    relay: Relay,
    port: u16,
}

impl Replica {
    fn streaming(&self) -> Option<bool> {
        let (_, body) = http_get(self.port, "/metrics")?;
        metric(&body, "outboxd_streaming").map(|v| v == 1.0)
    }
    fn role(&self) -> Option<String> {
        let (_, body) = http_get(self.port, "/status")?;
        let v: serde_json::Value = serde_json::from_str(&body).ok()?;
        v["role"].as_str().map(str::to_string)
    }
}

/// Index of the single streaming replica once every live replica answers, exactly
/// one streams and the others report `standby`. A replica that exits fails the test:
/// one that crashes at once must not pass for a standby that has not answered yet.
async fn single_leader(replicas: &mut [Option<Replica>], timeout: Duration) -> Option<usize> {
    let deadline = Instant::now() + timeout;
    loop {
        for r in replicas.iter_mut().flatten() {
            if let Some(status) = r.relay.try_exit() {
                panic!("a replica exited ({status}): {}", r.relay.stderr());
            }
        }
        let states: Vec<(usize, Option<(bool, String)>)> = replicas
            .iter()
            .enumerate()
            .filter_map(|(i, r)| Some((i, r.as_ref()?)))
            .map(|(i, r)| (i, r.streaming().zip(r.role())))
            .collect();
        if states.iter().all(|(_, s)| s.is_some()) {
            let leaders: Vec<usize> = states
                .iter()
                .filter(|(_, s)| matches!(s, Some((true, _))))
                .map(|(i, _)| *i)
                .collect();
            let standbys_ok = states
                .iter()
                .filter(|(i, _)| !leaders.contains(i))
                .all(|(_, s)| matches!(s, Some((false, role)) if role == "standby"));
            if leaders.len() == 1 && standbys_ok {
                return Some(leaders[0]);
            }
        }
        if Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_streams_standbys_take_over_on_sigkill_and_sigterm() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();
    let spawn = || {
        let port = free_port();
        let listen = format!("\"127.0.0.1:{port}\"");
        let cfg = config(
            &pg,
            Some(&nats),
            &[
                ("http", "listen", &listen),
                ("postgres", "standby_poll_ms", STANDBY_POLL_MS),
            ],
        );
        Replica {
            relay: Relay::spawn(&cfg),
            port,
        }
    };
    let mut replicas: Vec<Option<Replica>> = vec![Some(spawn()), Some(spawn()), Some(spawn())];

    // Given three replicas: exactly one streams, two are ready standbys
    let leader = single_leader(&mut replicas, Duration::from_secs(30))
        .await
        .expect("one leader");
    pg.wait_streaming("outboxd").await;
    for r in replicas.iter().flatten() {
        assert_eq!(
            http_get(r.port, "/readyz").map(|x| x.0),
            Some(200),
            "standbys are ready"
        );
        assert_eq!(http_get(r.port, "/healthz").map(|x| x.0), Some(200));
    }

    // and a writer committing rows over 40 aggregates the whole time
    let writer_db = pg.client().await;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_w = stop.clone();
    let writer = tokio::spawn(async move {
        let mut ids = Vec::new();
        let mut n = 0i64;
        while !stop_w.load(std::sync::atomic::Ordering::Relaxed) {
            n += 1;
            let id: String = writer_db
                .query_one(
                    "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
                     VALUES ('Order', $1, 'Updated', jsonb_build_object('n', $2::bigint)) RETURNING id::text",
                    &[&format!("agg-{}", n % 40), &n],
                )
                .await
                .expect("insert")
                .get(0);
            ids.push(id);
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        ids
    });

    // When the leader is killed (SIGKILL), then the next one is stopped (SIGTERM), twice
    let mut leader = leader;
    let mut takeovers = Vec::new();
    for round in 0..4 {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let sigterm = round % 2 == 1;
        let mut old = replicas[leader].take().expect("leader");
        let t0 = Instant::now();
        if sigterm {
            let status = old.relay.terminate(Duration::from_secs(20)).expect("exits");
            assert!(status.success(), "SIGTERM exit {status:?}");
        } else {
            old.relay.kill();
        }
        // Then a standby takes over
        let next = single_leader(&mut replicas, Duration::from_secs(30))
            .await
            .expect("takeover");
        takeovers.push((if sigterm { "SIGTERM" } else { "SIGKILL" }, t0.elapsed()));
        assert_ne!(next, leader);
        // and the stopped replica comes back as a standby
        old.relay.start();
        replicas[leader] = Some(old);
        leader = single_leader(&mut replicas, Duration::from_secs(30))
            .await
            .expect("stable");
        assert_eq!(
            leader, next,
            "the new leader keeps the slot when the old one returns"
        );
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let ids: HashSet<String> = writer.await.expect("writer").into_iter().collect();

    // Then every row arrives, in per-aggregate order
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(60), || async {
            stream_len(&js, "OUTBOX").await >= ids.len() as u64
        })
        .await,
        "only {} of {} arrived",
        stream_len(&js, "OUTBOX").await,
        ids.len()
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    let got: HashSet<String> = msgs
        .iter()
        .map(|m| m.header("ce-id").expect("id").to_string())
        .collect();
    assert_eq!(got, ids);
    let mut last: HashMap<String, i64> = HashMap::new();
    for m in &msgs {
        let n = serde_json::from_slice::<serde_json::Value>(&m.payload).expect("json")["n"]
            .as_i64()
            .expect("n");
        let agg = m.header("ce-subject").expect("subject").to_string();
        if let Some(prev) = last.insert(agg.clone(), n) {
            assert!(n > prev, "{agg}: {n} after {prev}");
        }
    }
    // and leadership changes were counted on the current leader
    let leader_metrics = http_get(replicas[leader].as_ref().expect("leader").port, "/metrics")
        .expect("scrape")
        .1;
    assert!(metric(&leader_metrics, "outboxd_leadership_changes_total").unwrap_or(0.0) >= 1.0);
    for (how, took) in &takeovers {
        println!(
            "takeover after {how}: {} ms (standby_poll_ms = {STANDBY_POLL_MS})",
            took.as_millis()
        );
    }
}

/// Replicas that start together all find no publication and all create it; the ones
/// that lose that race carry on as replicas instead of exiting. Made deterministic by
/// holding the "other replica's" CREATE PUBLICATION open until the relay's own one
/// waits for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_race_to_create_the_publication_is_not_an_error() {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let nats = Nats::start();

    // Given another replica's CREATE PUBLICATION, not committed yet
    let mut other = pg.client().await;
    let tx = other.transaction().await.expect("begin");
    tx.batch_execute(
        "CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert')",
    )
    .await
    .expect("create publication in the open transaction");

    // When the relay's own CREATE PUBLICATION waits for it, and it then commits
    let port = free_port();
    let listen = format!("\"127.0.0.1:{port}\"");
    let mut relay = Relay::spawn(&config(&pg, Some(&nats), &[("http", "listen", &listen)]));
    let probe = pg.client().await;
    let waiting = wait_for(Duration::from_secs(30), || {
        let probe = &probe;
        async move {
            probe
                .query_opt(
                    "SELECT 1 FROM pg_stat_activity WHERE wait_event_type = 'Lock' \
                     AND query ILIKE 'CREATE PUBLICATION%' AND backend_type = 'client backend'",
                    &[],
                )
                .await
                .expect("pg_stat_activity")
                .is_some()
        }
    })
    .await;
    assert!(
        waiting,
        "the relay's CREATE PUBLICATION waits for the open one"
    );
    tx.commit().await.expect("commit");

    // Then the relay streams, stays up and delivers
    pg.wait_streaming("outboxd").await;
    assert!(relay.try_exit().is_none(), "the relay is still running");
    let db = pg.client().await;
    let id = support::insert_event(&db, "race-1", 1)
        .await
        .expect("insert");
    let js = nats.jetstream().await;
    assert!(
        wait_for(Duration::from_secs(30), || {
            let js = &js;
            async move { stream_len(js, "OUTBOX").await >= 1 }
        })
        .await,
        "the row is delivered"
    );
    let msgs = read_stream(&js, "OUTBOX").await;
    assert_eq!(msgs.len(), 1);
    assert_eq!(msgs[0].header("ce-id"), Some(id.as_str()));
    assert_eq!(http_get(port, "/readyz").map(|x| x.0), Some(200));
}
