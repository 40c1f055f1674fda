// The edge request of the benchmark (bench/edge.mjs), as a worker running in workerd: load the
// document's replica from the save() the isolate cached on its last request, make 20
// increments, sync once with the node, cache save() for the next request. `?mode=thin` does the
// same with a thin replica (the node makes the changes); `?mode=live` keeps the replica itself
// between requests instead; `?mode=floor` only fetches the node's status.
import { Verge } from "../dist/workerd.js";

const live = new Map();
const cache = new Map(); // document id -> bytes of the replica's last save()

export default {
  async fetch(request, env) {
    const url = new URL(request.url);
    const id = url.pathname.slice(1);
    const mode = url.searchParams.get("mode");
    if (mode === "floor") {
      // What any request costs here: the harness and one small fetch to the node.
      const r = await fetch(`${env.VERGE_URL}/v1/status`);
      await r.arrayBuffer();
      return Response.json({ roundTrips: 1 });
    }
    if (mode === "live") {
      // A replica kept in the isolate between requests: no load, no save.
      const conn = { url: env.VERGE_URL };
      let doc = live.get(id);
      if (!doc) { doc = Verge.create(conn, id); live.set(id, doc); }
      for (let j = 0; j < 20; j++) doc.inc(["items", `sku-${j}`], 1);
      const { roundTrips } = await doc.sync();
      return Response.json({ roundTrips });
    }
    const conn = { url: env.VERGE_URL };
    const cached = cache.get(id);
    const thin = mode === "thin";
    const doc = cached ? Verge.load(cached, conn) : Verge.create(conn, id, { thin });
    try {
      for (let j = 0; j < 20; j++) doc.inc(["items", `sku-${j}`], 1);
      const { roundTrips } = await doc.sync();
      cache.set(id, doc.save());
      return Response.json({ roundTrips, items: Object.keys(doc.get(["items"]) ?? {}).length });
    } finally {
      doc.free();
    }
  },
};
