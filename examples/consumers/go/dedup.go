// Package dedup applies each outboxd event once, although at-least-once delivery
// may bring it twice (after a relay crash, a replay, a slot recovery, or a
// redelivery of an unacknowledged message).
//
// The effect and the record of the event's CloudEvent id commit in one database
// transaction; the message is acknowledged to the broker only after that commit.
// A crash in between means a redelivery, which the recorded id makes a no-op.
//
// Standard library only: database/sql with the PostgreSQL driver of your choice,
// and any NATS or Kafka client, whose message headers go to EventID.
//
//	CREATE TABLE processed_events (id text PRIMARY KEY, processed_at timestamptz NOT NULL DEFAULT now());
package dedup

import (
	"context"
	"database/sql"
	"encoding/json"
	"errors"
	"fmt"
	"net/url"
)

// EventID returns the CloudEvent id of a message from outboxd, in either content
// mode. NATS binary mode: the "ce-id" header, percent-encoded by the CloudEvents
// HTTP rule, so it is decoded (PathUnescape leaves '+' alone, as that rule does).
// Kafka binary mode: the "ce_id" header, as is. Structured mode: the "id" member of
// the JSON body.
func EventID(headers map[string]string, body []byte) (string, error) {
	if v, ok := headers["ce-id"]; ok {
		return url.PathUnescape(v)
	}
	if v, ok := headers["ce_id"]; ok {
		return v, nil
	}
	var event struct {
		ID string `json:"id"`
	}
	if err := json.Unmarshal(body, &event); err != nil {
		return "", fmt.Errorf("no ce-id/ce_id header and the body is not a structured CloudEvent: %w", err)
	}
	if event.ID == "" {
		return "", errors.New("structured CloudEvent without an id")
	}
	return event.ID, nil
}

// HandleOnce runs apply and records id in one transaction, unless id was recorded
// before. It reports whether apply ran. When apply fails, nothing is recorded: do
// not acknowledge the message, and it comes again.
func HandleOnce(ctx context.Context, db *sql.DB, id string, apply func(*sql.Tx) error) (applied bool, err error) {
	tx, err := db.BeginTx(ctx, nil)
	if err != nil {
		return false, err
	}
	defer func() {
		if !applied {
			_ = tx.Rollback()
		}
	}()
	res, err := tx.ExecContext(ctx, "INSERT INTO processed_events (id) VALUES ($1) ON CONFLICT DO NOTHING", id)
	if err != nil {
		return false, err
	}
	n, err := res.RowsAffected()
	if err != nil {
		return false, err
	}
	if n == 0 {
		return false, nil // a duplicate: acknowledge it, do nothing
	}
	if err := apply(tx); err != nil {
		return false, err
	}
	if err := tx.Commit(); err != nil {
		return false, err
	}
	return true, nil
}
