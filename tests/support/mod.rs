//! Test harness: real services on free ports, stopped on drop.
//!
//! - [`Postgres`]: a throw-away cluster (`initdb` into a temp dir, `wal_level=logical`
//!   by default), run as the `postgres` user when the tests run as root.
//! - [`Nats`]: `nats-server -js` with its own store directory; can be stopped and
//!   started again on the same port for outage tests.
//! - [`Relay`]: the `outboxd` binary as a child process with a generated config.
//! - [`replica`]: a hot standby of a cluster, and a forwarder that plays a DNS switch.
//!
//! The versions under test come from the environment: `OUTBOXD_TEST_PG_BINDIR` (a
//! directory with initdb, pg_ctl and postgres) and `OUTBOXD_TEST_NATS_SERVER` (a
//! nats-server binary); unset, the Debian packages `make test` installs are used.
//! `make test-matrix` sets them to the pinned builds of scripts/ensure-deps.sh.
//!
//! Nothing here fakes a service: every test talks to the real server processes.

#![allow(dead_code)]

pub mod faults;
pub mod kafka;
pub mod replica;
pub mod secure;
pub mod streaming;

use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;

/// A free TCP port on 127.0.0.1 (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind :0")
        .local_addr()
        .expect("addr")
        .port()
}

fn is_root() -> bool {
    // `id -u` rather than libc::geteuid keeps the crate free of unsafe code.
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout).trim() == "0"
}

/// The nats-server binary: `OUTBOXD_TEST_NATS_SERVER` (the version matrix sets it),
/// else the one on the PATH (Debian's, installed by `make test`).
pub fn nats_server() -> PathBuf {
    if let Some(path) = std::env::var_os("OUTBOXD_TEST_NATS_SERVER") {
        return PathBuf::from(path);
    }
    which("nats-server").expect("nats-server not found: run `make test` (installs it)")
}

/// Postgres's server binaries (initdb, pg_ctl, postgres): `OUTBOXD_TEST_PG_BINDIR`
/// (the version matrix sets it), else the newest under /usr/lib/postgresql.
fn pg_bindir() -> PathBuf {
    if let Ok(dir) = std::env::var("OUTBOXD_TEST_PG_BINDIR") {
        return PathBuf::from(dir);
    }
    let mut candidates: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.path().join("bin"))
                .collect()
        })
        .unwrap_or_default();
    candidates.retain(|p| p.join("initdb").exists());
    candidates.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
            .unwrap_or(0)
    });
    candidates
        .pop()
        .expect("PostgreSQL server binaries not found: run `make test` (installs postgresql)")
}

/// Runs a command as the `postgres` user when we are root (initdb refuses root).
fn as_pg_user(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

/// A throw-away PostgreSQL cluster.
pub struct Postgres {
    dir: tempfile::TempDir,
    pub port: u16,
    bin: PathBuf,
    wal_level: String,
    /// Extra `-c name=value` server settings, kept across restarts.
    settings: Vec<(String, String)>,
}

impl Postgres {
    /// A cluster with `wal_level=logical`.
    pub fn start() -> Self {
        Self::start_with("logical")
    }

    /// A cluster with the given `wal_level`.
    pub fn start_with(wal_level: &str) -> Self {
        let bin = pg_bindir();
        let dir = tempfile::Builder::new()
            .prefix("outboxd-pg-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777))
            .expect("chmod");
        let data = dir.path().join("data");
        let status = as_pg_user(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .stdout(Stdio::null())
            .status()
            .expect("run initdb");
        assert!(status.success(), "initdb failed");
        let pg = Self {
            dir,
            port: free_port(),
            bin,
            wal_level: wal_level.to_string(),
            settings: Vec::new(),
        };
        pg.pg_ctl_start();
        pg
    }

    fn pg_ctl_start(&self) {
        self.pg_ctl_start_with(&[], true);
    }

    /// `pg_ctl start` with the cluster's settings plus `extra`; `wait` for "ready".
    fn pg_ctl_start_with(&self, extra: &[(&str, &str)], wait: bool) {
        let mut opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c wal_level={} -c max_wal_senders=20 \
             -c max_replication_slots=20 -c fsync=off -c synchronous_commit=off \
             -c wal_sender_timeout=30s",
            self.port,
            self.dir.path().display(),
            self.wal_level
        );
        let settings = self.settings.iter().map(|(k, v)| (k.as_str(), v.as_str()));
        for (name, value) in settings.chain(extra.iter().copied()) {
            opts.push_str(&format!(" -c {name}={value}"));
        }
        let status = self
            .pg_ctl()
            .arg("-l")
            .arg(self.dir.path().join("log"))
            .args(["-o", &opts])
            .args(if wait {
                &["-w", "-t", "60", "start"][..]
            } else {
                &["-W", "start"][..]
            })
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl start");
        assert!(status.success(), "pg_ctl start failed; log: {}", self.log());
    }

    /// `pg_ctl -D <data directory>`, as the server's user.
    fn pg_ctl(&self) -> Command {
        let mut c = as_pg_user(&self.bin.join("pg_ctl"));
        c.arg("-D").arg(self.dir.path().join("data"));
        c
    }

    /// `pg_ctl stop -m <mode>`, waiting for the server to stop; quiet.
    fn pg_ctl_stop(&self, mode: &str) -> std::io::Result<std::process::ExitStatus> {
        self.pg_ctl()
            .args(["-m", mode, "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
    }

    /// Stops the server (fast mode: clients are disconnected).
    pub fn stop(&self) {
        let _ = self.pg_ctl_stop("fast");
    }

    /// Stops and starts the server on the same port.
    pub fn restart(&self) {
        self.stop();
        self.pg_ctl_start();
    }

    /// Server log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// URL for the superuser `postgres`, database `postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A SQL client.
    pub async fn client(&self) -> tokio_postgres::Client {
        let (client, conn) = tokio_postgres::connect(&self.url(), tokio_postgres::NoTls)
            .await
            .expect("connect to test postgres");
        tokio::spawn(async move {
            let _ = conn.await;
        });
        client
    }

    /// Creates the default outbox table.
    pub async fn create_outbox(&self) {
        self.run_ddl(outbox_ddl()).await;
    }

    /// Starts a cluster whose outbox is made by `ddl`, a table of another shape than
    /// [`outbox_ddl`]'s (no publication: the relay creates it).
    pub async fn start_with_outbox(ddl: &str) -> Self {
        let pg = Self::start();
        pg.run_ddl(ddl).await;
        pg
    }

    async fn run_ddl(&self, ddl: &str) {
        self.client()
            .await
            .batch_execute(ddl)
            .await
            .expect("create outbox");
    }

    /// The slot's confirmed flush LSN as a number, if the slot exists.
    pub async fn confirmed_lsn(&self, slot: &str) -> Option<u64> {
        let row = self
            .client()
            .await
            .query_opt(
                "SELECT (confirmed_flush_lsn - '0/0')::bigint FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slot")?;
        row.get::<_, Option<i64>>(0).map(|v| v as u64)
    }

    /// Server PID streaming from `slot`, if any.
    pub async fn slot_active_pid(&self, slot: &str) -> Option<i32> {
        self.client()
            .await
            .query_opt(
                "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await
            .expect("query slot")
            .and_then(|r| r.get::<_, Option<i32>>(0))
    }

    /// Waits (30 s) until no process holds `slot`: a dropped relay has let go of it.
    pub async fn wait_slot_released(&self, slot: &str) {
        let released = wait_for(Duration::from_secs(30), || async {
            self.slot_active_pid(slot).await.is_none()
        });
        assert!(released.await, "slot {slot} is still held");
    }

    /// Waits until a relay streams from `slot` (rows committed before the slot existed
    /// are not in it: a test must not write before this).
    /// Waits until a walsender streams from `slot` (not merely a backend holding it,
    /// as the one creating it does for a moment).
    pub async fn wait_streaming(&self, slot: &str) {
        assert!(
            wait_for(Duration::from_secs(60), || async {
                self.client()
                    .await
                    .query_opt(
                        "SELECT 1 FROM pg_replication_slots s \
                         JOIN pg_stat_replication r ON r.pid = s.active_pid \
                         WHERE s.slot_name = $1",
                        &[&slot],
                    )
                    .await
                    .expect("query slot")
                    .is_some()
            })
            .await,
            "no relay streams from slot {slot}"
        );
    }

    /// The server's current WAL insert position.
    pub async fn current_lsn(&self) -> u64 {
        let row = self
            .client()
            .await
            .query_one("SELECT (pg_current_wal_lsn() - '0/0')::bigint", &[])
            .await
            .expect("current lsn");
        row.get::<_, i64>(0) as u64
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self.pg_ctl_stop("immediate");
    }
}

/// The default outbox table as `outboxd setup` prints it: the DDL exists once, in
/// `source::sql`, and the tests create the table users get.
pub fn outbox_ddl() -> &'static str {
    static DDL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DDL.get_or_init(|| setup_statement("CREATE TABLE IF NOT EXISTS public.outbox ("))
}

/// The statement of `outboxd setup`'s script (default config) that begins with
/// `start`, up to its closing `);`.
pub fn setup_statement(start: &str) -> String {
    let url = (
        "OUTBOXD_POSTGRES__URL",
        "postgres://outboxd@localhost/outboxd",
    );
    let setup = secure::outboxd(None, &["setup"], &[url]);
    assert_eq!(setup.code, Some(0), "outboxd setup failed: {}", setup.all());
    let from = setup
        .stdout
        .find(start)
        .unwrap_or_else(|| panic!("outboxd setup prints no {start}: {}", setup.stdout));
    let rest = &setup.stdout[from..];
    let end = rest
        .find(");")
        .unwrap_or_else(|| panic!("{start} is not closed: {rest}"));
    rest[..end + 2].to_string()
}

/// A `nats-server -js` on a free port.
pub struct Nats {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
}

impl Nats {
    /// Starts a server and waits until it accepts connections.
    pub fn start() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-nats-")
            .tempdir()
            .expect("tempdir");
        let mut n = Self {
            dir,
            port: free_port(),
            child: None,
        };
        n.resume();
        n
    }

    /// Starts the (stopped) server again on the same port and store.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "already running");
        let child = Command::new(nats_server())
            .args([
                "-js",
                "-a",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-sd",
            ])
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.dir.path().join("log")).expect("log file"))
            .spawn()
            .expect("spawn nats-server");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "nats-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGKILL: an outage, not a goodbye).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Hangs the server (SIGSTOP): connections stay open, nothing is answered.
    pub fn freeze(&self) {
        signal(self.child.as_ref().expect("running").id(), "STOP");
    }

    /// Lets a [`Nats::freeze`]d server go on (SIGCONT).
    pub fn thaw(&self) {
        signal(self.child.as_ref().expect("running").id(), "CONT");
    }

    /// Client URL.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// A JetStream context.
    pub async fn jetstream(&self) -> jetstream::Context {
        let client = async_nats::connect(self.url())
            .await
            .expect("connect to test nats");
        jetstream::new(client)
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One message read back from the stream.
#[derive(Debug, Clone)]
pub struct Received {
    pub subject: String,
    pub headers: std::collections::HashMap<String, String>,
    pub payload: Vec<u8>,
}

impl Received {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }
}

/// The stream, or `None` when it does not exist. Any other failure (the server down,
/// a timeout) panics: an "is empty" check must not pass because nobody answered.
async fn stream_or_none(
    js: &jetstream::Context,
    stream: &str,
) -> Option<jetstream::stream::Stream> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match js.get_stream(stream).await {
        Ok(s) => Some(s),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                None
            }
            _ => panic!("cannot read stream {stream}: {e}"),
        },
    }
}

/// All messages in `stream`, in stream order (empty if the stream does not exist;
/// panics if the server does not answer).
pub async fn read_stream(js: &jetstream::Context, stream: &str) -> Vec<Received> {
    use async_nats::jetstream::stream::LastRawMessageErrorKind;
    let Some(mut s) = stream_or_none(js, stream).await else {
        return Vec::new();
    };
    let info = s
        .info()
        .await
        .unwrap_or_else(|e| panic!("stream info of {stream}: {e}"));
    let (first, last) = (info.state.first_sequence, info.state.last_sequence);
    let mut out = Vec::new();
    if info.state.messages == 0 {
        return out;
    }
    for seq in first..=last {
        let m = match s.get_raw_message(seq).await {
            Ok(m) => m,
            // A message removed from the middle (a limit, a delete) leaves a gap.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => panic!("reading {stream} #{seq}: {e}"),
        };
        let headers = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.first().map(|v| v.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        out.push(Received {
            subject: m.subject.to_string(),
            headers,
            payload: m.payload.to_vec(),
        });
    }
    out
}

/// Number of messages in `stream` (0 if it does not exist; panics if the server does
/// not answer).
pub async fn stream_len(js: &jetstream::Context, stream: &str) -> u64 {
    match stream_or_none(js, stream).await {
        Some(mut s) => {
            s.info()
                .await
                .unwrap_or_else(|e| panic!("stream info of {stream}: {e}"))
                .state
                .messages
        }
        None => 0,
    }
}

/// Sends `SIG<name>` (e.g. `STOP`, `CONT`) to `pid` with kill(1): no unsafe code.
pub fn signal(pid: u32, name: &str) {
    let status = Command::new("kill")
        .arg(format!("-{name}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{name} {pid} failed");
}

/// Polls `cond` until it holds or `timeout` passes; returns whether it held.
pub async fn wait_for<F, Fut>(timeout: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `outboxd` as a child process.
pub struct Relay {
    child: Option<Child>,
    dir: tempfile::TempDir,
    /// `(soft, hard)` RLIMIT_NOFILE to start the process with (`prlimit`), if any.
    nofile: Option<(u64, u64)>,
}

impl Relay {
    /// Writes `config` to a file and runs `outboxd run --config <file>`.
    pub fn spawn(config: &str) -> Self {
        Self::spawn_with_args(config, &[])
    }

    /// Like [`Relay::spawn`], with extra `run` arguments.
    pub fn spawn_with_args(config: &str, extra: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-relay-")
            .tempdir()
            .expect("tempdir");
        let mut r = Self {
            child: None,
            dir,
            nofile: None,
        };
        std::fs::write(r.config_path(), config).expect("write config");
        r.start_with_args(extra);
        r
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("outboxd.toml")
    }

    /// (Re)starts the process with the same config; output is appended to files.
    pub fn start(&mut self) {
        self.start_with_args(&[]);
    }

    /// (Re)starts the process with extra `run` arguments.
    pub fn start_with_args(&mut self, extra: &[&str]) {
        assert!(self.child.is_none(), "already running");
        let append = |name: &str| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(self.dir.path().join(name))
                .expect("log file")
        };
        let mut command = match self.nofile {
            // prlimit execs the command: the child's pid is outboxd's.
            Some((soft, hard)) => {
                let mut c = Command::new("prlimit");
                c.arg(format!("--nofile={soft}:{hard}"))
                    .arg(env!("CARGO_BIN_EXE_outboxd"));
                c
            }
            None => Command::new(env!("CARGO_BIN_EXE_outboxd")),
        };
        let child = command
            .args(["run", "--config"])
            .arg(self.config_path())
            .args(extra)
            .env("RUST_LOG", "outboxd=debug,info")
            .stdout(append("stdout"))
            .stderr(append("stderr"))
            .spawn()
            .expect("spawn outboxd");
        self.child = Some(child);
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGKILL: a crash.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM, then waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let mut c = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &c.id().to_string()])
            .status();
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(Some(status)) = c.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                let _ = c.kill();
                let _ = c.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default()
    }

    pub fn stdout(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stdout")).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- outboxd stderr ---\n{}", self.stderr());
        }
    }
}

/// A config for the relay against `pg` and (optionally) `nats`; `overrides` are
/// `("section", "key", "toml value")` triples that replace or add keys.
pub fn config(pg: &Postgres, nats: Option<&Nats>, overrides: &[(&str, &str, &str)]) -> String {
    use std::collections::BTreeMap;
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut set = |sec: &str, key: &str, val: String| {
        sections
            .entry(sec.to_string())
            .or_default()
            .insert(key.to_string(), val);
    };
    set("postgres", "url", format!("\"{}\"", pg.url()));
    set("postgres", "status_interval_ms", "200".into());
    set("cloudevents", "source", "\"/test/orders\"".into());
    set("http", "listen", format!("\"127.0.0.1:{}\"", free_port()));
    set("log", "format", "\"text\"".into());
    set("retry", "initial_backoff_ms", "50".into());
    set("retry", "max_backoff_ms", "1000".into());
    match nats {
        Some(n) => {
            set("sink", "kind", "\"nats\"".into());
            set("nats", "url", format!("\"{}\"", n.url()));
        }
        None => set("sink", "kind", "\"stdout\"".into()),
    }
    for (sec, key, val) in overrides {
        set(sec, key, (*val).to_string());
    }
    let mut out = String::new();
    for (sec, kv) in sections {
        out.push_str(&format!("[{sec}]\n"));
        for (k, v) in kv {
            out.push_str(&format!("{k} = {v}\n"));
        }
    }
    out
}

fn which(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .map(|d| Path::new(d).join(name))
        .chain(
            ["/usr/sbin", "/usr/bin", "/usr/local/bin"]
                .iter()
                .map(|d| Path::new(d).join(name)),
        )
        .find(|p| p.exists())
}

/// A plain HTTP/1.0 GET on 127.0.0.1: (status code, body). `None` if not reachable.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, body.to_string()))
}

/// The value of one sample line of a Prometheus text exposition, e.g.
/// `metric(&text, "outboxd_streaming")` or with labels `metric(&text, "x{a=\"b\"}")`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Sum of all samples of a metric family (any labels). Panics on an empty text: a
/// scrape that returned nothing is not "0 errors".
pub fn metric_sum(text: &str, name: &str) -> f64 {
    assert!(
        text.contains("# TYPE"),
        "not a metrics exposition (did the scrape fail?): {text:?}"
    );
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ') | Some(b'{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

// ---------------------------------------------------------------------------------
// Fault-injection helpers (tests/failures.rs). Appended: nothing above changes.
// ---------------------------------------------------------------------------------

impl Postgres {
    /// A `wal_level=logical` cluster whose server also gets `-c name=value` for each
    /// of `settings` (they come after, so they win over, the defaults of
    /// `pg_ctl_start`, e.g. `("wal_sender_timeout", "3s")`). Note: [`Postgres::restart`]
    /// starts the server with the defaults again.
    pub fn start_with_settings(settings: &[(&str, &str)]) -> Self {
        let mut pg = Self::start();
        pg.stop();
        pg.settings = settings
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        pg.pg_ctl_start();
        pg
    }

    /// `SHOW <setting>` as the server reports it.
    pub async fn show(&self, setting: &str) -> String {
        self.client()
            .await
            .query_one(&format!("SHOW {setting}"), &[])
            .await
            .expect("show")
            .get(0)
    }

    /// Every id in the outbox table: the committed rows, whatever a writer believes.
    pub async fn outbox_ids(&self) -> std::collections::HashSet<String> {
        self.client()
            .await
            .query("SELECT id::text FROM outbox", &[])
            .await
            .expect("select ids")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }
}

impl Relay {
    /// Waits up to `timeout` for the process to exit on its own; its status, if it did.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The `/metrics` text of a relay on `port`; panics when it does not answer, so a
/// metric read as 0 was really exported as 0 (or not exported).
pub fn scrape(port: u16) -> String {
    match http_get(port, "/metrics") {
        Some((200, body)) => body,
        other => panic!("/metrics on port {port} does not answer: {other:?}"),
    }
}

/// For wait loops: whether the relay on `port` answers `/metrics` and `cond` holds on
/// the text. A relay that is not up yet is "not yet", never a 0 that passes.
pub fn scraped(port: u16, cond: impl FnOnce(&str) -> bool) -> bool {
    http_get(port, "/metrics").is_some_and(|(code, body)| code == 200 && cond(&body))
}

/// Inserts one outbox row of `aggregate` whose payload is `{"n": n}`; returns its id.
/// `n` grows with commit order, so the order of an aggregate's events can be checked.
pub async fn insert_event(
    db: &impl tokio_postgres::GenericClient,
    aggregate: &str,
    n: i64,
) -> Result<String, tokio_postgres::Error> {
    db.query_one(
        "INSERT INTO outbox (aggregate_type, aggregate_id, event_type, payload) \
         VALUES ('Order', $1, 'OrderUpdated', jsonb_build_object('n', $2::bigint)) \
         RETURNING id::text",
        &[&aggregate, &n],
    )
    .await
    .map(|r| r.get(0))
}

/// The `n` of an event's JSON payload (binary content mode).
pub fn payload_n(m: &Received) -> i64 {
    let v: serde_json::Value = serde_json::from_slice(&m.payload).expect("json payload");
    v["n"].as_i64().expect("payload has n")
}

/// Per aggregate (`ce-subject`), `n` strictly increases in stream order.
pub fn assert_per_aggregate_order(msgs: &[Received]) {
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for m in msgs {
        let agg = m.header("ce-subject").expect("ce-subject").to_string();
        let n = payload_n(m);
        if let Some(prev) = last.insert(agg.clone(), n) {
            assert!(
                n > prev,
                "aggregate {agg}: event n={n} arrived after n={prev}"
            );
        }
    }
}

/// Each id of `expected` is in `msgs` exactly once, and nothing else is.
pub fn assert_delivered_once(msgs: &[Received], expected: &std::collections::HashSet<String>) {
    let mut seen = std::collections::HashMap::<&str, usize>::new();
    for m in msgs {
        *seen.entry(m.header("ce-id").expect("ce-id")).or_default() += 1;
    }
    let missing: Vec<&String> = expected
        .iter()
        .filter(|id| !seen.contains_key(id.as_str()))
        .collect();
    let repeated: Vec<(&&str, &usize)> = seen.iter().filter(|(_, c)| **c > 1).collect();
    let unknown: Vec<&&str> = seen.keys().filter(|id| !expected.contains(**id)).collect();
    assert!(
        missing.is_empty() && repeated.is_empty() && unknown.is_empty(),
        "{} expected, {} in the stream: {} missing (e.g. {:?}), {} repeated (e.g. {:?}), \
         {} never committed (e.g. {:?})",
        expected.len(),
        msgs.len(),
        missing.len(),
        missing.iter().take(3).collect::<Vec<_>>(),
        repeated.len(),
        repeated.iter().take(3).collect::<Vec<_>>(),
        unknown.len(),
        unknown.iter().take(3).collect::<Vec<_>>(),
    );
}

/// SplitMix64: a small seeded PRNG, so a failing random run can be replayed.
pub struct SplitMix64(u64);

impl SplitMix64 {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform-enough in `lo..=hi` for tests.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// The test seed: `OUTBOXD_TEST_SEED` when set (to replay a run), else the clock.
/// Printed, so a failing run shows how to replay it.
pub fn seed() -> u64 {
    let seed = std::env::var("OUTBOXD_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(42)
        });
    eprintln!("seed {seed} (replay with OUTBOXD_TEST_SEED={seed})");
    seed
}

impl Postgres {
    /// Restarts the server so that it is up but refuses every connection with
    /// SQLSTATE 57P03 ("the database system is not accepting connections"), as during
    /// start-up or recovery: standby mode with `hot_standby=off` and no primary to
    /// follow, until [`Postgres::promote`].
    pub fn restart_not_accepting_connections(&self) {
        self.stop();
        std::fs::write(self.dir.path().join("data").join("standby.signal"), "")
            .expect("standby.signal");
        // Do not wait for "ready", which this server never becomes.
        self.pg_ctl_start_with(&[("hot_standby", "off")], false);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !self.log().contains("entering standby mode") {
            assert!(
                Instant::now() < deadline,
                "no standby mode; log: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Ends standby mode: the server accepts connections as a primary.
    pub fn promote(&self) {
        let status = self
            .pg_ctl()
            .args(["-w", "-t", "60", "promote"])
            .stdout(Stdio::null())
            .status()
            .expect("run pg_ctl promote");
        assert!(
            status.success(),
            "pg_ctl promote failed; log: {}",
            self.log()
        );
    }
}

impl Relay {
    /// Like [`Relay::spawn`], with the process's file-descriptor limit set to `soft`
    /// (raisable by the process up to `hard`) from its start, as a container runtime
    /// or systemd would.
    pub fn spawn_with_nofile(config: &str, soft: u64, hard: u64) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-relay-")
            .tempdir()
            .expect("tempdir");
        let mut r = Self {
            child: None,
            dir,
            nofile: Some((soft, hard)),
        };
        std::fs::write(r.config_path(), config).expect("write config");
        r.start();
        r
    }

    /// `(soft, hard)` "Max open files" of the running process, from /proc.
    pub fn nofile_limits(&self) -> (u64, u64) {
        let limits = std::fs::read_to_string(format!("/proc/{}/limits", self.pid()))
            .expect("read /proc/<pid>/limits");
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .expect("Max open files line");
        let mut n = line
            .split_whitespace()
            .filter_map(|w| w.parse::<u64>().ok());
        (n.next().expect("soft"), n.next().expect("hard"))
    }
}
