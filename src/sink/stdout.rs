//! The stdout sink: one structured-mode CloudEvent JSON object per line.
//!
//! It lets the relay's main job run with nothing but Postgres (the demo, a pipe into
//! another tool). A line counts as delivered once it is written and flushed; a
//! closed stdout (broken pipe) is fatal, since nothing downstream can receive.

use std::io::Write;

use super::{Delivered, Envelope, SinkError};

/// Writes events to standard output.
#[derive(Debug, Default)]
pub struct StdoutSink {
    _private: (),
}

impl StdoutSink {
    /// A sink on the process's stdout.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes and flushes one line. The lock keeps concurrent lines whole.
    pub fn publish(&self, env: &Envelope) -> Result<Delivered, SinkError> {
        let mut line =
            crate::event::structured_json(&env.event).map_err(|e| SinkError::Rejected {
                sink: "stdout",
                reason: "encode",
                detail: e.to_string(),
            })?;
        line.push(b'\n');
        let mut out = std::io::stdout().lock();
        out.write_all(&line)
            .and_then(|()| out.flush())
            .map_err(|e| SinkError::Fatal {
                sink: "stdout",
                detail: format!("write failed: {e}"),
            })?;
        Ok(Delivered {
            duplicate: false,
            destination: "stdout".to_string(),
        })
    }
}
