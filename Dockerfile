# syntax=docker/dockerfile:1
#
# outboxd image: built on Debian bookworm, run on distroless as uid 65532.
#   docker build -t outboxd .
#   docker run --read-only -v ./outboxd.toml:/etc/outboxd/outboxd.toml:ro -p 9187:9187 outboxd
# The config file is not baked in: mount it (compose, ConfigMap) at the path in CMD.

# Pinned: the Rust the project is built and tested with (CI: rustc 1.95.0).
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# rdkafka builds librdkafka from source (vendored): C/C++ toolchain, perl and
# python3 for its configure script, zlib headers, and OpenSSL headers (SSL and
# SASL_SSL listeners; libssl3 itself is in the distroless runtime).
# Versions are not pinned: the bookworm base image pins the distribution, and
# exact Debian versions vanish from the mirrors after each point release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends gcc g++ make pkg-config zlib1g-dev libssl-dev perl python3 \
 && rm -rf /var/lib/apt/lists/*

# Link zlib statically: the distroless runtime has no libz.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never

WORKDIR /src
COPY . .

# Cache mounts keep the registry and target/ between builds; the binary is
# copied out of target/ because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin outboxd \
 && install -D -m 0755 target/release/outboxd /out/outboxd

# Fail here, not at start-up, if the binary needs a shared library that
# distroless/cc does not ship (it has glibc, libgcc, libstdc++ and OpenSSL 3).
RUN extra="$(readelf -d /out/outboxd | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p' \
      | grep -Ev '^(libc|libm|libdl|librt|libpthread|libgcc_s|libstdc\+\+|libssl|libcrypto|ld-linux-x86-64|ld-linux-aarch64)\.so' || true)" \
 && if [ -n "$extra" ]; then echo "not in the runtime image: $extra" >&2; exit 1; fi

FROM gcr.io/distroless/cc-debian12:nonroot

# Set by the build (docker build --build-arg VERSION=... --build-arg REVISION=$(git rev-parse HEAD)).
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="outboxd" \
      org.opencontainers.image.description="Transactional outbox relay: PostgreSQL logical replication to NATS JetStream and Kafka as CloudEvents" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}"

COPY --from=build /out/outboxd /usr/local/bin/outboxd

# Nothing is written at run time, so the root filesystem may be read-only.
USER 65532:65532
EXPOSE 9187
# distroless has no shell or curl: the binary probes its own /healthz (liveness: the
# relay loop is not stuck), with the listen address and token of the mounted config.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
  CMD ["/usr/local/bin/outboxd", "healthcheck", "--config", "/etc/outboxd/outboxd.toml"]
ENTRYPOINT ["/usr/local/bin/outboxd"]
CMD ["run", "--config", "/etc/outboxd/outboxd.toml"]
