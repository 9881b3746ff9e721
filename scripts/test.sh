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

# Real servers. Prometheus (and its `promtool`) for the metrics tests: Debian's package,
# installed if missing; the tests start their own instance on a free port and data dir (the
# package's daemon is not started here). Later suites (PostgreSQL, RabbitMQ, NATS, etcd, a
# Kafka-API broker) are started by scripts/services.sh once they exist.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "installing Debian's prometheus package (for promtool and a real scraper)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi

if cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doctests; run them first so the suite's summary line comes last.
    cargo test --workspace --doc --quiet
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
