// @verge/client for workerd (Cloudflare Workers): the runtime forbids compiling Wasm from
// bytes, so the module is imported as a compiled WebAssembly.Module and only instantiated here.
import wasmModule from "./verge_client_bg.wasm";
import { initSync, Replica, ThinReplica } from "./verge_client.js";
import { bind } from "./api.js";

initSync({ module: wasmModule });
bind({ Replica, ThinReplica });

export { Verge, VergeDoc, VergeError } from "./api.js";
