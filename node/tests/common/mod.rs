//! Test harness shared by the integration tests: starts the real `verge` binary as a child
//! process on its own temporary data directory and ephemeral port, and talks HTTP/1.1 to it
//! over plain `std::net::TcpStream` (no client crate: the tests need to send malformed
//! requests, oversized bodies and raw bytes, and to read a server-sent-event stream).
#![allow(dead_code, clippy::unwrap_used)]

pub mod cluster;

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;

/// How long a node may take from spawn to `/readyz` answering 200.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Default timeout of one HTTP request (connect, write and read each).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Bodies larger than this are written from a second thread while the response is read, so
/// an early `413` is seen even when the server stops reading the body.
const CONCURRENT_WRITE_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Node process
// ---------------------------------------------------------------------------------------------

/// A running (or stopped) `verge node` child process. Killed on drop.
pub struct Node {
    /// The bound API address, read from `<data-dir>/api.addr`.
    pub addr: SocketAddr,
    /// `--data-dir` of the node.
    pub data_dir: PathBuf,
    /// `--node-id` of the node.
    pub node_id: String,
    /// Where the child's stdout and stderr go (appended across restarts).
    pub log_path: PathBuf,
    /// Extra `verge node` arguments given on every (re)start, e.g. a fixed `--gossip-addr`,
    /// `--peer` and TLS files for a cluster.
    pub extra_args: Vec<String>,
    /// Environment variables set on every (re)start (for example a faked clock).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
    tmp: Option<TempDir>,
}

impl Node {
    /// Starts a node with a fresh temporary data directory and waits until it is ready.
    pub fn start(node_id: &str) -> Node {
        Node::start_with(node_id, Vec::new())
    }

    /// Starts a node like [`Node::start`] with extra arguments, kept for restarts. When they
    /// hold `--gossip-addr`, the harness does not add its own.
    pub fn start_with(node_id: &str, extra_args: Vec<String>) -> Node {
        Node::start_env(node_id, extra_args, Vec::new())
    }

    /// [`Node::start_with`] with environment variables set on every (re)start.
    pub fn start_env(node_id: &str, extra_args: Vec<String>, env: Vec<(String, String)>) -> Node {
        let tmp = tempfile::Builder::new()
            .prefix("verge-test-")
            .tempdir()
            .expect("create temp dir");
        let data_dir = tmp.path().join("data");
        let log_path = tmp.path().join("node.log");
        let mut node = Node {
            addr: "127.0.0.1:0".parse().unwrap(),
            data_dir,
            node_id: node_id.to_string(),
            log_path,
            extra_args,
            env,
            child: None,
            tmp: Some(tmp),
        };
        node.spawn();
        node
    }

    /// The base directory of the test (parent of the data dir and the log).
    pub fn base_dir(&self) -> &Path {
        self.tmp.as_ref().map(|t| t.path()).unwrap()
    }

    /// Spawns `verge node` on `data_dir` and waits for readiness. Panics with the child's
    /// output if it does not come up in time.
    pub fn spawn(&mut self) {
        assert!(self.child.is_none(), "node already running");
        // The node removes a stale address file itself; removing it here too means we can
        // never read the previous process's address before the new one removed it.
        let addr_file = self.data_dir.join("api.addr");
        let _ = fs::remove_file(&addr_file);
        let mut args: Vec<String> = vec![
            "node".into(),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
            "--api-addr".into(),
            "127.0.0.1:0".into(),
            "--node-id".into(),
            self.node_id.clone(),
        ];
        // Parallel nodes must not all take the default gossip port.
        let own_gossip = self.extra_args.iter().any(|a| a == "--gossip-addr");
        if !own_gossip && supports_flag("--gossip-addr") {
            args.extend(["--gossip-addr".into(), "127.0.0.1:0".into()]);
        }
        args.extend(self.extra_args.iter().cloned());
        let cwd = self.base_dir().to_path_buf();
        let mut child = spawn_verge_env(&args, &cwd, &self.log_path, &self.env);
        match wait_ready(&mut child, &addr_file, &self.log_path, START_TIMEOUT) {
            Ok(addr) => {
                self.addr = addr;
                self.child = Some(child);
            }
            Err(why) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "verge node {} did not come up: {why}\n--- node output ---\n{}",
                    self.node_id,
                    read_log(&self.log_path)
                );
            }
        }
    }

    /// The child's process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("node not running").id()
    }

    /// Kills the node with SIGKILL (no shutdown code runs) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends SIGTERM and waits for the process to exit, at most `timeout`.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("node not running");
        let pid = child.id() as libc::pid_t;
        // SAFETY: kill(2) has no memory-safety preconditions; the pid is our own child, not
        // yet reaped, so it cannot have been reused by another process.
        #[allow(unsafe_code)]
        let rc = unsafe { libc::kill(pid, libc::SIGTERM) };
        assert_eq!(rc, 0, "kill(SIGTERM) failed");
        match wait_timeout(&mut child, timeout) {
            Some(status) => status,
            None => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "node {} did not exit within {timeout:?} after SIGTERM\n--- node output ---\n{}",
                    self.node_id,
                    read_log(&self.log_path)
                );
            }
        }
    }

    /// Kills (SIGKILL) and starts the node again on the same data directory.
    pub fn restart_after_kill(&mut self) {
        self.kill();
        self.append_log_marker("restart after SIGKILL");
        self.spawn();
    }

    /// Writes a marker line into the log, to tell restarts apart.
    pub fn append_log_marker(&self, what: &str) {
        if let Ok(mut f) = OpenOptions::new().append(true).open(&self.log_path) {
            let _ = writeln!(f, "===== test harness: {what} =====");
        }
    }

    /// Whether the child is still running.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The child's output so far.
    pub fn output(&self) -> String {
        read_log(&self.log_path)
    }

    // --- HTTP helpers --------------------------------------------------------------------

    /// Sends a request; panics (with the node's output) on an I/O error.
    pub fn req(&self, method: &str, target: &str, body: &[u8]) -> Resp {
        match http(self.addr, method, target, body, &[], REQUEST_TIMEOUT) {
            Ok(r) => r,
            Err(e) => panic!(
                "{method} {target} failed: {e}\n--- node output (tail) ---\n{}",
                tail(&self.output(), 4000)
            ),
        }
    }

    /// Sends a request with extra headers.
    pub fn req_with(
        &self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> Resp {
        http(self.addr, method, target, body, headers, REQUEST_TIMEOUT).unwrap_or_else(|e| {
            panic!(
                "{method} {target} failed: {e}\n--- node output (tail) ---\n{}",
                tail(&self.output(), 4000)
            )
        })
    }

    /// Sends a request and returns the I/O error instead of panicking.
    pub fn try_req(&self, method: &str, target: &str, body: &[u8]) -> io::Result<Resp> {
        http(self.addr, method, target, body, &[], REQUEST_TIMEOUT)
    }

    /// `GET target`.
    pub fn get(&self, target: &str) -> Resp {
        self.req("GET", target, b"")
    }

    /// `GET /v1/docs/{id}`.
    pub fn get_doc(&self, id: &str) -> Resp {
        self.get(&format!("/v1/docs/{id}"))
    }

    /// `PUT /v1/docs/{id}` with a JSON body.
    pub fn put_doc(&self, id: &str, doc: &Value) -> Resp {
        self.req("PUT", &format!("/v1/docs/{id}"), doc.to_string().as_bytes())
    }

    /// `PATCH /v1/docs/{id}` with `{"ops": ops}`.
    pub fn patch_doc(&self, id: &str, ops: Value) -> Resp {
        let body = serde_json::json!({ "ops": ops });
        self.req(
            "PATCH",
            &format!("/v1/docs/{id}"),
            body.to_string().as_bytes(),
        )
    }

    /// `DELETE /v1/docs/{id}`.
    pub fn delete_doc(&self, id: &str) -> Resp {
        self.req("DELETE", &format!("/v1/docs/{id}"), b"")
    }

    /// Asserts the node still serves: `/healthz` is 200 and a normal write succeeds.
    pub fn assert_serving(&self, context: &str) {
        let h = self.get("/healthz");
        assert_eq!(h.status, 200, "after {context}: /healthz: {}", h.describe());
        let w = self.patch_doc(
            "health/probe",
            serde_json::json!([{ "op": "inc", "path": ["n"], "by": 1 }]),
        );
        assert_eq!(
            w.status,
            200,
            "after {context}: a normal write: {}",
            w.describe()
        );
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Whether `verge node --help` lists `flag` (asked once per test binary).
pub fn supports_flag(flag: &str) -> bool {
    static HELP: OnceLock<String> = OnceLock::new();
    let help = HELP.get_or_init(|| {
        Command::new(env!("CARGO_BIN_EXE_verge"))
            .args(["node", "--help"])
            .stdin(Stdio::null())
            .output()
            .map(|o| {
                format!(
                    "{}{}",
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                )
            })
            .unwrap_or_default()
    });
    help.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '<')
        .any(|w| w == flag)
}

/// Spawns the `verge` binary with `args`, in `cwd`, appending stdout and stderr to `log`.
pub fn spawn_verge(args: &[String], cwd: &Path, log: &Path) -> Child {
    spawn_verge_env(args, cwd, log, &[])
}

/// [`spawn_verge`] with environment variables set.
pub fn spawn_verge_env(args: &[String], cwd: &Path, log: &Path, env: &[(String, String)]) -> Child {
    fs::create_dir_all(cwd).expect("create cwd");
    let out = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .expect("open node log");
    let err = out.try_clone().expect("clone log handle");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_verge"));
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // Configuration from the environment of whoever runs the tests must not leak in.
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("VERGE_") {
            cmd.env_remove(k);
        }
    }
    cmd.envs(env.iter().map(|(k, v)| (k, v)));
    cmd.spawn().expect("spawn verge binary")
}

/// Polls `addr_file` for the bound address, then `/readyz` until 200. Fails early when the
/// child exits.
pub fn wait_ready(
    child: &mut Child,
    addr_file: &Path,
    log: &Path,
    timeout: Duration,
) -> Result<SocketAddr, String> {
    let deadline = Instant::now() + timeout;
    let addr = loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the process exited with {status} before writing {}",
                addr_file.display()
            ));
        }
        if let Ok(text) = fs::read_to_string(addr_file) {
            // The file is one line; until its newline is there it may be partly written (a
            // cut-off port would still parse), so the next poll reads it again.
            if let Some(Ok(addr)) = text
                .strip_suffix('\n')
                .map(|l| l.trim().parse::<SocketAddr>())
            {
                break addr;
            }
        }
        if Instant::now() > deadline {
            return Err(format!(
                "{} did not appear within {timeout:?}",
                addr_file.display()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    };
    let mut last;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Err(format!(
                "the process exited with {status} before /readyz answered 200 (api.addr said {addr})"
            ));
        }
        match http(addr, "GET", "/readyz", b"", &[], Duration::from_secs(2)) {
            Ok(r) if r.status == 200 => return Ok(addr),
            Ok(r) => last = r.describe(),
            Err(e) => last = e.to_string(),
        }
        if Instant::now() > deadline {
            return Err(format!(
                "GET /readyz on {addr} did not answer 200 within {timeout:?}; last: {last}; log: {}",
                log.display()
            ));
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a child to exit, at most `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        match child.try_wait() {
            Ok(Some(s)) => return Some(s),
            Ok(None) => {}
            Err(_) => return None,
        }
        if Instant::now() > deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Reads a log file (lossy), or a note that it is missing.
pub fn read_log(path: &Path) -> String {
    match fs::read(path) {
        Ok(b) => String::from_utf8_lossy(&b).into_owned(),
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

/// The last `n` bytes of `s` (on a char boundary).
pub fn tail(s: &str, n: usize) -> String {
    if s.len() <= n {
        return s.to_string();
    }
    let mut start = s.len() - n;
    while !s.is_char_boundary(start) {
        start += 1;
    }
    format!("…{}", &s[start..])
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client
// ---------------------------------------------------------------------------------------------

/// A complete HTTP response.
#[derive(Debug, Clone)]
pub struct Resp {
    /// Status code.
    pub status: u16,
    /// Headers, names lowercased.
    pub headers: Vec<(String, String)>,
    /// The body, de-chunked.
    pub body: Vec<u8>,
}

impl Resp {
    /// The body as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the body when it is not JSON.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("response body is not JSON ({e}): {}", self.describe()))
    }

    /// The body as JSON, if it is JSON.
    pub fn try_json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// A header's value (name case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// `status body` with the body shortened, for assertion messages.
    pub fn describe(&self) -> String {
        let text = self.text();
        let shown = if text.len() > 600 {
            let mut end = 600;
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}… ({} bytes)", &text[..end], text.len())
        } else {
            text
        };
        format!("{} {}", self.status, shown)
    }

    /// The `error.code` of a JSON error body, if any.
    pub fn error_code(&self) -> Option<String> {
        self.try_json()?
            .get("error")?
            .get("code")?
            .as_str()
            .map(str::to_string)
    }

    /// `None` when this is the error `status`/`code` of docs/api.md with a string message;
    /// otherwise a description of what differs.
    pub fn error_mismatch(&self, status: u16, code: &str) -> Option<String> {
        let json = self.try_json();
        let ok_shape = json
            .as_ref()
            .and_then(|j| j.get("error"))
            .map(|e| {
                e.get("code").and_then(Value::as_str) == Some(code)
                    && e.get("message").map(Value::is_string) == Some(true)
            })
            .unwrap_or(false);
        if self.status == status && ok_shape {
            None
        } else {
            Some(format!(
                "expected {status} {{error:{{code:{code:?},message}}}}, got {}",
                self.describe()
            ))
        }
    }

    /// Asserts the error `status`/`code`.
    pub fn assert_error(&self, status: u16, code: &str, context: &str) {
        if let Some(m) = self.error_mismatch(status, code) {
            panic!("{context}: {m}");
        }
    }

    /// Asserts status 200 and returns the JSON body.
    pub fn ok_json(&self, context: &str) -> Value {
        assert_eq!(self.status, 200, "{context}: {}", self.describe());
        self.json()
    }
}

/// Incremental decoder of `Transfer-Encoding: chunked`.
#[derive(Default)]
pub struct Dechunker {
    raw: Vec<u8>,
    remaining: usize,
    need_crlf: bool,
    /// The terminating zero-size chunk was seen.
    pub done: bool,
}

impl Dechunker {
    /// Feeds raw bytes; appends decoded body bytes to `out`.
    pub fn feed(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
        self.raw.extend_from_slice(data);
        loop {
            if self.done {
                return Ok(());
            }
            if self.remaining > 0 {
                let n = self.remaining.min(self.raw.len());
                out.extend(self.raw.drain(..n));
                self.remaining -= n;
                if self.remaining > 0 {
                    return Ok(());
                }
                self.need_crlf = true;
            }
            if self.need_crlf {
                if self.raw.len() < 2 {
                    return Ok(());
                }
                if &self.raw[..2] != b"\r\n" {
                    return Err("chunk not followed by CRLF".into());
                }
                self.raw.drain(..2);
                self.need_crlf = false;
            }
            let Some(pos) = find(&self.raw, b"\r\n") else {
                return Ok(());
            };
            let line = String::from_utf8_lossy(&self.raw[..pos]).into_owned();
            let size_text = line.split(';').next().unwrap_or("").trim().to_string();
            let size = usize::from_str_radix(&size_text, 16)
                .map_err(|_| format!("bad chunk size line {line:?}"))?;
            self.raw.drain(..pos + 2);
            if size == 0 {
                self.done = true;
                return Ok(());
            }
            self.remaining = size;
        }
    }
}

/// Position of `needle` in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A response head: status, headers, offset of the body.
type Head = (u16, Vec<(String, String)>, usize);

/// Parses a response head once it is complete (`None` until then).
fn parse_head(buf: &[u8]) -> Option<Result<Head, String>> {
    let end = find(buf, b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or("");
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Some(Err(format!("bad status line {status_line:?}")));
    }
    let Some(status) = parts.next().and_then(|s| s.parse::<u16>().ok()) else {
        return Some(Err(format!("bad status line {status_line:?}")));
    };
    let mut headers = Vec::new();
    for line in lines {
        if let Some((k, v)) = line.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Some(Ok((status, headers, end + 4)))
}

/// Builds the request head. `Connection: close` on every request.
fn request_head(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body_len: usize,
    extra: &[(&str, &str)],
) -> Vec<u8> {
    let mut head = format!("{method} {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    let bodyless = body_len == 0 && matches!(method, "GET" | "HEAD" | "DELETE" | "OPTIONS");
    if !bodyless {
        head.push_str(&format!("Content-Length: {body_len}\r\n"));
    }
    for (k, v) in extra {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    head.into_bytes()
}

/// One HTTP/1.1 request on a new connection, with `timeout` for connect and for each read
/// and write.
pub fn http(
    addr: SocketAddr,
    method: &str,
    target: &str,
    body: &[u8],
    extra_headers: &[(&str, &str)],
    timeout: Duration,
) -> io::Result<Resp> {
    let head = request_head(addr, method, target, body.len(), extra_headers);
    http_raw(addr, &head, body, timeout)
}

/// Sends `head` then `body` verbatim and reads one response.
pub fn http_raw(addr: SocketAddr, head: &[u8], body: &[u8], timeout: Duration) -> io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    if body.len() <= CONCURRENT_WRITE_BYTES {
        let mut all = Vec::with_capacity(head.len() + body.len());
        all.extend_from_slice(head);
        all.extend_from_slice(body);
        // A server may answer and close before reading everything; still read its answer.
        let write_result = stream.write_all(&all);
        match read_response(&mut stream) {
            Ok(r) => Ok(r),
            Err(e) => Err(match write_result {
                Err(we) => io::Error::new(we.kind(), format!("write: {we}; read: {e}")),
                Ok(()) => e,
            }),
        }
    } else {
        let mut writer = stream.try_clone()?;
        thread::scope(|s| {
            let w = s.spawn(move || -> io::Result<()> {
                writer.write_all(head)?;
                for chunk in body.chunks(64 * 1024) {
                    writer.write_all(chunk)?;
                }
                Ok(())
            });
            let r = read_response(&mut stream);
            // Unblocks the writer if the server stopped reading.
            let _ = stream.shutdown(Shutdown::Both);
            let _ = w.join();
            r
        })
    }
}

/// Reads one response: until its declared length, the end of its chunks, or EOF.
fn read_response(stream: &mut TcpStream) -> io::Result<Resp> {
    let mut buf = Vec::new();
    let mut tmp = [0u8; 16 * 1024];
    let mut parsed: Option<(u16, Vec<(String, String)>)> = None;
    let mut body = Vec::new();
    let mut dechunker: Option<Dechunker> = None;
    let mut content_length: Option<usize> = None;
    loop {
        // Is the response complete?
        if let Some((status, headers)) = &parsed {
            let complete = if let Some(d) = &dechunker {
                d.done
            } else if let Some(cl) = content_length {
                body.len() >= cl
            } else {
                false
            };
            if complete {
                if let Some(cl) = content_length {
                    body.truncate(cl);
                }
                return Ok(Resp {
                    status: *status,
                    headers: headers.clone(),
                    body,
                });
            }
        }
        let n = match stream.read(&mut tmp) {
            Ok(n) => n,
            Err(e) => {
                let what = if parsed.is_some() {
                    "reading the body"
                } else {
                    "reading the response head"
                };
                return Err(io::Error::new(e.kind(), format!("{what}: {e}")));
            }
        };
        if n == 0 {
            return match parsed {
                Some((status, headers)) if dechunker.is_none() && content_length.is_none() => {
                    Ok(Resp {
                        status,
                        headers,
                        body,
                    })
                }
                Some(_) => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed inside the body",
                )),
                None => Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a response ({} bytes read)",
                        buf.len()
                    ),
                )),
            };
        }
        if parsed.is_none() {
            buf.extend_from_slice(&tmp[..n]);
            match parse_head(&buf) {
                None => continue,
                Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                Some(Ok((status, headers, body_start))) => {
                    let chunked = headers.iter().any(|(k, v)| {
                        k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
                    });
                    content_length = headers
                        .iter()
                        .find(|(k, _)| k == "content-length")
                        .and_then(|(_, v)| v.parse().ok());
                    let rest = buf[body_start..].to_vec();
                    if chunked {
                        content_length = None;
                        let mut d = Dechunker::default();
                        d.feed(&rest, &mut body)
                            .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                        dechunker = Some(d);
                    } else {
                        body.extend_from_slice(&rest);
                    }
                    parsed = Some((status, headers));
                }
            }
        } else if let Some(d) = dechunker.as_mut() {
            d.feed(&tmp[..n], &mut body)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        } else {
            body.extend_from_slice(&tmp[..n]);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Server-sent events
// ---------------------------------------------------------------------------------------------

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    /// The `event:` field (`message` when absent).
    pub event: String,
    /// The `data:` lines joined with `\n`.
    pub data: String,
    /// The `id:` field, when set.
    pub id: Option<String>,
}

/// An open `text/event-stream` response.
pub struct SseStream {
    stream: TcpStream,
    /// The response head.
    pub status: u16,
    /// Response headers, names lowercased.
    pub headers: Vec<(String, String)>,
    dechunker: Option<Dechunker>,
    text: Vec<u8>,
    closed: bool,
}

impl SseStream {
    /// Opens `GET target` and reads the response head.
    pub fn open(addr: SocketAddr, target: &str, timeout: Duration) -> io::Result<SseStream> {
        Self::open_with(addr, target, &[], timeout)
    }

    /// Opens `GET target` with extra request headers and reads the response head.
    pub fn open_with(
        addr: SocketAddr,
        target: &str,
        headers: &[(&str, &str)],
        timeout: Duration,
    ) -> io::Result<SseStream> {
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        let extra: String = headers
            .iter()
            .map(|(k, v)| format!("{k}: {v}\r\n"))
            .collect();
        let head = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n{extra}Connection: close\r\n\r\n"
        );
        stream.write_all(head.as_bytes())?;
        let mut buf = Vec::new();
        let mut tmp = [0u8; 8192];
        let (status, headers, start) = loop {
            let n = stream.read(&mut tmp)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "closed before the response head",
                ));
            }
            buf.extend_from_slice(&tmp[..n]);
            match parse_head(&buf) {
                None => continue,
                Some(Err(e)) => return Err(io::Error::new(io::ErrorKind::InvalidData, e)),
                Some(Ok(h)) => break h,
            }
        };
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
        let mut sse = SseStream {
            stream,
            status,
            headers,
            dechunker: chunked.then(Dechunker::default),
            text: Vec::new(),
            closed: false,
        };
        let rest = buf[start..].to_vec();
        sse.push(&rest)?;
        Ok(sse)
    }

    fn push(&mut self, data: &[u8]) -> io::Result<()> {
        match self.dechunker.as_mut() {
            Some(d) => d
                .feed(data, &mut self.text)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e)),
            None => {
                self.text.extend_from_slice(data);
                Ok(())
            }
        }
    }

    /// Takes one complete event out of the buffer (comments and empty blocks skipped).
    fn take_event(&mut self) -> Option<SseEvent> {
        loop {
            // Accept both LF and CRLF line ends.
            let lf = find(&self.text, b"\n\n").map(|p| (p, 2));
            let crlf = find(&self.text, b"\r\n\r\n").map(|p| (p, 4));
            let (pos, len) = match (lf, crlf) {
                (Some(a), Some(b)) => {
                    if a.0 <= b.0 {
                        a
                    } else {
                        b
                    }
                }
                (Some(a), None) => a,
                (None, Some(b)) => b,
                (None, None) => return None,
            };
            let block = String::from_utf8_lossy(&self.text[..pos]).into_owned();
            self.text.drain(..pos + len);
            let mut event = None;
            let mut id = None;
            let mut data: Vec<String> = Vec::new();
            for line in block.lines() {
                let line = line.trim_end_matches('\r');
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                let (field, value) = match line.split_once(':') {
                    Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
                    None => (line, ""),
                };
                match field {
                    "event" => event = Some(value.to_string()),
                    "data" => data.push(value.to_string()),
                    "id" => id = Some(value.to_string()),
                    _ => {}
                }
            }
            if event.is_none() && data.is_empty() {
                continue;
            }
            return Some(SseEvent {
                event: event.unwrap_or_else(|| "message".into()),
                data: data.join("\n"),
                id,
            });
        }
    }

    /// The next event, or `None` if none arrives within `timeout` or the stream ended.
    pub fn next_event(&mut self, timeout: Duration) -> Option<SseEvent> {
        let deadline = Instant::now() + timeout;
        let mut tmp = [0u8; 8192];
        loop {
            if let Some(ev) = self.take_event() {
                return Some(ev);
            }
            if self.closed {
                return None;
            }
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            let wait = (deadline - now).max(Duration::from_millis(1));
            self.stream.set_read_timeout(Some(wait)).ok()?;
            match self.stream.read(&mut tmp) {
                Ok(0) => self.closed = true,
                Ok(n) => {
                    if self.push(&tmp[..n]).is_err() {
                        self.closed = true;
                    }
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) => {}
                Err(_) => self.closed = true,
            }
        }
    }

    /// Whether the server closed the stream.
    pub fn is_closed(&self) -> bool {
        self.closed
    }
}

// ---------------------------------------------------------------------------------------------
// Assertions on API values
// ---------------------------------------------------------------------------------------------

/// Asserts `heads` is a non-empty array of 64-char lowercase hex strings; returns them sorted.
pub fn assert_heads(heads: &Value, context: &str) -> Vec<String> {
    let arr = heads
        .as_array()
        .unwrap_or_else(|| panic!("{context}: heads is not an array: {heads}"));
    assert!(!arr.is_empty(), "{context}: heads is empty");
    let mut out = Vec::new();
    for h in arr {
        let s = h
            .as_str()
            .unwrap_or_else(|| panic!("{context}: head is not a string: {h}"));
        assert!(
            s.len() == 64
                && s.bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
            "{context}: head is not 64 lowercase hex chars: {s:?}"
        );
        out.push(s.to_string());
    }
    out.sort();
    out
}

/// Sorted heads of a JSON response that has a `heads` field.
pub fn heads_of(v: &Value, context: &str) -> Vec<String> {
    assert_heads(
        v.get("heads")
            .unwrap_or_else(|| panic!("{context}: no heads field in {v}")),
        context,
    )
}

/// A small deterministic PRNG (xorshift64*), seeded by the caller.
pub struct Rng(u64);

impl Rng {
    /// A generator seeded with `seed` (0 is replaced).
    pub fn new(seed: u64) -> Rng {
        Rng(if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        })
    }

    /// A seed from the clock and the process id, to print and replay.
    pub fn seed_from_time() -> u64 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1);
        nanos ^ (u64::from(std::process::id()) << 32)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A value in `lo..hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo)
    }
}

/// Creates an empty file (used to check a path is writable).
pub fn touch(path: &Path) {
    File::create(path).expect("touch");
}

// ---------------------------------------------------------------------------------------------
// Clusters: ports, certificates, metrics, polling
// ---------------------------------------------------------------------------------------------

/// A UDP port on 127.0.0.1 that was free a moment ago (bound, read, released). For gossip
/// addresses that must stay the same across a restart, where port 0 cannot be used.
pub fn free_udp_port() -> u16 {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind a UDP socket");
    socket.local_addr().expect("UDP local addr").port()
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_tcp_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a TCP socket");
    listener.local_addr().expect("TCP local addr").port()
}

/// Runs `verge ARGS` to completion in `cwd`; panics with its output when it fails.
pub fn run_verge(args: &[&str], cwd: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_verge"))
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .output()
        .expect("run verge");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "verge {args:?} failed: {text}");
    text
}

/// Creates a cluster CA in `dir` (`verge certs ca`) and a certificate for each of `names`
/// (`verge certs node`).
pub fn make_certs(dir: &Path, names: &[&str]) {
    fs::create_dir_all(dir).expect("create cert dir");
    let d = dir.display().to_string();
    run_verge(&["certs", "ca", "--dir", &d], dir);
    for name in names {
        run_verge(&["certs", "node", "--name", name, "--dir", &d], dir);
    }
}

/// The `--tls-*` arguments for node `name` with certificates in `dir`.
pub fn tls_args(dir: &Path, name: &str) -> Vec<String> {
    vec![
        "--tls-ca".into(),
        dir.join("ca.pem").display().to_string(),
        "--tls-cert".into(),
        dir.join(format!("{name}.pem")).display().to_string(),
        "--tls-key".into(),
        dir.join(format!("{name}.key")).display().to_string(),
    ]
}

/// The value of the sample `series` (a metric name with its labels exactly as exposed, e.g.
/// `verge_peer_refused_total{kind="handshake"}`) in a Prometheus text body; `None` when absent.
pub fn metric_value(body: &str, series: &str) -> Option<f64> {
    body.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        let rest = l.strip_prefix(series)?;
        // The series name must end here (not be a prefix of a longer name).
        if !rest.starts_with(' ') {
            return None;
        }
        rest.split_whitespace().next()?.parse().ok()
    })
}

impl Node {
    /// `GET /metrics` and the value of one series (0 when absent).
    pub fn metric(&self, series: &str) -> f64 {
        let r = self.get("/metrics");
        assert_eq!(r.status, 200, "GET /metrics: {}", r.describe());
        metric_value(&r.text(), series).unwrap_or(0.0)
    }
}

/// Calls `check` every 25 ms until it returns `Ok`, at most `timeout`; panics with `what` and
/// the last `Err` otherwise. Returns the value and how long it took.
pub fn wait_for<T>(
    timeout: Duration,
    what: &str,
    mut check: impl FnMut() -> Result<T, String>,
) -> (T, Duration) {
    let start = Instant::now();
    loop {
        match check() {
            Ok(v) => return (v, start.elapsed()),
            Err(last) => {
                if start.elapsed() > timeout {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        thread::sleep(Duration::from_millis(25));
    }
}

/// Stops `node`'s process (SIGSTOP) and waits until it is stopped: until [`resume`] it neither
/// serves, purges nor replicates, like a node cut off.
pub fn pause(node: &Node) {
    signal(node, libc::SIGSTOP);
    wait_stopped(node, true);
}

/// Continues a [`pause`]d node (SIGCONT).
pub fn resume(node: &Node) {
    signal(node, libc::SIGCONT);
    wait_stopped(node, false);
}

pub fn signal(node: &Node, signal: libc::c_int) {
    let pid = node.pid() as libc::pid_t;
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is the harness's own child,
    // not yet reaped, so it cannot have been reused by another process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, signal) };
    assert_eq!(rc, 0, "kill({pid}, {signal}) failed");
}

/// Waits until the kernel reports `node` stopped (`T` in `/proc/PID/stat`), or running again.
pub fn wait_stopped(node: &Node, stopped: bool) {
    let path = format!("/proc/{}/stat", node.pid());
    wait_for(
        Duration::from_secs(5),
        &format!(
            "{} to be {}",
            node.node_id,
            if stopped { "stopped" } else { "running" }
        ),
        || {
            let stat = std::fs::read_to_string(&path).map_err(|e| e.to_string())?;
            // "PID (COMM) STATE …": the state follows the last ')'.
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next());
            if (state == Some('T')) == stopped {
                Ok(())
            } else {
                Err(format!("state {state:?}"))
            }
        },
    );
}
