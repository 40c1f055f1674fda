#!/usr/bin/env bash
# Fetches libfaketime into target/faketime, idempotently, for the tests that run a node with
# its wall clock moved (node/tests/clock.rs sets LD_PRELOAD to it). `apt-get download` needs
# neither root nor an installed package; on a system without apt, install libfaketime and set
# VERGE_TEST_FAKETIME to its libfaketimeMT.so.1.
set -euo pipefail
cd "$(dirname "$0")/.."
dest=target/faketime
if compgen -G "$dest/usr/lib/*/faketime/libfaketimeMT.so.1" >/dev/null; then
    exit 0
fi
if ! command -v apt-get >/dev/null; then
    echo "fetch-faketime: no apt-get here; install libfaketime and set VERGE_TEST_FAKETIME" >&2
    exit 0
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && apt-get download -q libfaketime >/dev/null 2>&1) || {
    apt-get update -q >/dev/null 2>&1 || true
    (cd "$tmp" && apt-get download -q libfaketime >/dev/null)
}
mkdir -p "$dest"
dpkg -x "$tmp"/libfaketime_*.deb "$dest"
echo "fetch-faketime: $(compgen -G "$dest/usr/lib/*/faketime/libfaketimeMT.so.1")"
