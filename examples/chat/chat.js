// A chat room as a Fetch API handler (used by examples/workerd-chat).
//
//   GET  /rooms/{room}            -> { id, messages: [{ from, text, at }], count, roundTrips }
//   POST /rooms/{room}/messages   body { "from": "ann", "text": "hi" }; answers like GET
//
// Each room is the document `room/{room}`, shaped `{ messages: [...], count }`. A post is one
// change of two ops, `push ["messages"]` (the message object is the pushed element) and
// `inc ["count"]`, then a sync. Functions posting to the same room at once, on one node or on
// several that replicate, all land: concurrent pushes keep every element (in one order every
// replica agrees on) and concurrent increments sum, also when the room is new and several
// replicas create its list and counter at once (docs/client.md, "Conflicts"). Never write the
// list or the counter whole (`set ["messages"]`, `set ["count"]`): one writer would win.
//
// The isolate keeps each room's saved replica between requests, so a warm request is one round
// trip to the node (push the post, pull the rest) and a cold one is one too.

const ROOM = /^\/rooms\/([A-Za-z0-9._~:@+-]{1,200})(\/messages)?$/;
const TEXT_MAX = 4000;

export function chatHandler(Verge, connection) {
  const cache = new Map(); // document id -> bytes of the replica's last save()

  return async function handle(request) {
    const match = new URL(request.url).pathname.match(ROOM);
    if (!match) return json({ error: "not found" }, 404);
    const id = `room/${match[1]}`;
    const cached = cache.get(id);
    // Each request gets its own replica (and actor), so concurrent requests never share state.
    const doc = cached ? Verge.load(cached, connection) : Verge.create(connection, id);
    try {
      if (request.method === "POST" && match[2]) {
        let body;
        try {
          body = await request.json();
        } catch {
          body = null;
        }
        const { from, text } = body ?? {};
        if (typeof from !== "string" || typeof text !== "string" || text.length > TEXT_MAX) {
          const error = `expected { from: string, text: string of at most ${TEXT_MAX} characters }`;
          return json({ error }, 400);
        }
        doc.apply([
          { op: "push", path: ["messages"], value: { from, text, at: Date.now() } },
          { op: "inc", path: ["count"], by: 1 },
        ]);
      } else if (request.method !== "GET" || match[2]) {
        return json({ error: "method not allowed" }, 405);
      }
      const { roundTrips } = await doc.sync();
      cache.set(id, doc.save());
      const room = doc.toJSON();
      return json({
        id,
        messages: Array.isArray(room.messages) ? room.messages : [],
        count: typeof room.count === "number" ? room.count : 0,
        roundTrips,
      });
    } catch (e) {
      return json({ error: e.message, code: e.code }, e.retryable ? 503 : 400);
    } finally {
      doc.free();
    }
  };
}

function json(body, status = 200) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}
