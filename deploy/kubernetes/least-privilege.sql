-- Database setup for outboxd, least privilege. Run once per database, by a DBA,
-- e.g.  psql "postgres://admin@orders-db/orders" -v password="$OUTBOXD_PASSWORD" -f least-privilege.sql
--
-- Server prerequisites (postgresql.conf, restart needed):
--   wal_level = logical, max_replication_slots >= 1 per outboxd, max_wal_senders >= the same.
-- Managed services: RDS/Aurora  rds.logical_replication = 1 and GRANT rds_replication TO outboxd;
--                   Cloud SQL   cloudsql.logical_decoding = on and ALTER ROLE outboxd REPLICATION as cloudsqlsuperuser.
--
-- pg_hba.conf must allow the role to connect to the database (a logical
-- replication connection is a normal "host <db> outboxd" line, not "replication"),
-- best over TLS with SCRAM only:  hostssl <db> outboxd <net> scram-sha-256
-- (password_encryption = scram-sha-256 before the role gets its password), and
-- outboxd with [postgres.tls] mode = "verify-full" (docs/security.md).

\set ON_ERROR_STOP on

-- 1. A dedicated login role: REPLICATION lets it create and stream from its
--    slot; it is not a superuser and owns nothing.
CREATE ROLE outboxd WITH LOGIN REPLICATION NOSUPERUSER NOCREATEDB NOCREATEROLE
    PASSWORD :'password';

-- 2. Read access to the outbox table only (`outboxd replay` reads it; streaming
--    does not need it; outboxd never writes), and heartbeats (PUBLIC has this
--    unless it was revoked).
GRANT CONNECT ON DATABASE :"DBNAME" TO outboxd;
GRANT USAGE ON SCHEMA public TO outboxd;
GRANT SELECT ON public.outbox TO outboxd;
-- The function gained a fourth parameter (flush) in PostgreSQL 17: grant the one
-- this server has.
DO $grant$ BEGIN
IF to_regprocedure('pg_catalog.pg_logical_emit_message(boolean, text, text, boolean)') IS NOT NULL THEN
  GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text, boolean) TO outboxd;
ELSE
  GRANT EXECUTE ON FUNCTION pg_catalog.pg_logical_emit_message(boolean, text, text) TO outboxd;
END IF; END $grant$;

-- Where outboxd records its slot (position, the table and publication it streams),
-- so that a slot lost while outboxd is stopped is never replaced silently
-- (docs/failures.md). outboxd writes one row per slot.
CREATE TABLE IF NOT EXISTS public.outboxd_slots (
  slot_name text PRIMARY KEY,
  publication text NOT NULL,
  publication_oid oid NOT NULL,
  table_oid oid NOT NULL,
  confirmed_lsn pg_lsn NOT NULL,
  confirmed_at timestamptz NOT NULL,
  replay_from_xid xid8,
  resync text
);
GRANT SELECT, INSERT, UPDATE ON public.outboxd_slots TO outboxd;

-- 3. The publication is created by the table owner (run this part as the
--    owner, e.g. SET ROLE orders_owner;), so outboxd needs no ownership.
--    Inserts only: outbox rows are immutable events; deleting old rows
--    (housekeeping) must not publish anything.
CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');

-- 4. The replication slot belongs to outboxd (its role has REPLICATION):
--    "outboxd setup --config FILE" shows what is missing, "--apply" creates it.
--    When retiring an outboxd, drop its slot, or Postgres keeps WAL for it forever:
--      SELECT slot_name, active,
--             pg_size_pretty(pg_wal_lsn_diff(pg_current_wal_lsn(), confirmed_flush_lsn)) AS retained
--        FROM pg_replication_slots;
--      SELECT pg_drop_replication_slot('orders_outboxd');
