#!/usr/bin/env bash
# The whole test suite: starts or installs whatever real servers the tests need, then runs
# every test (unit, integration over real TCP, real processes, doctests).
#
# Usage: scripts/test.sh [extra nextest/cargo-test args]
set -euo pipefail
cd "$(dirname "$0")/.."

# A target directory outside the clone, so CI's fresh checkouts reuse earlier builds.
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

# Real servers: the foundation's tests need none beyond processes and TCP on loopback.
# Later suites (PostgreSQL, RabbitMQ, NATS, etcd, a Kafka-API broker) are started here by
# scripts/services.sh once they exist, each on its own port and data directory.

if cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doctests; run them first so the suite's summary line comes last.
    cargo test --workspace --doc --quiet
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
