//! Decoder for the pgoutput messages that `pgwire-replication` hands over raw.
//!
//! The replication client decodes Begin, Commit and logical decoding Messages itself;
//! what reaches this module is the `XLogData` payload of everything else (protocol
//! version 1, text format): Relation, Insert, and the messages an insert-only outbox
//! publication does not produce or does not need (Update, Delete, Truncate, Type,
//! Origin). Values stay `Bytes` slices of the received buffer: no copy per column.
//!
//! Reference: PostgreSQL docs, "Logical Replication Message Formats".

use bytes::{Buf, Bytes};

/// A malformed or unexpected pgoutput message. Always fatal for the session: the
/// stream cannot be interpreted past it.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    /// The message ended before a field it announced.
    #[error("pgoutput message {tag:?} truncated at byte {at}")]
    Truncated {
        /// Message tag.
        tag: char,
        /// Offset where it ran out.
        at: usize,
    },
    /// A tuple column kind other than n, u, t, b.
    #[error("unknown tuple column kind {0:?}")]
    ColumnKind(char),
    /// An empty XLogData payload.
    #[error("empty pgoutput message")]
    Empty,
    /// A string that is not UTF-8 or not NUL-terminated.
    #[error("pgoutput message {0:?} has a malformed string")]
    BadString(char),
}

/// One column of a Relation message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelationColumn {
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
}

/// A Relation message: the shape of the rows that follow it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    /// Relation OID.
    pub id: u32,
    /// Schema.
    pub namespace: String,
    /// Table name.
    pub name: String,
    /// Columns in tuple order.
    pub columns: Vec<RelationColumn>,
}

/// One value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    /// SQL NULL.
    Null,
    /// An unchanged TOASTed value (only in updates; never in inserts).
    Unchanged,
    /// Text-format value.
    Text(Bytes),
    /// Binary-format value (only when `binary` was requested; outboxd does not).
    Binary(Bytes),
}

/// A decoded pgoutput message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    /// Relation (schema) of the following rows.
    Relation(Relation),
    /// An inserted row.
    Insert {
        /// Relation OID.
        relation: u32,
        /// Column values in relation order.
        values: Vec<Value>,
    },
    /// Anything an insert-only outbox does not act on; carries its tag for a log line.
    Ignored(char),
}

/// Decodes one XLogData payload.
pub fn decode(mut buf: Bytes) -> Result<Message, DecodeError> {
    if buf.is_empty() {
        return Err(DecodeError::Empty);
    }
    let total = buf.len();
    let tag = buf.get_u8() as char;
    let mut r = Reader { buf, tag, total };
    match tag {
        'R' => {
            let id = r.u32()?;
            let namespace = r.string()?;
            let name = r.string()?;
            let _replica_identity = r.u8()?;
            let n = r.i16()?.max(0) as usize;
            let mut columns = Vec::with_capacity(n);
            for _ in 0..n {
                let _flags = r.u8()?;
                let name = r.string()?;
                let type_oid = r.u32()?;
                let _typmod = r.i32()?;
                columns.push(RelationColumn { name, type_oid });
            }
            Ok(Message::Relation(Relation {
                id,
                namespace,
                name,
                columns,
            }))
        }
        'I' => {
            let relation = r.u32()?;
            let _new = r.u8()?; // 'N'
            let values = r.tuple()?;
            Ok(Message::Insert { relation, values })
        }
        other => Ok(Message::Ignored(other)),
    }
}

struct Reader {
    buf: Bytes,
    tag: char,
    total: usize,
}

impl Reader {
    fn need(&self, n: usize) -> Result<(), DecodeError> {
        if self.buf.remaining() < n {
            Err(DecodeError::Truncated {
                tag: self.tag,
                at: self.total - self.buf.remaining(),
            })
        } else {
            Ok(())
        }
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn i16(&mut self) -> Result<i16, DecodeError> {
        self.need(2)?;
        Ok(self.buf.get_i16())
    }
    fn u32(&mut self) -> Result<u32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }
    fn i32(&mut self) -> Result<i32, DecodeError> {
        self.need(4)?;
        Ok(self.buf.get_i32())
    }
    fn string(&mut self) -> Result<String, DecodeError> {
        let end = self
            .buf
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::BadString(self.tag))?;
        let s = self.buf.split_to(end);
        self.buf.advance(1);
        String::from_utf8(s.to_vec()).map_err(|_| DecodeError::BadString(self.tag))
    }
    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let n = self.i16()?.max(0) as usize;
        let mut values = Vec::with_capacity(n);
        for _ in 0..n {
            let kind = self.u8()? as char;
            let v = match kind {
                'n' => Value::Null,
                'u' => Value::Unchanged,
                't' | 'b' => {
                    let len = self.i32()?.max(0) as usize;
                    self.need(len)?;
                    let data = self.buf.split_to(len);
                    if kind == 't' {
                        Value::Text(data)
                    } else {
                        Value::Binary(data)
                    }
                }
                other => return Err(DecodeError::ColumnKind(other)),
            };
            values.push(v);
        }
        Ok(values)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::{BufMut, BytesMut};

    /// Encodes a Relation message as the server does (for tests elsewhere too).
    pub(crate) fn relation_bytes(id: u32, ns: &str, name: &str, cols: &[(&str, u32)]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'R');
        b.put_u32(id);
        b.put_slice(ns.as_bytes());
        b.put_u8(0);
        b.put_slice(name.as_bytes());
        b.put_u8(0);
        b.put_u8(b'd');
        b.put_i16(cols.len() as i16);
        for (c, oid) in cols {
            b.put_u8(0);
            b.put_slice(c.as_bytes());
            b.put_u8(0);
            b.put_u32(*oid);
            b.put_i32(-1);
        }
        b.freeze()
    }

    /// Encodes an Insert message with text values (`None` = NULL).
    pub(crate) fn insert_bytes(rel: u32, vals: &[Option<&str>]) -> Bytes {
        let mut b = BytesMut::new();
        b.put_u8(b'I');
        b.put_u32(rel);
        b.put_u8(b'N');
        b.put_i16(vals.len() as i16);
        for v in vals {
            match v {
                None => b.put_u8(b'n'),
                Some(s) => {
                    b.put_u8(b't');
                    b.put_i32(s.len() as i32);
                    b.put_slice(s.as_bytes());
                }
            }
        }
        b.freeze()
    }

    #[test]
    fn decodes_relation() {
        let m = decode(relation_bytes(
            16384,
            "public",
            "outbox",
            &[("id", 2950), ("payload", 3802)],
        ))
        .expect("decodes");
        let Message::Relation(r) = m else {
            panic!("not a relation: {m:?}")
        };
        assert_eq!(r.id, 16384);
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("public", "outbox")
        );
        assert_eq!(
            r.columns[1],
            RelationColumn {
                name: "payload".into(),
                type_oid: 3802
            }
        );
    }

    #[test]
    fn decodes_insert_with_nulls() {
        let m = decode(insert_bytes(7, &[Some("a"), None, Some("{\"x\":1}")])).expect("decodes");
        assert_eq!(
            m,
            Message::Insert {
                relation: 7,
                values: vec![
                    Value::Text(Bytes::from_static(b"a")),
                    Value::Null,
                    Value::Text(Bytes::from_static(b"{\"x\":1}")),
                ]
            }
        );
    }

    #[test]
    fn truncated_messages_are_errors_not_panics() {
        let full = insert_bytes(7, &[Some("abcdef")]);
        for cut in 1..full.len() {
            let r = decode(full.slice(..cut));
            assert!(
                matches!(r, Err(DecodeError::Truncated { tag: 'I', .. })),
                "cut {cut}: {r:?}"
            );
        }
        let rel = relation_bytes(1, "public", "outbox", &[("id", 25)]);
        for cut in 1..rel.len() {
            assert!(decode(rel.slice(..cut)).is_err(), "cut {cut}");
        }
        assert_eq!(decode(Bytes::new()), Err(DecodeError::Empty));
    }

    #[test]
    fn other_messages_are_ignored_by_tag() {
        assert_eq!(
            decode(Bytes::from_static(b"T\0\0\0\0")),
            Ok(Message::Ignored('T'))
        );
        assert_eq!(decode(Bytes::from_static(b"Y")), Ok(Message::Ignored('Y')));
    }
}
