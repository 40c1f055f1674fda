// A shopping cart as a Fetch API handler, shared by the workerd, Node and Deno examples.
//
//   GET  /cart/{user}         -> { id, items: { sku: qty }, roundTrips }
//   POST /cart/{user}/items   body { "sku": "sku-1", "qty": 2 }
//
// Each cart is the document `cart/{user}`, shaped `{ items: { sku: qty } }`: an add is
// `inc ["items", sku]`, which creates the `items` map and the sku's counter when missing. Two
// functions adding to the same cart at once, even one neither has seen yet, both land: replicas
// that create the same map or counter concurrently create the same one (docs/client.md,
// "Conflicts"), adds of the same sku sum and adds of different skus write different keys.
//
// The isolate keeps each cart's saved replica between requests, so a warm request is one
// round trip to the node (push the add, pull the rest) and a cold one is one too.

const USER = /^\/cart\/([A-Za-z0-9._~:@+-]{1,200})(\/items)?$/;

export function cartHandler(Verge, connection) {
  const cache = new Map(); // document id -> bytes of the replica's last save()

  return async function handle(request) {
    const match = new URL(request.url).pathname.match(USER);
    if (!match) return json({ error: "not found" }, 404);
    const id = `cart/${match[1]}`;
    const cached = cache.get(id);
    // Each request gets its own replica (and actor), so concurrent requests never share state.
    const doc = cached ? Verge.load(cached, connection) : Verge.create(connection, id);
    try {
      if (request.method === "POST" && match[2]) {
        const { sku, qty = 1 } = await request.json();
        if (typeof sku !== "string" || !Number.isInteger(qty)) {
          return json({ error: "expected { sku: string, qty: integer }" }, 400);
        }
        doc.inc(["items", sku], qty);
      } else if (request.method !== "GET" || match[2]) {
        return json({ error: "method not allowed" }, 405);
      }
      const { roundTrips } = await doc.sync();
      cache.set(id, doc.save());
      return json({ id, items: items(doc.toJSON()), roundTrips });
    } catch (e) {
      return json({ error: e.message, code: e.code }, e.retryable ? 503 : 400);
    } finally {
      doc.free();
    }
  };
}

function items(cart) {
  const items = cart.items !== null && typeof cart.items === "object" ? cart.items : {};
  return Object.fromEntries(Object.entries(items).filter(([, qty]) => qty !== 0));
}

function json(body, status = 200) {
  return new Response(JSON.stringify(body), {
    status,
    headers: { "content-type": "application/json" },
  });
}
