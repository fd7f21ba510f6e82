//! Text values of the outbox's columns as the server sends them: `bytea` in hex,
//! `timestamptz` and `timestamp` (ISO, UTC), RFC 3339 in the table-less envelope.

use bytes::Bytes;
use chrono::{DateTime, NaiveDateTime, Utc};

/// bytea text output (`\x` + hex), as with the default `bytea_output = hex`.
pub(super) fn decode_bytea(b: &[u8]) -> Option<Bytes> {
    let hex = b.strip_prefix(b"\\x")?;
    if hex.len() % 2 != 0 {
        return None;
    }
    let nibble = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    hex.chunks(2)
        .map(|p| Some(nibble(p[0])? << 4 | nibble(p[1])?))
        .collect::<Option<Vec<u8>>>()
        .map(Bytes::from)
}

/// Parses an RFC 3339 timestamp (the table-less outbox's `created_at`).
pub fn parse_rfc3339(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// Parses `2026-11-23 10:49:40.123456+00` (timestamptz) or the same without offset
/// (timestamp, taken as UTC).
pub fn parse_timestamp(s: &str) -> Option<DateTime<Utc>> {
    // Fast path, once per event: what the server sends with `datestyle=ISO` and
    // `timezone=UTC` (the replication connection sets both) is RFC 3339 but for the
    // space and the short offset, and chrono's RFC 3339 parser is several times
    // cheaper than a format-string parse.
    if let Some(local) = s.strip_suffix("+00") {
        if local.len() >= 19 && local.is_char_boundary(10) && local.as_bytes()[10] == b' ' {
            let mut rfc3339 = String::with_capacity(local.len() + 6);
            rfc3339.push_str(&local[..10]);
            rfc3339.push('T');
            rfc3339.push_str(&local[11..]);
            rfc3339.push_str("+00:00");
            if let Some(t) = parse_rfc3339(&rfc3339) {
                return Some(t);
            }
        }
    }
    if let Ok(t) = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z") {
        return Some(t.with_timezone(&Utc));
    }
    NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f")
        .ok()
        .map(|n| n.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_parse_the_same_on_the_fast_path() {
        for s in [
            "2026-11-23 10:49:40.123456+00",
            "2026-11-23 10:49:40+00",
            "2026-11-23 10:49:40.5+00",
            "1999-12-31 23:59:59.999999+00",
        ] {
            let slow = DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%#z")
                .expect("valid")
                .with_timezone(&Utc);
            assert_eq!(parse_timestamp(s), Some(slow), "{s}");
        }
        // Other offsets, no offset and junk take the general path.
        assert_eq!(
            parse_timestamp("2026-11-23 12:49:40+02"),
            parse_timestamp("2026-11-23 10:49:40+00")
        );
        assert_eq!(
            parse_timestamp("2026-11-23 10:49:40"),
            parse_timestamp("2026-11-23 10:49:40+00")
        );
        assert_eq!(parse_timestamp("2026-11-23 1x:49:40+00"), None);
        assert_eq!(parse_timestamp("é+00"), None);
    }

    #[test]
    fn timestamps_without_zone_are_utc() {
        let ts = parse_timestamp("2026-01-02 03:04:05").expect("parses");
        assert_eq!(ts.to_rfc3339(), "2026-01-02T03:04:05+00:00");
        assert!(parse_timestamp("yesterday").is_none());
    }
}
