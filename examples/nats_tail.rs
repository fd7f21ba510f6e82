//! Prints the CloudEvents in a JetStream stream, one block per message: the subject,
//! the `ce-*` headers and the body. Used by `make demo`; handy against any stream.
//!
//! Usage: `cargo run --example nats_tail -- <nats-url> <stream> [expected-count]`
//! Waits (up to 30 s) until the stream holds `expected-count` messages, then prints.

use std::time::{Duration, Instant};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let url = args
        .next()
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let stream_name = args.next().unwrap_or_else(|| "OUTBOX".into());
    let expected: u64 = args.next().map(|s| s.parse()).transpose()?.unwrap_or(1);
    let js = async_nats::jetstream::new(async_nats::connect(&url).await?);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut stream = loop {
        if let Ok(mut s) = js.get_stream(&stream_name).await {
            if s.info().await?.state.messages >= expected {
                break s;
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!("stream {stream_name} did not reach {expected} messages");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let state = stream.info().await?.state.clone();
    for seq in state.first_sequence..=state.last_sequence {
        let m = stream.get_raw_message(seq).await?;
        println!("#{seq} {}", m.subject);
        let mut headers: Vec<_> = m
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    v.first().map(|v| v.to_string()).unwrap_or_default(),
                )
            })
            .collect();
        headers.sort();
        for (k, v) in headers {
            println!("  {k}: {v}");
        }
        println!("  body: {}", String::from_utf8_lossy(&m.payload));
    }
    println!("{} events in stream {stream_name}", state.messages);
    Ok(())
}
