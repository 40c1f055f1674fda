// The cart as a Node.js HTTP handler:
//   VERGE_URL=http://127.0.0.1:7070 PORT=8788 node examples/node-cart/server.mjs
// Uses the "node" export of @verge/client (imported by path here; `import ... from
// "@verge/client"` once installed).
import { createServer } from "node:http";
import { Verge } from "../../client-wasm/dist/node.js";
import { cartHandler } from "../cart/cart.js";

/** A Node HTTP server serving the cart against the node at `url`. */
export function cartServer(url) {
  const handle = cartHandler(Verge, { url, token: process.env.VERGE_TOKEN });
  return createServer(async (req, res) => {
    const chunks = [];
    for await (const chunk of req) chunks.push(chunk);
    const body = chunks.length ? Buffer.concat(chunks) : undefined;
    const request = new Request(`http://${req.headers.host ?? "localhost"}${req.url}`, {
      method: req.method,
      headers: req.headers,
      body: req.method === "GET" || req.method === "HEAD" ? undefined : body,
    });
    const response = await handle(request);
    res.writeHead(response.status, Object.fromEntries(response.headers));
    res.end(Buffer.from(await response.arrayBuffer()));
  });
}

if (process.argv[1] && import.meta.url === new URL(`file://${process.argv[1]}`).href) {
  const url = process.env.VERGE_URL ?? "http://127.0.0.1:7070";
  const server = cartServer(url).listen(Number(process.env.PORT ?? 8788), "127.0.0.1", () => {
    console.log(`cart on http://127.0.0.1:${server.address().port}, node ${url}`);
  });
}
