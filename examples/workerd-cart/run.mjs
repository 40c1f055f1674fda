// Runs the cart worker in workerd through Miniflare against a node:
//   node examples/workerd-cart/run.mjs http://127.0.0.1:7070
// then: curl -d '{"sku":"sku-1","qty":2}' http://127.0.0.1:8787/cart/u-42/items
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
// Miniflare is a dev dependency of the client package.
const { Miniflare } = createRequire(join(root, "client-wasm", "package.json"))("miniflare");

/** A Miniflare instance running the cart worker, talking to the node at `url`. */
export function cartWorker(url, options = {}) {
  return new Miniflare({
    modules: true,
    scriptPath: join(here, "worker.js"),
    modulesRoot: root,
    modulesRules: [
      { type: "ESModule", include: ["**/*.js"] },
      { type: "CompiledWasm", include: ["**/*.wasm"] },
    ],
    compatibilityDate: "2025-01-01",
    bindings: { VERGE_URL: url },
    ...options,
  });
}

if (process.argv[1] === fileURLToPath(import.meta.url)) {
  const url = process.argv[2] ?? "http://127.0.0.1:7070";
  const mf = cartWorker(url, { port: Number(process.env.PORT ?? 8787), host: "127.0.0.1" });
  console.log(`cart worker on ${await mf.ready}, node ${url}`);
}
