// Types of @verge/client (every runtime entry exports the same API).

/** A JSON value as stored in a document (counters read as numbers, texts as strings). */
export type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

/** A map key, or a path of map keys and list indexes from the document root. */
export type Path = string | (string | number)[];

/** How to reach a node. */
export interface Connection {
  /** Base URL of the node's API, e.g. `http://127.0.0.1:7070`. */
  url: string;
  /** Sent as `Authorization: Bearer <token>`. */
  token?: string;
  /** The fetch to use (defaults to the global one). */
  fetch?: typeof fetch;
}

/** One op, as in the body of `PATCH /v1/docs/{id}`. */
export type Op =
  | { op: "set"; path: (string | number)[]; value: Json }
  | { op: "del"; path: (string | number)[] }
  | { op: "inc"; path: (string | number)[]; by?: number }
  | { op: "insert"; path: (string | number)[]; value: Json }
  | { op: "push"; path: (string | number)[]; value: Json }
  | { op: "splice"; path: (string | number)[]; index: number; delete?: number; text?: string };

/** What a sync did. */
export interface SyncResult {
  roundTrips: number;
  bytesSent: number;
  bytesReceived: number;
  /** Whether changes from the node altered the replica. */
  changed: boolean;
}

/** Passed to subscribers after a sync brought changes. */
export interface ChangeEvent {
  doc: VergeDoc;
  /** Heads before the sync. */
  before: string[];
  /** Heads after the sync. */
  heads: string[];
}

/**
 * Codes: `invalid_id`, `invalid_json`, `invalid_op`, `op_not_applicable`, `invalid_document`,
 * `invalid_save`, `invalid_sync_message`, `invalid_options`, `network`, `sync_incomplete`,
 * `no_connection`, or the node's own error code (`too_large`, `overloaded`,
 * `precondition_failed`, `not_yet_replicated`, `idempotency_key_reused`, …).
 */
export class VergeError extends Error {
  readonly code: string;
  /** HTTP status when the node answered with an error. */
  readonly status?: number;
  /** Whether repeating the call may succeed. */
  readonly retryable: boolean;
}

/** A local replica of one document. */
export class VergeDoc {
  readonly id: string;
  readonly deleted: boolean;
  readonly hasUnsyncedChanges: boolean;
  readonly lastSync: SyncResult | null;
  /**
   * Whether this is a thin replica (`{ thin: true }`): the node makes its Automerge changes,
   * and `heads()` names the last state read from the node.
   */
  readonly thin: boolean;
  /**
   * The value at `path`, `undefined` when absent: a lookup in plain JavaScript objects, also
   * right after a write. Objects and arrays are frozen.
   */
  get(path?: Path): Json | undefined;
  toJSON(): { [key: string]: Json };
  heads(): string[];
  set(path: Path, value: Json): boolean;
  del(path: Path): boolean;
  inc(path: Path, by?: number): boolean;
  insert(path: Path, value: Json): boolean;
  push(path: Path, value: Json): boolean;
  splice(path: Path, index: number, deleteCount?: number, text?: string): boolean;
  /** Several ops as one change. */
  apply(ops: Op[]): boolean;
  /** Makes the document equal to `doc`, changing only what differs (not on a thin replica). */
  replace(doc: { [key: string]: Json }): boolean;
  /** Deletes the document (a tombstone that syncs; not on a thin replica). */
  remove(): boolean;
  save(): Uint8Array;
  sync(): Promise<SyncResult>;
  subscribe(listener: (event: ChangeEvent) => void): () => void;
  free(): void;
}

/** Options of `Verge.create`. */
export interface CreateOptions {
  /**
   * A thin replica: it keeps the state and its writes, and the node makes the changes, so a
   * write and a sync cost microseconds. It cannot replace or delete the document, nor write to
   * a deleted one (`document_not_live`).
   */
  thin?: boolean;
}

/** Options of `Verge.open`. */
export interface OpenOptions extends CreateOptions {
  /** Heads to wait for first (from a write or a replica, possibly at another node). */
  after?: string[];
  /** How long the node waits for `after`, in ms (default 2000, at most 30000). */
  waitMs?: number;
}

/** Options of `Verge.write`. */
export interface WriteOptions {
  /** Write only if the document is at these heads (else `precondition_failed`). */
  ifMatch?: string[];
  /** A retry with the same key answers the first answer and writes nothing. */
  idempotencyKey?: string;
  /** Expire the document this many seconds after the write (0 clears an expiry). */
  ttl?: number;
}

export class Verge {
  /**
   * Opens a document from the node: one round trip. With `after`, the node first waits until
   * it holds those heads (read your writes made elsewhere); `not_yet_replicated` if they do
   * not arrive within `waitMs`.
   */
  static open(connection: Connection, id: string, options?: OpenOptions): Promise<VergeDoc>;
  /** One write over HTTP without a replica; resolves to the document's heads after it. */
  static write(
    connection: Connection,
    id: string,
    ops: Op[],
    options?: WriteOptions,
  ): Promise<string[]>;
  /** A replica that has not talked to the node yet (no I/O). */
  static create(connection: Connection | null, id: string, options?: CreateOptions): VergeDoc;
  /** Loads bytes from `save()`. */
  static load(bytes: Uint8Array, connection?: Connection | null): VergeDoc;
}
