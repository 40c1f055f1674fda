//! The JavaScript face of [`Replica`], for the npm package.
//!
//! Values cross the boundary as JSON text: `JSON.stringify`/`JSON.parse` on the JavaScript side
//! and serde_json here are faster than walking JavaScript objects through wasm-bindgen, and the
//! ops go through `verge_core`'s parser, so every limit the node checks is checked here too.
//! The wrapper in `js/api.js` adds `fetch`, subscriptions and the `VergeError` class.

use js_sys::{Error, Reflect};
use wasm_bindgen::prelude::*;

use crate::error::ClientError;
use crate::replica::Replica;
use crate::thin::ThinReplica;
use verge_core::{DocId, PathSegment};

/// A JavaScript `Error` whose `code` property carries [`ClientError::code`].
fn js_error(e: ClientError) -> JsValue {
    let err = Error::new(&e.to_string());
    // Setting a property on a fresh Error object cannot fail.
    let _ = Reflect::set(
        &err,
        &JsValue::from_str("code"),
        &JsValue::from_str(e.code()),
    );
    err.into()
}

/// Milliseconds since the Unix epoch, as JavaScript numbers carry them.
fn ms(now_ms: f64) -> i64 {
    now_ms as i64
}

fn parse_path(path: &str) -> Result<Vec<PathSegment>, ClientError> {
    let json: serde_json::Value =
        serde_json::from_str(path).map_err(|e| ClientError::InvalidJson(e.to_string()))?;
    let items = json
        .as_array()
        .ok_or_else(|| ClientError::InvalidJson("a path is an array".into()))?;
    items
        .iter()
        .map(|item| match item {
            serde_json::Value::String(k) => Ok(PathSegment::Key(k.clone())),
            serde_json::Value::Number(n) => n
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(PathSegment::Index)
                .ok_or_else(|| ClientError::InvalidJson("a list index is an integer ≥ 0".into())),
            _ => Err(ClientError::InvalidJson(
                "a path holds string keys and integer indexes".into(),
            )),
        })
        .collect()
}

/// A local replica of one document (see the Rust [`Replica`]).
#[wasm_bindgen(js_name = Replica)]
pub struct WasmReplica {
    inner: Replica,
}

#[wasm_bindgen(js_class = Replica)]
impl WasmReplica {
    /// An empty replica of `id`.
    #[wasm_bindgen(constructor)]
    pub fn new(id: &str) -> Result<WasmReplica, JsValue> {
        let id = DocId::new(id).map_err(|e| js_error(e.into()))?;
        Ok(Self {
            inner: Replica::new(id),
        })
    }

    /// Loads bytes from `save()` (a copy when this isolate saved them lately).
    pub fn load(bytes: &[u8]) -> Result<WasmReplica, JsValue> {
        Ok(Self {
            inner: Replica::load(bytes).map_err(js_error)?,
        })
    }

    /// The document id.
    #[wasm_bindgen(getter)]
    pub fn id(&self) -> String {
        self.inner.id().as_str().to_owned()
    }

    /// Applies a JSON array of ops (or one op) as one change; returns whether it changed.
    pub fn apply(&mut self, ops: &str, now_ms: f64) -> Result<bool, JsValue> {
        self.inner.apply_json(ops, ms(now_ms)).map_err(js_error)
    }

    /// Makes the document equal to a JSON object, changing only what differs.
    pub fn replace(&mut self, doc: &str, now_ms: f64) -> Result<bool, JsValue> {
        let map = match serde_json::from_str(doc) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => {
                return Err(js_error(ClientError::InvalidDocument(
                    "a document is a JSON object".into(),
                )));
            }
            Err(e) => return Err(js_error(ClientError::InvalidJson(e.to_string()))),
        };
        self.inner.replace(map, ms(now_ms)).map_err(js_error)
    }

    /// Deletes the document (a tombstone that syncs).
    pub fn remove(&mut self, now_ms: f64) -> Result<bool, JsValue> {
        self.inner.delete(ms(now_ms)).map_err(js_error)
    }

    /// The JSON text of the value at a JSON path, or `undefined` when absent.
    pub fn get(&self, path: &str) -> Result<Option<String>, JsValue> {
        let path = parse_path(path).map_err(js_error)?;
        Ok(self.inner.get(&path).map(|v| v.to_string()))
    }

    /// The JSON text of the whole document.
    #[wasm_bindgen(js_name = toJSONText)]
    pub fn to_json_text(&self) -> String {
        self.inner.to_json().to_string()
    }

    /// The current heads as hex strings.
    pub fn heads(&mut self) -> Result<Vec<String>, JsValue> {
        Ok(verge_core::heads_to_hex(
            &self.inner.heads().map_err(js_error)?,
        ))
    }

    /// Whether the document carries a tombstone.
    #[wasm_bindgen(getter)]
    pub fn deleted(&self) -> bool {
        self.inner.lifecycle().deleted
    }

    /// Whether there are local changes the node has not acknowledged.
    #[wasm_bindgen(js_name = hasUnsyncedChanges)]
    pub fn has_unsynced_changes(&self) -> bool {
        self.inner.has_unsynced_changes()
    }

    /// The replica's bytes for a cache.
    pub fn save(&mut self) -> Result<Vec<u8>, JsValue> {
        self.inner.save().map_err(js_error)
    }

    /// Starts a sync: the first request body.
    #[wasm_bindgen(js_name = syncBegin)]
    pub fn sync_begin(&mut self) -> Result<Vec<u8>, JsValue> {
        self.inner.sync_begin().map_err(js_error)
    }

    /// Consumes an answer: the next request body, or `undefined` when done.
    #[wasm_bindgen(js_name = syncReceive)]
    pub fn sync_receive(&mut self, reply: &[u8]) -> Result<Option<Vec<u8>>, JsValue> {
        self.inner.sync_receive(reply).map_err(js_error)
    }

    /// Drops the local copy after the node answered `document_replaced`.
    #[wasm_bindgen(js_name = startOver)]
    pub fn start_over(&mut self) {
        self.inner.start_over();
    }

    /// Drops the local copy after the node answered `document_compacted`, keeping the writes
    /// it has not acknowledged to make again on the new generation.
    #[wasm_bindgen(js_name = startOverKeepingWrites)]
    pub fn start_over_keeping_writes(&mut self) {
        self.inner.start_over_keeping_writes();
    }

    /// Abandons the sync in progress.
    #[wasm_bindgen(js_name = syncAbort)]
    pub fn sync_abort(&mut self) {
        self.inner.sync_abort();
    }

    /// `[roundTrips, bytesSent, bytesReceived, changed (0/1)]` of the last completed sync.
    #[wasm_bindgen(js_name = lastSync)]
    pub fn last_sync(&self) -> Vec<f64> {
        let s = self.inner.last_sync();
        vec![
            f64::from(s.round_trips),
            s.bytes_sent as f64,
            s.bytes_received as f64,
            if s.changed { 1.0 } else { 0.0 },
        ]
    }
}

/// A thin replica of one document (see the Rust [`ThinReplica`]): the state and the writes,
/// with the node making the changes.
#[wasm_bindgen(js_name = ThinReplica)]
pub struct WasmThinReplica {
    inner: ThinReplica,
}

#[wasm_bindgen(js_class = ThinReplica)]
impl WasmThinReplica {
    /// An empty thin replica of `id`.
    #[wasm_bindgen(constructor)]
    pub fn new(id: &str) -> Result<WasmThinReplica, JsValue> {
        let id = DocId::new(id).map_err(|e| js_error(e.into()))?;
        Ok(Self {
            inner: ThinReplica::new(id),
        })
    }

    /// Loads bytes from a thin replica's `save()`.
    pub fn load(bytes: &[u8]) -> Result<WasmThinReplica, JsValue> {
        Ok(Self {
            inner: ThinReplica::load(bytes).map_err(js_error)?,
        })
    }

    /// Whether `bytes` are a thin replica's `save()`.
    #[wasm_bindgen(js_name = isSave)]
    pub fn is_save(bytes: &[u8]) -> bool {
        ThinReplica::is_save(bytes)
    }

    /// The document id.
    #[wasm_bindgen(getter)]
    pub fn id(&self) -> String {
        self.inner.id().as_str().to_owned()
    }

    /// Applies a JSON array of ops (or one op) as one write; returns whether it changed.
    pub fn apply(&mut self, ops: &str, now_ms: f64) -> Result<bool, JsValue> {
        self.inner.apply_json(ops, ms(now_ms)).map_err(js_error)
    }

    /// The JSON text of the value at a JSON path, or `undefined` when absent.
    pub fn get(&self, path: &str) -> Result<Option<String>, JsValue> {
        let path = parse_path(path).map_err(js_error)?;
        Ok(self.inner.get(&path).map(|v| v.to_string()))
    }

    /// The JSON text of the whole document.
    #[wasm_bindgen(js_name = toJSONText)]
    pub fn to_json_text(&self) -> String {
        self.inner.to_json().to_string()
    }

    /// The heads of the last state read from the node, as hex strings.
    pub fn heads(&self) -> Vec<String> {
        verge_core::heads_to_hex(self.inner.heads())
    }

    /// Whether the document carries a tombstone.
    #[wasm_bindgen(getter)]
    pub fn deleted(&self) -> bool {
        self.inner.lifecycle().deleted
    }

    /// Whether writes wait for a sync.
    #[wasm_bindgen(js_name = hasUnsyncedChanges)]
    pub fn has_unsynced_changes(&self) -> bool {
        self.inner.has_unsynced_changes()
    }

    /// The replica's bytes for a cache.
    pub fn save(&mut self) -> Vec<u8> {
        self.inner.save()
    }

    /// Starts a sync: the JSON body of `POST /v1/ops/{id}`.
    #[wasm_bindgen(js_name = pushBegin)]
    pub fn push_begin(&mut self) -> String {
        self.inner.push_begin()
    }

    /// Consumes an answer: the next request body, or `undefined` when done.
    #[wasm_bindgen(js_name = pushReceive)]
    pub fn push_receive(&mut self, reply: &[u8]) -> Result<Option<String>, JsValue> {
        self.inner.push_receive(reply).map_err(js_error)
    }

    /// Abandons the sync in progress; the next one sends the same writes again.
    #[wasm_bindgen(js_name = pushAbort)]
    pub fn push_abort(&mut self) {
        self.inner.push_abort();
    }

    /// After `document_replaced`: drops the writes made on the old document.
    #[wasm_bindgen(js_name = startOver)]
    pub fn start_over(&mut self) {
        self.inner.start_over();
    }

    /// After `document_compacted`: makes the unsynced writes again on the current state.
    #[wasm_bindgen(js_name = startOverKeepingWrites)]
    pub fn start_over_keeping_writes(&mut self) {
        self.inner.start_over_keeping_writes();
    }

    /// `[roundTrips, bytesSent, bytesReceived, changed (0/1)]` of the last completed sync.
    #[wasm_bindgen(js_name = lastSync)]
    pub fn last_sync(&self) -> Vec<f64> {
        let s = self.inner.last_sync();
        vec![
            f64::from(s.round_trips),
            s.bytes_sent as f64,
            s.bytes_received as f64,
            if s.changed { 1.0 } else { 0.0 },
        ]
    }
}
