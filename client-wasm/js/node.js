// @verge/client for Node.js: compiles the Wasm module from the file next to this one.
import { readFileSync } from "node:fs";
import { initSync, Replica, ThinReplica } from "./verge_client.js";
import { bind } from "./api.js";

initSync({ module: readFileSync(new URL("./verge_client_bg.wasm", import.meta.url)) });
bind({ Replica, ThinReplica });

export { Verge, VergeDoc, VergeError } from "./api.js";
