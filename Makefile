# outboxd: the two commands of the README, and their pieces.
#   make demo   build, start a throw-away Postgres (+ nats-server), relay sample events
#   make test   install what is missing, then the whole test suite
#   make test-matrix   the version-dependent tests on PostgreSQL 14/16/17/18 and
#                      nats-server 2.10/2.15 (docs/versions.md)
.PHONY: test test-matrix demo deps lint lint-deploy build build-release

CARGO ?= cargo

deps:
	bash scripts/ensure-deps.sh

build: deps
	$(CARGO) build --locked --all-targets

# The Dockerfile's build stage command, with its flags, so the image build cannot rot.
build-release: deps
	LIBZ_SYS_STATIC=1 $(CARGO) build --release --locked --bin outboxd

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

lint-deploy:
	bash scripts/lint-deploy.sh

test: deps
	$(CARGO) test --locked --lib --tests

# The version matrix: installs the pinned PostgreSQL and nats-server builds into
# .tmp/tools (scripts/ensure-deps.sh --matrix), then runs scripts/test-matrix.sh, a
# focused subset of the suite once per version (~8 minutes on 2 cores). Knobs:
# MATRIX_PG="14 16 17 18", MATRIX_NATS="2.10.26 2.15.1".
test-matrix: deps
	bash scripts/ensure-deps.sh --matrix
	CARGO=$(CARGO) bash scripts/test-matrix.sh

demo: deps
	bash scripts/demo.sh

# Throughput, end-to-end latency and memory against the pg_recvlogical ceiling, on a
# throw-away Postgres and nats-server under .tmp/bench; prints a table and rewrites the
# generated block of BENCHMARKS.md; NATS and Kafka each at least once and exactly once
# ("nats-eo", "kafka-eo"). Takes ~10 minutes. Not part of `make test` and never
# run by CI. Knobs: BENCH_N, BENCH_REPEAT, BENCH_RATES, BENCH_BATCHED, BENCH_LATENCY_SECS
# (bench/bench.py).
.PHONY: bench
bench: build-release
	python3 bench/bench.py
