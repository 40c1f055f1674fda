// The CPU time of an edge request in workerd, through Miniflare (not part of the tests): a
// worker (bench/edge-worker.js) loads a document's replica from the save() it cached on its last
// request, makes 20 increments, syncs once with a real node and caches save() again. Each
// request's CPU is what the workerd process spent on it, all threads, read from the kernel's
// per-thread run time (/proc/PID/task/*/schedstat, nanoseconds; Linux only): the request's
// parsing, the worker's JavaScript and Wasm, and its fetch to the node. Requests run one at a
// time. Documents: one with 100 changes of history before the measured requests, one with
// 100,000 (HISTORY), written through the node's PATCH API and compacted by it as configured.
// The same request with a thin replica (`{ thin: true }`) runs beside it; for that one the node
// makes the changes, so the node's CPU per request (its process, all threads) is printed too.
//   npm run build && node bench/edge.mjs
import { readFileSync, readdirSync } from "node:fs";
import { startNode } from "../test/node-server.mjs";
import { createRequire } from "node:module";

const { Miniflare } = createRequire(import.meta.url)("miniflare");
const REQUESTS = Number(process.env.REQUESTS ?? 300);
const HISTORY = Number(process.env.HISTORY ?? 100_000);

function workerdPid() {
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    try {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      const ppid = Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]);
      if (ppid === process.pid && readFileSync(`/proc/${pid}/comm`, "utf8").trim() === "workerd") {
        return pid;
      }
    } catch {
      // The process ended meanwhile.
    }
  }
  throw new Error("no workerd child process found");
}

/** Nanoseconds the process's threads have run, all together. */
function cpuNs(pid) {
  let sum = 0;
  for (const tid of readdirSync(`/proc/${pid}/task`)) {
    try {
      sum += Number(readFileSync(`/proc/${pid}/task/${tid}/schedstat`, "utf8").split(" ")[0]);
    } catch {
      // The thread ended meanwhile.
    }
  }
  return sum;
}

/** Writes `n` changes to `id` through the node's API, in batches of one PATCH per change. */
async function history(url, id, n) {
  const body = (k) => JSON.stringify({ ops: [{ op: "inc", path: ["items", `sku-${k % 50}`], by: 1 }] });
  const batch = 64;
  for (let i = 0; i < n; i += batch) {
    await Promise.all(
      Array.from({ length: Math.min(batch, n - i) }, (_, k) =>
        fetch(`${url}/v1/docs/${id}`, { method: "PATCH", body: body(i + k), headers: { "content-type": "application/json" } }).then(async (r) => {
          if (!r.ok) throw new Error(`PATCH ${id}: ${r.status} ${await r.text()}`);
        }),
      ),
    );
  }
}

const node = await startNode();
const mf = new Miniflare({
  modules: true,
  scriptPath: new URL("./edge-worker.js", import.meta.url).pathname,
  modulesRoot: new URL("..", import.meta.url).pathname,
  modulesRules: [
    { type: "ESModule", include: ["**/*.js"] },
    { type: "CompiledWasm", include: ["**/*.wasm"] },
  ],
  compatibilityDate: "2025-01-01",
  bindings: { VERGE_URL: node.url },
});
try {
  await mf.ready;
  const pid = workerdPid();
  const results = [];
  const measure = async (label, url) => {
    const cpu = [];
    const nodeCpu = [];
    let more = 0; // requests that took more than one round trip (a compaction between them)
    for (let i = 0; i < REQUESTS; i++) {
      const before = cpuNs(pid);
      const nodeBefore = cpuNs(node.pid);
      const res = await mf.dispatchFetch(url);
      const body = await res.json();
      const used = (cpuNs(pid) - before) / 1e6;
      const nodeUsed = (cpuNs(node.pid) - nodeBefore) / 1e6;
      if (res.status !== 200 || !(body.roundTrips >= 1)) throw new Error(JSON.stringify(body));
      if (body.roundTrips > 1) more++;
      if (i >= 10) {
        // The first requests warm the isolate and its cache.
        cpu.push(used);
        nodeCpu.push(nodeUsed);
      }
    }
    const at = (xs, q) => {
      const sorted = [...xs].sort((a, b) => a - b);
      return sorted[Math.min(sorted.length - 1, Math.floor(sorted.length * q))].toFixed(2);
    };
    results.push(
      `${label}: p50 ${at(cpu, 0.5)} ms, p90 ${at(cpu, 0.9)} ms, p99 ${at(cpu, 0.99)} ms` +
        ` (node: p50 ${at(nodeCpu, 0.5)} ms)` +
        (more ? ` (${more} requests of more than one round trip)` : ""),
    );
  };
  await measure("floor (the harness and one fetch to the node)", "http://edge.example/floor?mode=floor");
  for (const n of [100, HISTORY]) {
    const id = `bench/edge-${n}`;
    await history(node.url, id, n);
    const label = `${n.toLocaleString("en")} changes of history before`;
    await measure(`edge request, ${label}`, `http://edge.example/${id}`);
    await history(node.url, `${id}-thin`, n);
    await measure(`  the same with a thin replica`, `http://edge.example/${id}-thin?mode=thin`);
    await history(node.url, `${id}-live`, n);
    await measure(`  the same with the replica kept in the isolate`, `http://edge.example/${id}-live?mode=live`);
  }
  console.log(`CPU per request in workerd, ${REQUESTS - 10} requests each after 10 to warm up:`);
  for (const line of results) console.log(line);
} finally {
  await mf.dispose();
  await node.stop();
}
