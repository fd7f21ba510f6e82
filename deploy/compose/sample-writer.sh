#!/usr/bin/env bash
# Sample application for docker-compose: once a second, one transaction that
# changes "business" state and writes its outbox rows. Runs in a postgres
# image; connection settings come from PG* environment variables.
set -euo pipefail

until pg_isready -q; do sleep 1; done

n=0
while true; do
  n=$((n + 1))
  order="order-$n"
  psql -v ON_ERROR_STOP=1 -q -v order="$order" -v n="$n" <<'SQL'
BEGIN;
INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, correlation_id, headers)
VALUES ('order', :'order', 'OrderPlaced',
        jsonb_build_object('order_id', :'order', 'amount_cents', (:n % 97) * 100, 'currency', 'EUR'),
        'corr-' || :'n', '{"tenant": "demo"}');
INSERT INTO public.outbox (aggregate_type, aggregate_id, event_type, payload, correlation_id, causation_id)
VALUES ('customer', 'customer-' || (:n % 10), 'CustomerOrdered',
        jsonb_build_object('order_id', :'order'), 'corr-' || :'n', :'order');
COMMIT;
SQL
  sleep 1
done
