#!/usr/bin/env bash
# Everything CI checks, in the same order: formatting, lints, docs, then the full test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/keel-target}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

echo "== rustfmt"
cargo fmt --all -- --check
echo "== clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== rustdoc"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
echo "== tests"
scripts/test.sh
