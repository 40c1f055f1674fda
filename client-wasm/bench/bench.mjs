// Benchmark of the Wasm client in Node (not part of the tests): local set and get latency,
// instantiate time, package size, and round trips and bytes of open and of a steady-state sync
// on a document with a long history, against a real node.
//   npm run build && npm run bench            (HISTORY=100000 by default)
import { readFileSync } from "node:fs";
import { gzipSync } from "node:zlib";
import { performance } from "node:perf_hooks";
import { startNode } from "../test/node-server.mjs";

const dist = new URL("../dist/", import.meta.url);
const wasmBytes = readFileSync(new URL("verge_client_bg.wasm", dist));
const glue = await import(new URL("verge_client.js", dist));

// Instantiate: compile + instantiate the module from bytes, as the node entry does.
const times = [];
for (let i = 0; i < 5; i++) {
  const t = performance.now();
  glue.initSync({ module: new WebAssembly.Module(wasmBytes) });
  times.push(performance.now() - t);
}
const { Verge } = await import(new URL("node.js", dist));

function perOp(n, f) {
  for (let i = 0; i < Math.min(n, 2000); i++) f(i); // warm-up
  const t = performance.now();
  for (let i = 0; i < n; i++) f(i);
  return ((performance.now() - t) * 1000) / n;
}

const doc = Verge.create(null, "bench/local");
for (let i = 0; i < 50; i++) doc.set(["items", `sku-${i}`], { qty: i, name: `item ${i}` });
const setUs = perOp(2_000, (i) => doc.set(["items", `sku-${i % 50}`, "qty"], i));
const incUs = perOp(2_000, () => doc.inc(["hits"], 1));
doc.get(["items", "sku-7", "qty"]);
const getUs = perOp(200_000, () => doc.get(["items", "sku-7", "qty"]));
const getAfterWriteUs = perOp(2_000, (i) => {
  doc.set(["items", "sku-7", "qty"], i);
  doc.get(["items", "sku-7", "qty"]);
}) - setUs;

const history = Number(process.env.HISTORY ?? 100_000);
const node = await startNode();
let open;
let push;
let pull;
try {
  const conn = { url: node.url };
  const writer = await Verge.open(conn, "bench/long");
  for (let i = 0; i < history; i++) {
    writer.inc("n", 1);
    if ((i + 1) % 10_000 === 0) await writer.sync(); // stay under the 4 MiB message limit
  }
  await writer.sync();
  const reader = await Verge.open(conn, "bench/long");
  open = reader.lastSync;
  reader.inc("n", 1);
  push = await reader.sync();
  pull = await writer.sync();
  if (writer.get("n") !== history + 1) throw new Error("did not converge");
} finally {
  await node.stop();
}

const kb = (n) => `${(n / 1024).toFixed(1)} KB`;
const median = times.sort((a, b) => a - b)[2];
console.log(`local set (map key):             ${setUs.toFixed(1)} µs`);
console.log(`local inc (counter):             ${incUs.toFixed(1)} µs`);
console.log(`local get (cached path):         ${getUs.toFixed(3)} µs`);
console.log(`local get right after a write:   ${getAfterWriteUs.toFixed(1)} µs`);
console.log(`instantiate (compile+init):      ${median.toFixed(1)} ms (median of 5)`);
console.log(`package wasm:                    ${kb(wasmBytes.length)} raw, ${kb(gzipSync(wasmBytes, { level: 9 }).length)} gzip`);
console.log(`open (${history} changes):       ${open.roundTrips} round trip, ${open.bytesSent} B sent, ${open.bytesReceived} B received`);
console.log(`sync push of one inc:            ${push.roundTrips} round trip, ${push.bytesSent} B sent, ${push.bytesReceived} B received`);
console.log(`sync pull of one inc:            ${pull.roundTrips} round trip, ${pull.bytesSent} B sent, ${pull.bytesReceived} B received`);
