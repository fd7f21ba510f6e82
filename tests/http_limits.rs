//! Black-box: the HTTP endpoints under a slowloris attack, against a real relay
//! (Postgres, stdout sink). Idle, trickling and kept-alive connections are closed in
//! bounded time, `/healthz` keeps answering, and the relay's own connections never
//! run out of file descriptors.

use crate::support;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use support::secure::http_port;
use support::{config, insert_event, wait_for, Postgres, Relay};

/// `http.header_read_timeout_ms` of the relay under test.
const HEADER_TIMEOUT: Duration = Duration::from_millis(2000);
/// `http.max_connection_age_secs` of the relay under test.
const MAX_AGE: Duration = Duration::from_secs(3);
/// What a loaded 2-core machine may add to a timeout before the socket is closed.
const SLACK: Duration = Duration::from_secs(2);
/// Slowloris clients at once: more than the relay may hold.
const TRICKLERS: usize = 300;
/// How long the slowloris clients keep at it, reconnecting when closed.
const ATTACK: Duration = Duration::from_secs(10);

fn relay_config(pg: &Postgres) -> String {
    config(
        pg,
        None,
        &[
            ("http", "header_read_timeout_ms", "2000"),
            ("http", "max_connection_age_secs", "3"),
            ("postgres", "heartbeat_interval_secs", "0"),
        ],
    )
}

/// How long the server kept a connection open, from connect to EOF or reset; `None`
/// when it was still open after `give_up`.
type Closed = Option<Duration>;

/// Reads until the server closes (EOF or error) while `tick` writes every 500 ms.
async fn hold(port: u16, first: &'static [u8], tick: &'static [u8], give_up: Duration) -> Closed {
    let start = Instant::now();
    let Ok(stream) = TcpStream::connect(("127.0.0.1", port)).await else {
        return Some(Duration::ZERO);
    };
    let (mut rd, mut wr) = stream.into_split();
    if wr.write_all(first).await.is_err() {
        return Some(start.elapsed());
    }
    let mut every = tokio::time::interval(Duration::from_millis(500));
    every.tick().await;
    let deadline = tokio::time::sleep(give_up);
    tokio::pin!(deadline);
    let mut buf = [0u8; 4096];
    loop {
        tokio::select! {
            _ = &mut deadline => return None,
            read = rd.read(&mut buf) => match read {
                Ok(0) | Err(_) => return Some(start.elapsed()),
                Ok(_) => {}
            },
            _ = every.tick(), if !tick.is_empty() => {
                if wr.write_all(tick).await.is_err() {
                    return Some(start.elapsed());
                }
            }
        }
    }
}

/// Slowloris: request heads that never end, one byte every 500 ms, on a new
/// connection whenever the server closes one, until `until`. How long each lasted.
async fn trickle(port: u16, until: Instant, give_up: Duration) -> Vec<Closed> {
    let mut lasted = Vec::new();
    while Instant::now() < until {
        let closed = hold(
            port,
            b"GET /healthz HTTP/1.1\r\nHost: outboxd\r\nX-Slow: ",
            b"a",
            give_up,
        )
        .await;
        lasted.push(closed);
        // The attacker's own pace between connections, not a wait on the test.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    lasted
}

/// One complete keep-alive request, then silence.
async fn idle_after_one_request(port: u16, give_up: Duration) -> Closed {
    hold(
        port,
        b"GET /healthz HTTP/1.1\r\nHost: outboxd\r\n\r\n",
        b"",
        give_up,
    )
    .await
}

/// A connection kept busy with a complete request every 500 ms, forever.
async fn keep_alive_forever(port: u16, give_up: Duration) -> Closed {
    const REQUEST: &[u8] = b"GET /healthz HTTP/1.1\r\nHost: outboxd\r\n\r\n";
    hold(port, REQUEST, REQUEST, give_up).await
}

/// `GET /healthz` every 200 ms from a thread of its own (so the test's runtime cannot
/// delay it) until `stop`; each probe's status (0: no answer) and duration.
fn probe_healthz(
    port: u16,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u16, Duration)>> {
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        let mut probes = Vec::new();
        while !stop.load(Ordering::Relaxed) {
            let start = Instant::now();
            let status = (|| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
                let mut s =
                    std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(1))).ok()?;
                s.write_all(b"GET /healthz HTTP/1.0\r\nHost: kubelet\r\n\r\n")
                    .ok()?;
                let mut raw = String::new();
                s.read_to_string(&mut raw).ok()?;
                raw.split_whitespace().nth(1)?.parse::<u16>().ok()
            })()
            .unwrap_or(0);
            probes.push((status, start.elapsed()));
            std::thread::sleep(Duration::from_millis(200));
        }
        probes
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slowloris_connections_are_closed_and_never_starve_the_relay() {
    // Given a relay whose process starts with 128 open files allowed (raisable to
    // 256), as a container runtime might set it
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = relay_config(&pg);
    let port = http_port(&cfg);
    let mut relay = Relay::spawn_with_nofile(&cfg, 128, 256);
    pg.wait_streaming("outboxd").await;
    let limits = relay.nofile_limits();

    // When one client idles after a request and another keeps its connection busy
    let give_up = Duration::from_secs(20);
    let idle = tokio::spawn(idle_after_one_request(port, give_up));
    let busy = tokio::spawn(keep_alive_forever(port, give_up));
    // Then the idle one is closed after the header timeout, the busy one at its
    // maximum age
    let idle = idle.await.expect("idle client");
    let busy = busy.await.expect("busy client");

    // When 300 slowloris clients trickle request heads for 10 s (reconnecting when
    // closed), while the kubelet probes /healthz and Postgres restarts
    let stop = Arc::new(AtomicBool::new(false));
    let prober = probe_healthz(port, stop.clone());
    let attack_end = Instant::now() + ATTACK;
    let tricklers: Vec<_> = (0..TRICKLERS)
        .map(|_| tokio::spawn(trickle(port, attack_end, give_up)))
        .collect();
    tokio::task::block_in_place(|| pg.restart());
    // Then the relay reconnects to Postgres and relays a row committed meanwhile,
    // before the attack is over
    let db = pg.client().await;
    let id = insert_event(&db, "o-1", 1).await.expect("insert");
    let relayed = wait_for(Duration::from_secs(20), || async {
        relay.stdout().contains(&id)
    })
    .await
    .then(Instant::now);
    let mut closed = Vec::new();
    for t in tricklers {
        closed.extend(t.await.expect("trickler"));
    }
    stop.store(true, Ordering::Relaxed);
    let probes = prober.join().expect("prober");

    assert!(
        relayed.is_some_and(|at| at < attack_end),
        "row {id} was relayed {:?} after the attack ended (None: not within 20 s); \
         stderr:\n{}",
        relayed.map(|at| at.saturating_duration_since(attack_end)),
        relay.stderr()
    );
    // And /healthz answered within a second throughout
    let slow: Vec<_> = probes
        .iter()
        .filter(|(status, took)| *status != 200 || *took >= Duration::from_secs(1))
        .collect();
    assert!(
        probes.len() >= 5 && slow.is_empty(),
        "{} of {} probes failed or took a second or more: {slow:?}",
        slow.len(),
        probes.len()
    );
    // And every trickling connection was closed within the header timeout
    let late: Vec<_> = closed
        .iter()
        .filter(|c| c.is_none_or(|d| d > HEADER_TIMEOUT + SLACK))
        .collect();
    assert!(
        closed.len() >= TRICKLERS && late.is_empty(),
        "{} of {} trickling connections open longer than {:?}: e.g. {:?}",
        late.len(),
        closed.len(),
        HEADER_TIMEOUT + SLACK,
        late.iter().take(5).collect::<Vec<_>>()
    );
    // And the idle and the busy connection were closed in time
    assert!(
        idle.is_some_and(|d| d <= HEADER_TIMEOUT + SLACK),
        "idle keep-alive connection: {idle:?}"
    );
    assert!(
        busy.is_some_and(|d| d >= MAX_AGE && d <= MAX_AGE + HEADER_TIMEOUT + SLACK),
        "busy keep-alive connection: {busy:?}"
    );
    // And the relay never ran out of file descriptors, and raised its soft limit to
    // the hard one
    assert!(
        !relay.stderr().contains("Too many open files"),
        "{}",
        relay.stderr()
    );
    assert_eq!(limits, (256, 256));
    assert!(relay.try_exit().is_none(), "{}", relay.stderr());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_is_not_held_up_by_slow_clients() {
    // Given a streaming relay with 20 connections in the middle of a request head
    let pg = Postgres::start();
    pg.create_outbox().await;
    let cfg = relay_config(&pg);
    let port = http_port(&cfg);
    let mut relay = Relay::spawn(&cfg);
    pg.wait_streaming("outboxd").await;
    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect");
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: outboxd\r\n")
            .await
            .expect("write");
        held.push(s);
    }
    // (a request answered after them means the server accepted them all)
    assert_eq!(support::http_get(port, "/healthz").map(|r| r.0), Some(200));

    // When it gets SIGTERM
    let start = Instant::now();
    let status = tokio::task::block_in_place(|| relay.terminate(Duration::from_secs(20)));

    // Then it exits 0 within a header-read timeout of its shutdown instead of waiting
    // for those requests to be finished
    assert!(
        status.is_some_and(|s| s.success()),
        "exit: {status:?} after {:?}; stderr:\n{}",
        start.elapsed(),
        relay.stderr()
    );
    assert!(
        start.elapsed() <= HEADER_TIMEOUT + SLACK * 2,
        "{:?}",
        start.elapsed()
    );
    drop(held);
}
