// The cart examples against a real node: in workerd through Miniflare, as a Node HTTP handler,
// and as a Deno function.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { join, dirname } from "node:path";
import { fileURLToPath } from "node:url";
import { startNode, nodeGet, denoBinary } from "./node-server.mjs";
import { cartWorker } from "../../examples/workerd-cart/run.mjs";
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

test("workerd: two concurrent functions add items to the same cart and both survive", async () => {
  // Two isolates, as two edge locations would run them, each with its own replica.
  const a = cartWorker(node.url);
  const b = cartWorker(node.url);
  try {
    const [ra, rb] = await Promise.all([
      a.dispatchFetch("http://cart.example/cart/u-1/items", add("sku-1", 2)),
      b.dispatchFetch("http://cart.example/cart/u-1/items", add("sku-2", 1)),
    ]);
    assert.equal(ra.status, 200, await ra.clone().text());
    assert.equal(rb.status, 200, await rb.clone().text());
    assert.equal((await ra.json()).roundTrips, 1);
    // Both adds of the same sku at once count too.
    await Promise.all([
      a.dispatchFetch("http://cart.example/cart/u-1/items", add("sku-3", 1)),
      b.dispatchFetch("http://cart.example/cart/u-1/items", add("sku-3", 1)),
    ]);
    const expected = { "sku-1": 2, "sku-2": 1, "sku-3": 2 };
    for (const worker of [a, b]) {
      const res = await worker.dispatchFetch("http://cart.example/cart/u-1");
      const body = await res.json();
      assert.deepEqual(body.items, expected);
      assert.equal(body.roundTrips, 1, "a warm isolate reads in one round trip");
    }
    const stored = (await nodeGet(node.url, "cart/u-1")).doc;
    assert.deepEqual(stored, { "item:sku-1": 2, "item:sku-2": 1, "item:sku-3": 2 });
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
    assert.deepEqual((await nodeGet(node.url, "cart/u-2")).doc, { "item:sku-9": 3 });
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
    assert.deepEqual((await nodeGet(node.url, "cart/u-3")).doc, { "item:sku-7": 4 });
  } finally {
    const exited = new Promise((r) => child.once("exit", r));
    child.kill("SIGTERM");
    await exited;
  }
});
