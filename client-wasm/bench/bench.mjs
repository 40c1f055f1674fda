// Benchmark of the Wasm client in Node (not part of the tests): local set, inc, get and toJSON
// latency on short and long histories, instantiate time, package size, round trips and bytes of
// open and of a steady-state sync on a document with a long history, and the CPU time of an
// edge request (load from a cached save, 20 ops, sync), against a real node.
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

/** Local costs on a 50-item document whose history is `history` changes long. */
function local(history) {
  const doc = Verge.create(null, `bench/local-${history}`);
  for (let i = 0; i < 50; i++) doc.set(["items", `sku-${i}`], { qty: i, name: `item ${i}` });
  for (let i = 0; i < history; i++) {
    doc.set(["history"], i); // map puts: increments would make building this quadratic
    doc.heads(); // each flush is one Automerge change
  }
  doc.heads();
  doc.get([]); // the read state exists, as in any function that reads before it writes
  const set = perOp(20_000, (i) => doc.set(["items", `sku-${i % 50}`, "qty"], i));
  const inc = perOp(20_000, () => doc.inc(["hits"], 1));
  const get = perOp(200_000, () => doc.get(["items", "sku-7", "qty"]));
  // Each get timed alone, right after a write to the same path (the clock's own cost, about
  // 0.05 µs, included).
  let afterWriteNs = 0n;
  const n = 20_000;
  for (let i = 0; i < n; i++) {
    doc.set(["items", "sku-7", "qty"], i);
    const t = process.hrtime.bigint();
    doc.get(["items", "sku-7", "qty"]);
    afterWriteNs += process.hrtime.bigint() - t;
  }
  const toJSON = perOp(20_000, () => doc.toJSON());
  doc.heads();
  return { set, inc, get, getAfterWrite: Number(afterWriteNs) / n / 1000, toJSON };
}
/**
 * The same on a thin replica, which holds no history: the state and the unsynced writes. A
 * thin replica carries at most 10,000 unsynced ops, so each figure is taken on a fresh one.
 */
function thinLocal() {
  const fresh = () => {
    const doc = Verge.create(null, "bench/thin", { thin: true });
    for (let i = 0; i < 50; i++) doc.set(["items", `sku-${i}`], { qty: i, name: `item ${i}` });
    doc.get([]);
    return doc;
  };
  let doc = fresh();
  const set = perOp(4000, (i) => doc.set(["items", `sku-${i % 50}`, "qty"], i));
  doc = fresh();
  const inc = perOp(4000, () => doc.inc(["hits"], 1));
  const get = perOp(200_000, () => doc.get(["items", "sku-7", "qty"]));
  doc = fresh();
  let afterWriteNs = 0n;
  const n = 4000;
  for (let i = 0; i < n; i++) {
    doc.set(["items", "sku-7", "qty"], i);
    const t = process.hrtime.bigint();
    doc.get(["items", "sku-7", "qty"]);
    afterWriteNs += process.hrtime.bigint() - t;
  }
  const toJSON = perOp(20_000, () => doc.toJSON());
  return { set, inc, get, getAfterWrite: Number(afterWriteNs) / n / 1000, toJSON };
}
const thin = thinLocal();
const small = local(100);
const long = local(100_000);
const setUs = small.set;
const incUs = small.inc;
const getUs = small.get;
const getAfterWriteUs = small.getAfterWrite;

const history = Number(process.env.HISTORY ?? 100_000);
const node = await startNode();
let open;
let push;
let pull;
try {
  const conn = { url: node.url };
  // 1,000 local ops, then one sync.
  const batch = await Verge.open(conn, "bench/batch");
  for (let i = 0; i < 1000; i++) batch.inc(["n"], 1);
  var batchSync = await batch.sync();
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

  // An edge request: load the replica from the isolate's cache (the save() of the request
  // before, as examples/cart does), 20 ops, one sync, save() for the next. CPU time of this
  // process (the client and its HTTP calls; the node runs elsewhere). Loading the same old save
  // every time instead would measure a replica lagging further each request: it receives every
  // change made since, each increment costing Automerge a walk of its counter's increments.
  const edge = async (id, saved) => {
    const cpu = [];
    for (let i = 0; i < 60; i++) {
      const t = process.cpuUsage();
      const doc = Verge.load(saved, conn);
      for (let j = 0; j < 20; j++) doc.inc(["items", `sku-${j}`], 1);
      await doc.sync();
      saved = doc.save();
      doc.free();
      const used = process.cpuUsage(t);
      if (i >= 10) cpu.push((used.user + used.system) / 1000);
    }
    cpu.sort((a, b) => a - b);
    return { p50: cpu[cpu.length >> 1], p99: cpu[Math.floor(cpu.length * 0.99)] };
  };
  const cart = await Verge.open(conn, "bench/edge");
  for (let j = 0; j < 50; j++) cart.inc(["items", `sku-${j}`], 1);
  await cart.sync();
  var edgeSmall = await edge("bench/edge", cart.save());
  var edgeLong = await edge("bench/long", reader.save());
  const thinCart = await Verge.open(conn, "bench/edge", { thin: true });
  var edgeThin = await edge("bench/edge", thinCart.save());
  const thinLong = await Verge.open(conn, "bench/long", { thin: true });
  var edgeThinLong = await edge("bench/long", thinLong.save());
} finally {
  await node.stop();
}

const kb = (n) => `${(n / 1024).toFixed(1)} KB`;
const median = times.sort((a, b) => a - b)[2];
console.log(`local set (map key):             ${setUs.toFixed(1)} µs`);
console.log(`local inc (counter):             ${incUs.toFixed(1)} µs`);
console.log(`local get (cached path):         ${getUs.toFixed(3)} µs`);
console.log(`local get right after a write:   ${getAfterWriteUs.toFixed(2)} µs`);
console.log(`local toJSON (50 items):         ${small.toJSON.toFixed(1)} µs`);
console.log(`  with 100,000 changes of history: set ${long.set.toFixed(1)} µs, inc ${long.inc.toFixed(1)} µs, get ${long.get.toFixed(3)} µs, get after a write ${long.getAfterWrite.toFixed(2)} µs, toJSON ${long.toJSON.toFixed(1)} µs`);
console.log(`thin replica: set ${thin.set.toFixed(2)} µs, inc ${thin.inc.toFixed(2)} µs, get ${thin.get.toFixed(3)} µs, get after a write ${thin.getAfterWrite.toFixed(2)} µs, toJSON ${thin.toJSON.toFixed(1)} µs (no history: the same on any document)`);
console.log(`1,000 local ops, then sync:      ${batchSync.roundTrips} round trip, ${batchSync.bytesSent} B sent`);
console.log(`edge request CPU (load, 20 ops, sync): p50 ${edgeSmall.p50.toFixed(2)} ms, p99 ${edgeSmall.p99.toFixed(2)} ms; on the ${history}-change document: p50 ${edgeLong.p50.toFixed(2)} ms, p99 ${edgeLong.p99.toFixed(2)} ms`);
console.log(`  with a thin replica: p50 ${edgeThin.p50.toFixed(2)} ms, p99 ${edgeThin.p99.toFixed(2)} ms; on the ${history}-change document: p50 ${edgeThinLong.p50.toFixed(2)} ms, p99 ${edgeThinLong.p99.toFixed(2)} ms (the node makes the changes)`);
console.log(`instantiate (compile+init):      ${median.toFixed(1)} ms (median of 5)`);
console.log(`package wasm:                    ${kb(wasmBytes.length)} raw, ${kb(gzipSync(wasmBytes, { level: 9 }).length)} gzip`);
console.log(`open (${history} changes):       ${open.roundTrips} round trip, ${open.bytesSent} B sent, ${open.bytesReceived} B received`);
console.log(`sync push of one inc:            ${push.roundTrips} round trip, ${push.bytesSent} B sent, ${push.bytesReceived} B received`);
console.log(`sync pull of one inc:            ${pull.roundTrips} round trip, ${pull.bytesSent} B sent, ${pull.bytesReceived} B received`);
