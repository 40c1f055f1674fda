#!/usr/bin/env bash
# Builds the npm package @verge/client into client-wasm/dist: the wasm32 release build of
# client-wasm, wasm-bindgen (the CLI at the exact version Cargo.lock pins, installed when missing
# or different), wasm-opt -Oz from the npm package binaryen, and the per-runtime entry files.
# Idempotent; `npm run build` in client-wasm/ runs it.
set -euo pipefail
cd "$(dirname "$0")/.."

bash scripts/setup.sh >/dev/null

# The CLI must match the wasm-bindgen crate exactly: the glue it writes and the crate's
# imports are one protocol.
want=$(awk '$0 == "name = \"wasm-bindgen\"" { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)
have=$(wasm-bindgen --version 2>/dev/null | awk '{print $2}' || true)
if [ "$have" != "$want" ]; then
    echo "build-client: installing wasm-bindgen-cli $want (found: ${have:-none})"
    # No --locked: the CLI's own lock file pins crates this toolchain cannot build.
    cargo install wasm-bindgen-cli --version "$want"
fi

if [ ! -x client-wasm/node_modules/.bin/wasm-opt ]; then
    (cd client-wasm && npm install --no-audit --no-fund)
fi

# Size matters for a module every cold start downloads and compiles, and so does the CPU of
# the edge request that syncs. Everything is optimised for speed and size ("s"). Automerge does
# the sync's work (the queued writes become one change, the node's answer is applied), and with
# "z" it took 40% longer: an edge request's 20 increments 2.4 ms against 1.7 ms, for 0.05 MB
# less gzipped (0.57 against 0.62 MB; "3" makes it 1.35 ms at 0.75 MB). VERGE_WASM_OPT_LEVEL and
# VERGE_WASM_AUTOMERGE_OPT_LEVEL choose otherwise. The workspace's release profile is tuned for
# the node, so the wasm32 build overrides it here (only wasm32 artifacts are affected; build
# scripts keep their own settings).
# TOML writes numeric levels bare and "s"/"z" quoted.
toml_level() { case "$1" in [0-3]) echo "$1" ;; *) echo "\"$1\"" ;; esac; }
CARGO_PROFILE_RELEASE_OPT_LEVEL=${VERGE_WASM_OPT_LEVEL:-s} CARGO_PROFILE_RELEASE_LTO=fat \
    CARGO_PROFILE_RELEASE_CODEGEN_UNITS=1 CARGO_PROFILE_RELEASE_DEBUG=0 \
    cargo build -p verge-client --target wasm32-unknown-unknown --release --locked \
    --config "profile.release.package.automerge.opt-level=$(toml_level "${VERGE_WASM_AUTOMERGE_OPT_LEVEL:-s}")"

out=client-wasm/dist
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
wasm-bindgen --target web --no-typescript --out-dir "$tmp" \
    target/wasm32-unknown-unknown/release/verge_client.wasm
# -Oz for size, and no --all-features: only what the Rust target emits, which every supported
# runtime (Node 20, Deno, workerd, current browsers) runs.
client-wasm/node_modules/.bin/wasm-opt -Oz --strip-debug --strip-producers \
    --enable-bulk-memory --enable-nontrapping-float-to-int --enable-sign-ext \
    --enable-mutable-globals --enable-reference-types --enable-multivalue \
    "$tmp/verge_client_bg.wasm" -o "$tmp/verge_client_bg.opt.wasm"
mv "$tmp/verge_client_bg.opt.wasm" "$tmp/verge_client_bg.wasm"

rm -rf "$out"
mkdir -p "$out"
cp "$tmp/verge_client.js" "$tmp/verge_client_bg.wasm" "$out/"
cp client-wasm/js/*.js client-wasm/js/*.d.ts "$out/"
raw=$(wc -c <"$out/verge_client_bg.wasm")
gz=$(gzip -9 -c "$out/verge_client_bg.wasm" | wc -c)
echo "build-client: $out ready (wasm $raw bytes, $gz gzipped)"
