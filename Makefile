# outboxd: the two commands of the README, and their pieces.
#   make demo   build, start a throw-away Postgres (+ nats-server), relay sample events
#   make test   install what is missing, then the whole test suite
.PHONY: test demo deps lint lint-deploy build build-release

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

demo: deps
	bash scripts/demo.sh
