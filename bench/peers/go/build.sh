#!/usr/bin/env bash
# Builds the Go net/http peer (standard library only) into ~/.cache/keel-go and prints its
# path. Installs Debian's golang-go if `go` is missing; exits non-zero if that fails, so a
# caller can skip the Go system with a note.
set -euo pipefail
cd "$(dirname "$0")"
if ! command -v go >/dev/null 2>&1; then
    echo "installing Debian's golang-go (for the Go net/http peer)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends golang-go >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends golang-go >/dev/null 2>&1; }
fi
out="$HOME/.cache/keel-go"
mkdir -p "$out"
# No module file: one stdlib-only source file builds in GOPATH-less "file mode", offline.
GOCACHE="$out/cache" GO111MODULE=off go build -o "$out/keel-go-peer" main.go
echo "$out/keel-go-peer"
