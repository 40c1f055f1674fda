// The examples against real nodes: the cart in workerd through Miniflare, as a Node HTTP handler
// and as a Deno function; the chat room in workerd, one worker at each of two replicating nodes.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { startNode, startCluster, nodeGet, denoBinary } from "./node-server.mjs";
import { cartWorker } from "../../examples/workerd-cart/run.mjs";
import { chatWorker } from "../../examples/workerd-chat/run.mjs";
import { cartServer } from "../../examples/node-cart/server.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
let node;
before(async () => {
  node = await startNode();
});
after(async () => {
  await node?.stop();
});

const add = (sku, qty) => ({ method: "POST", body: JSON.stringify({ sku, qty }) });

test("workerd: two isolates adding to one cart at once: every add counts", async () => {
  // Two isolates, as two edge locations would run them, each with its own replicas.
  const a = cartWorker(node.url);
  const b = cartWorker(node.url);
  const post = (worker, sku, qty) =>
    worker.dispatchFetch("http://cart.example/cart/u-1/items", add(sku, qty));
  const ok = async (res) => {
    assert.equal(res.status, 200, await res.clone().text());
    return res.json();
  };
  try {
    // The first adds to a cart neither has seen: both create `items` at once.
    const [ra, rb] = await Promise.all([post(a, "sku-1", 2), post(b, "sku-2", 1)]);
    assert.equal((await ok(ra)).roundTrips, 1);
    await ok(rb);
    // Then 40 adds at once: each isolate adds 10 skus of its own and the same shared sku 10
    // times (its cached replica loaded by 20 concurrent requests).
    const expected = { "sku-1": 2, "sku-2": 1, shared: 20 };
    const adds = [];
    for (const [name, worker] of [["a", a], ["b", b]]) {
      for (let i = 0; i < 10; i++) {
        expected[`${name}-${i}`] = i + 1;
        adds.push(post(worker, `${name}-${i}`, i + 1), post(worker, "shared", 1));
      }
    }
    for (const res of await Promise.all(adds)) await ok(res);
    for (const worker of [a, b]) {
      const body = await ok(await worker.dispatchFetch("http://cart.example/cart/u-1"));
      assert.deepEqual(body.items, expected);
      assert.equal(body.roundTrips, 1, "a warm isolate reads in one round trip");
    }
    assert.deepEqual((await nodeGet(node.url, "cart/u-1")).doc, { items: expected });
  } finally {
    await a.dispose();
    await b.dispose();
  }
});

test("node: the cart as an HTTP handler", async () => {
  const server = cartServer(node.url);
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  const base = `http://127.0.0.1:${server.address().port}`;
  try {
    const r = await fetch(`${base}/cart/u-2/items`, add("sku-9", 3));
    assert.equal(r.status, 200);
    assert.deepEqual((await r.json()).items, { "sku-9": 3 });
    const bad = await fetch(`${base}/cart/u-2/items`, { method: "POST", body: "{\"qty\":1}" });
    assert.equal(bad.status, 400);
    assert.deepEqual((await nodeGet(node.url, "cart/u-2")).doc, { items: { "sku-9": 3 } });
  } finally {
    server.close();
  }
});

test("deno: the cart as a Deno function", async () => {
  const child = spawn(
    denoBinary(),
    ["run", "--allow-net", "--allow-read", "--allow-env", "main.ts"],
    {
      cwd: join(root, "examples", "deno-cart"),
      env: { ...process.env, VERGE_URL: node.url, PORT: "0", DENO_NO_UPDATE_CHECK: "1", NO_COLOR: "1" },
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  let out = "";
  let err = "";
  child.stderr.on("data", (d) => (err += d));
  try {
    const base = await new Promise((resolve, reject) => {
      const timer = setTimeout(() => reject(new Error(`deno did not start: ${err}`)), 60_000);
      child.stdout.on("data", (d) => {
        out += d;
        const m = out.match(/cart on (http:\/\/[^,\s]+)/);
        if (m) {
          clearTimeout(timer);
          resolve(m[1]);
        }
      });
      child.on("exit", (code) => reject(new Error(`deno exited ${code}: ${err}`)));
    });
    const r = await fetch(`${base}/cart/u-3/items`, add("sku-7", 4));
    assert.equal(r.status, 200);
    assert.deepEqual((await r.json()).items, { "sku-7": 4 });
    assert.deepEqual((await nodeGet(node.url, "cart/u-3")).doc, { items: { "sku-7": 4 } });
  } finally {
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await exited;
  }
});

test("workerd: 40 chat posts at once at two replicating nodes land exactly once", async () => {
  const cluster = await startCluster(2, { prefix: "chat" });
  // One worker (isolate) per node, as two edge locations would each use their nearest node.
  const workers = cluster.nodes.map((n) => chatWorker(n.url));
  const room = "http://chat.example/rooms/r-1";
  const post = (worker, from, text) => worker.dispatchFetch(`${room}/messages`, {
    method: "POST",
    body: JSON.stringify({ from, text }),
  });
  try {
    const posts = [];
    for (let i = 0; i < 20; i++) {
      posts.push(post(workers[0], "a", `a says ${i}`), post(workers[1], "b", `b says ${i}`));
    }
    const answers = await Promise.all(posts);
    const failed = [];
    for (const res of answers) {
      if (res.status !== 200) failed.push(`${res.status} ${await res.text()}`);
    }
    assert.deepEqual(failed, [], "every post answers 200");

    const posted = new Set();
    for (let i = 0; i < 20; i++) posted.add(`a: a says ${i}`).add(`b: b says ${i}`);
    // Each (from, text) exactly once, and the count of posts.
    const check = (room, where) => {
      const seen = room.messages.map((m) => `${m.from}: ${m.text}`);
      const dups = seen.filter((m, i) => seen.indexOf(m) !== i);
      assert.deepEqual(dups, [], `${where}: duplicated messages`);
      assert.deepEqual([...posted].filter((m) => !seen.includes(m)), [], `${where}: lost messages`);
      assert.equal(room.messages.length, 40, `${where}: ${JSON.stringify(seen)}`);
      assert.equal(room.count, 40, `${where}: count`);
    };

    // Both nodes converge on one document (replication, then anti-entropy every second).
    const deadline = Date.now() + 10_000;
    let docs;
    for (;;) {
      docs = await Promise.all(cluster.nodes.map((n) => nodeGet(n.url, "room/r-1")));
      const same = docs.every((d) => d && JSON.stringify(d.doc) === JSON.stringify(docs[0].doc));
      if ((same && docs[0].doc.messages?.length === 40) || Date.now() > deadline) break;
      await new Promise((r) => setTimeout(r, 100));
    }
    docs.forEach((d, i) => {
      assert.ok(d, `node ${cluster.nodes[i].name} has no room/r-1`);
      check(d.doc, `node ${cluster.nodes[i].name}`);
    });
    assert.deepEqual(docs[1].doc, docs[0].doc, "both nodes hold the same document");
    assert.deepEqual(docs[1].heads.toSorted(), docs[0].heads.toSorted());

    // Each worker, synced with its own node, reads that same room.
    for (const [i, worker] of workers.entries()) {
      const res = await worker.dispatchFetch(room);
      assert.equal(res.status, 200);
      const body = await res.json();
      check(body, `worker ${i}`);
      assert.deepEqual(body.messages, docs[0].doc.messages);
    }
    const bad = await workers[0].dispatchFetch(`${room}/messages`, { method: "POST", body: "{}" });
    assert.equal(bad.status, 400);
  } finally {
    await Promise.all(workers.map((w) => w.dispose()));
    await cluster.stop();
  }
});
