// @verge/client for Deno: reads the Wasm module next to this file (needs --allow-read for it).
import { initSync, Replica, ThinReplica } from "./verge_client.js";
import { bind } from "./api.js";

initSync({ module: await Deno.readFile(new URL("./verge_client_bg.wasm", import.meta.url)) });
bind({ Replica, ThinReplica });

export { Verge, VergeDoc, VergeError } from "./api.js";
