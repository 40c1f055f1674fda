// Starts a real `verge node` for the tests, benchmark and examples: a fresh data dir, the API
// on a free port (read back from DATA_DIR/api.addr). The binary is VERGE_BIN, else the
// workspace's debug or release build, else `cargo build -p verge-node` makes one.
// `startCluster` starts nodes that replicate over QUIC with mutual TLS (node/tests/common/
// cluster.rs is the Rust equivalent).
import { spawn, spawnSync } from "node:child_process";
import { createHash, randomBytes } from "node:crypto";
import { createSocket } from "node:dgram";
import { existsSync, mkdtempSync, mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, dirname } from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

export function vergeBinary() {
  if (process.env.VERGE_BIN) return process.env.VERGE_BIN;
  const target = process.env.CARGO_TARGET_DIR ?? join(root, "target");
  for (const profile of ["debug", "release"]) {
    const bin = join(target, profile, "verge");
    if (existsSync(bin)) return bin;
  }
  const build = spawnSync("cargo", ["build", "-p", "verge-node", "--bin", "verge"], {
    cwd: root,
    stdio: "inherit",
  });
  if (build.status !== 0) throw new Error("cargo build -p verge-node failed");
  return join(target, "debug", "verge");
}

/**
 * Starts a node. `config`: TOML text for its `--config` file; `args`: more flags (e.g.
 * `["--cors-origin", origin]`).
 */
export async function startNode({ config, args: extra = [] } = {}) {
  const bin = vergeBinary();
  const dir = mkdtempSync(join(tmpdir(), "verge-client-test-"));
  const args = ["--data-dir", dir, ...extra];
  if (config !== undefined) {
    const file = join(dir, "verge.toml");
    writeFileSync(file, config);
    args.push("--config", file);
  }
  // Nodes that gossip must not fight over the default gossip port.
  const help = spawnSync(bin, ["node", "--help"], { encoding: "utf8" }).stdout ?? "";
  if (help.includes("--gossip-addr")) args.push("--gossip-addr", "127.0.0.1:0");
  const node = await spawnNode(bin, args, dir);
  return {
    ...node,
    async stop() {
      await node.stop();
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Runs `verge node ARGS --api-addr 127.0.0.1:0` and waits for DATA_DIR/api.addr. */
async function spawnNode(bin, args, dataDir) {
  const child = spawn(bin, ["node", ...args, "--api-addr", "127.0.0.1:0"], {
    stdio: ["ignore", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  const stop = async () => {
    if (child.exitCode === null && child.signalCode === null) {
      const exited = new Promise((r) => child.once("exit", r));
      child.kill("SIGTERM");
      await exited;
    }
  };
  const addrFile = join(dataDir, "api.addr");
  const deadline = Date.now() + 30_000;
  while (!existsSync(addrFile) || readFileSync(addrFile, "utf8").trim() === "") {
    if (child.exitCode !== null) throw new Error(`verge node exited: ${stderr}`);
    if (Date.now() > deadline) {
      await stop();
      throw new Error(`verge node did not start: ${stderr}`);
    }
    await new Promise((r) => setTimeout(r, 20));
  }
  const url = `http://${readFileSync(addrFile, "utf8").trim()}`;
  return { url, pid: child.pid, dir: dataDir, stderr: () => stderr, stop };
}

/** A UDP port on 127.0.0.1 that was free a moment ago (for a node's fixed gossip address). */
async function freeUdpPort() {
  const socket = createSocket("udp4");
  await new Promise((resolve, reject) => {
    socket.once("error", reject);
    socket.bind(0, "127.0.0.1", resolve);
  });
  const { port } = socket.address();
  await new Promise((r) => socket.close(r));
  return port;
}

/**
 * Starts `n` nodes named `{prefix}-1..n` that replicate with each other: certificates from
 * `verge certs` (one CA), fixed gossip addresses, every node seeded with every other, and
 * `config` (TOML; anti-entropy every second by default) as their config file. Resolves once
 * every node lists every other as `up` in GET /v1/status. `nodes[i]` is `{ url, name,
 * gossipAddr, dir }`; `stop()` stops them all and removes their files.
 */
export async function startCluster(n = 2, {
  prefix = "js",
  config = "[replication]\nanti_entropy_interval_s = 1\n",
} = {}) {
  const bin = vergeBinary();
  const base = mkdtempSync(join(tmpdir(), "verge-client-cluster-"));
  const certs = join(base, "certs");
  mkdirSync(certs);
  const verge = (args) => {
    const r = spawnSync(bin, args, { cwd: base, encoding: "utf8" });
    if (r.status !== 0) throw new Error(`verge ${args.join(" ")}: ${r.stdout}${r.stderr}`);
  };
  const names = Array.from({ length: n }, (_, i) => `${prefix}-${i + 1}`);
  verge(["certs", "ca", "--dir", certs]);
  for (const name of names) verge(["certs", "node", "--name", name, "--dir", certs]);
  const configFile = join(base, "verge.toml");
  writeFileSync(configFile, config);
  const gossip = [];
  for (let i = 0; i < n; i++) gossip.push(`127.0.0.1:${await freeUdpPort()}`);

  const nodes = [];
  const stopAll = async () => {
    await Promise.all(nodes.map((node) => node.stop()));
    rmSync(base, { recursive: true, force: true });
  };
  // Every start settles before any failure is reported, so no node is left running.
  const settled = await Promise.allSettled(names.map((name, i) => {
    const dir = join(base, name);
    mkdirSync(dir);
    const args = [
      "--config", configFile,
      "--data-dir", dir,
      "--node-id", name,
      "--gossip-addr", gossip[i],
      ...gossip.filter((_, j) => j !== i).flatMap((addr) => ["--peer", addr]),
      "--tls-ca", join(certs, "ca.pem"),
      "--tls-cert", join(certs, `${name}.pem`),
      "--tls-key", join(certs, `${name}.key`),
    ];
    return spawnNode(bin, args, dir).then((node) => ({ ...node, name, gossipAddr: gossip[i] }));
  }));
  for (const r of settled) if (r.status === "fulfilled") nodes.push(r.value);
  try {
    const failed = settled.find((r) => r.status === "rejected");
    if (failed) throw failed.reason;
    await waitConnected(nodes);
    return { nodes, stop: stopAll };
  } catch (e) {
    await stopAll();
    throw e;
  }
}

/** Waits (10 s at most) until each node lists every other's gossip address as `up`. */
async function waitConnected(nodes, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (const node of nodes) {
    const others = nodes.filter((o) => o !== node).map((o) => o.gossipAddr);
    for (;;) {
      let status;
      try {
        const res = await fetch(`${node.url}/v1/status`);
        status = res.ok ? await res.json() : { error: res.status };
      } catch (e) {
        status = { error: e.message };
      }
      const up = (status.members ?? []).filter((m) => m.state === "up").map((m) => m.addr);
      if (others.every((addr) => up.includes(addr))) break;
      if (Date.now() > deadline) {
        throw new Error(
          `${node.name} does not list ${others} as up: ${JSON.stringify(status)}\n${node.stderr()}`,
        );
      }
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

/** Reads a document through the node's HTTP API (the node's view, not a replica's). */
/**
 * A new API token and the `[[auth.tokens]]` entry that accepts it (what `verge token` prints).
 */
export function apiToken(name, role, prefixes) {
  const token = `vg_${randomBytes(32).toString("hex")}`;
  const hash = createHash("sha256").update(token).digest("hex");
  const entry =
    `[[auth.tokens]]\nname = ${JSON.stringify(name)}\nhash = "sha256:${hash}"\n` +
    `role = ${JSON.stringify(role)}\nprefixes = ${JSON.stringify(prefixes)}\n`;
  return { token, entry };
}

export async function nodeGet(url, id) {
  const res = await fetch(`${url}/v1/docs/${id}`);
  if (res.status === 404) return undefined;
  if (!res.ok) throw new Error(`GET ${id}: ${res.status} ${await res.text()}`);
  return res.json();
}

export async function nodePatch(url, id, ops) {
  const res = await fetch(`${url}/v1/docs/${id}`, {
    method: "PATCH",
    body: JSON.stringify({ ops }),
  });
  if (!res.ok) throw new Error(`PATCH ${id}: ${res.status} ${await res.text()}`);
  return res.json();
}

/** Deletes a document through the node's HTTP API (a tombstone). */
export async function nodeDelete(url, id) {
  const res = await fetch(`${url}/v1/docs/${id}`, { method: "DELETE" });
  if (!res.ok) throw new Error(`DELETE ${id}: ${res.status} ${await res.text()}`);
  return res.json();
}

/** The deno executable shipped by the `deno` npm package (its platform package's binary). */
export function denoBinary() {
  const require = createRequire(join(root, "client-wasm", "package.json"));
  const platform = process.platform === "linux" ? "linux" : process.platform;
  const arch = process.arch === "x64" ? "x64" : "arm64";
  const name = `@deno/${platform}-${arch}${platform === "linux" ? "-glibc" : ""}`;
  const exe = process.platform === "win32" ? "deno.exe" : "deno";
  return join(dirname(require.resolve(`${name}/package.json`)), exe);
}
