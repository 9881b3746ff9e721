#!/usr/bin/env bash
# Message consumer scenario (BENCH.md S4, target T5): idempotent insert in PostgreSQL with 10 %
# redeliveries; Keel's consumer rate against min(broker-only consumer, pgbench running the same
# SQL), all three measured in the same run, plus the zero-duplicate-effects check.
# Needs PostgreSQL (postgres@127.0.0.1:5432, trust auth, pgbench) and NATS JetStream
# (127.0.0.1:4222). See crates/keel-messaging/examples/consumer_bench.rs for the set-up.
#
# Usage: bench/consumer.sh [messages=50000] [concurrency=16] [pgbench seconds=10] [batch=16]
# The report is also written to bench/results/consumer-<date>.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
cargo build --release -q -p keel-messaging --example consumer_bench
mkdir -p bench/results
out="bench/results/consumer-$(date -u +%Y-%m-%dT%H%M%SZ).md"
{
  echo "<!-- bench/consumer.sh $*, $(date -u +%FT%TZ), $(nproc) cores -->"
  echo
  "$CARGO_TARGET_DIR/release/examples/consumer_bench" "${1:-50000}" "${2:-16}" "${3:-10}" "${4:-16}"
} | tee "$out"
echo
echo "written to $out"
