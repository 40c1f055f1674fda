// Runs the chat worker in workerd through Miniflare against a node:
//   node examples/workerd-chat/run.mjs http://127.0.0.1:7070
// then: curl -d '{"from":"ann","text":"hi"}' http://127.0.0.1:8787/rooms/lobby/messages
//       curl http://127.0.0.1:8787/rooms/lobby
import { fileURLToPath } from "node:url";
import { dirname, join } from "node:path";
import { createRequire } from "node:module";

const here = dirname(fileURLToPath(import.meta.url));
const root = join(here, "..", "..");
// Miniflare is a dev dependency of the client package.
const { Miniflare } = createRequire(join(root, "client-wasm", "package.json"))("miniflare");

/** A Miniflare instance running the chat worker, talking to the node at `url`. */
export function chatWorker(url, options = {}) {
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
  const mf = chatWorker(url, { port: Number(process.env.PORT ?? 8787), host: "127.0.0.1" });
  console.log(`chat worker on ${await mf.ready}, node ${url}`);
}
