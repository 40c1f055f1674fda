#!/usr/bin/env bash
# Installs what building and testing Verge needs, idempotently: the pinned Rust toolchain with
# rustfmt and clippy, the wasm32 target, cargo-deny (the dependency policy in deny.toml) and
# s3s-fs (the S3-compatible server of the backup tests).
# Safe to run any number of times.
set -euo pipefail
cd "$(dirname "$0")/.."

want=$(sed -n 's/^channel *= *"\(.*\)"/\1/p' rust-toolchain.toml)
if ! rustup run "$want" rustc --version >/dev/null 2>&1; then
    # No network toolchain downloads here: when the machine's stable toolchain is the pinned
    # version, register it under the pinned name.
    have=$(rustc +stable --version | awk '{print $2}')
    if [ "$have" = "$want" ]; then
        rustup toolchain link "$want" "$(rustc +stable --print sysroot)"
    else
        rustup toolchain install "$want" --profile minimal --component rustfmt,clippy
    fi
fi
if ! rustup run "$want" rustc --print target-libdir --target wasm32-unknown-unknown 2>/dev/null | xargs -r test -d; then
    rustup target add --toolchain "$want" wasm32-unknown-unknown 2>/dev/null \
        || rustup target add --toolchain stable wasm32-unknown-unknown
fi
# cargo-deny, pinned: built from crates.io once (about 2 minutes), then found on PATH.
deny_want=0.20.2
deny_have=$(cargo deny --version 2>/dev/null | awk '{print $2}' || true)
if [ "$deny_have" != "$deny_want" ]; then
    echo "setup: installing cargo-deny $deny_want"
    cargo install cargo-deny --version "$deny_want" --locked
fi
# s3s-fs, pinned: the S3-compatible server the backup tests start on loopback (a real S3 API
# over files; no credentials or network beyond 127.0.0.1).
s3s_want=0.14.1
s3s_have=$(s3s-fs --version 2>/dev/null | awk '{print $2}' || true)
if [ "$s3s_have" != "$s3s_want" ]; then
    echo "setup: installing s3s-fs $s3s_want (the backup tests' S3 server)"
    cargo install s3s-fs --version "$s3s_want" --features binary --locked
fi
echo "setup: rust $(rustc --version | awk '{print $2}') with wasm32-unknown-unknown, cargo-deny $deny_want, s3s-fs $s3s_want ready"
