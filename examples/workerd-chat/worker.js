// The chat room as a Cloudflare Worker (workerd). With wrangler, import from "@verge/client":
// its "workerd" export imports the .wasm as a module, as workerd requires. This example imports
// the built package by path so that it runs from the repository without a bundler.
import { Verge } from "../../client-wasm/dist/workerd.js";
import { chatHandler } from "../chat/chat.js";

let handle;

export default {
  async fetch(request, env) {
    handle ??= chatHandler(Verge, { url: env.VERGE_URL, token: env.VERGE_TOKEN });
    return handle(request);
  },
};
