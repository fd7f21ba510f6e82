-- Runs once, as the superuser "postgres", when the compose Postgres volume is
-- first created (docker-entrypoint-initdb.d). Same steps as the production
-- runbook in deploy/kubernetes/least-privilege.sql, with a demo password.

CREATE TABLE public.outbox (
    id             uuid        PRIMARY KEY DEFAULT gen_random_uuid(),
    aggregate_type text        NOT NULL,
    aggregate_id   text        NOT NULL,
    event_type     text        NOT NULL,
    payload        jsonb       NOT NULL,
    correlation_id text,
    causation_id   text,
    headers        jsonb,
    created_at     timestamptz NOT NULL DEFAULT now()
);

-- outboxd logs in as a dedicated role: REPLICATION to stream, SELECT on the
-- one table, nothing else (not a superuser, owns nothing).
CREATE ROLE outboxd WITH LOGIN REPLICATION PASSWORD 'outboxd';
GRANT USAGE ON SCHEMA public TO outboxd;
GRANT SELECT ON public.outbox TO outboxd;

-- The table owner creates the publication; inserts are the only events.
CREATE PUBLICATION outboxd FOR TABLE public.outbox WITH (publish = 'insert');
