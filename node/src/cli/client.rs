//! The client commands: `get`, `put`, `patch`, `del`, `ls`, `inc`, `watch`, `status`,
//! `subscriptions`, and the admin commands `leave` and `members forget`.
//!
//! Each command is one (or, for `ls`, a few) requests against the node's HTTP API
//! (docs/api.md). Output goes to stdout in a form that is easy to read and to pipe; errors go to
//! stderr, and the exit code says which side failed: 1 when the node answered with an error,
//! 2 for bad input, 3 when the node could not be reached.

use std::io::{self, Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};

use super::ClientOpts;
use super::http::{
    ApiClient, ApiResponse, Endpoint, MAX_RESPONSE_BYTES, TransportError, bearer, encode_id,
    encode_query, read_limited,
};
use super::sse::SseParser;

/// The most bytes read from stdin for `put -` and `patch -`.
const MAX_INPUT_BYTES: u64 = 64 * 1024 * 1024;

/// The node sends a keep-alive comment every 15 s; silence for this long means the connection
/// is gone even if TCP has not noticed yet.
const WATCH_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The largest single line or event accepted on the watch stream.
const MAX_EVENT_BYTES: usize = 1024 * 1024;

/// The node's page size limit for `GET /v1/docs`.
const MAX_PAGE: u64 = verge_core::limits::LIST_LIMIT_MAX as u64;

/// A client command of the `verge` binary. Flatten it into the top-level subcommands.
// `about = None`: clap applies the doc comment of a flattened enum to the command it is
// flattened into, and this one must not become the help text of `verge`.
#[derive(Debug, Clone, clap::Subcommand)]
#[command(about = None, long_about = None)]
pub enum ClientCommand {
    /// Print a document as pretty JSON.
    Get {
        /// The document id, e.g. `cart/u-42`.
        id: String,
        /// Answer once the node holds these heads (as a write printed them; comma-separated
        /// or one argument each): read your own write at another node.
        #[arg(long, value_name = "HEADS", num_args = 1.., value_delimiter = ',')]
        after: Vec<String>,
        /// How long to wait for `--after`, in milliseconds (the node's default: 2000).
        #[arg(long, value_name = "MS", requires = "after")]
        wait_ms: Option<u64>,
    },
    /// Replace a document with a JSON object; prints the new heads.
    ///
    /// The node writes only the keys that changed, so concurrent edits of other keys survive.
    Put {
        /// The document id.
        id: String,
        /// The whole new document as a JSON object, or `-` to read it from stdin.
        json: String,
        /// Expire the document this many seconds after the write (0 removes the expiry).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Write only if the document is still at these heads (as `get`'s read printed them):
        /// refused with `precondition_failed` when it changed since.
        #[arg(long, value_name = "HEADS", num_args = 1.., value_delimiter = ',')]
        if_match: Vec<String>,
    },
    /// Apply ops to a document atomically; prints the new heads.
    ///
    /// OPS is a JSON array of ops, an object `{"ops":[...]}`, a single op object, or `-` to
    /// read any of these from stdin. Example: '[{"op":"inc","path":["n"],"by":1}]'.
    Patch {
        /// The document id.
        id: String,
        /// The ops (see above), or `-` for stdin.
        ops: String,
        /// Expire the document this many seconds after the write (0 removes the expiry).
        #[arg(long, value_name = "SECONDS")]
        ttl: Option<u64>,
        /// Write only if the document is still at these heads: refused with
        /// `precondition_failed` when it changed since.
        #[arg(long, value_name = "HEADS", num_args = 1.., value_delimiter = ',')]
        if_match: Vec<String>,
    },
    /// Delete a document; prints the heads of the tombstone.
    Del {
        /// The document id.
        id: String,
    },
    /// List document ids, one per line, in id order.
    Ls {
        /// Only ids starting with this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Print at most this many ids (all of them when absent).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..))]
        limit: Option<u64>,
    },
    /// Add to a counter; prints the new heads.
    Inc {
        /// The document id.
        id: String,
        /// The counter's path: a JSON array (`["items","sku-1","qty"]`) or dot-separated map
        /// keys (`items.sku-1.qty`).
        path: String,
        /// How much to add (may be negative).
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        by: i64,
    },
    /// Follow changes: one JSON line per committed change (`seq`, `id`, `heads`, `deleted`).
    Watch {
        /// Only documents whose id starts with this prefix.
        #[arg(long)]
        prefix: Option<String>,
        /// Resume after this sequence number (a printed change's `seq`): every change after it
        /// that the node's feed still holds, then live ones.
        #[arg(long)]
        since: Option<u64>,
    },
    /// Show the node's identity, load and cluster members.
    Status,
    /// Show each webhook subscription: its cursor, lag, deliveries and failures.
    Subscriptions,
    /// Backups of the running node (`[backup]` in its config).
    #[command(subcommand)]
    Backup(BackupCommand),
    /// Retire the node: it announces its departure to the cluster, then stops as on SIGTERM
    /// (draining the write queue). The other members drop it instead of listing it as down,
    /// and stop dialling it until it starts again. Needs an admin token.
    Leave,
    /// Manage the cluster's members.
    Members {
        /// What to do with them.
        #[command(subcommand)]
        command: MembersCommand,
    },
}

/// How long `verge backup now` waits for the snapshot.
const BACKUP_NOW_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(6 * 3600);

/// `verge backup` subcommands.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum BackupCommand {
    /// Take a snapshot now; prints its name and size once it is written.
    Now,
    /// List the snapshots at the backup location, and the segments shipped since.
    List,
}

/// `verge members ...`.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum MembersCommand {
    /// Drop a member that will never return (its machine is gone): the node stops dialling
    /// ADDR and drops it from status, and tells the other members, which do the same. A node
    /// that starts again at ADDR later joins as a new member. Needs an admin token.
    Forget {
        /// The member's gossip address, as `verge status` lists it (IP:PORT).
        addr: String,
    },
}

/// Why a command failed; decides the message and the exit code.
#[derive(Debug)]
enum CliError {
    /// Bad input on the command line or stdin (exit 2, like clap's usage errors).
    Usage(String),
    /// The node answered with an error (exit 1).
    Api { code: String, message: String },
    /// No usable HTTP exchange (exit 3 when the node could not be reached).
    Transport(TransportError),
    /// The node answered, but not in the documented shape (exit 1).
    Unexpected(String),
    /// Writing to stdout failed (exit 1, or 0 for a closed pipe).
    Output(io::Error),
}

impl From<TransportError> for CliError {
    fn from(e: TransportError) -> Self {
        match e {
            TransportError::Invalid(msg) => Self::Usage(msg),
            other => Self::Transport(other),
        }
    }
}

impl CliError {
    fn report(self) -> ExitCode {
        let (code, message) = match self {
            Self::Usage(msg) => (2, format!("error: {msg}")),
            Self::Api { code, message } => (1, format!("error: {code}: {message}{}", hint(&code))),
            Self::Transport(e @ TransportError::BadBody(_)) => (1, format!("error: {e}")),
            Self::Transport(e) => (3, format!("error: {e}")),
            Self::Unexpected(msg) => (
                1,
                format!("error: unexpected response from the node: {msg}"),
            ),
            // The reader went away (`verge watch | head`): nothing left to say, not a failure.
            Self::Output(e) if e.kind() == io::ErrorKind::BrokenPipe => return ExitCode::SUCCESS,
            Self::Output(e) => (1, format!("error: writing output failed: {e}")),
        };
        // If stderr is gone too there is nobody left to tell.
        let _ = writeln!(io::stderr(), "{message}");
        ExitCode::from(code)
    }
}

/// What to do about an access error, after the node's own message.
fn hint(code: &str) -> &'static str {
    match code {
        "unauthorized" => {
            "\nhint: pass a valid API token with --token or VERGE_TOKEN (`verge token` creates one)"
        }
        "forbidden" => {
            "\nhint: the token is valid but its role or prefixes do not cover this request; use a token that does"
        }
        _ => "",
    }
}

/// Runs a client command against the node at `opts.url` and returns the process exit code:
/// 0 on success, 1 when the node answered with an error, 2 for bad input, 3 when the node
/// could not be reached. Output and error messages are printed here, so `main` only returns
/// the code.
pub async fn run(cmd: ClientCommand, opts: &ClientOpts) -> ExitCode {
    match run_inner(cmd, opts).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => e.report(),
    }
}

async fn run_inner(cmd: ClientCommand, opts: &ClientOpts) -> Result<(), CliError> {
    let endpoint = Endpoint::parse(&opts.url).map_err(CliError::Usage)?;
    let token = match opts.token.as_deref() {
        Some(t) if !t.is_empty() => Some(bearer(t).map_err(CliError::Usage)?),
        _ => None,
    };
    let client = ApiClient::new(endpoint, token);
    match cmd {
        ClientCommand::Get { id, after, wait_ms } => get(&client, &id, &after, wait_ms).await,
        ClientCommand::Put {
            id,
            json,
            ttl,
            if_match,
        } => {
            let body = put_body(&read_arg(&json)?).map_err(CliError::Usage)?;
            write_doc(&client, Method::PUT, &id, ttl, body, &if_match).await
        }
        ClientCommand::Patch {
            id,
            ops,
            ttl,
            if_match,
        } => {
            let body = normalize_ops(&read_arg(&ops)?).map_err(CliError::Usage)?;
            write_doc(&client, Method::PATCH, &id, ttl, body, &if_match).await
        }
        ClientCommand::Del { id } => {
            let path = doc_path(&id)?;
            let value = expect_ok(client.send(Method::DELETE, &path, None).await?)?;
            print_heads(&value)
        }
        ClientCommand::Ls { prefix, limit } => ls(&client, prefix.as_deref(), limit).await,
        ClientCommand::Inc { id, path, by } => {
            let path = parse_path(&path).map_err(CliError::Usage)?;
            let body = json!({ "ops": [ { "op": "inc", "path": path, "by": by } ] }).to_string();
            write_doc(&client, Method::PATCH, &id, None, body, &[]).await
        }
        ClientCommand::Watch { prefix, since } => watch(&client, prefix.as_deref(), since).await,
        ClientCommand::Status => {
            let value = expect_ok(client.send(Method::GET, "/v1/status", None).await?)?;
            emit(&format_status(&value))
        }
        ClientCommand::Subscriptions => {
            let value = expect_ok(client.send(Method::GET, "/v1/status", None).await?)?;
            emit(&format_subscriptions(&value))
        }
        ClientCommand::Leave => {
            let value = expect_ok(client.send(Method::POST, "/v1/admin/leave", None).await?)?;
            emit(&format_leave(&value))
        }
        ClientCommand::Members {
            command: MembersCommand::Forget { addr },
        } => {
            let body = json!({ "addr": addr }).to_string();
            let value = expect_ok(
                client
                    .send(
                        Method::POST,
                        "/v1/admin/members/forget",
                        Some(Bytes::from(body)),
                    )
                    .await?,
            )?;
            emit(&format!(
                "forgot {}; the other members drop it as the news spreads\n",
                value
                    .get("forgotten")
                    .and_then(Value::as_str)
                    .unwrap_or(&addr)
            ))
        }
        ClientCommand::Backup(BackupCommand::Now) => {
            // A snapshot of a large store takes a while; the node answers once it is written.
            let value = expect_ok(
                client
                    .send_within(
                        Method::POST,
                        "/v1/admin/backup",
                        None,
                        None,
                        BACKUP_NOW_TIMEOUT,
                    )
                    .await?,
            )?;
            emit(&format!(
                "snapshot {} written: {} bytes, {} documents, feed position {}, taken {}\n",
                value["snapshot"].as_str().unwrap_or("?"),
                value["bytes"],
                value["documents"],
                value["seq"],
                value["at"].as_str().unwrap_or("?"),
            ))
        }
        ClientCommand::Backup(BackupCommand::List) => {
            let value = expect_ok(client.send(Method::GET, "/v1/admin/backups", None).await?)?;
            emit(&format_backups(&value))
        }
    }
}

/// What `verge leave` prints: who was told, and that the node is stopping.
fn format_leave(value: &Value) -> String {
    let list = |key: &str| -> Vec<&str> {
        value
            .get(key)
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default()
    };
    let (told, unconfirmed) = (list("told"), list("unconfirmed"));
    let node = value
        .get("node_id")
        .and_then(Value::as_str)
        .unwrap_or("the node");
    let mut out = match told.len() {
        0 if unconfirmed.is_empty() => format!("{node} left (it had no members to tell)\n"),
        n => format!(
            "{node} left the cluster; {n} member(s) confirmed: {}\n",
            told.join(", ")
        ),
    };
    if !unconfirmed.is_empty() {
        out.push_str(&format!(
            "not confirmed (they learn it from the others, or declare the node down): {}\n",
            unconfirmed.join(", ")
        ));
    }
    out.push_str("the node is draining its write queue and stopping\n");
    out
}

/// `/v1/docs/{id}` with the id percent-encoded where needed.
fn doc_path(id: &str) -> Result<String, CliError> {
    if id.is_empty() {
        return Err(CliError::Usage("the document id must not be empty".into()));
    }
    Ok(format!("/v1/docs/{}", encode_id(id)))
}

/// Writes `text` to stdout and flushes, so piped output (notably `watch`) arrives promptly.
fn emit(text: &str) -> Result<(), CliError> {
    let mut out = io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|()| out.flush())
        .map_err(CliError::Output)
}

/// The command-line argument itself, or all of stdin when it is `-`.
fn read_arg(arg: &str) -> Result<String, CliError> {
    if arg != "-" {
        return Ok(arg.to_owned());
    }
    let mut buf = String::new();
    io::stdin()
        .lock()
        .take(MAX_INPUT_BYTES + 1)
        .read_to_string(&mut buf)
        .map_err(|e| CliError::Usage(format!("reading stdin failed: {e}")))?;
    if buf.len() as u64 > MAX_INPUT_BYTES {
        return Err(CliError::Usage(format!(
            "stdin is larger than {MAX_INPUT_BYTES} bytes"
        )));
    }
    Ok(buf)
}

/// Checks a `put` argument: it must be a JSON object. The original text is sent, so numbers
/// keep their exact spelling.
fn put_body(text: &str) -> Result<String, String> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(_)) => Ok(text.trim().to_owned()),
        Ok(_) => Err("the document must be a JSON object, e.g. '{\"n\":1}'".into()),
        Err(e) => Err(format!("the document is not valid JSON: {e}")),
    }
}

/// Turns the `patch` argument into the request body `{"ops":[...]}`. Accepts an array of ops,
/// the body itself, or a single op object. Wraps the original text rather than re-serialising
/// it, so numbers keep their exact spelling.
fn normalize_ops(text: &str) -> Result<String, String> {
    let value: Value =
        serde_json::from_str(text).map_err(|e| format!("the ops are not valid JSON: {e}"))?;
    let text = text.trim();
    match value {
        Value::Array(_) => Ok(format!("{{\"ops\":{text}}}")),
        Value::Object(map) => match map.get("ops") {
            Some(Value::Array(_)) => Ok(text.to_owned()),
            Some(_) => Err("\"ops\" must be a JSON array of ops".into()),
            None if map.contains_key("op") => Ok(format!("{{\"ops\":[{text}]}}")),
            None => Err(
                "expected a JSON array of ops, an object {\"ops\":[...]}, or one op object \
                 with an \"op\" field"
                    .into(),
            ),
        },
        _ => Err("expected a JSON array of ops or an object {\"ops\":[...]}".into()),
    }
}

/// Parses the PATH of `inc`: a JSON array of keys and indexes, or dot-separated map keys.
fn parse_path(text: &str) -> Result<Value, String> {
    let trimmed = text.trim();
    if trimmed.starts_with('[') {
        let items: Vec<Value> = serde_json::from_str(trimmed)
            .map_err(|e| format!("the path is not a valid JSON array: {e}"))?;
        if items.is_empty() {
            return Err("the path must not be empty".into());
        }
        for item in &items {
            let ok = item.is_string() || item.as_u64().is_some();
            if !ok {
                return Err(format!(
                    "path element {item} must be a string (map key) or a non-negative integer \
                     (list index)"
                ));
            }
        }
        return Ok(Value::Array(items));
    }
    if text.is_empty() {
        return Err("the path must not be empty".into());
    }
    let mut keys = Vec::new();
    for key in text.split('.') {
        if key.is_empty() {
            return Err(format!(
                "the path {text:?} has an empty key; use the JSON array form for keys that \
                 contain dots, e.g. '[\"a.b\",\"c\"]'"
            ));
        }
        keys.push(Value::String(key.to_owned()));
    }
    Ok(Value::Array(keys))
}

/// Builds the error for a non-2xx answer from the documented JSON error body, falling back to
/// the status and a snippet of the body when the body is not in that shape.
fn api_error(resp: &ApiResponse) -> CliError {
    let parsed: Option<(String, String)> = serde_json::from_slice::<Value>(&resp.body)
        .ok()
        .and_then(|v| {
            let err = v.get("error")?;
            let code = err.get("code")?.as_str()?.to_owned();
            let message = err
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            Some((code, message))
        });
    match parsed {
        Some((code, message)) => CliError::Api { code, message },
        None => CliError::Api {
            code: format!("http_{}", resp.status.as_u16()),
            message: fallback_message(resp.status, &resp.body),
        },
    }
}

/// A readable message for an error response without the JSON error body.
fn fallback_message(status: StatusCode, body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    let reason = status.canonical_reason().unwrap_or("error");
    if text.is_empty() {
        return reason.to_owned();
    }
    let mut snippet: String = text.chars().take(200).collect();
    if snippet.len() < text.len() {
        snippet.push('…');
    }
    let snippet = snippet.replace(['\n', '\r'], " ");
    format!("{reason}: {snippet}")
}

/// The JSON body of a successful answer, or the error the node answered with.
fn expect_ok(resp: ApiResponse) -> Result<Value, CliError> {
    if !resp.status.is_success() {
        return Err(api_error(&resp));
    }
    serde_json::from_slice(&resp.body).map_err(|e| {
        CliError::Unexpected(format!(
            "status {} with a body that is not JSON ({e})",
            resp.status.as_u16()
        ))
    })
}

/// The `heads` of a write answer.
fn heads_of(value: &Value) -> Result<Vec<&str>, CliError> {
    let heads = value
        .get("heads")
        .and_then(Value::as_array)
        .ok_or_else(|| CliError::Unexpected("the answer has no \"heads\" array".into()))?;
    heads
        .iter()
        .map(|h| {
            h.as_str()
                .ok_or_else(|| CliError::Unexpected(format!("a head is not a string: {h}")))
        })
        .collect()
}

fn print_heads(value: &Value) -> Result<(), CliError> {
    let mut text = String::new();
    for head in heads_of(value)? {
        text.push_str(head);
        text.push('\n');
    }
    emit(&text)
}

async fn get(
    client: &ApiClient,
    id: &str,
    after: &[String],
    wait_ms: Option<u64>,
) -> Result<(), CliError> {
    let mut path = doc_path(id)?;
    if !after.is_empty() {
        path.push_str(&format!("?after={}", after.join(",")));
        if let Some(ms) = wait_ms {
            path.push_str(&format!("&wait_ms={ms}"));
        }
    }
    let value = expect_ok(client.send(Method::GET, &path, None).await?)?;
    let doc = value
        .get("doc")
        .ok_or_else(|| CliError::Unexpected("the answer has no \"doc\" field".into()))?;
    let text = serde_json::to_string_pretty(doc)
        .map_err(|e| CliError::Unexpected(format!("cannot print the document: {e}")))?;
    emit(&format!("{text}\n"))
}

async fn write_doc(
    client: &ApiClient,
    method: Method,
    id: &str,
    ttl: Option<u64>,
    body: String,
    if_match: &[String],
) -> Result<(), CliError> {
    let mut path = doc_path(id)?;
    if let Some(ttl) = ttl {
        path.push_str(&format!("?ttl={ttl}"));
    }
    let if_match = (!if_match.is_empty()).then(|| if_match.join(","));
    let value = expect_ok(
        client
            .send_if_match(method, &path, Some(Bytes::from(body)), if_match.as_deref())
            .await?,
    )?;
    print_heads(&value)
}

/// `/v1/docs?limit=..&prefix=..&cursor=..`
fn list_path(prefix: Option<&str>, limit: u64, cursor: Option<&str>) -> String {
    let mut path = format!("/v1/docs?limit={limit}");
    if let Some(prefix) = prefix {
        path.push_str("&prefix=");
        path.push_str(&encode_query(prefix));
    }
    if let Some(cursor) = cursor {
        path.push_str("&cursor=");
        path.push_str(&encode_query(cursor));
    }
    path
}

async fn ls(client: &ApiClient, prefix: Option<&str>, limit: Option<u64>) -> Result<(), CliError> {
    let mut remaining = limit;
    let mut cursor: Option<String> = None;
    loop {
        let page = remaining.map_or(MAX_PAGE, |r| r.min(MAX_PAGE));
        if page == 0 {
            return Ok(());
        }
        let path = list_path(prefix, page, cursor.as_deref());
        let value = expect_ok(client.send(Method::GET, &path, None).await?)?;
        let docs = value
            .get("docs")
            .and_then(Value::as_array)
            .ok_or_else(|| CliError::Unexpected("the answer has no \"docs\" array".into()))?;
        let mut text = String::new();
        let mut printed: u64 = 0;
        for doc in docs {
            if remaining.is_some_and(|r| printed >= r) {
                break;
            }
            let id = doc.get("id").and_then(Value::as_str).ok_or_else(|| {
                CliError::Unexpected(format!("a listed document has no string \"id\": {doc}"))
            })?;
            text.push_str(id);
            text.push('\n');
            printed += 1;
        }
        emit(&text)?;
        remaining = remaining.map(|r| r.saturating_sub(printed));
        let next = match value.get("next_cursor") {
            None | Some(Value::Null) => return Ok(()),
            Some(Value::String(next)) => next.clone(),
            Some(other) => {
                return Err(CliError::Unexpected(format!(
                    "\"next_cursor\" is neither a string nor null: {other}"
                )));
            }
        };
        // A cursor that does not move would loop forever.
        if docs.is_empty() || cursor.as_deref() == Some(next.as_str()) {
            return Err(CliError::Unexpected(format!(
                "the listing does not advance past cursor {next:?}"
            )));
        }
        cursor = Some(next);
    }
}

async fn watch(
    client: &ApiClient,
    prefix: Option<&str>,
    since: Option<u64>,
) -> Result<(), CliError> {
    let mut query = Vec::new();
    if let Some(prefix) = prefix {
        query.push(format!("prefix={}", encode_query(prefix)));
    }
    if let Some(since) = since {
        query.push(format!("since={since}"));
    }
    let mut path = "/v1/watch".to_owned();
    if !query.is_empty() {
        path.push('?');
        path.push_str(&query.join("&"));
    }
    let response = client.open_stream(&path).await?;
    let status = response.status();
    if !status.is_success() {
        let body = tokio::time::timeout(
            super::http::REQUEST_TIMEOUT,
            read_limited(response.into_body(), MAX_RESPONSE_BYTES),
        )
        .await
        .unwrap_or_else(|_| Ok(Bytes::new()))?;
        return Err(api_error(&ApiResponse { status, body }));
    }
    // The last number seen, for the hint on how to resume.
    let mut last_seq = since;
    let lost = |detail: String, last_seq: Option<u64>| {
        let detail = match last_seq {
            Some(seq) => format!("{detail}; resume with `verge watch --since {seq}`"),
            None => detail,
        };
        CliError::Transport(TransportError::Lost {
            url: client.endpoint().to_string(),
            detail,
        })
    };
    let mut body = response.into_body();
    let mut parser = SseParser::new(MAX_EVENT_BYTES);
    loop {
        let frame = match tokio::time::timeout(WATCH_IDLE_TIMEOUT, body.frame()).await {
            Err(_) => {
                return Err(lost(
                    format!(
                        "no data on the watch stream for {} s",
                        WATCH_IDLE_TIMEOUT.as_secs()
                    ),
                    last_seq,
                ));
            }
            Ok(None) => return Err(lost("the node closed the watch stream".into(), last_seq)),
            Ok(Some(Err(e))) => {
                return Err(lost(
                    format!("the watch stream broke: {}", super::http::error_chain(&e)),
                    last_seq,
                ));
            }
            Ok(Some(Ok(frame))) => frame,
        };
        let Ok(data) = frame.into_data() else {
            continue; // trailers
        };
        let events = parser.push(&data).map_err(CliError::Unexpected)?;
        let mut text = String::new();
        for event in events {
            if let Some(seq) = event.id.as_deref().and_then(|id| id.parse().ok()) {
                last_seq = Some(seq);
            }
            match event_line(&event.event, &event.data) {
                WatchLine::Out(line) => {
                    text.push_str(&line);
                    text.push('\n');
                }
                WatchLine::Warn(msg) => {
                    let _ = writeln!(io::stderr(), "warning: {msg}");
                }
                WatchLine::Skip => {}
            }
        }
        if !text.is_empty() {
            emit(&text)?;
        }
    }
}

/// What `watch` does with one event.
#[derive(Debug, PartialEq, Eq)]
enum WatchLine {
    /// Print this line on stdout.
    Out(String),
    /// Print this warning on stderr.
    Warn(String),
    /// Ignore the event.
    Skip,
}

/// Renders a watch event: `change` events become one compact JSON line on stdout; `reset` and
/// malformed events become warnings; unknown event types are skipped for forward
/// compatibility.
fn event_line(event: &str, data: &str) -> WatchLine {
    match event {
        "change" => match serde_json::from_str::<Value>(data) {
            // Printed as sent (keys in the node's order), on one line: a raw newline in JSON
            // can only be whitespace between tokens.
            Ok(Value::Object(_)) => WatchLine::Out(data.trim().replace(['\n', '\r'], " ")),
            _ => WatchLine::Warn(format!("ignoring a malformed change event: {data}")),
        },
        "reset" => {
            let data = serde_json::from_str::<Value>(data).unwrap_or_default();
            let number = |key: &str| {
                data.get(key)
                    .and_then(Value::as_u64)
                    .map_or_else(|| "none".to_owned(), |n| n.to_string())
            };
            WatchLine::Warn(format!(
                "the node's feed no longer holds the changes after the point asked (oldest kept: \
                 {}); re-read the documents you care about; following from {}",
                number("oldest"),
                number("last")
            ))
        }
        _ => WatchLine::Skip,
    }
}

/// One line per subscription: name, cursor, lag, delivered, failures, the last error.
fn format_backups(listing: &Value) -> String {
    let mut out = format!("location: {}\n", listing["to"].as_str().unwrap_or("?"));
    let status = &listing["status"];
    out.push_str(&format!(
        "state: {}{}\n",
        status["state"].as_str().unwrap_or("?"),
        status["error"]
            .as_str()
            .map(|e| format!(" ({e})"))
            .unwrap_or_default()
    ));
    let snapshots = listing["snapshots"].as_array().cloned().unwrap_or_default();
    if snapshots.is_empty() {
        out.push_str("no snapshots yet\n");
    } else {
        out.push_str(&format!(
            "{:<26} {:>14} {:>12}  NAME\n",
            "TAKEN", "FEED_SEQ", "BYTES"
        ));
        for s in &snapshots {
            out.push_str(&format!(
                "{:<26} {:>14} {:>12}  {}\n",
                s["at"].as_str().unwrap_or("?"),
                s["seq"].to_string(),
                s["bytes"].to_string(),
                s["name"].as_str().unwrap_or("?"),
            ));
        }
    }
    let segments = &listing["segments"];
    out.push_str(&format!(
        "segments: {} ({} bytes), last taken {}, up to feed position {}\n",
        segments["count"],
        segments["bytes"],
        segments["last_at"].as_str().unwrap_or("-"),
        segments["last_seq"],
    ));
    out
}

fn format_subscriptions(status: &Value) -> String {
    let subs = status
        .get("subscriptions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    if subs.is_empty() {
        return "no subscriptions ([[subscriptions]] in the config)\n".to_owned();
    }
    let mut out = format!(
        "{:<20} {:>10} {:>8} {:>10} {:>8}  {}\n",
        "NAME", "CURSOR", "LAG", "DELIVERED", "FAILURES", "URL / LAST ERROR"
    );
    for s in subs {
        let n = |k: &str| s.get(k).and_then(Value::as_u64).unwrap_or(0);
        let text = |k: &str| s.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
        out.push_str(&format!(
            "{:<20} {:>10} {:>8} {:>10} {:>8}  {}\n",
            text("name"),
            n("cursor"),
            n("lag"),
            n("delivered"),
            n("failures"),
            text("url")
        ));
        if let Some(e) = s.get("last_error").and_then(Value::as_str) {
            out.push_str(&format!(
                "{:<20} failing for {} tries: {e}\n",
                "",
                n("failing_for")
            ));
        }
    }
    out
}

/// Formats milliseconds of uptime as `3d 4h 5m 6s` (largest unit first, zero units dropped).
fn format_uptime(ms: u64) -> String {
    let secs = ms / 1000;
    if secs < 60 {
        return format!("{}.{}s", secs, (ms % 1000) / 100);
    }
    let (d, h, m, s) = (
        secs / 86_400,
        (secs / 3600) % 24,
        (secs / 60) % 60,
        secs % 60,
    );
    let mut parts = Vec::new();
    for (n, unit) in [(d, "d"), (h, "h"), (m, "m"), (s, "s")] {
        if n > 0 || (unit == "s" && parts.is_empty()) {
            parts.push(format!("{n}{unit}"));
        }
    }
    parts.join(" ")
}

/// A JSON value as a table cell: strings bare, null and missing as `-`.
fn cell(value: Option<&Value>) -> String {
    match value {
        None | Some(Value::Null) => "-".to_owned(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// Renders `GET /v1/status` as a key/value block and a table of members. Missing or oddly
/// typed fields show as `-` rather than failing, so a newer node still prints.
fn format_status(status: &Value) -> String {
    let uptime = status
        .get("uptime_ms")
        .and_then(Value::as_u64)
        .map_or_else(|| "-".to_owned(), format_uptime);
    let rows = [
        ("node", cell(status.get("node_id"))),
        ("version", cell(status.get("version"))),
        ("uptime", uptime),
        ("actor", cell(status.get("actor"))),
        ("docs", cell(status.get("docs"))),
        ("write queue", cell(status.get("write_queue_depth"))),
    ];
    let mut out = String::new();
    for (key, value) in rows {
        out.push_str(&format!("{key:<12} {value}\n"));
    }
    let members = status
        .get("members")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let departed: Vec<&str> = status
        .get("departed")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    if !departed.is_empty() {
        out.push_str(&format!("{:<12} {}\n", "departed", departed.join(", ")));
    }
    out.push_str(&format!("\nmembers ({})\n", members.len()));
    let mut table = vec![[
        "NODE".to_owned(),
        "ADDR".to_owned(),
        "STATE".to_owned(),
        "RTT".to_owned(),
        "LAG".to_owned(),
    ]];
    for m in members {
        let rtt = match m.get("rtt_ms") {
            Some(Value::Number(n)) => match n.as_f64() {
                Some(f) if n.is_f64() => format!("{f:.1} ms"),
                _ => format!("{n} ms"),
            },
            other => cell(other),
        };
        table.push([
            cell(m.get("node_id")),
            cell(m.get("addr")),
            cell(m.get("state")),
            rtt,
            cell(m.get("lag_changes")),
        ]);
    }
    let mut widths = [0usize; 5];
    for row in &table {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    for row in &table {
        let mut line = String::new();
        for (i, (c, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(c);
            } else {
                line.push_str(&format!("{c:<w$}  "));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dotted_paths_are_map_keys() {
        assert_eq!(
            parse_path("items.sku-1.qty").expect("valid"),
            json!(["items", "sku-1", "qty"])
        );
        assert_eq!(parse_path("n").expect("valid"), json!(["n"]));
        // Digits in the dotted form are still map keys.
        assert_eq!(parse_path("a.0").expect("valid"), json!(["a", "0"]));
    }

    #[test]
    fn json_paths_allow_keys_and_indexes() {
        assert_eq!(
            parse_path(r#"["items", "a.b", 3]"#).expect("valid"),
            json!(["items", "a.b", 3])
        );
    }

    #[test]
    fn bad_paths_are_rejected() {
        for bad in [
            "", "a..b", ".a", "a.", "[]", "[1.5]", "[-1]", "[null]", "[\"a\"", "[{}]",
        ] {
            assert!(parse_path(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn ops_are_normalised() {
        let arr = r#"[{"op":"inc","path":["n"]}]"#;
        assert_eq!(
            normalize_ops(arr).expect("valid"),
            r#"{"ops":[{"op":"inc","path":["n"]}]}"#
        );
        let body = r#" {"ops":[]} "#;
        assert_eq!(normalize_ops(body).expect("valid"), r#"{"ops":[]}"#);
        let single = r#"{"op":"set","path":["a"],"value":1}"#;
        assert_eq!(
            normalize_ops(single).expect("valid"),
            r#"{"ops":[{"op":"set","path":["a"],"value":1}]}"#
        );
        // The original text is kept: big numbers are not rounded through f64.
        let big = r#"[{"op":"set","path":["a"],"value":123456789012345678901234567890}]"#;
        assert!(
            normalize_ops(big)
                .expect("valid")
                .contains("123456789012345678901234567890")
        );
    }

    #[test]
    fn bad_ops_are_rejected() {
        for bad in [
            "",
            "nope",
            "42",
            r#""x""#,
            r#"{"ops":{}}"#,
            r#"{"x":1}"#,
            "[1,",
        ] {
            assert!(normalize_ops(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn put_needs_an_object() {
        assert_eq!(put_body(" {\"a\":1}\n").expect("valid"), "{\"a\":1}");
        assert!(put_body("[1]").is_err());
        assert!(put_body("{").is_err());
    }

    #[test]
    fn list_paths_encode_prefix_and_cursor() {
        assert_eq!(list_path(None, 100, None), "/v1/docs?limit=100");
        assert_eq!(
            list_path(Some("cart/u+1"), 5, Some("cart/u+1/x")),
            "/v1/docs?limit=5&prefix=cart/u%2B1&cursor=cart/u%2B1/x"
        );
    }

    #[test]
    fn api_errors_use_the_json_body() {
        let resp = ApiResponse {
            status: StatusCode::BAD_REQUEST,
            body: Bytes::from_static(
                br#"{"error":{"code":"invalid_op","message":"ops[0]: unknown op \"bump\""}}"#,
            ),
        };
        match api_error(&resp) {
            CliError::Api { code, message } => {
                assert_eq!(code, "invalid_op");
                assert_eq!(message, "ops[0]: unknown op \"bump\"");
            }
            other => panic!("unexpected {other:?}"),
        }
        let resp = ApiResponse {
            status: StatusCode::BAD_GATEWAY,
            body: Bytes::from_static(b"<html>\nproxy down</html>"),
        };
        match api_error(&resp) {
            CliError::Api { code, message } => {
                assert_eq!(code, "http_502");
                assert_eq!(message, "Bad Gateway: <html> proxy down</html>");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn watch_events_render() {
        assert_eq!(
            event_line("change", r#"{"id":"a","heads":["01"],"deleted":false}"#),
            WatchLine::Out(r#"{"id":"a","heads":["01"],"deleted":false}"#.to_owned())
        );
        assert!(matches!(
            event_line("reset", r#"{"oldest":12,"last":40}"#),
            WatchLine::Warn(m) if m.contains("oldest kept: 12") && m.contains("following from 40")
        ));
        assert_eq!(
            event_line("change", "{\"id\":\"a\",\n\"heads\":[]}"),
            WatchLine::Out("{\"id\":\"a\", \"heads\":[]}".to_owned())
        );
        assert!(matches!(
            event_line("change", "garbage"),
            WatchLine::Warn(_)
        ));
        assert!(matches!(event_line("change", "[1]"), WatchLine::Warn(_)));
        assert_eq!(event_line("future", "{}"), WatchLine::Skip);
    }

    #[test]
    fn uptime_formatting() {
        assert_eq!(format_uptime(5230), "5.2s");
        assert_eq!(format_uptime(61_000), "1m 1s");
        assert_eq!(format_uptime(3_600_000), "1h");
        assert_eq!(format_uptime(90_061_000), "1d 1h 1m 1s");
    }

    #[test]
    fn status_table() {
        let status = json!({
            "node_id": "edge-1", "version": "0.1.0", "uptime_ms": 5230, "actor": "6c1f",
            "docs": 3, "write_queue_depth": 0,
            "members": [
                { "node_id": "edge-1", "addr": "127.0.0.1:7070", "state": "self",
                  "rtt_ms": null, "lag_changes": 0 },
                { "node_id": "edge-22", "addr": "10.0.0.2:7946", "state": "alive",
                  "rtt_ms": 1.25, "lag_changes": 12 }
            ]
        });
        let text = format_status(&status);
        let expected = "\
node         edge-1
version      0.1.0
uptime       5.2s
actor        6c1f
docs         3
write queue  0

members (2)
NODE     ADDR            STATE  RTT     LAG
edge-1   127.0.0.1:7070  self   -       0
edge-22  10.0.0.2:7946   alive  1.2 ms  12
";
        assert_eq!(text, expected);
    }

    #[test]
    fn status_tolerates_missing_fields() {
        let text = format_status(&json!({ "members": [ {} ] }));
        assert!(text.contains("node         -"));
        assert!(text.contains("members (1)"));
        let text = format_status(&json!("nonsense"));
        assert!(text.contains("members (0)"));
    }
}
