// Starts a real `verge node` for the tests, benchmark and examples: a fresh data dir, the API
// on a free port (read back from DATA_DIR/api.addr). The binary is VERGE_BIN, else the
// workspace's debug or release build, else `cargo build -p verge-node` makes one.
import { spawn, spawnSync } from "node:child_process";
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
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

export async function startNode() {
  const bin = vergeBinary();
  const dir = mkdtempSync(join(tmpdir(), "verge-client-test-"));
  const args = ["node", "--data-dir", dir, "--api-addr", "127.0.0.1:0"];
  // Nodes that gossip must not fight over the default gossip port.
  const help = spawnSync(bin, ["node", "--help"], { encoding: "utf8" }).stdout ?? "";
  if (help.includes("--gossip-addr")) args.push("--gossip-addr", "127.0.0.1:0");
  const child = spawn(bin, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr.on("data", (d) => {
    stderr = (stderr + d).slice(-4000);
  });
  const addrFile = join(dir, "api.addr");
  const deadline = Date.now() + 30_000;
  while (!existsSync(addrFile) || readFileSync(addrFile, "utf8").trim() === "") {
    if (child.exitCode !== null) throw new Error(`verge node exited: ${stderr}`);
    if (Date.now() > deadline) throw new Error(`verge node did not start: ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
  const url = `http://${readFileSync(addrFile, "utf8").trim()}`;
  return {
    url,
    dir,
    async stop() {
      if (child.exitCode === null) {
        const exited = new Promise((r) => child.once("exit", r));
        child.kill("SIGTERM");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

/** Reads a document through the node's HTTP API (the node's view, not a replica's). */
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

/** The deno executable shipped by the `deno` npm package (its platform package's binary). */
export function denoBinary() {
  const require = createRequire(join(root, "client-wasm", "package.json"));
  const platform = process.platform === "linux" ? "linux" : process.platform;
  const arch = process.arch === "x64" ? "x64" : "arm64";
  const name = `@deno/${platform}-${arch}${platform === "linux" ? "-glibc" : ""}`;
  const exe = process.platform === "win32" ? "deno.exe" : "deno";
  return join(dirname(require.resolve(`${name}/package.json`)), exe);
}
