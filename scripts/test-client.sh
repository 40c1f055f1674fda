#!/usr/bin/env bash
# Tests of the Wasm client package against real nodes: the API under Node's test runner, the
# workerd cart through Miniflare, the Node and Deno carts, the workerd chat at two replicating
# nodes, and the browser export in headless Chromium. Installs what it needs, idempotently: the
# wasm32 target (setup.sh), wasm-bindgen-cli and the npm packages (build-client.sh), Debian's
# chromium when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -x /usr/bin/chromium ]; then
    echo "test-client: installing Debian's chromium"
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo_ apt-get install -y -qq --no-install-recommends chromium >/dev/null
fi

# npm packages at the versions of the committed lock file, when node_modules is missing or
# older than it. (`npm install`, not `npm ci`: deno's lock entries name optional packages for
# other platforms that `npm ci` insists on, while `npm install` keeps the lock as it is.)
if [ ! -d client-wasm/node_modules ] || [ client-wasm/package-lock.json -nt client-wasm/node_modules ]; then
    (cd client-wasm && npm install --no-audit --no-fund)
fi

bash scripts/build-client.sh
# The tests start the debug `verge` binary.
cargo build -p verge-node --bin verge --locked
(cd client-wasm && npm test)
