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
# package's daemon is not started here). PostgreSQL, RabbitMQ and NATS run on the machine
# already; the tests make their own databases, queues and streams.
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    echo "installing Debian's prometheus package (for promtool and a real scraper)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends prometheus >/dev/null 2>&1 ||
        { apt-get update >/dev/null && apt-get install -y --no-install-recommends prometheus >/dev/null; }
fi

# A Kafka-API broker for the Kafka tests: Debian has no Kafka, so `tansu` (a Kafka-compatible
# broker in Rust) is built once into ~/.cache/tansu, outside the clone, and reused by every
# later run. The tests start their own instances on free ports with in-memory storage.
TANSU_ROOT="$HOME/.cache/tansu"
if [ -z "${KEEL_TANSU:-}" ] && [ ! -x "$TANSU_ROOT/bin/tansu" ]; then
    echo "building the Kafka-API broker tansu 0.6.0 into $TANSU_ROOT (once; 15-45 min on a cold machine)" >&2
    # Its own target directory: the broker's build must not evict Keel's cached one.
    env -u CARGO_TARGET_DIR cargo install tansu --version 0.6.0 --locked --features dynostore \
        --root "$TANSU_ROOT" --quiet
fi

if cargo nextest --version >/dev/null 2>&1; then
    # nextest does not run doctests; run them first so the suite's summary line comes last.
    cargo test --workspace --doc --quiet
    cargo nextest run --workspace --no-fail-fast "$@"
else
    cargo test --workspace --no-fail-fast "$@"
fi
