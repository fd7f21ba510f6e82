package dedup

import (
	"context"
	"database/sql"
	"database/sql/driver"
	"errors"
	"io"
	"strings"
	"sync"
	"testing"
)

// A minimal database/sql driver standing in for PostgreSQL: it understands the two
// statements of this test, keeps committed rows in memory and drops a rolled-back
// transaction's. It lets the example be tested with the standard library alone.
type store struct {
	mu        sync.Mutex
	processed map[string]bool
	orders    []string
}

type fakeDriver struct{ s *store }
type conn struct {
	s  *store
	tx *tx
}
type tx struct {
	c         *conn
	processed []string
	orders    []string
}
type stmt struct {
	c *conn
	q string
}

func (d fakeDriver) Open(string) (driver.Conn, error)     { return &conn{s: d.s}, nil }
func (c *conn) Prepare(q string) (driver.Stmt, error)     { return &stmt{c, q}, nil }
func (c *conn) Close() error                              { return nil }
func (c *conn) Begin() (driver.Tx, error)                 { c.tx = &tx{c: c}; return c.tx, nil }
func (s *stmt) Close() error                              { return nil }
func (s *stmt) NumInput() int                             { return -1 }
func (s *stmt) Query([]driver.Value) (driver.Rows, error) { return nil, io.EOF }
func (s *stmt) Exec(args []driver.Value) (driver.Result, error) {
	st, t := s.c.s, s.c.tx
	st.mu.Lock()
	defer st.mu.Unlock()
	id := args[0].(string)
	switch {
	case strings.HasPrefix(s.q, "INSERT INTO processed_events"):
		if st.processed[id] {
			return driver.RowsAffected(0), nil
		}
		for _, p := range t.processed {
			if p == id {
				return driver.RowsAffected(0), nil
			}
		}
		t.processed = append(t.processed, id)
		return driver.RowsAffected(1), nil
	case strings.HasPrefix(s.q, "INSERT INTO orders"):
		t.orders = append(t.orders, id)
		return driver.RowsAffected(1), nil
	}
	return nil, errors.New("unexpected statement: " + s.q)
}
func (t *tx) Commit() error {
	st := t.c.s
	st.mu.Lock()
	defer st.mu.Unlock()
	for _, p := range t.processed {
		st.processed[p] = true
	}
	st.orders = append(st.orders, t.orders...)
	return nil
}
func (t *tx) Rollback() error { return nil }

func TestEachEventIsAppliedOnce(t *testing.T) {
	// Given a consumer database and four deliveries: e-1 twice, e-2 whose first
	// handling fails, then e-2 again.
	st := &store{processed: map[string]bool{}}
	sql.Register("fake-once", fakeDriver{st})
	db, err := sql.Open("fake-once", "")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	order := func(subject string) func(*sql.Tx) error {
		return func(tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, "INSERT INTO orders (id) VALUES ($1)", subject)
			return err
		}
	}
	fail := func(*sql.Tx) error { return errors.New("transient") }

	// When each is handled
	steps := []struct {
		id    string
		apply func(*sql.Tx) error
		want  bool
		fails bool
	}{
		{"e-1", order("o-1"), true, false},
		{"e-1", order("o-1"), false, false},
		{"e-2", fail, false, true},
		{"e-2", order("o-2"), true, false},
	}
	for i, s := range steps {
		applied, err := HandleOnce(ctx, db, s.id, s.apply)
		if (err != nil) != s.fails || applied != s.want {
			t.Fatalf("step %d (%s): applied=%v err=%v, want applied=%v fails=%v", i, s.id, applied, err, s.want, s.fails)
		}
	}

	// Then each effect happened once
	if got := strings.Join(st.orders, ","); got != "o-1,o-2" {
		t.Fatalf("orders = %s, want o-1,o-2", got)
	}
}

func TestEventID(t *testing.T) {
	cases := []struct {
		headers map[string]string
		body    string
		want    string
	}{
		{map[string]string{"ce-id": "r%201/%C3%BC+%25"}, "", "r 1/ü+%"}, // NATS binary mode
		{map[string]string{"ce_id": "r 1/ü+%"}, "", "r 1/ü+%"},          // Kafka binary mode
		{nil, `{"specversion":"1.0","id":"e-3","data":{}}`, "e-3"},      // structured mode
	}
	for _, c := range cases {
		got, err := EventID(c.headers, []byte(c.body))
		if err != nil || got != c.want {
			t.Fatalf("EventID(%v, %q) = %q, %v; want %q", c.headers, c.body, got, err, c.want)
		}
	}
	if _, err := EventID(nil, []byte("not json")); err == nil {
		t.Fatal("a message without id must be an error")
	}
}
