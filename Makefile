# outboxd: the two commands of the README, and their pieces.
#   make demo   build, start a throw-away Postgres (+ nats-server), relay sample events
#   make test   install what is missing, then the whole test suite
.PHONY: test demo deps lint lint-deploy build

CARGO ?= cargo

deps:
	bash scripts/ensure-deps.sh

build: deps
	$(CARGO) build --locked --all-targets

lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --locked --all-targets -- -D warnings

lint-deploy:
	bash scripts/lint-deploy.sh

test: deps
	$(CARGO) test --locked --lib --tests

demo: deps
	bash scripts/demo.sh
