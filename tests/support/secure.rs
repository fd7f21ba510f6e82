//! Security fixtures: certificates made with the `openssl` CLI, a `nats-server` with
//! TLS and an authorization block (reloadable, so credentials can be fixed while a
//! relay retries), and `outboxd` one-shot commands whose whole output is returned.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream;

use super::free_port;

/// A CA with a server certificate for `127.0.0.1`/`localhost` and a client
/// certificate, all in one temp dir.
pub struct Pki {
    pub dir: tempfile::TempDir,
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl not found: run `make deps`");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The `openssl req` options of a new P-256 key, written unencrypted.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

/// Makes a self-signed CA in `dir`, valid for 2 days: its key `<stem>.key` and its
/// certificate `<stem>.<cert_ext>`, of subject `subject`.
pub fn make_ca(dir: &Path, stem: &str, cert_ext: &str, subject: &str) {
    let (key, cert) = (format!("{stem}.key"), format!("{stem}.{cert_ext}"));
    let mut req = vec!["req", "-x509"];
    req.extend(EC_KEY);
    req.extend([
        "-keyout",
        &key,
        "-out",
        &cert,
        "-days",
        "2",
        "-subj",
        subject,
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign,cRLSign",
    ]);
    openssl(dir, &req);
}

/// Makes a key `<stem>.key` and a certificate `<stem>.<cert_ext>` of subject `subject`
/// in `dir`, valid for 2 days, with the X.509 extensions `ext` (an extfile's lines),
/// signed by the CA `<ca>.key` / `<ca>.<cert_ext>` of [`make_ca`].
pub fn make_signed(dir: &Path, stem: &str, cert_ext: &str, subject: &str, ext: &str, ca: &str) {
    let (key, csr, cert, extfile) = (
        format!("{stem}.key"),
        format!("{stem}.csr"),
        format!("{stem}.{cert_ext}"),
        format!("{stem}.ext"),
    );
    let (ca_key, ca_cert) = (format!("{ca}.key"), format!("{ca}.{cert_ext}"));
    std::fs::write(dir.join(&extfile), ext).expect("ext file");
    let mut req = vec!["req"];
    req.extend(EC_KEY);
    req.extend(["-keyout", &key, "-out", &csr, "-subj", subject]);
    openssl(dir, &req);
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ],
    );
}

impl Pki {
    /// Generates `ca.pem`, `server.pem`/`server.key` and `client.pem`/`client.key`.
    pub fn generate() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-pki-")
            .tempdir()
            .expect("tempdir");
        let d = dir.path();
        make_ca(d, "ca", "pem", "/CN=outboxd test CA");
        make_signed(
            d,
            "server",
            "pem",
            "/CN=outboxd test server",
            "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
            "ca",
        );
        make_signed(
            d,
            "client",
            "pem",
            "/CN=outboxd test client",
            "extendedKeyUsage=clientAuth\n",
            "ca",
        );
        Self { dir }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// `nats-server -js` with TLS (optionally verifying client certificates) and the
/// given auth section.
pub struct SecureNats {
    dir: tempfile::TempDir,
    pub port: u16,
    child: Option<Child>,
    server_cert: PathBuf,
    server_key: PathBuf,
    ca: PathBuf,
    verify_clients: bool,
}

impl SecureNats {
    /// `auth` is the server's auth section: an `authorization { ... }` block (see
    /// [`user_block`]) or the lines of [`Operator::server_conf`].
    pub fn start(pki: &Pki, auth: &str, verify_clients: bool) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("outboxd-nats-tls-")
            .tempdir()
            .expect("tempdir");
        let n = Self {
            dir,
            port: free_port(),
            child: None,
            server_cert: pki.path("server.pem"),
            server_key: pki.path("server.key"),
            ca: pki.path("ca.pem"),
            verify_clients,
        };
        n.write_conf(auth);
        let mut n = n;
        let bin = super::nats_server();
        let child = Command::new(bin)
            .arg("-c")
            .arg(n.conf())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(n.dir.path().join("log")).expect("log file"))
            .spawn()
            .expect("spawn nats-server");
        n.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", n.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start: {}",
                n.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    fn conf(&self) -> PathBuf {
        self.dir.path().join("nats.conf")
    }

    fn write_conf(&self, auth: &str) {
        let text = format!(
            "listen: \"127.0.0.1:{port}\"\n\
             jetstream {{ store_dir: \"{store}\" }}\n\
             tls {{\n  cert_file: \"{cert}\"\n  key_file: \"{key}\"\n  ca_file: \"{ca}\"\n  \
             verify: {verify}\n  timeout: 5\n}}\n\
             {auth}\n",
            port = self.port,
            store = self.dir.path().join("js").display(),
            cert = self.server_cert.display(),
            key = self.server_key.display(),
            ca = self.ca.display(),
            verify = self.verify_clients,
        );
        std::fs::write(self.conf(), text).expect("write nats.conf");
    }

    /// Replaces the auth section and reloads the running server (SIGHUP).
    pub fn reload(&self, auth: &str) {
        self.write_conf(auth);
        let pid = self.child.as_ref().expect("running").id();
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .expect("kill -HUP");
        assert!(status.success());
    }

    pub fn url(&self) -> String {
        format!("tls://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    /// A JetStream context that trusts `pki`'s CA and logs in with `options`.
    pub async fn jetstream(
        &self,
        pki: &Pki,
        options: async_nats::ConnectOptions,
    ) -> jetstream::Context {
        // As in outboxd's main: two rustls back-ends are compiled in, so pick one.
        let _ = async_nats::rustls::crypto::aws_lc_rs::default_provider().install_default();
        let mut o = options
            .require_tls(true)
            .add_root_certificates(pki.path("ca.pem"));
        if self.verify_clients {
            o = o.add_client_certificate(pki.path("client.pem"), pki.path("client.key"));
        }
        let client = o.connect(self.url()).await.expect("test client connects");
        jetstream::new(client)
    }

    /// [`SecureNats::jetstream`] logged in as `user` with `password`.
    pub async fn jetstream_as(&self, pki: &Pki, user: &str, password: &str) -> jetstream::Context {
        let login =
            async_nats::ConnectOptions::with_user_and_password(user.into(), password.into());
        self.jetstream(pki, login).await
    }
}

impl Drop for SecureNats {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// An `authorization` block with one user/password.
pub fn user_block(user: &str, password: &str) -> String {
    format!("authorization {{\n  users = [ {{ user: \"{user}\", password: \"{password}\" }} ]\n}}")
}

/// The output of a one-shot `outboxd` command.
pub struct Output {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Output {
    pub fn all(&self) -> String {
        format!("{}\n{}", self.stdout, self.stderr)
    }
}

/// Runs `outboxd <args>` with `config` written to a file and `env` set; waits at most
/// 60 s.
pub fn outboxd(config: Option<&str>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_outboxd"));
    cmd.args(args);
    if let Some(c) = config {
        let path = dir.path().join("outboxd.toml");
        std::fs::write(&path, c).expect("write config");
        cmd.arg("--config").arg(path);
    }
    cmd.env_remove("RUST_LOG");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn outboxd");
    let pid = child.id();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = match rx.recv_timeout(Duration::from_secs(60)) {
        Ok(out) => out.expect("outboxd output"),
        Err(_) => {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
            panic!("outboxd {args:?} did not finish within 60 s");
        }
    };
    Output {
        code: out.status.code(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A plain HTTP/1.0 GET with extra header lines: (status, head, body).
pub fn http_get_with(port: u16, path: &str, headers: &str) -> Option<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n{headers}\r\n").ok()?;
    let mut raw = String::new();
    s.read_to_string(&mut raw).ok()?;
    let (head, body) = raw.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, head.to_string(), body.to_string()))
}

/// The `[http] listen` port of a config made by [`super::config`].
pub fn http_port(config: &str) -> u16 {
    config
        .lines()
        .find_map(|l| l.strip_prefix("listen = \"127.0.0.1:"))
        .and_then(|rest| rest.trim_end_matches('"').parse().ok())
        .expect("config has [http] listen")
}

/// Decentralized auth without `nsc`: an operator, an account with JetStream, and a
/// user, as signed JWTs (nats-io/jwt v2 claims, `ed25519-nkey`).
pub struct Operator {
    /// `operator:` / `resolver: MEMORY` / `resolver_preload` lines for nats.conf.
    pub server_conf: String,
    /// The user's `.creds` file content (JWT + seed).
    pub creds: String,
}

fn jwt(issuer: &nkeys::KeyPair, subject: &str, name: &str, nats: serde_json::Value) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use base64::Engine as _;
    let header = B64.encode(r#"{"typ":"JWT","alg":"ed25519-nkey"}"#);
    let iat = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let claims = serde_json::json!({
        "jti": format!("{name}-{iat}"),
        "iat": iat,
        "iss": issuer.public_key(),
        "name": name,
        "sub": subject,
        "nats": nats,
    });
    let body = format!("{header}.{}", B64.encode(claims.to_string()));
    let sig = issuer.sign(body.as_bytes()).expect("sign");
    format!("{body}.{}", B64.encode(sig))
}

impl Operator {
    pub fn generate() -> Self {
        let (op, sys, acc, user) = (
            nkeys::KeyPair::new_operator(),
            nkeys::KeyPair::new_account(),
            nkeys::KeyPair::new_account(),
            nkeys::KeyPair::new_user(),
        );
        let op_jwt = jwt(
            &op,
            &op.public_key(),
            "outboxd-test",
            serde_json::json!({"type": "operator", "version": 2}),
        );
        let unlimited = serde_json::json!({
            "subs": -1, "data": -1, "payload": -1, "imports": -1, "exports": -1,
            "wildcards": true, "conn": -1, "leaf": -1,
            "mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1,
        });
        let acc_jwt = jwt(
            &op,
            &acc.public_key(),
            "app",
            serde_json::json!({"limits": unlimited, "type": "account", "version": 2}),
        );
        // JetStream needs a system account.
        let sys_jwt = jwt(
            &op,
            &sys.public_key(),
            "SYS",
            serde_json::json!({"type": "account", "version": 2}),
        );
        let user_jwt = jwt(
            &acc,
            &user.public_key(),
            "outboxd",
            serde_json::json!({"pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1,
                               "type": "user", "version": 2}),
        );
        Self {
            server_conf: format!(
                "operator: \"{op_jwt}\"\nsystem_account: {sys_pub}\nresolver: MEMORY\n\
                 resolver_preload: {{\n  {sys_pub}: \"{sys_jwt}\"\n  {acc_pub}: \"{acc_jwt}\"\n}}\n",
                sys_pub = sys.public_key(),
                acc_pub = acc.public_key()
            ),
            creds: format!(
                "-----BEGIN NATS USER JWT-----\n{user_jwt}\n------END NATS USER JWT------\n\n\
                 -----BEGIN USER NKEY SEED-----\n{}\n------END USER NKEY SEED------\n",
                user.seed().expect("seed")
            ),
        }
    }
}
