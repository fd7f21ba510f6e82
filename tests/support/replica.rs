//! Physical replication for the version tests: a hot standby of a test cluster,
//! built with the low-level backup API (the matrix's PostgreSQL builds have no
//! `pg_basebackup`), the server's version, and a TCP forwarder that plays the part of
//! a DNS name moved from the old primary to the promoted standby.
//!
//! The standby is built as an operator would without `pg_basebackup`:
//! `pg_backup_start` (14: `pg_start_backup(…, exclusive => false)`) on a session of
//! the primary, a file copy of its data directory (without `postmaster.pid` and the
//! WAL, which the standby streams through its physical slot), `pg_backup_stop` on the
//! same session, its label file written as `backup_label`, and `standby.signal`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{as_pg_user, free_port, is_root, wait_for, Postgres};

impl Postgres {
    /// `server_version_num`, e.g. 170010.
    pub async fn version_num(&self) -> i32 {
        self.client()
            .await
            .query_one("SELECT current_setting('server_version_num')::int", &[])
            .await
            .expect("server_version_num")
            .get(0)
    }

    /// The major version (14 … 18).
    pub async fn major(&self) -> i32 {
        self.version_num().await / 10_000
    }

    /// A hot standby of this cluster streaming through the physical slot `slot`
    /// (created here), with `hot_standby_feedback = on` and `settings` on top.
    pub async fn start_standby(&self, slot: &str, settings: &[(&str, &str)]) -> Postgres {
        let admin = self.client().await;
        admin
            .execute(
                "SELECT pg_create_physical_replication_slot($1, true)",
                &[&slot],
            )
            .await
            .expect("physical slot");
        let v14 = self.major().await < 15;
        // The backup must start and stop on one session.
        let start = if v14 {
            "SELECT pg_start_backup('outboxd-test', true, false)"
        } else {
            "SELECT pg_backup_start('outboxd-test', true)"
        };
        admin.execute(start, &[]).await.expect("backup start");
        let dir = tempfile::Builder::new()
            .prefix("outboxd-pg-standby-")
            .tempdir()
            .expect("tempdir");
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o777),
        )
        .expect("chmod");
        let (from, to) = (self.dir.path().join("data"), dir.path().join("data"));
        let copied = as_pg_user(std::path::Path::new("/bin/sh"))
            .arg("-c")
            .arg(
                "cp -a \"$1\" \"$2\" && rm -f \"$2/postmaster.pid\" \"$2/postmaster.opts\" && \
                 find \"$2/pg_wal\" -type f -delete",
            )
            .args(["sh", &from.display().to_string(), &to.display().to_string()])
            .status()
            .expect("copy the data directory");
        assert!(copied.success(), "copying the data directory failed");
        let stop = if v14 {
            "SELECT labelfile FROM pg_stop_backup(false, true)"
        } else {
            "SELECT labelfile FROM pg_backup_stop(true)"
        };
        let label: String = admin
            .query_one(stop, &[])
            .await
            .expect("backup stop")
            .get(0);
        std::fs::write(to.join("backup_label"), label).expect("backup_label");
        std::fs::write(to.join("standby.signal"), "").expect("standby.signal");
        if is_root() {
            let owned = Command::new("chown")
                .args(["postgres:postgres"])
                .arg(to.join("backup_label"))
                .arg(to.join("standby.signal"))
                .status()
                .expect("chown");
            assert!(owned.success());
        }
        let conninfo = format!(
            "'host=127.0.0.1 port={} user=postgres dbname=postgres application_name=standby'",
            self.port
        );
        let mut all: Vec<(String, String)> = vec![
            ("primary_conninfo".into(), conninfo),
            ("primary_slot_name".into(), slot.into()),
            ("hot_standby_feedback".into(), "on".into()),
        ];
        all.extend(settings.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let standby = Postgres {
            dir,
            port: free_port(),
            bin: self.bin.clone(),
            wal_level: self.wal_level.clone(),
            settings: all,
        };
        standby.pg_ctl_start();
        standby.wait_replayed(self).await;
        standby
    }

    /// Waits until this standby replayed the primary's WAL up to its current position.
    pub async fn wait_replayed(&self, primary: &Postgres) {
        let target = primary.current_lsn().await;
        assert!(
            wait_for(Duration::from_secs(60), || async {
                self.client()
                    .await
                    .query_one(
                        "SELECT COALESCE((pg_last_wal_replay_lsn() - '0/0')::bigint, 0)",
                        &[],
                    )
                    .await
                    .expect("replay lsn")
                    .get::<_, i64>(0) as u64
                    >= target
            })
            .await,
            "the standby did not replay up to {target}; its log: {}",
            self.log()
        );
    }

    /// Stops the server at once, as a crash would (`pg_ctl stop -m immediate`).
    pub fn crash(&self) {
        let status = self.pg_ctl_stop("immediate").expect("pg_ctl stop");
        assert!(status.success(), "pg_ctl stop -m immediate failed");
    }
}

/// A TCP forwarder on 127.0.0.1: every connection goes to the port it points at when
/// the connection opens. [`Forward::point_to`] is the DNS switch of a failover.
pub struct Forward {
    pub port: u16,
    target: Arc<AtomicU16>,
    stop: Arc<AtomicBool>,
}

impl Forward {
    pub fn to(target: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind forwarder");
        let port = listener.local_addr().expect("addr").port();
        let target = Arc::new(AtomicU16::new(target));
        let stop = Arc::new(AtomicBool::new(false));
        let (t, s) = (target.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if s.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(client) = conn else { continue };
                // A refused upstream closes the client's connection: it sees the
                // server as down, as it would behind a DNS name.
                let Ok(server) = TcpStream::connect(("127.0.0.1", t.load(Ordering::Relaxed)))
                else {
                    continue;
                };
                pipe(&client, &server);
                pipe(&server, &client);
            }
        });
        Self { port, target, stop }
    }

    /// New connections go to `port` from now on.
    pub fn point_to(&self, port: u16) {
        self.target.store(port, Ordering::Relaxed);
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// Copies bytes from `a` to `b` on a thread until either side closes.
fn pipe(a: &TcpStream, b: &TcpStream) {
    let (Ok(mut from), Ok(mut to)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    std::thread::spawn(move || {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(std::net::Shutdown::Both);
        let _ = from.shutdown(std::net::Shutdown::Both);
    });
}
