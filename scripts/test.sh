#!/usr/bin/env bash
# The whole test suite: formatting, lints, the wasm32 build of core, and every test.
# This is what CI runs (.ci/run) and what the README's second command runs.
set -euo pipefail
cd "$(dirname "$0")/.."

# A one-off build gains nothing from incremental artifacts, which double the
# size of target/ on disk.
if [[ "${CI:-}" == "true" ]]; then
    export CARGO_INCREMENTAL=0
fi

bash scripts/setup.sh
bash scripts/fetch-faketime.sh

step() { printf '\n== %s\n' "$*"; }

step "format"
cargo fmt --all -- --check

step "lints"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "dependency policy (licenses, duplicate versions, sources: deny.toml)"
# cargo-deny reads the metadata of every platform's dependencies, offline: fetch them all
# first (a cache filled by builds on this machine holds only this platform's).
cargo fetch --locked --quiet
cargo deny --offline --locked check licenses bans sources

step "docs (rustdoc, warnings denied)"
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --locked

step "fuzz targets build (run them with cargo +nightly fuzz, docs/security.md)"
cargo build --manifest-path core/fuzz/Cargo.toml --bins --locked --target-dir target

step "core builds for wasm32"
cargo build -p verge-core --target wasm32-unknown-unknown --locked

step "tests"
cargo test --workspace --locked

step "wasm client (Node, workerd, Deno, Chromium)"
bash scripts/test-client.sh
