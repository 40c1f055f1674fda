// The cart as a Deno function:
//   deno run --allow-net --allow-read --allow-env examples/deno-cart/main.ts
// with VERGE_URL (default http://127.0.0.1:7070) and PORT (default 8789; 0 picks a free port).
// deno.json maps "@verge/client" to the package's "deno" export.
import { Verge } from "@verge/client";
import { cartHandler } from "../cart/cart.js";

const url = Deno.env.get("VERGE_URL") ?? "http://127.0.0.1:7070";
export const handler = cartHandler(Verge, { url, token: Deno.env.get("VERGE_TOKEN") });

if (import.meta.main) {
  Deno.serve({
    hostname: "127.0.0.1",
    port: Number(Deno.env.get("PORT") ?? 8789),
    onListen: ({ hostname, port }) => console.log(`cart on http://${hostname}:${port}, node ${url}`),
  }, handler);
}
