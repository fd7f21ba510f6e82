//! `outboxd healthcheck`: asks the running relay's own `/healthz` (liveness: its loop
//! is not stuck) on `http.listen`, for a container `HEALTHCHECK` in an image that has
//! no shell and no curl. An unspecified listen address (`0.0.0.0`, `[::]`) is probed
//! on loopback. Exit 0 on `200`, 1 otherwise, saying what it probed and what came back.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::EXIT_FAILURE;
use crate::config::Config;

/// How long the whole probe may take (Docker's default HEALTHCHECK timeout is 30 s).
const TIMEOUT: Duration = Duration::from_secs(3);

/// Probes `/healthz`; prints a line either way.
pub async fn run(cfg: &Config) -> ExitCode {
    let addr = match probe_address(&cfg.http.listen) {
        Ok(a) => a,
        Err(e) => {
            eprintln!(
                "outboxd healthcheck: http.listen {:?}: {e}",
                cfg.http.listen
            );
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match tokio::time::timeout(TIMEOUT, get_status(addr)).await {
        Ok(Ok(200)) => {
            println!("outboxd healthcheck: http://{addr}/healthz answered 200");
            ExitCode::SUCCESS
        }
        Ok(Ok(code)) => {
            eprintln!("outboxd healthcheck: http://{addr}/healthz answered {code} (the relay loop is stuck: see /status and the log)");
            ExitCode::from(EXIT_FAILURE)
        }
        Ok(Err(e)) => {
            eprintln!("outboxd healthcheck: http://{addr}/healthz: {e} (is `outboxd run` up, with this config?)");
            ExitCode::from(EXIT_FAILURE)
        }
        Err(_) => {
            eprintln!("outboxd healthcheck: http://{addr}/healthz: no answer within {TIMEOUT:?}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

/// `http.listen` as an address to connect to.
fn probe_address(listen: &str) -> Result<SocketAddr, String> {
    let addr: SocketAddr = listen.parse().map_err(|e| format!("not an address: {e}"))?;
    Ok(match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => (Ipv4Addr::LOCALHOST, addr.port()).into(),
        IpAddr::V6(ip) if ip.is_unspecified() => (Ipv6Addr::LOCALHOST, addr.port()).into(),
        _ => addr,
    })
}

/// The status code of `GET /healthz`.
async fn get_status(addr: SocketAddr) -> std::io::Result<u16> {
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(b"GET /healthz HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .await?;
    let mut head = Vec::new();
    let mut buf = [0u8; 256];
    while !head.windows(2).any(|w| w == b"\r\n") {
        let n = s.read(&mut buf).await?;
        if n == 0 || head.len() > 4096 {
            break;
        }
        head.extend_from_slice(&buf[..n]);
    }
    let line = String::from_utf8_lossy(&head);
    line.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!(
                    "not an HTTP answer: {:?}",
                    line.lines().next().unwrap_or("")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unspecified_address_is_probed_on_loopback() {
        let probed = |listen: &str| probe_address(listen).map(|a| a.to_string());
        assert_eq!(probed("0.0.0.0:9187").as_deref(), Ok("127.0.0.1:9187"));
        assert_eq!(probed("[::]:1").as_deref(), Ok("[::1]:1"));
        assert_eq!(probed("10.1.2.3:80").as_deref(), Ok("10.1.2.3:80"));
        assert!(probed("localhost:80").is_err());
    }
}
