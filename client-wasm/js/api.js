// The runtime-independent part of @verge/client: the Verge entry points, the document handle
// and VergeError. Each runtime's entry (node.js, deno.js, browser.js, workerd.js) instantiates
// the Wasm module its own way and hands the bindings to `bind`.

let Replica = null;
let ThinReplica = null;

/** Called once by the runtime entry with the wasm-bindgen exports. */
export function bind(bindings) {
  Replica = bindings.Replica;
  ThinReplica = bindings.ThinReplica;
}

/** An error from Verge, with a stable machine-readable `code` (see docs/client.md). */
export class VergeError extends Error {
  constructor(code, message, options) {
    super(message, options);
    this.name = "VergeError";
    this.code = code;
    if (options && options.status !== undefined) this.status = options.status;
  }

  /** Whether repeating the call may succeed (network trouble, node overloaded). */
  get retryable() {
    return (
      this.code === "network" ||
      this.code === "sync_incomplete" ||
      (this.status !== undefined && this.status >= 500)
    );
  }
}

function rethrow(e) {
  if (e instanceof VergeError) throw e;
  if (e && typeof e.code === "string") throw new VergeError(e.code, e.message);
  throw e;
}

function deepFreeze(value) {
  if (value !== null && typeof value === "object") {
    for (const v of Object.values(value)) deepFreeze(v);
    Object.freeze(value);
  }
  return value;
}

/** Containers larger than this are not copied to keep the read state current after a write:
 * the state is read again from the replica on the next read instead. */
const COPY_ENTRIES_MAX = 4096;

/** A frozen copy of a JSON value given by the caller. */
function frozenCopy(value) {
  if (value === undefined) return null;
  if (value === null || typeof value !== "object") return value;
  return deepFreeze(JSON.parse(JSON.stringify(value)));
}

/** A mutable deep copy of plain JSON (faster than a JSON round trip). */
function copyJSON(value) {
  if (value === null || typeof value !== "object") return value;
  if (Array.isArray(value)) return value.map(copyJSON);
  const out = {};
  for (const k in value) out[k] = copyJSON(value[k]);
  return out;
}

/** Thrown to give up updating the read state in place (it is read again instead). */
const TOO_BIG = Symbol("too big to copy");

/** A shallow, unfrozen copy of a container, for one step of a path update. */
function copyOf(node, makeList) {
  if (Array.isArray(node)) {
    if (node.length > COPY_ENTRIES_MAX) throw TOO_BIG;
    return node.slice();
  }
  if (node !== null && typeof node === "object") {
    const copy = { ...node };
    if (Object.keys(copy).length > COPY_ENTRIES_MAX) throw TOO_BIG;
    return copy;
  }
  return makeList ? [] : {};
}

/**
 * The read state after `op`, which the replica has already checked and applied: the
 * containers along its path are copied (missing ones created, as the replica does), the rest
 * is shared. Returns a new frozen root; `state` is unchanged.
 */
function applyToState(state, op) {
  const path = toPath(op.path);
  const parents = path.length - 1;
  if (op.op === "del") {
    // A del below a missing parent does nothing (and creates nothing).
    let node = state;
    for (let i = 0; i < parents; i++) {
      node = node?.[path[i]];
      if (node === null || typeof node !== "object") return state;
    }
  }
  const root = copyOf(state, false);
  let node = root;
  for (let i = 0; i < parents; i++) {
    const seg = path[i];
    // A missing step becomes a map, or a list when it is the last one of an insert.
    const child = copyOf(node[seg], op.op === "insert" && i === parents - 1);
    node[seg] = child;
    node = child;
  }
  const last = path[parents];
  switch (op.op) {
    case "set":
      node[last] = frozenCopy(op.value);
      break;
    case "del":
      if (Array.isArray(node)) node.splice(last, 1);
      else delete node[last];
      break;
    case "inc":
      node[last] = (node[last] ?? 0) + (op.by ?? 1);
      break;
    case "insert":
      node.splice(last, 0, frozenCopy(op.value));
      break;
    case "push": {
      const list = copyOf(node[last], true);
      list.push(frozenCopy(op.value));
      node[last] = Object.freeze(list);
      break;
    }
    case "splice": {
      const chars = Array.from(node[last] ?? "");
      chars.splice(op.index ?? 0, op.delete ?? 0, ...Array.from(op.text ?? ""));
      node[last] = chars.join("");
      break;
    }
    default:
      throw TOO_BIG;
  }
  // Freeze what was copied (everything else was frozen already).
  let walk = root;
  Object.freeze(walk);
  for (let i = 0; i < parents; i++) {
    walk = walk[path[i]];
    Object.freeze(walk);
  }
  return root;
}

function toPath(path) {
  if (typeof path === "string" || typeof path === "number") return [path];
  return path;
}

/** How to reach a node: `{ url, token?, fetch? }`. */
class Connection {
  constructor(options) {
    if (!options || typeof options.url !== "string") {
      throw new VergeError("invalid_options", "expected { url: string, token?: string }");
    }
    this.url = options.url.replace(/\/+$/, "");
    this.token = options.token;
    this.fetch = options.fetch ?? ((...args) => globalThis.fetch(...args));
  }

  async post(id, body) {
    return this.request("POST", `/v1/sync/${id}`, {
      body,
      headers: { "content-type": "application/octet-stream" },
    });
  }

  /** A thin replica's push (`POST /v1/ops/{id}`, JSON). */
  async push(id, body) {
    return this.request("POST", `/v1/ops/${id}`, {
      body,
      headers: { "content-type": "application/json" },
    });
  }

  /** Sends a request; the answer's bytes, or a VergeError with the node's code. */
  async request(method, path, { body, headers = {} } = {}) {
    const all = { ...headers };
    if (this.token) all.authorization = `Bearer ${this.token}`;
    let response;
    let bytes;
    try {
      response = await this.fetch(`${this.url}${path}`, { method, headers: all, body });
      bytes = new Uint8Array(await response.arrayBuffer());
    } catch (e) {
      throw new VergeError("network", `${method} ${this.url}${path}: ${e && e.message}`, {
        cause: e,
      });
    }
    if (!response.ok) {
      let code = "http";
      let message = `${response.status} ${response.statusText}`;
      try {
        const err = JSON.parse(new TextDecoder().decode(bytes)).error;
        if (err && typeof err.code === "string") {
          code = err.code;
          message = err.message ?? message;
        }
      } catch {
        // Not a JSON error body (a proxy's page, say): keep the status.
      }
      throw new VergeError(code, message, { status: response.status });
    }
    return bytes;
  }
}

/** Checks a list of heads given by the caller. */
function headsList(heads, what) {
  if (!Array.isArray(heads) || !heads.every((h) => typeof h === "string" && /^[0-9a-f]{64}$/.test(h))) {
    throw new VergeError("invalid_options", `${what} must be heads: 64 hex digits each`);
  }
  return heads.join(",");
}

/**
 * A local replica of one document. Reads and writes are synchronous and touch only memory;
 * `sync()` exchanges changes with the node.
 */
export class VergeDoc {
  #replica;
  #connection;
  #listeners = new Set();
  #queue = Promise.resolve();
  #lastSync = null;
  // The document as frozen JSON, kept current by each local write (the replica checks it,
  // then the same op is applied here) and read again after a sync, a replace or a delete:
  // reads are lookups in plain JavaScript objects. `null` until the first read.
  #state = null;
  // A thin replica (`{ thin: true }`): the node makes the changes (docs/client.md).
  #thin;

  constructor(replica, connection, thin = false) {
    this.#replica = replica;
    this.#connection = connection;
    this.#thin = thin;
  }

  /** Whether this is a thin replica (the node makes its changes; see docs/client.md). */
  get thin() {
    return this.#thin;
  }

  /** The document id. */
  get id() {
    return this.#replica.id;
  }

  #root() {
    if (this.#state === null) {
      let text;
      try {
        text = this.#replica.toJSONText();
      } catch (e) {
        rethrow(e);
      }
      this.#state = deepFreeze(JSON.parse(text));
    }
    return this.#state;
  }

  /**
   * The value at `path` (a key, or an array of keys and indexes); `undefined` when absent.
   * Objects and arrays come back frozen (they are shared with the read state); `toJSON()`
   * returns a mutable copy.
   */
  get(path = []) {
    const p = toPath(path);
    if (!Array.isArray(p)) return undefined;
    let value = this.#root();
    for (const seg of p) {
      if (Array.isArray(value)) {
        if (typeof seg !== "number") return undefined;
        value = value[seg];
      } else if (value !== null && typeof value === "object") {
        if (typeof seg !== "string") return undefined;
        value = Object.hasOwn(value, seg) ? value[seg] : undefined;
      } else {
        return undefined;
      }
    }
    return value;
  }

  /** The whole document as plain JSON (counters as numbers, text as strings), a copy. */
  toJSON() {
    return copyJSON(this.#root());
  }

  /** The current heads: hex hashes naming this exact version of the document. */
  heads() {
    try {
      return this.#replica.heads();
    } catch (e) {
      rethrow(e);
    }
  }

  /** Whether the document carries a tombstone (it was deleted and not written since). */
  get deleted() {
    return this.#replica.deleted;
  }

  /** Whether local changes wait for a sync. */
  get hasUnsyncedChanges() {
    return this.#replica.hasUnsyncedChanges();
  }

  #apply(ops) {
    let changed;
    try {
      changed = this.#replica.apply(JSON.stringify(ops), Date.now());
    } catch (e) {
      rethrow(e);
    }
    if (changed && this.#state !== null) {
      try {
        for (const op of Array.isArray(ops) ? ops : [ops]) this.#state = applyToState(this.#state, op);
      } catch (e) {
        if (e !== TOO_BIG) throw e;
        this.#state = null;
      }
    }
    return changed;
  }

  /** Sets a map key or list element to a JSON value. */
  set(path, value) {
    return this.#apply({ op: "set", path: toPath(path), value });
  }

  /** Deletes a map key or list element. */
  del(path) {
    return this.#apply({ op: "del", path: toPath(path) });
  }

  /** Adds `by` to the counter at `path`, creating it at 0 when missing. */
  inc(path, by = 1) {
    return this.#apply({ op: "inc", path: toPath(path), by });
  }

  /** Inserts into a list before the index that ends `path`. */
  insert(path, value) {
    return this.#apply({ op: "insert", path: toPath(path), value });
  }

  /** Appends to the list at `path`, creating it when missing. */
  push(path, value) {
    return this.#apply({ op: "push", path: toPath(path), value });
  }

  /** Edits the text at `path`: deletes `deleteCount` characters at `index`, inserts `text`. */
  splice(path, index, deleteCount = 0, text = "") {
    return this.#apply({ op: "splice", path: toPath(path), index, delete: deleteCount, text });
  }

  /** Applies several ops (`{op, path, …}` as in the HTTP PATCH body) as one change. */
  apply(ops) {
    return this.#apply(ops);
  }

  #notThin(what) {
    if (this.#thin) {
      throw new VergeError(
        "not_supported",
        `a thin replica cannot ${what}: use a full replica or the HTTP API (Verge.write, PUT, DELETE)`,
      );
    }
  }

  /** Makes the document equal to `doc`, changing only what differs (like HTTP PUT). */
  replace(doc) {
    this.#notThin("replace the document");
    this.#state = null;
    try {
      return this.#replica.replace(JSON.stringify(doc), Date.now());
    } catch (e) {
      rethrow(e);
    }
  }

  /** Deletes the document: a tombstone that syncs; a later write revives it. */
  remove() {
    this.#notThin("delete the document");
    this.#state = null;
    try {
      return this.#replica.remove(Date.now());
    } catch (e) {
      rethrow(e);
    }
  }

  /** The replica's bytes, for `Verge.load` (isolate-level caching). */
  save() {
    try {
      return this.#replica.save();
    } catch (e) {
      rethrow(e);
    }
  }

  /**
   * Pushes local changes and pulls the node's: one round trip in the steady state. Calls are
   * queued, never concurrent. Safe to retry after any error.
   */
  sync() {
    const run = () => this.#syncOnce();
    const result = this.#queue.then(run, run);
    this.#queue = result.catch(() => {});
    return result;
  }

  async #syncOnce() {
    if (!this.#connection) {
      throw new VergeError("no_connection", "this document has no node to sync with");
    }
    const before = this.heads();
    try {
      await this.#exchange();
    } catch (e) {
      if (!(e instanceof VergeError)) throw e;
      if (e.code === "document_replaced") {
        // The document was deleted or expired and written again since this copy was made: the
        // copy can never merge with the node's, so it starts over from the node's.
        this.#replica.startOver();
      } else if (e.code === "changes_carried") {
        // The document started a new generation since this copy was made, and the node carried
        // this copy's changes onto it (durably): the copy starts over from the node's, without
        // making its writes again.
        this.#replica.startOver();
      } else if (e.code === "document_compacted") {
        // The document started a new generation since this copy was made: the copy starts over
        // from the node's, and the writes the node had not acknowledged are made again on it.
        this.#replica.startOverKeepingWrites();
      } else {
        throw e;
      }
      this.#state = null;
      await this.#exchange();
    }
    const [roundTrips, bytesSent, bytesReceived, changed] = this.#replica.lastSync();
    if (changed === 1) this.#state = null;
    const result = { roundTrips, bytesSent, bytesReceived, changed: changed === 1 };
    this.#lastSync = result;
    if (result.changed) {
      const event = { doc: this, before, heads: this.heads() };
      for (const listener of this.#listeners) {
        try {
          listener(event);
        } catch (e) {
          // A failing listener must not fail the sync or starve the others.
          queueMicrotask(() => {
            throw e;
          });
        }
      }
    }
    return result;
  }

  async #exchange() {
    if (this.#thin) return this.#exchangeThin();
    let body;
    try {
      body = this.#replica.syncBegin();
    } catch (e) {
      rethrow(e);
    }
    try {
      while (body !== undefined) {
        const reply = await this.#connection.post(this.id, body);
        body = this.#replica.syncReceive(reply);
      }
    } catch (e) {
      // Part of the node's changes may have been applied before the failure.
      this.#state = null;
      this.#replica.syncAbort();
      rethrow(e);
    }
  }

  async #exchangeThin() {
    let body = this.#replica.pushBegin();
    try {
      while (body !== undefined) {
        const reply = await this.#connection.push(this.id, body);
        body = this.#replica.pushReceive(reply);
      }
    } catch (e) {
      this.#replica.pushAbort();
      rethrow(e);
    }
  }

  /** What the last completed sync did: `{ roundTrips, bytesSent, bytesReceived, changed }`. */
  get lastSync() {
    return this.#lastSync;
  }

  /**
   * Calls `listener({ doc, before, heads })` after each sync that brought changes from the
   * node. Returns a function that unsubscribes.
   */
  subscribe(listener) {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  /** Frees the Wasm memory of this replica now rather than at garbage collection. */
  free() {
    this.#replica.free();
  }
}

function newReplica(make) {
  if (!Replica) throw new Error("@verge/client: the Wasm module is not initialised");
  try {
    return make();
  } catch (e) {
    rethrow(e);
  }
}

/** Entry points. */
export class Verge {
  /**
   * Opens `id` from the node: one round trip. A document the node lacks opens empty.
   *
   * With `{ after: heads }` (heads a write or a replica returned, possibly at another node),
   * the node first waits until it holds them, at most `waitMs` (2000 by default): a read of
   * your own writes wherever they were made. If they have not arrived by then, the error's code
   * is `not_yet_replicated`.
   */
  static async open(connection, id, options = {}) {
    const doc = Verge.create(connection, id, { thin: options.thin });
    if (options.after !== undefined && options.after.length > 0) {
      const after = headsList(options.after, "after");
      const waitMs = options.waitMs ?? 2000;
      try {
        await new Connection(connection).request(
          "GET",
          `/v1/docs/${id}?after=${after}&wait_ms=${waitMs}`,
        );
      } catch (e) {
        // Deleted since: the heads are held, and the sync brings the tombstone.
        if (!(e instanceof VergeError && e.code === "not_found")) throw e;
      }
    }
    await doc.sync();
    return doc;
  }

  /**
   * One write over HTTP, without a replica: `PATCH /v1/docs/{id}` with `ops`. Returns the
   * document's heads after it.
   *
   * `ifMatch: heads` writes only if the document is still at those heads (else the error's
   * code is `precondition_failed`): read, compute, write, and read again on that error.
   * `idempotencyKey` makes a retry of the same write answer the first answer and write nothing
   * (retry at the same node; see docs/api.md). `ttl` sets the document's expiry, in seconds.
   */
  static async write(connection, id, ops, options = {}) {
    const conn = new Connection(connection);
    const headers = { "content-type": "application/json" };
    if (options.ifMatch !== undefined) headers["if-match"] = headsList(options.ifMatch, "ifMatch");
    if (options.idempotencyKey !== undefined) {
      if (typeof options.idempotencyKey !== "string") {
        throw new VergeError("invalid_options", "idempotencyKey must be a string");
      }
      headers["idempotency-key"] = options.idempotencyKey;
    }
    const query = options.ttl !== undefined ? `?ttl=${Number(options.ttl)}` : "";
    const bytes = await conn.request("PATCH", `/v1/docs/${id}${query}`, {
      body: JSON.stringify({ ops }),
      headers,
    });
    return JSON.parse(new TextDecoder().decode(bytes)).heads;
  }

  /**
   * A replica of `id` that has not talked to the node yet (no I/O); `sync()` pulls.
   *
   * `{ thin: true }` makes a thin replica: it keeps the state and its writes, and the node
   * makes the Automerge changes, so writes and syncs cost microseconds instead of Automerge's
   * work in Wasm. It cannot `replace()` or `remove()` the document, nor write to a deleted one
   * (docs/client.md).
   */
  static create(connection, id, options = {}) {
    const thin = options.thin === true;
    const replica = newReplica(() => (thin ? new ThinReplica(id) : new Replica(id)));
    return new VergeDoc(replica, connection ? new Connection(connection) : null, thin);
  }

  /**
   * Loads bytes from `doc.save()` (of a full or a thin replica); syncs in one round trip like
   * the replica that saved them.
   */
  static load(bytes, connection) {
    const thin = ThinReplica !== null && ThinReplica.isSave(bytes);
    const replica = newReplica(() => (thin ? ThinReplica.load(bytes) : Replica.load(bytes)));
    return new VergeDoc(replica, connection ? new Connection(connection) : null, thin);
  }
}
