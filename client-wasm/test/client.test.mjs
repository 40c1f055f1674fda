// The package's API under Node's test runner, against a real `verge node`.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { Verge, VergeError } from "../dist/node.js";
import { startNode, nodeGet, nodePatch, nodeDelete, apiToken } from "./node-server.mjs";

let node;
let conn;
before(async () => {
  node = await startNode();
  conn = { url: node.url };
});
after(async () => {
  await node?.stop();
});

test("open of a missing document is one round trip and empty", async () => {
  const doc = await Verge.open(conn, "t/missing");
  assert.deepEqual(doc.toJSON(), {});
  assert.deepEqual(doc.heads(), []);
  assert.equal(doc.lastSync.roundTrips, 1);
});

test("local writes are visible at once and reach the node in one round trip", async () => {
  const doc = await Verge.open(conn, "t/write");
  doc.set(["owner"], "u-42");
  doc.inc(["items", "sku-1", "qty"], 2);
  doc.push(["log"], { at: 1 });
  doc.splice(["note"], 0, 0, "leave at door");
  doc.insert(["log", 0], "first");
  assert.equal(doc.get("owner"), "u-42");
  assert.equal(doc.get(["items", "sku-1", "qty"]), 2);
  assert.deepEqual(doc.get("log"), ["first", { at: 1 }]);
  assert.equal(doc.get(["log", 1, "at"]), 1);
  assert.equal(doc.get(["nope", "x"]), undefined);
  assert.ok(doc.hasUnsyncedChanges);
  const stats = await doc.sync();
  assert.equal(stats.roundTrips, 1);
  assert.equal(doc.hasUnsyncedChanges, false);
  const remote = await nodeGet(node.url, "t/write");
  assert.deepEqual(remote.doc, doc.toJSON());
  assert.deepEqual(remote.heads, doc.heads());
  doc.del("owner");
  doc.splice("note", 0, 6, "");
  await doc.sync();
  assert.deepEqual((await nodeGet(node.url, "t/write")).doc, {
    items: { "sku-1": { qty: 2 } },
    log: ["first", { at: 1 }],
    note: "at door",
  });
});

test("two clients editing offline converge after both sync, counters and text included", async () => {
  const id = "t/converge";
  const a = await Verge.open(conn, id);
  a.inc("n", 0);
  a.splice("text", 0, 0, "Hello");
  a.set(["items", "base"], 1);
  await a.sync();
  const b = await Verge.open(conn, id);
  assert.deepEqual(b.toJSON(), a.toJSON());

  // Offline: neither syncs while both edit the same counter, text and map.
  a.inc("n", 2);
  a.splice("text", 5, 0, ", world");
  a.set(["items", "from-a"], true);
  b.inc("n", 5);
  b.splice("text", 0, 0, ">> ");
  b.set(["items", "from-b"], true);
  b.del(["items", "base"]);

  await a.sync();
  await b.sync();
  await a.sync();
  assert.deepEqual(a.heads(), b.heads());
  assert.deepEqual(a.toJSON(), b.toJSON());
  assert.deepEqual(a.toJSON(), {
    n: 7,
    text: ">> Hello, world",
    items: { "from-a": true, "from-b": true },
  });
  assert.deepEqual((await nodeGet(node.url, id)).doc, a.toJSON());
});

test("concurrently created counters sum instead of losing increments", async () => {
  const id = "t/counter-race";
  const a = await Verge.open(conn, id);
  const b = await Verge.open(conn, id);
  a.inc("hits", 3);
  b.inc("hits", 4);
  await a.sync();
  await b.sync();
  await a.sync();
  assert.equal(a.get("hits"), 7);
  assert.equal(b.get("hits"), 7);
});

test("two offline clients creating the same list and counter converge exactly", async () => {
  const id = "t/offline-create";
  // Neither has talked to the node: each creates the list, the counter and the maps itself.
  const a = Verge.create(conn, id);
  const b = Verge.create(conn, id);
  const expected = { list: [], m: { a: {}, b: {}, both: {} } };
  for (const [name, doc] of [["a", a], ["b", b]]) {
    for (let i = 0; i < 10; i++) {
      doc.push(["list"], `${name}-${i}`);
      doc.inc(["n"]);
      doc.set(["m", name, String(i)], i);
      doc.set(["m", "both", `${name}-${i}`], true);
      expected.list.push(`${name}-${i}`);
      expected.m[name][String(i)] = i;
      expected.m.both[`${name}-${i}`] = true;
    }
  }
  assert.equal(a.get("n"), 10);
  await a.sync();
  await b.sync();
  await a.sync();
  assert.deepEqual(a.heads(), b.heads());
  const doc = a.toJSON();
  assert.deepEqual(b.toJSON(), doc);
  assert.equal(doc.n, 20);
  assert.equal(doc.list.length, 20, JSON.stringify(doc.list));
  assert.deepEqual(doc.list.toSorted(), expected.list.toSorted(), "each item exactly once");
  for (const name of ["a", "b"]) {
    const own = doc.list.filter((item) => item.startsWith(`${name}-`));
    assert.deepEqual(own, expected.list.filter((item) => item.startsWith(`${name}-`)));
  }
  assert.deepEqual(doc.m, expected.m);
  const remote = await nodeGet(node.url, id);
  assert.deepEqual(remote.doc, doc);
  assert.deepEqual(remote.heads, a.heads());
});

test("a replica older than a delete and a revival starts over from the node's copy", async () => {
  const id = "t/replaced";
  const statuses = [];
  const recording = {
    url: node.url,
    fetch: async (...args) => {
      const res = await fetch(...args);
      statuses.push(res.status);
      return res;
    },
  };
  // A replica created before the document existed, holding writes it never synced.
  const stale = Verge.create(recording, id);
  stale.push(["log"], "offline");
  stale.inc(["n"]);
  // Another replica writes the document and syncs...
  const a = await Verge.open(conn, id);
  a.push(["log"], "old");
  await a.sync();
  // ...and writes more offline while the document is deleted and written again on the node.
  a.push(["log"], "unsynced");
  await nodeDelete(node.url, id);
  await nodePatch(node.url, id, [{ op: "push", path: ["log"], value: "new" }]);
  const revived = await nodeGet(node.url, id);
  assert.deepEqual(revived.doc, { log: ["new"] });

  // The stale replica's history can never merge with the new incarnation: the node answers
  // document_replaced, the replica starts over and syncs again. Its offline writes were
  // concurrent with the delete and are dropped.
  await stale.sync();
  assert.ok(statuses.includes(409), `the node answered ${statuses}`);
  assert.equal(statuses.at(-1), 200);
  assert.deepEqual(stale.toJSON(), revived.doc);
  assert.deepEqual(stale.heads(), revived.heads);
  assert.equal(stale.hasUnsyncedChanges, false);
  // The replica that saw the old incarnation takes the new one too.
  await a.sync();
  assert.deepEqual(a.toJSON(), revived.doc);
  assert.deepEqual(a.heads(), revived.heads);
  // Both write into the new incarnation.
  stale.push(["log"], "later");
  await stale.sync();
  await a.sync();
  a.push(["log"], "from-a");
  await a.sync();
  await stale.sync();
  assert.deepEqual((await nodeGet(node.url, id)).doc, { log: ["new", "later", "from-a"] });
  assert.deepEqual(stale.toJSON(), a.toJSON());
});

test("writes a compaction did not see are carried onto the new generation, once", async () => {
  // A node that starts a generation every 16 changes.
  const compacting = await startNode({ config: "[compaction]\nafter_changes = 16\n" });
  try {
    const c = { url: compacting.url };
    const id = "t/compacted";
    const writer = await Verge.open(c, id);
    writer.inc(["n"]);
    await writer.sync();
    const reader = await Verge.open(c, id);
    // Offline writes while others write enough for the node to compact.
    writer.inc(["n"], 5);
    writer.push(["log"], "offline");
    for (let i = 0; i < 64; i++) {
      await nodePatch(compacting.url, id, [{ op: "inc", path: ["n"], by: 1 }]);
    }
    for (let tries = 0; (await nodeGet(compacting.url, id)).generation < 1; tries++) {
      assert.ok(tries < 400, "the document never compacted");
      await new Promise((r) => setTimeout(r, 50));
    }
    // The node carries the writer's changes onto the new generation; the writer starts over
    // from the node's copy without making them again.
    await writer.sync();
    const metrics = await (await fetch(`${compacting.url}/metrics`)).text();
    assert.match(metrics, /^verge_stale_carried_total 1$/m);
    const expected = { n: 70, log: ["offline"] };
    assert.deepEqual(writer.toJSON(), expected);
    assert.deepEqual((await nodeGet(compacting.url, id)).doc, expected);
    assert.equal(writer.hasUnsyncedChanges, false);
    await reader.sync();
    assert.deepEqual(reader.toJSON(), expected);
    // Both go on writing in the new generation.
    reader.inc(["n"], 10);
    await reader.sync();
    await writer.sync();
    assert.equal(writer.toJSON().n, 80);
  } finally {
    await compacting.stop();
  }
});

test("subscribers hear about changes brought by sync, not about local ones", async () => {
  const id = "t/subscribe";
  const doc = await Verge.open(conn, id);
  const events = [];
  const unsubscribe = doc.subscribe((e) => events.push(e));
  doc.set("local", 1);
  await doc.sync();
  assert.equal(events.length, 0);
  await nodePatch(node.url, id, [{ op: "set", path: ["remote"], value: "yes" }]);
  const stats = await doc.sync();
  assert.equal(stats.changed, true);
  assert.equal(events.length, 1);
  assert.equal(events[0].doc, doc);
  assert.deepEqual(events[0].heads, doc.heads());
  assert.equal(doc.get("remote"), "yes");
  unsubscribe();
  await nodePatch(node.url, id, [{ op: "set", path: ["remote"], value: "again" }]);
  await doc.sync();
  assert.equal(events.length, 1);
  assert.equal(doc.get("remote"), "again");
});

test("save and load keep the replica and its sync position", async () => {
  const id = "t/cache";
  const doc = await Verge.open(conn, id);
  doc.inc("visits", 1);
  await doc.sync();
  const bytes = doc.save();
  assert.ok(bytes instanceof Uint8Array);
  const again = Verge.load(bytes, conn);
  assert.equal(again.id, id);
  assert.deepEqual(again.toJSON(), { visits: 1 });
  // Two replicas loaded from the same bytes write as different actors, so both writes count.
  const twin = Verge.load(bytes, conn);
  again.inc("visits", 1);
  twin.inc("visits", 1);
  const stats = await again.sync();
  assert.equal(stats.roundTrips, 1);
  await twin.sync();
  assert.equal((await nodeGet(node.url, id)).doc.visits, 3);
  assert.throws(() => Verge.load(new Uint8Array([1, 2, 3])), { code: "invalid_save" });
});

test("a sync whose answer was lost is safe to retry", async () => {
  const id = "t/lost-answer";
  const doc = await Verge.open(conn, id);
  const lossy = Verge.load(doc.save(), {
    url: node.url,
    // The request reaches the node, which applies it; the answer never arrives.
    fetch: async (...args) => {
      await fetch(...args);
      throw new Error("connection reset");
    },
  });
  lossy.inc("n", 1);
  await assert.rejects(lossy.sync(), (e) => e instanceof VergeError && e.code === "network");
  assert.equal((await nodeGet(node.url, id)).doc.n, 1);
  const retry = Verge.load(lossy.save(), conn);
  assert.ok(retry.hasUnsyncedChanges);
  await retry.sync();
  assert.equal((await nodeGet(node.url, id)).doc.n, 1, "the increment counts once");
  assert.equal(retry.hasUnsyncedChanges, false);
});

test("one-shot writes: idempotent, conditional, and read back elsewhere with after", async () => {
  const id = "t/oneshot";
  const inc = [{ op: "inc", path: ["n"], by: 2 }];
  const heads = await Verge.write(conn, id, inc, { idempotencyKey: "order-1" });
  assert.equal(heads.length, 1);
  // A retry of the same write: the first answer, nothing written.
  assert.deepEqual(await Verge.write(conn, id, inc, { idempotencyKey: "order-1" }), heads);
  const doc = await Verge.open(conn, id, { after: heads });
  assert.equal(doc.get("n"), 2);
  assert.deepEqual(doc.heads(), heads);
  // The key on another write is refused.
  await assert.rejects(
    Verge.write(conn, id, [{ op: "inc", path: ["n"], by: 3 }], { idempotencyKey: "order-1" }),
    (e) => e instanceof VergeError && e.code === "idempotency_key_reused" && e.status === 422,
  );
  // Conditional: at the heads read, then not at the old ones.
  const set = [{ op: "set", path: ["paid"], value: true }];
  const next = await Verge.write(conn, id, set, { ifMatch: heads });
  assert.notDeepEqual(next, heads);
  await assert.rejects(
    Verge.write(conn, id, set, { ifMatch: heads }),
    (e) => e.code === "precondition_failed" && e.status === 412 && !e.retryable,
  );
  assert.deepEqual((await nodeGet(node.url, id)).doc, { n: 2, paid: true });
  // Heads the node will never hold: it waits waitMs, then says so.
  await assert.rejects(
    Verge.open(conn, id, { after: ["ab".repeat(32)], waitMs: 200 }),
    (e) => e.code === "not_yet_replicated" && e.status === 504 && e.retryable,
  );
  await assert.rejects(Verge.open(conn, id, { after: ["xyz"] }), (e) => e.code === "invalid_options");
  await assert.rejects(Verge.write(conn, id, set, { ifMatch: "x" }), (e) => e.code === "invalid_options");
});

test("errors are VergeErrors with codes", async () => {
  assert.throws(() => Verge.create(conn, "bad id!"), (e) => e instanceof VergeError && e.code === "invalid_id");
  const doc = Verge.create(conn, "t/errors");
  doc.set("s", "text");
  doc.splice("t", 0, 0, "abc");
  assert.throws(() => doc.inc("s"), { code: "op_not_applicable" });
  assert.throws(() => doc.set([], 1), { code: "invalid_op" });
  assert.throws(() => doc.set(["_verge_deleted"], 1), { code: "invalid_op" });
  assert.throws(() => doc.splice("t", 10, 0, "x"), { code: "op_not_applicable" });
  assert.equal(doc.get("s"), "text", "a failed write changes nothing");
  const offline = Verge.create({ url: "http://127.0.0.1:9" }, "t/errors");
  await assert.rejects(offline.sync(), (e) => e.code === "network" && e.retryable);
  await assert.rejects(Verge.create(null, "t/x").sync(), { code: "no_connection" });
});

test("steady-state sync of a long history is one round trip under 1 KB each way", async () => {
  const id = "t/long-history";
  const writer = await Verge.open(conn, id);
  for (let i = 0; i < 2000; i++) writer.inc("n", 1);
  await writer.sync();
  const doc = await Verge.open(conn, id);
  assert.equal(doc.get("n"), 2000);
  doc.inc("n", 1);
  const push = await doc.sync();
  assert.equal(push.roundTrips, 1);
  assert.ok(push.bytesSent < 1024, `sent ${push.bytesSent} bytes`);
  assert.ok(push.bytesReceived < 1024, `received ${push.bytesReceived} bytes`);
  writer.inc("n", 1);
  const pull = await writer.sync();
  assert.equal(pull.roundTrips, 1);
  assert.ok(pull.bytesSent < 1024 && pull.bytesReceived < 1024, JSON.stringify(pull));
  assert.equal(writer.get("n"), 2002);
});

test("a deleted document syncs its tombstone and revives on write", async () => {
  const id = "t/delete";
  const doc = await Verge.open(conn, id);
  doc.set("k", 1);
  await doc.sync();
  doc.remove();
  assert.equal(doc.deleted, true);
  assert.deepEqual(doc.toJSON(), {});
  await doc.sync();
  assert.equal(await nodeGet(node.url, id), undefined);
  doc.set("k", 2);
  await doc.sync();
  assert.deepEqual((await nodeGet(node.url, id)).doc, { k: 2 });
});

test("against a node with tokens: a write token works in its prefix, everything else is refused with a code", async () => {
  const writer = apiToken("cart-writer", "write", ["cart/"]);
  const reader = apiToken("reader", "read", [""]);
  const secured = await startNode({ config: `[auth]\nmode = "tokens"\n${writer.entry}${reader.entry}` });
  try {
    const url = secured.url;
    const doc = await Verge.open({ url, token: writer.token }, "cart/tok");
    doc.inc("n", 3);
    await doc.sync();
    const again = await Verge.open({ url, token: writer.token }, "cart/tok");
    assert.equal(again.get("n"), 3);

    const refusal = async (options, id) => {
      try {
        await Verge.open(options, id);
      } catch (e) {
        assert.ok(e instanceof VergeError, String(e));
        return { code: e.code, status: e.status, message: e.message };
      }
      assert.fail(`open of ${id} was not refused`);
    };
    // Outside the write token's prefix.
    const outside = await refusal({ url, token: writer.token }, "user/tok");
    assert.equal(outside.code, "forbidden");
    assert.equal(outside.status, 403);
    assert.match(outside.message, /cart-writer/);
    // A read token cannot sync: syncing writes.
    const readOnly = await refusal({ url, token: reader.token }, "cart/tok");
    assert.equal(readOnly.code, "forbidden");
    // No token, and a wrong one.
    assert.equal((await refusal({ url }, "cart/tok")).code, "unauthorized");
    assert.equal((await refusal({ url, token: "vg_wrong" }, "cart/tok")).code, "unauthorized");
    // A refused sync of local edits keeps them for a later sync with a good token.
    const offline = Verge.load(again.save(), { url, token: reader.token });
    offline.inc("n", 1);
    await assert.rejects(offline.sync(), (e) => e.code === "forbidden");
    assert.equal(offline.get("n"), 4);
    assert.ok(offline.hasUnsyncedChanges);
  } finally {
    await secured.stop();
  }
});

test("what a replica shows agrees with its Automerge document after every op and sync (random ops, two clients, a node)", async () => {
  // A small seeded generator, so that a failure replays.
  let seed = Number(process.env.VERGE_TEST_SEED ?? 0x2545f491);
  const rand = (n) => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return (seed >>> 0) % n;
  };
  const keys = ["a", "b", "l", "t", "n"];
  const values = [1, -2, "s", null, true, { k: [1] }, [1, 2]];
  const randomOp = () => {
    const k = keys[rand(keys.length)];
    const v = values[rand(values.length)];
    switch (rand(8)) {
      case 0: return { op: "set", path: [k], value: v };
      case 1: return { op: "set", path: [k, "x"], value: v };
      case 2: return { op: "del", path: rand(2) ? [k] : [k, rand(3)] };
      case 3: return { op: "inc", path: [k], by: rand(5) - 2 };
      case 4: return { op: "push", path: [k], value: v };
      case 5: return { op: "insert", path: [k, rand(3)], value: v };
      case 6: return { op: "splice", path: [k], index: rand(3), delete: rand(2), text: "xé" };
      default: return { op: "inc", path: [k, "c"], by: 1 };
    }
  };
  const id = "t/random";
  const clients = [await Verge.open(conn, id), await Verge.open(conn, id)];
  // The replica's own view: read afresh from its saved Automerge bytes.
  const fromAutomerge = (doc) => Verge.load(doc.save()).toJSON();
  for (let step = 0; step < 400; step++) {
    const doc = clients[rand(2)];
    const ops = Array.from({ length: 1 + rand(2) }, randomOp);
    try {
      doc.apply(ops);
    } catch (e) {
      assert.ok(e instanceof VergeError, String(e));
      assert.equal(e.code, "op_not_applicable", e.message);
    }
    assert.deepEqual(doc.toJSON(), fromAutomerge(doc), `after ${JSON.stringify(ops)}`);
    if (rand(10) === 0) {
      await clients[rand(2)].sync();
    }
  }
  await clients[0].sync();
  await clients[1].sync();
  await clients[0].sync();
  assert.deepEqual(clients[0].toJSON(), clients[1].toJSON());
  assert.deepEqual(clients[0].toJSON(), fromAutomerge(clients[0]));
  assert.deepEqual(clients[0].heads(), clients[1].heads());
  assert.deepEqual((await nodeGet(node.url, id)).doc, clients[0].toJSON());
});

test("a thin replica writes locally, syncs in one round trip and sees others' writes", async () => {
  const id = "t/thin";
  const thin = await Verge.open(conn, id, { thin: true });
  assert.equal(thin.thin, true);
  assert.deepEqual(thin.toJSON(), {});
  for (let j = 0; j < 20; j++) thin.inc(["items", `sku-${j}`], 1);
  thin.set("owner", "ann");
  assert.equal(thin.get(["items", "sku-3"]), 1);
  assert.ok(thin.hasUnsyncedChanges);
  const stats = await thin.sync();
  assert.equal(stats.roundTrips, 1);
  assert.equal(stats.changed, false, "the node holds just what the replica shows");
  assert.equal(thin.hasUnsyncedChanges, false);
  const remote = await nodeGet(node.url, id);
  assert.deepEqual(remote.doc, thin.toJSON());
  assert.deepEqual(remote.heads, thin.heads());

  // A full replica and an HTTP write change it; the thin one gets their state on its next sync.
  const full = await Verge.open(conn, id);
  full.inc(["items", "sku-3"], 10);
  await full.sync();
  await nodePatch(node.url, id, [{ op: "push", path: ["log"], value: "http" }]);
  thin.inc(["items", "sku-3"], 100);
  const merged = await thin.sync();
  assert.equal(merged.changed, true);
  assert.equal(thin.get(["items", "sku-3"]), 111);
  assert.deepEqual(thin.get("log"), ["http"]);
  assert.deepEqual((await nodeGet(node.url, id)).doc, thin.toJSON());

  // What the full replica or the node would refuse, the thin one refuses at once.
  assert.throws(() => thin.inc("owner", 1), (e) => e instanceof VergeError && e.code === "op_not_applicable");
  assert.throws(() => thin.remove(), (e) => e.code === "not_supported");
  assert.throws(() => thin.replace({}), (e) => e.code === "not_supported");
});

test("a thin replica's push whose answer was lost counts once, from the save too", async () => {
  const id = "t/thin-lost";
  const doc = await Verge.open(conn, id, { thin: true });
  doc.inc("n", 1);
  await doc.sync();
  const lossy = Verge.load(doc.save(), {
    url: node.url,
    fetch: async (...args) => {
      await fetch(...args);
      throw new Error("connection reset");
    },
  });
  assert.equal(lossy.thin, true);
  lossy.inc("n", 10);
  await assert.rejects(lossy.sync(), (e) => e instanceof VergeError && e.code === "network");
  assert.equal((await nodeGet(node.url, id)).doc.n, 11);
  lossy.inc("n", 100);
  // Two copies of one save both sync: the lost push's write still counts once.
  const saved = lossy.save();
  const first = Verge.load(saved, conn);
  const second = Verge.load(saved, conn);
  await first.sync();
  await second.sync();
  await first.sync();
  assert.equal((await nodeGet(node.url, id)).doc.n, 111);
  assert.equal(first.get("n"), 111);
  assert.equal(second.get("n"), 111);
});

test("a thin replica against a node with tokens: writes in the prefix, refusals with codes", async () => {
  const writer = apiToken("thin-writer", "write", ["cart/"]);
  const reader = apiToken("thin-reader", "read", [""]);
  const secured = await startNode({ config: `[auth]\nmode = "tokens"\n${writer.entry}${reader.entry}` });
  try {
    const url = secured.url;
    const doc = await Verge.open({ url, token: writer.token }, "cart/thin", { thin: true });
    doc.inc("n", 3);
    await doc.sync();
    const outside = Verge.create({ url, token: writer.token }, "user/thin", { thin: true });
    outside.inc("n", 1);
    await assert.rejects(outside.sync(), (e) => e.code === "forbidden" && e.status === 403);
    const readOnly = Verge.load(doc.save(), { url, token: reader.token });
    readOnly.inc("n", 1);
    await assert.rejects(readOnly.sync(), (e) => e.code === "forbidden");
    assert.equal(readOnly.get("n"), 4);
    assert.ok(readOnly.hasUnsyncedChanges, "a refused push keeps its writes");
  } finally {
    await secured.stop();
  }
});
