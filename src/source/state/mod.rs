//! What outboxd records about its slot in the database, next to the outbox table, so
//! that a later start tells a first start from a lost slot, and the table and the
//! publication it streamed from from re-created ones (README, "Failure behaviour").
//! One row per slot in `<schema>.outboxd_slots`:
//!
//! | column | meaning |
//! |---|---|
//! | `slot_name` | the slot |
//! | `publication`, `publication_oid` | the publication the slot decodes with |
//! | `table_oid` | the outbox table (its relation id) the stream carries |
//! | `confirmed_lsn`, `confirmed_at` | the slot's confirmed position, and when it was read |
//! | `replay_from_xid` | every transaction that committed after `confirmed_lsn` has a (64-bit) xid at least this; NULL while unknown |
//! | `resync` | why the table's rows must be published again before streaming (it left the publication, or was re-created), or NULL |
//!
//! Why `replay_from_xid` is exact. A snapshot's xmin is the oldest transaction still
//! running when it is taken: every transaction that commits later has an xid at
//! least that. The monitor reads, in one statement, a snapshot's xmin `X` and then the
//! WAL position `W`; everything that committed before the snapshot lies before `W`.
//! Once the slot is confirmed at or past `W`, whatever it has not confirmed committed
//! after the snapshot, so it has an xid ≥ `X`: the rows of that gap are exactly
//! among those `outboxd replay --since-xid X` selects (`age(xmin) <= age(X)`). An older
//! `X` stays true for a newer confirmed position (it only selects more).
//!
//! Written by the streaming instance only (at slot creation and every
//! `postgres.monitor_interval_secs`), never on a server in recovery (a standby is
//! read-only: there a lost slot goes unnoticed across restarts, see the README). Never
//! holds a secret.

mod record;

use chrono::{DateTime, Utc};

use crate::config::{split_table, Config};
use crate::lsn::lsn_text;

/// Name of the state table, in the outbox table's schema.
pub const STATE_TABLE: &str = "outboxd_slots";

/// The state table of `cfg`'s schema, `schema.outboxd_slots`.
pub fn state_table(cfg: &Config) -> String {
    let (schema, _) = split_table(&cfg.postgres.table);
    format!("{schema}.{STATE_TABLE}")
}

/// Whether this connection can keep the slot's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StateAccess {
    /// It can.
    Writable,
    /// The server is a standby: nothing can be written there.
    InRecovery,
    /// The role may not create or write the state table; what the owner must run.
    NotPermitted(String),
}

/// What the table owner runs so that the relay role can keep the record.
fn state_fix(cfg: &Config) -> String {
    format!(
        "as the table owner, run: {} GRANT SELECT, INSERT, UPDATE ON {} TO <relay role>; (part 1 \
         of `outboxd setup`)",
        super::sql::create_state_table_sql(cfg).replace('\n', " "),
        state_table(cfg)
    )
}

/// What the state table says about the slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SlotRecord {
    /// The publication's oid when the slot was created (or last recovered).
    pub publication_oid: u32,
    /// The outbox table's oid the stream carries.
    pub table_oid: u32,
    /// The slot's confirmed position when last read.
    pub confirmed_lsn: u64,
    /// When that was.
    pub confirmed_at: DateTime<Utc>,
    /// See the module docs; `None` while unknown.
    pub replay_from_xid: Option<u64>,
    /// Why the table must be published again first, if it must.
    pub resync: Option<String>,
}

/// The table and the publication as they are now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    /// The configured table's oid, `None` when it does not exist.
    pub table_oid: Option<u32>,
    /// The publication's oid, `None` when it does not exist.
    pub publication_oid: Option<u32>,
    /// The publication covers the table.
    pub published: bool,
}

/// A snapshot's xmin and the WAL position read right after it (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XminMark {
    /// WAL position, read after the snapshot.
    pub wal: u64,
    /// The snapshot's xmin (64-bit).
    pub xmin: u64,
}

/// What a start must do, judged from the record, the slot and the identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No record and no slot: create the slot (and take the initial snapshot when on).
    FirstStart,
    /// A slot but no record (created by `outboxd setup`, another instance, or an
    /// older outboxd): record it and stream.
    Adopt,
    /// Record and slot agree: stream.
    Stream,
    /// The recorded slot is gone or invalidated: its gap may hold rows.
    SlotLost,
    /// The publication was dropped and created again: the slot cannot decode past it.
    PublicationChanged,
    /// The table left the publication or was re-created: rows were not decoded.
    TableChanged(String),
}

/// Judges a start. The slot's state (`lost`) comes from `slot_lost`.
pub fn judge(
    record: Option<&SlotRecord>,
    slot_exists: bool,
    slot_lost: bool,
    now: &Identity,
) -> Verdict {
    let Some(r) = record else {
        return if slot_exists && !slot_lost {
            Verdict::Adopt
        } else if slot_lost {
            Verdict::SlotLost
        } else {
            Verdict::FirstStart
        };
    };
    if !slot_exists || slot_lost {
        return Verdict::SlotLost;
    }
    if now
        .publication_oid
        .is_some_and(|oid| oid != r.publication_oid)
    {
        return Verdict::PublicationChanged;
    }
    if let Some(why) = table_change(r, now) {
        return Verdict::TableChanged(why);
    }
    Verdict::Stream
}

/// Why the table no longer is the one the record says the stream carries, if so.
pub fn table_change(r: &SlotRecord, now: &Identity) -> Option<String> {
    if let Some(why) = &r.resync {
        return Some(why.clone());
    }
    match now.table_oid {
        None => Some("the outbox table was dropped".into()),
        Some(oid) if oid != r.table_oid => Some(format!(
            "the outbox table was dropped and created again (it is relation {oid} now, was {})",
            r.table_oid
        )),
        Some(_) if !now.published && now.publication_oid.is_some() => {
            Some("the outbox table was removed from the publication".into())
        }
        Some(_) => None,
    }
}

/// Why the slot cannot be streamed from, what may be missing, and the recovery.
pub fn lost_message(
    cfg: &Config,
    record: Option<&SlotRecord>,
    slot_present: bool,
    identity: &Identity,
    publication_replaced: bool,
) -> String {
    let p = &cfg.postgres;
    let what = if publication_replaced {
        format!(
            "publication {} was dropped and created again since slot {} was created (its oid is {}, \
             was {}); a slot decodes with the catalog of its own past, so it cannot stream past the \
             drop (PostgreSQL stops with \"publication does not exist\", or skips the rows in between)",
            p.publication,
            p.slot,
            identity.publication_oid.unwrap_or(0),
            record.map_or(0, |r| r.publication_oid)
        )
    } else if slot_present {
        format!(
            "replication slot {} was invalidated (wal_status = lost; max_slot_wal_keep_size \
             exceeded): the WAL it needed is gone",
            p.slot
        )
    } else {
        format!(
            "replication slot {} is gone (dropped, or lost in a primary failover without a \
             failover slot)",
            p.slot
        )
    };
    let (position, by_hand) = match record {
        Some(r) => (
            format!(
                "; outboxd had streamed from it, confirmed up to {} at {}, so rows committed since \
                 may not have reached the broker",
                lsn_text(r.confirmed_lsn),
                r.confirmed_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            ),
            match (r.replay_from_xid, table_change(r, identity)) {
                (Some(xid), None) => format!(
                    "the rows committed since then (by hand: `outboxd replay --since-xid {xid}`)"
                ),
                _ => "every row of the outbox table (where the gap starts is not recorded; by \
                      hand: `outboxd replay`)"
                    .to_string(),
            },
        ),
        None => (
            String::new(),
            "every row of the outbox table (by hand: `outboxd replay`)".to_string(),
        ),
    };
    format!(
        "{what}{position}. outboxd does not replace it silently. To recover, start once with \
         `outboxd run --allow-new-slot` (or postgres.allow_new_slot = true): it creates a new slot \
         and first republishes {by_hand}, with the same event ids. Events written with \
         pg_logical_emit_message in the gap are not in the table and cannot be republished"
    )
}

/// Why the table's rows were not decoded, and the recovery.
pub fn table_message(cfg: &Config, why: &str) -> String {
    let p = &cfg.postgres;
    format!(
        "{why} while outboxd streamed from it, so rows written to it meanwhile were not decoded. \
         To recover: make sure publication {pub_} includes it (as the table owner: ALTER \
         PUBLICATION {pub_} ADD TABLE {table};), then start once with `outboxd run --resync-table` \
         (or postgres.resync_table = true): it publishes every row of {table} (rows delivered \
         before are sent again, with the same ids), then streams on",
        pub_ = p.publication,
        table = p.table,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> SlotRecord {
        SlotRecord {
            publication_oid: 10,
            table_oid: 20,
            confirmed_lsn: 0x100,
            confirmed_at: Utc::now(),
            replay_from_xid: Some(700),
            resync: None,
        }
    }

    const NOW: Identity = Identity {
        table_oid: Some(20),
        publication_oid: Some(10),
        published: true,
    };

    #[test]
    fn without_a_record_a_slot_is_adopted_or_created() {
        assert_eq!(judge(None, false, false, &NOW), Verdict::FirstStart);
        assert_eq!(judge(None, true, false, &NOW), Verdict::Adopt);
        // an invalidated slot is a loss even without a record
        assert_eq!(judge(None, true, true, &NOW), Verdict::SlotLost);
    }

    #[test]
    fn a_recorded_slot_that_is_gone_or_invalidated_is_lost() {
        assert_eq!(
            judge(Some(&record()), false, false, &NOW),
            Verdict::SlotLost
        );
        assert_eq!(judge(Some(&record()), true, true, &NOW), Verdict::SlotLost);
        assert_eq!(judge(Some(&record()), true, false, &NOW), Verdict::Stream);
    }

    #[test]
    fn a_new_publication_or_table_is_noticed() {
        let r = record();
        let republished = Identity {
            publication_oid: Some(11),
            ..NOW
        };
        assert_eq!(
            judge(Some(&r), true, false, &republished),
            Verdict::PublicationChanged
        );
        for (now, says) in [
            (
                Identity {
                    table_oid: Some(21),
                    ..NOW
                },
                "created again (it is relation 21 now, was 20)",
            ),
            (
                Identity {
                    table_oid: None,
                    published: false,
                    ..NOW
                },
                "dropped",
            ),
            (
                Identity {
                    published: false,
                    ..NOW
                },
                "removed from the publication",
            ),
        ] {
            match judge(Some(&r), true, false, &now) {
                Verdict::TableChanged(why) => assert!(why.contains(says), "{why}"),
                other => panic!("{now:?}: {other:?}"),
            }
        }
        // and a recorded resync stays until it is done, whatever the table is now
        let marked = SlotRecord {
            resync: Some("the outbox table was removed from the publication".into()),
            ..record()
        };
        assert!(matches!(
            judge(Some(&marked), true, false, &NOW),
            Verdict::TableChanged(_)
        ));
    }
}
