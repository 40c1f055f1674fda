// @verge/client for browsers: streams the Wasm module from the URL next to this file (the
// server must send it as application/wasm).
import init, { Replica, ThinReplica } from "./verge_client.js";
import { bind } from "./api.js";

await init({ module_or_path: new URL("./verge_client_bg.wasm", import.meta.url) });
bind({ Replica, ThinReplica });

export { Verge, VergeDoc, VergeError } from "./api.js";
