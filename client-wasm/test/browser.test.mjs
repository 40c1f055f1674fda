// The browser export in headless Chromium (Debian's /usr/bin/chromium, never a downloaded
// one), against real nodes. A small server serves the package and proxies /v1 to one node, so
// the page talks to it from its own origin; a second node, with tokens, allows the page's
// origin by CORS and is called across origins.
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { createServer } from "node:http";
import { readFile } from "node:fs/promises";
import { mkdtempSync, rmSync, existsSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname, normalize } from "node:path";
import { fileURLToPath } from "node:url";
import { chromium } from "playwright-core";
import { startNode, nodeGet, apiToken } from "./node-server.mjs";

const pkg = join(dirname(fileURLToPath(import.meta.url)), "..");
const CHROMIUM = process.env.CHROMIUM ?? "/usr/bin/chromium";
const TYPES = { ".js": "text/javascript", ".wasm": "application/wasm", ".html": "text/html" };
const PAGE = `<!doctype html><script type="module">
import { Verge, VergeError } from "/dist/browser.js";
window.verge = { Verge, VergeError };
window.ready = true;
</script>`;

let node;
let corsNode;
let writer;
let reader;
let server;
let browser;
let profile;
let base;

before(async () => {
  node = await startNode();
  server = createServer(async (req, res) => {
    if (req.url.startsWith("/v1/")) {
      const chunks = [];
      for await (const c of req) chunks.push(c);
      const upstream = await fetch(node.url + req.url, {
        method: req.method,
        headers: { "content-type": req.headers["content-type"] ?? "application/octet-stream" },
        body: req.method === "GET" ? undefined : Buffer.concat(chunks),
      });
      res.writeHead(upstream.status, { "content-type": upstream.headers.get("content-type") });
      res.end(Buffer.from(await upstream.arrayBuffer()));
      return;
    }
    if (req.url === "/") {
      res.writeHead(200, { "content-type": "text/html" });
      res.end(PAGE);
      return;
    }
    const file = normalize(join(pkg, req.url));
    if (!file.startsWith(join(pkg, "dist")) || !existsSync(file)) {
      res.writeHead(404);
      res.end();
      return;
    }
    res.writeHead(200, { "content-type": TYPES[file.slice(file.lastIndexOf("."))] ?? "text/plain" });
    res.end(await readFile(file));
  });
  await new Promise((r) => server.listen(0, "127.0.0.1", r));
  base = `http://127.0.0.1:${server.address().port}`;
  writer = apiToken("cart-writer", "write", ["cart/"]);
  reader = apiToken("reader", "read", [""]);
  corsNode = await startNode({
    config: `[auth]\nmode = "tokens"\n${writer.entry}${reader.entry}`,
    args: ["--cors-origin", base],
  });
  profile = mkdtempSync(join(tmpdir(), "verge-chromium-"));
  // A fresh profile directory (playwright passes it as --user-data-dir).
  browser = await chromium.launchPersistentContext(profile, {
    executablePath: CHROMIUM,
    headless: true,
    args: [
      "--headless",
      "--no-sandbox",
      "--disable-gpu",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  await browser?.close();
  server?.close();
  await node?.stop();
  await corsNode?.stop();
  if (profile) rmSync(profile, { recursive: true, force: true });
});

test("the browser export opens, edits, syncs and converges in Chromium", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(base + "/");
  await page.waitForFunction(() => window.ready === true, null, { timeout: 20_000 });
  const result = await page.evaluate(async (url) => {
    const { Verge, VergeError } = window.verge;
    const conn = { url };
    const a = await Verge.open(conn, "browser/doc");
    const b = await Verge.open(conn, "browser/doc");
    a.inc("n", 2);
    a.splice("text", 0, 0, "world");
    b.inc("n", 3);
    b.set(["tags", "b"], true);
    const pushed = await a.sync();
    await b.sync();
    await a.sync();
    let code = null;
    try {
      a.inc("text");
    } catch (e) {
      code = e instanceof VergeError ? e.code : "not a VergeError";
    }
    const loaded = Verge.load(a.save(), conn);
    return { a: a.toJSON(), b: b.toJSON(), same: a.heads().join() === b.heads().join(), pushed, code, loaded: loaded.toJSON() };
  }, base);
  assert.deepEqual(errors, []);
  assert.deepEqual(result.a, { n: 5, text: "world", tags: { b: true } });
  assert.deepEqual(result.b, result.a);
  assert.equal(result.same, true);
  assert.equal(result.pushed.roundTrips, 1);
  assert.equal(result.code, "op_not_applicable");
  assert.deepEqual(result.loaded, result.a);
  assert.deepEqual((await nodeGet(node.url, "browser/doc")).doc, result.a);
});

test("a page calls a node on another origin that allows it, with tokens, and reads its refusals", async () => {
  const page = await browser.newPage();
  await page.goto(base + "/");
  await page.waitForFunction(() => window.ready === true, null, { timeout: 20_000 });
  const result = await page.evaluate(
    async ({ allowed, notAllowed, write, read }) => {
      const { Verge, VergeError } = window.verge;
      const code = async (f) => {
        try {
          await f();
          return "no error";
        } catch (e) {
          return e instanceof VergeError ? e.code : `not a VergeError: ${e}`;
        }
      };
      const doc = await Verge.open({ url: allowed, token: write }, "cart/browser");
      doc.inc("n", 2);
      const stats = await doc.sync();
      return {
        json: doc.toJSON(),
        roundTrips: stats.roundTrips,
        outsidePrefix: await code(() => Verge.open({ url: allowed, token: write }, "user/browser")),
        readToken: await code(() => Verge.open({ url: allowed, token: read }, "cart/browser")),
        noToken: await code(() => Verge.open({ url: allowed }, "cart/browser")),
        // The first node does not allow this origin: the browser blocks the call.
        blocked: await code(() => Verge.open({ url: notAllowed }, "cart/browser")),
      };
    },
    { allowed: corsNode.url, notAllowed: node.url, write: writer.token, read: reader.token },
  );
  assert.deepEqual(result.json, { n: 2 });
  assert.equal(result.roundTrips, 1);
  assert.equal(result.outsidePrefix, "forbidden");
  assert.equal(result.readToken, "forbidden");
  assert.equal(result.noToken, "unauthorized");
  assert.equal(result.blocked, "network");
  const res = await fetch(`${corsNode.url}/v1/docs/cart/browser`, {
    headers: { authorization: `Bearer ${writer.token}` },
  });
  assert.deepEqual((await res.json()).doc, { n: 2 });
});
