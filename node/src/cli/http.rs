//! A small HTTP/1.1 client for the node's API, shared by the client commands.
//!
//! It wraps hyper-util's legacy client (connection handling, `Host` header, origin-form request
//! targets) and adds what every command needs: the base URL, the bearer token, an overall
//! timeout per request, a bound on the size of a response body, and errors that tell "the node
//! could not be reached" apart from "the node answered".

use std::fmt;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, IF_MATCH};
use hyper::http::uri::{Authority, Scheme};
use hyper::{Method, Request, Response, StatusCode, Uri};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use verge_core::doc_id::is_id_byte;

/// The most bytes of a response body the client reads before giving up.
pub(crate) const MAX_RESPONSE_BYTES: usize = 64 * 1024 * 1024;

/// How long one request may take, from connecting to reading the last byte of the body.
pub(crate) const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long establishing a TCP connection may take.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where the node's API lives: scheme, authority and an optional path prefix.
#[derive(Debug, Clone)]
pub(crate) struct Endpoint {
    authority: Authority,
    /// The path of the base URL without a trailing `/` (usually empty).
    base_path: String,
    /// The base URL as the user gave it, for messages.
    display: String,
}

impl Endpoint {
    /// Parses a base URL such as `http://127.0.0.1:7070`.
    pub(crate) fn parse(url: &str) -> Result<Self, String> {
        let uri: Uri = url
            .parse()
            .map_err(|e| format!("invalid --url (or VERGE_URL) {url:?}: {e}"))?;
        match uri.scheme() {
            Some(s) if *s == Scheme::HTTP => {}
            Some(s) if *s == Scheme::HTTPS => {
                return Err(format!(
                    "invalid --url (or VERGE_URL) {url:?}: https is not supported by this client; \
                     use http:// (or a TLS-terminating proxy)"
                ));
            }
            Some(s) => {
                return Err(format!(
                    "invalid --url (or VERGE_URL) {url:?}: unsupported scheme {s}"
                ));
            }
            None => {
                return Err(format!(
                    "invalid --url (or VERGE_URL) {url:?}: expected an absolute URL such as http://127.0.0.1:7070"
                ));
            }
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or_else(|| format!("invalid --url (or VERGE_URL) {url:?}: missing host"))?;
        if authority.as_str().contains('@') {
            return Err(format!(
                "invalid --url (or VERGE_URL) {url:?}: credentials in the URL are not supported; use --token"
            ));
        }
        if uri.query().is_some() {
            return Err(format!(
                "invalid --url (or VERGE_URL) {url:?}: a query string is not allowed"
            ));
        }
        let base_path = uri.path().trim_end_matches('/').to_owned();
        Ok(Self {
            authority,
            base_path,
            display: url.trim_end_matches('/').to_owned(),
        })
    }

    /// The full URI of `path_and_query`, which starts with `/` and is already percent-encoded.
    pub(crate) fn uri(&self, path_and_query: &str) -> Result<Uri, String> {
        let text = format!(
            "http://{}{}{}",
            self.authority, self.base_path, path_and_query
        );
        text.parse()
            .map_err(|e| format!("cannot build a request URL from {text:?}: {e}"))
    }

    /// The origin-form request target (`/base/path?query`) for a raw HTTP/1.1 connection.
    pub(crate) fn target(&self, path_and_query: &str) -> String {
        format!("{}{}", self.base_path, path_and_query)
    }

    /// The `Host` header value and the `host:port` to connect to.
    pub(crate) fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The host and port to open a TCP connection to (port 80 when the URL names none).
    pub(crate) fn host_port(&self) -> (String, u16) {
        let host = self.authority.host();
        // `Authority::host` keeps the brackets of an IPv6 literal; the resolver wants them off.
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        (host.to_owned(), self.authority.port_u16().unwrap_or(80))
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.display)
    }
}

/// Builds the `Authorization` header value for a bearer token.
pub(crate) fn bearer(token: &str) -> Result<HeaderValue, String> {
    HeaderValue::try_from(format!("Bearer {token}"))
        .map(|mut v| {
            v.set_sensitive(true);
            v
        })
        .map_err(|_| {
            "invalid --token (or VERGE_TOKEN): it must be visible ASCII without control characters"
                .into()
        })
}

/// Why a request produced no HTTP response.
#[derive(Debug)]
pub(crate) enum TransportError {
    /// Connecting or talking to the node failed.
    Unreachable {
        /// The base URL.
        url: String,
        /// What went wrong, with its causes.
        detail: String,
    },
    /// The connection broke or went silent after the node had answered (the watch stream).
    Lost {
        /// The base URL.
        url: String,
        /// What happened.
        detail: String,
    },
    /// The node did not answer within the timeout.
    Timeout {
        /// The base URL.
        url: String,
        /// The timeout that passed.
        after: Duration,
    },
    /// The node answered, but with a body larger than [`MAX_RESPONSE_BYTES`] or one that broke
    /// off half-way.
    BadBody(String),
    /// The request could not even be built (a bad URL or header).
    Invalid(String),
}

impl fmt::Display for TransportError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unreachable { url, detail } => {
                write!(f, "could not reach the node at {url}: {detail}")
            }
            Self::Lost { url, detail } => {
                write!(f, "lost the connection to the node at {url}: {detail}")
            }
            Self::Timeout { url, after } => write!(
                f,
                "the node at {url} did not answer within {} s",
                after.as_secs()
            ),
            Self::BadBody(detail) => write!(f, "bad response from the node: {detail}"),
            Self::Invalid(detail) => f.write_str(detail),
        }
    }
}

/// Renders an error and its chain of causes as one line, skipping repeated messages.
pub(crate) fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        next = e.source();
    }
    parts.join(": ")
}

/// A complete response: status and the (bounded) body.
#[derive(Debug)]
pub(crate) struct ApiResponse {
    /// The HTTP status.
    pub(crate) status: StatusCode,
    /// The whole body.
    pub(crate) body: Bytes,
}

/// The client the commands use: one base URL, an optional token.
pub(crate) struct ApiClient {
    endpoint: Endpoint,
    token: Option<HeaderValue>,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl ApiClient {
    /// A client for `endpoint`, sending `token` as a bearer token when given.
    pub(crate) fn new(endpoint: Endpoint, token: Option<HeaderValue>) -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(CONNECT_TIMEOUT));
        connector.set_nodelay(true);
        let client = Client::builder(TokioExecutor::new()).build(connector);
        Self {
            endpoint,
            token,
            client,
        }
    }

    /// The base URL, for messages.
    pub(crate) fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    fn unreachable(&self, err: &(dyn std::error::Error + 'static)) -> TransportError {
        TransportError::Unreachable {
            url: self.endpoint.to_string(),
            detail: error_chain(err),
        }
    }

    /// Sends the request and returns the response head with its body still streaming.
    async fn start(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        if_match: Option<&str>,
    ) -> Result<Response<Incoming>, TransportError> {
        let uri = self
            .endpoint
            .uri(path_and_query)
            .map_err(TransportError::Invalid)?;
        let mut builder = Request::builder().method(method).uri(uri);
        if let Some(token) = &self.token {
            builder = builder.header(AUTHORIZATION, token.clone());
        }
        if body.is_some() {
            builder = builder.header(CONTENT_TYPE, "application/json");
        }
        if let Some(heads) = if_match {
            builder = builder.header(IF_MATCH, heads);
        }
        let request = builder
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| TransportError::Invalid(format!("cannot build the request: {e}")))?;
        self.client
            .request(request)
            .await
            .map_err(|e| self.unreachable(&e))
    }

    /// Sends one request and reads the whole response, within [`REQUEST_TIMEOUT`].
    pub(crate) async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
    ) -> Result<ApiResponse, TransportError> {
        self.send_if_match(method, path_and_query, body, None).await
    }

    /// [`ApiClient::send`] with an `If-Match` header (heads, comma-separated) when given.
    pub(crate) async fn send_if_match(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        if_match: Option<&str>,
    ) -> Result<ApiResponse, TransportError> {
        self.send_within(method, path_and_query, body, if_match, REQUEST_TIMEOUT)
            .await
    }

    /// [`ApiClient::send_if_match`] waiting at most `timeout` (for requests that do long work,
    /// such as `backup now`).
    pub(crate) async fn send_within(
        &self,
        method: Method,
        path_and_query: &str,
        body: Option<Bytes>,
        if_match: Option<&str>,
        timeout: Duration,
    ) -> Result<ApiResponse, TransportError> {
        let exchange = async {
            let response = self.start(method, path_and_query, body, if_match).await?;
            let status = response.status();
            let body = read_limited(response.into_body(), MAX_RESPONSE_BYTES).await?;
            Ok(ApiResponse { status, body })
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .unwrap_or_else(|_| {
                Err(TransportError::Timeout {
                    url: self.endpoint.to_string(),
                    after: timeout,
                })
            })
    }

    /// Opens a long-lived response (the watch stream). Only the response head is subject to
    /// [`REQUEST_TIMEOUT`]; the caller reads the body frame by frame.
    pub(crate) async fn open_stream(
        &self,
        path_and_query: &str,
    ) -> Result<Response<Incoming>, TransportError> {
        tokio::time::timeout(
            REQUEST_TIMEOUT,
            self.start(Method::GET, path_and_query, None, None),
        )
        .await
        .unwrap_or_else(|_| {
            Err(TransportError::Timeout {
                url: self.endpoint.to_string(),
                after: REQUEST_TIMEOUT,
            })
        })
    }
}

/// Reads a whole body, failing once it grows past `limit` bytes.
pub(crate) async fn read_limited<B>(body: B, limit: usize) -> Result<Bytes, TransportError>
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    match Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(TransportError::BadBody(
            format!("the response body is larger than {limit} bytes"),
        )),
        Err(e) => Err(TransportError::BadBody(format!(
            "reading the response body failed: {}",
            error_chain(&*e)
        ))),
    }
}

/// Whether `b` may appear unescaped in a query parameter value. `+` is escaped because form
/// decoders read it as a space; `&`, `=` and `#` because they delimit.
fn is_query_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"._~:/@-".contains(&b)
}

fn encode_with(input: &str, keep: fn(u8) -> bool) -> String {
    let mut out = String::with_capacity(input.len());
    for &b in input.as_bytes() {
        if keep(b) {
            out.push(char::from(b));
        } else {
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
    }
    out
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// Percent-encodes a document id for the URL path. Valid ids pass through unchanged (slashes
/// included: they are part of the id); any other byte is escaped so that the node, not the URL
/// parser, gets to reject it with `invalid_id`.
pub(crate) fn encode_id(id: &str) -> String {
    encode_with(id, is_id_byte)
}

/// Percent-encodes a query parameter value.
pub(crate) fn encode_query(value: &str) -> String {
    encode_with(value, is_query_byte)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_in_the_alphabet_pass_through() {
        assert_eq!(encode_id("cart/u-42"), "cart/u-42");
        assert_eq!(encode_id("a.b_c~d:e/f@g+h-i"), "a.b_c~d:e/f@g+h-i");
    }

    #[test]
    fn other_id_bytes_are_escaped() {
        assert_eq!(encode_id("a b"), "a%20b");
        assert_eq!(encode_id("a?b#c%d"), "a%3Fb%23c%25d");
        assert_eq!(encode_id("é"), "%C3%A9");
        assert_eq!(encode_id("x\ny"), "x%0Ay");
    }

    #[test]
    fn query_values_escape_plus_and_delimiters() {
        assert_eq!(encode_query("cart/u+1"), "cart/u%2B1");
        assert_eq!(encode_query("a&b=c d"), "a%26b%3Dc%20d");
        assert_eq!(encode_query("cart/"), "cart/");
    }

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("http://127.0.0.1:7070").expect("valid url");
        assert_eq!(
            e.uri("/v1/status").expect("uri").to_string(),
            "http://127.0.0.1:7070/v1/status"
        );
        assert_eq!(e.host_port(), ("127.0.0.1".to_owned(), 7070));

        let e = Endpoint::parse("http://example.test/verge/").expect("valid url");
        assert_eq!(e.target("/v1/status"), "/verge/v1/status");
        assert_eq!(e.host_port(), ("example.test".to_owned(), 80));
        assert_eq!(e.to_string(), "http://example.test/verge");

        let e = Endpoint::parse("http://[::1]:7070").expect("valid url");
        assert_eq!(e.host_port(), ("::1".to_owned(), 7070));

        assert!(Endpoint::parse("https://x").is_err());
        assert!(Endpoint::parse("127.0.0.1:7070").is_err());
        assert!(Endpoint::parse("ftp://x").is_err());
        assert!(Endpoint::parse("not a url").is_err());
        assert!(Endpoint::parse("http://u:p@x").is_err());
    }

    #[test]
    fn bearer_rejects_control_characters() {
        assert!(bearer("abc").is_ok());
        assert!(bearer("a\nb").is_err());
    }
}
