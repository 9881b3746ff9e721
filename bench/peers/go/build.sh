#!/usr/bin/env bash
# Builds the Go peers into ~/.cache/keel-go and prints the path of the one asked for:
#   bench/peers/go/build.sh         keel-go-peer, standard library only (Debian's golang-go)
#   bench/peers/go/build.sh extra   keel-go-peer-extra, plus the grpc-go and h2c roles, from
#                                   Debian's golang-google-grpc-dev and golang-golang-x-net-dev
# Installs the Debian packages if missing; exits non-zero if that fails, so a caller can skip
# the Go system with a note. GOPATH mode, no module file: nothing is fetched.
set -euo pipefail
cd "$(dirname "$0")"
want=${1:-stdlib}
need=(golang-go)
[ "$want" = extra ] && need+=(golang-google-grpc-dev golang-golang-x-net-dev)
missing=()
for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
    echo "installing Debian's ${missing[*]} (for the Go peers)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1 ||
        { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null 2>&1; }
fi
out="$HOME/.cache/keel-go"
mkdir -p "$out"
export GOCACHE="$out/cache" GO111MODULE=off GOPATH=/usr/share/gocode
if [ "$want" = extra ]; then
    go build -tags debianlibs -o "$out/keel-go-peer-extra" .
    echo "$out/keel-go-peer-extra"
else
    go build -o "$out/keel-go-peer" .
    echo "$out/keel-go-peer"
fi
