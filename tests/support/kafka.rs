//! Kafka side of the harness: a real Kafka-protocol broker process and a reader.
//!
//! - [`Tansu`]: the `tansu` broker (Kafka wire protocol, in-memory storage) as a child
//!   process on a free port, stopped (SIGKILL) on drop, restartable on the same port
//!   for outage tests. Its storage is memory: a restarted broker starts empty.
//!   Binary: `OUTBOXD_TEST_TANSU`, else `.tmp/tools/tansu/tansu` (installed by
//!   `scripts/ensure-deps.sh`, which `make test` runs).
//! - [`read_topic`]: every record of a topic, read with librdkafka from the beginning
//!   until each partition reports its end.
//! - [`java_partition`]: the Java client's default partitioner (murmur2), to check
//!   that keys land where Java producers would put them.
//! - Helpers the Kafka tests share: writing outbox rows, waiting for records, and the
//!   order and duplicate assertions.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

use super::{free_port, wait_for, Postgres, Relay};

/// noida-db's Kafka service on a free port: unlike tansu 0.6 it implements
/// read_committed (a consumer never sees records of an aborted transaction, nor those
/// of an open one), so the exactly-once tests read through it. It does not abort a
/// transaction that times out (a later producer of the same id does). Binary:
/// `OUTBOXD_TEST_NOIDA`, else `.tmp/tools/noida-db/noida-db` (scripts/ensure-deps.sh).
pub struct Noida {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Noida {
    /// Starts the broker and waits until it accepts connections.
    pub fn start() -> Self {
        let bin = std::env::var_os("OUTBOXD_TEST_NOIDA").map_or_else(
            || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/tools/noida-db/noida-db"),
            PathBuf::from,
        );
        assert!(
            bin.exists(),
            "noida-db not found at {}: run `make test` (scripts/ensure-deps.sh installs it) \
             or set OUTBOXD_TEST_NOIDA",
            bin.display()
        );
        let dir = tempfile::Builder::new()
            .prefix("outboxd-noida-")
            .tempdir()
            .expect("tempdir");
        let port = free_port();
        let log = std::fs::File::create(dir.path().join("log")).expect("log file");
        let child = Command::new(bin)
            .arg("start")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--only", "kafka", "--kafka-port", &port.to_string()])
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn noida-db");
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "noida-db did not start: {}",
                std::fs::read_to_string(dir.path().join("log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { dir, port, child }
    }

    /// Bootstrap servers for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }
}

impl Drop for Noida {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `tansu` broker on a free port.
pub struct Tansu {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

fn tansu_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("OUTBOXD_TEST_TANSU") {
        return PathBuf::from(p);
    }
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".tmp/tools/tansu/tansu");
    assert!(
        p.exists(),
        "tansu not found at {}: run `make test` (scripts/ensure-deps.sh installs it) \
         or set OUTBOXD_TEST_TANSU",
        p.display()
    );
    p
}

impl Tansu {
    /// Starts a broker and waits until it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-tansu-")
            .tempdir()
            .expect("tempdir");
        let mut t = Self {
            dir,
            port: free_port(),
            child: None,
        };
        t.resume();
        t
    }

    /// Starts the (stopped) broker again on the same port. Memory storage: it starts
    /// without topics or records.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let url = format!("tcp://127.0.0.1:{}", self.port);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("log"))
            .expect("log file");
        let child = Command::new(tansu_bin())
            .arg("broker")
            .args(["--listener-url", &url])
            .args(["--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .current_dir(self.dir.path())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .spawn()
            .expect("spawn tansu");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "tansu did not start: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the broker (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Hangs the broker (SIGSTOP): its sockets stay open and accept bytes, nothing is
    /// answered, as with a broker stuck in a long GC pause or on a frozen VM.
    pub fn freeze(&self) {
        super::signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// Lets a [`Tansu::freeze`]d broker go on (SIGCONT) with its state intact.
    pub fn thaw(&self) {
        super::signal(self.child.as_ref().expect("running").id(), "CONT");
    }

    /// Bootstrap servers for clients.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's output so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// Creates `name` with `partitions` partitions (through the Kafka admin API).
    pub async fn create_topic(&self, name: &str, partitions: i32) {
        self.create_topic_with(name, partitions, &[]).await;
    }

    /// Creates `name` with `partitions` partitions and topic `configs`, e.g.
    /// `("max.message.bytes", "100000")`. tansu stores them and reports them through
    /// DescribeConfigs; it does not enforce them.
    pub async fn create_topic_with(&self, name: &str, partitions: i32, configs: &[(&str, &str)]) {
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("admin client");
        let mut topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for (k, v) in configs {
            topic = topic.set(k, v);
        }
        let results = admin
            .create_topics(
                [&topic],
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .expect("create topics");
        for r in results {
            r.expect("topic created");
        }
    }
}

impl Drop for Tansu {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("--- tansu log (tail) ---\n{}", tail(&self.log(), 40));
        }
    }
}

fn tail(s: &str, lines: usize) -> String {
    let all: Vec<&str> = s.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A relay config for `pg` and the broker(s) at `brokers` (`[sink] kind = "kafka"`);
/// `overrides` as for [`super::config`], e.g.
/// `("kafka.properties", "\"message.max.bytes\"", "\"2000\"")`.
pub fn kafka_config(pg: &Postgres, brokers: &str, overrides: &[(&str, &str, &str)]) -> String {
    let brokers = format!("\"{brokers}\"");
    let mut all: Vec<(&str, &str, &str)> = vec![
        ("sink", "kind", "\"kafka\""),
        ("kafka", "brokers", &brokers),
    ];
    all.extend_from_slice(overrides);
    super::config(pg, None, &all)
}

/// Starts Postgres (outbox created) and a relay of it to the broker(s) at `brokers`
/// with `overrides` (see [`kafka_config`]), and waits until the relay streams. Returns
/// them in the order `let (pg, relay) = …` declares them, so the relay is dropped
/// before the database.
pub async fn relay_to(brokers: &str, overrides: &[(&str, &str, &str)]) -> (Postgres, Relay) {
    let pg = Postgres::start();
    pg.create_outbox().await;
    let relay = Relay::spawn(&kafka_config(&pg, brokers, overrides));
    pg.wait_streaming("outboxd").await;
    (pg, relay)
}

/// One record read back.
#[derive(Debug, Clone)]
pub struct Record {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub headers: HashMap<String, String>,
    pub value: Option<Vec<u8>>,
}

impl Record {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

fn consumer(brokers: &str) -> BaseConsumer {
    consumer_with(brokers, "read_uncommitted")
}

fn consumer_with(brokers: &str, isolation: &str) -> BaseConsumer {
    ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("isolation.level", isolation)
        .set("group.id", "outboxd-test-reader")
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .create()
        .expect("consumer")
}

/// Partition ids of `topic` (empty if it does not exist). Panics when the broker does
/// not answer: "no records" must never stand for "nobody asked".
fn partitions(c: &BaseConsumer, topic: &str) -> Vec<i32> {
    use rdkafka::types::RDKafkaRespErr;
    let md = c
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("metadata of {topic}: {e}"));
    let Some(t) = md.topics().iter().find(|t| t.name() == topic) else {
        return Vec::new();
    };
    match t.error() {
        None => t.partitions().iter().map(|p| p.id()).collect(),
        Some(RDKafkaRespErr::RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART) => Vec::new(),
        Some(e) => panic!("metadata of {topic}: {e:?}"),
    }
}

/// Records in `topic` now (0 if it does not exist).
pub async fn topic_len(brokers: &str, topic: &str) -> usize {
    read_topic(brokers, topic).await.len()
}

/// Partition count of `topic` (0 if it does not exist).
pub async fn partition_count(brokers: &str, topic: &str) -> usize {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || partitions(&consumer(&b), &t).len())
        .await
        .expect("metadata task")
}

/// Every record of `topic`, read from the beginning until each partition reports its
/// end, sorted by partition, then offset.
///
/// The end is librdkafka's partition-EOF event, not the high watermark of a
/// ListOffsets request: tansu 0.6 answers that with the base offset of the last
/// record batch plus one, which is short whenever the producer batched records.
pub async fn read_topic(brokers: &str, topic: &str) -> Vec<Record> {
    read_topic_as(brokers, topic, "read_uncommitted").await
}

/// [`read_topic`] as a consumer with `isolation.level = read_committed`: on a broker
/// that implements it, records of aborted transactions are left out. (tansu 0.6 does
/// not: it hands them out too.)
pub async fn read_topic_committed(brokers: &str, topic: &str) -> Vec<Record> {
    read_topic_as(brokers, topic, "read_committed").await
}

async fn read_topic_as(brokers: &str, topic: &str, isolation: &'static str) -> Vec<Record> {
    let (b, t) = (brokers.to_string(), topic.to_string());
    tokio::task::spawn_blocking(move || read_blocking(&b, &t, isolation))
        .await
        .expect("reader task")
}

fn read_blocking(brokers: &str, topic: &str, isolation: &str) -> Vec<Record> {
    let c = consumer_with(brokers, isolation);
    let mut open: HashSet<i32> = partitions(&c, topic).into_iter().collect();
    let mut out = Vec::new();
    if open.is_empty() {
        return out;
    }
    let mut tpl = TopicPartitionList::new();
    for p in &open {
        tpl.add_partition_offset(topic, *p, Offset::Beginning)
            .expect("partition offset");
    }
    c.assign(&tpl).expect("assign");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !open.is_empty() {
        assert!(
            Instant::now() < deadline,
            "reading {topic}: partitions {open:?} never reached their end"
        );
        let m = match c.poll(Duration::from_millis(200)) {
            None => continue,
            Some(Err(KafkaError::PartitionEOF(p))) => {
                open.remove(&p);
                continue;
            }
            Some(Err(e)) => panic!("reading {topic}: {e}"),
            Some(Ok(m)) => m,
        };
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| {
                        let v = h.value.map(|v| String::from_utf8_lossy(v).to_string());
                        (h.key.to_string(), v.unwrap_or_default())
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.push(Record {
            partition: m.partition(),
            offset: m.offset(),
            key: m.key().map(|k| String::from_utf8_lossy(k).to_string()),
            headers,
            value: m.payload().map(<[u8]>::to_vec),
        });
    }
    out.sort_by_key(|r| (r.partition, r.offset));
    out
}

/// Kafka's `Utils.murmur2` (the Java client's key hash).
pub fn murmur2(data: &[u8]) -> i32 {
    const M: u32 = 0x5bd1_e995;
    let len = data.len();
    let mut h: u32 = 0x9747_b28c ^ (len as u32);
    let mut chunks = data.chunks_exact(4);
    for c in &mut chunks {
        let mut k = u32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> 24;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The partition the Java client's default partitioner picks for `key`.
pub fn java_partition(key: &str, partitions: usize) -> i32 {
    ((murmur2(key.as_bytes()) & 0x7fff_ffff) as usize % partitions) as i32
}

// ---- Helpers shared by the Kafka tests: outbox rows in, records out. ----

/// Inserts one row and returns its id.
pub async fn insert(
    db: &impl tokio_postgres::GenericClient,
    aggregate_type: &str,
    aggregate_id: &str,
    n: i64,
) -> String {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ($1, $2, 'Updated', jsonb_build_object('n', $3::bigint)) RETURNING id::text",
        &[&aggregate_type, &aggregate_id, &n],
    )
    .await
    .expect("insert")
    .get(0)
}

/// The `n` of a binary-mode record's JSON value.
pub fn n_of(r: &Record) -> i64 {
    let v: serde_json::Value =
        serde_json::from_slice(r.value.as_deref().expect("value")).expect("json value");
    v["n"].as_i64().expect("n")
}

/// Waits until `topic` holds at least `n` records.
pub async fn wait_records(brokers: &str, topic: &str, n: usize, timeout: Duration) {
    let ok = wait_for(timeout, || async { topic_len(brokers, topic).await >= n }).await;
    assert!(
        ok,
        "{topic}: only {} of {n} records arrived",
        topic_len(brokers, topic).await
    );
}

/// Per key, the first occurrences of `n` increase in partition order, and every key
/// stays on one partition. Repeated `(key, n)` pairs (redeliveries) are skipped.
pub fn assert_order_per_key(records: &[Record], n: impl Fn(&Record) -> i64) {
    let mut last: HashMap<&str, (i32, i64)> = HashMap::new();
    let mut seen: HashSet<(&str, i64)> = HashSet::new();
    for r in records {
        let key = r.key.as_deref().expect("key");
        let v = n(r);
        if !seen.insert((key, v)) {
            continue; // a redelivery: see `assert_same_event_when_repeated`
        }
        if let Some((partition, prev)) = last.insert(key, (r.partition, v)) {
            assert_eq!(partition, r.partition, "key {key} moved partitions");
            assert!(v > prev, "key {key}: event {v} arrived after {prev}");
        }
    }
}

/// Waits (bounded) for the relay process to exit.
pub async fn wait_exit(relay: &mut Relay, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = relay.try_exit() {
            return Some(status);
        }
        if std::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Every copy of a repeated `ce_id` is the same event: key, data, sequence, time.
pub fn assert_same_event_when_repeated(records: &[Record]) {
    let mut first: HashMap<&str, &Record> = HashMap::new();
    for r in records {
        let id = r.header("ce_id").expect("ce_id");
        let f = *first.entry(id).or_insert(r);
        assert_eq!(r.key, f.key, "{id}: key differs");
        assert_eq!(r.value, f.value, "{id}: data differs");
        assert_eq!(r.header("ce_sequence"), f.header("ce_sequence"), "{id}");
        assert_eq!(r.header("ce_time"), f.header("ce_time"), "{id}");
    }
}

/// Writes `count` rows over 4 aggregates, continuing the numbering at `*n`.
pub async fn write_rows(db: &tokio_postgres::Client, n: &mut i64, count: usize) -> HashSet<String> {
    let mut ids = HashSet::new();
    for _ in 0..count {
        *n += 1;
        ids.insert(insert(db, "Order", &format!("o-{}", *n % 4), *n).await);
    }
    ids
}

/// Ids of the CloudEvents in `topic`.
pub async fn ids_in(brokers: &str, topic: &str) -> HashSet<String> {
    read_topic(brokers, topic)
        .await
        .iter()
        .filter_map(|r| r.header("ce_id").map(str::to_string))
        .collect()
}

/// The commit LSN in a `ce_sequence` (16 hex digits of LSN, 8 of position).
pub fn commit_lsn(r: &Record) -> u64 {
    let seq = r.header("ce_sequence").expect("ce_sequence");
    u64::from_str_radix(&seq[..16], 16).expect("hex LSN")
}
