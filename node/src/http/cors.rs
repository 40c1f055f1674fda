//! Cross-origin requests from browsers (`[cors]` in the config).
//!
//! A browser page on another origin (a web app using `@verge/client`'s browser export) may call
//! the API only if the node says so: the client's sync sends `Authorization` and a binary body,
//! so every such call is preceded by a preflight `OPTIONS` that carries no token. The preflight
//! is answered here, before authorization; the real request then goes through authorization
//! like any other, and its answer (an error too, so the page can read the error's code) names
//! the origin. Nothing is sent for origins that are not allowed: a preflight from one is
//! refused with `403 cors_origin_not_allowed`, and the browser blocks the call.

use std::collections::HashSet;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::header::{
    ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_ALLOW_ORIGIN,
    ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, ACCESS_CONTROL_REQUEST_METHOD, ORIGIN,
    VARY,
};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::ApiError;

/// Most entries in `[cors] allowed_origins`.
pub const CORS_ORIGINS_MAX: usize = 256;
/// Longest origin accepted in the configuration.
pub const CORS_ORIGIN_BYTES_MAX: usize = 256;
/// How long a browser may cache a preflight's answer, in seconds.
pub const PREFLIGHT_MAX_AGE_S: u32 = 600;

const ALLOWED_METHODS: &str = "GET, HEAD, PUT, PATCH, POST, DELETE";
const ALLOWED_HEADERS: &str =
    "authorization, content-type, if-match, idempotency-key, last-event-id";
const EXPOSED_HEADERS: &str = "retry-after, www-authenticate, idempotent-replayed";

/// Which origins may call the API from a browser.
#[derive(Debug, Clone, Default)]
pub struct Cors {
    any: bool,
    origins: HashSet<String>,
}

/// Why an entry of `[cors] allowed_origins` was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CorsConfigError {
    /// More entries than [`CORS_ORIGINS_MAX`].
    #[error("{0} origins given, at most {CORS_ORIGINS_MAX}")]
    TooMany(usize),
    /// An entry is not `*` or `scheme://host[:port]`.
    #[error(
        "{0:?} is not an origin: write `*` or scheme://host[:port], as a browser sends it (no path, no trailing slash)"
    )]
    NotAnOrigin(String),
}

impl Cors {
    /// Checks and keeps `origins`: `*` (any origin) or exact origins such as
    /// `https://app.example.com` or `http://localhost:5173`.
    pub fn new(origins: &[String]) -> Result<Self, CorsConfigError> {
        if origins.len() > CORS_ORIGINS_MAX {
            return Err(CorsConfigError::TooMany(origins.len()));
        }
        let mut cors = Cors::default();
        for origin in origins {
            if origin == "*" {
                cors.any = true;
            } else if is_origin(origin) {
                cors.origins.insert(origin.to_ascii_lowercase());
            } else {
                return Err(CorsConfigError::NotAnOrigin(origin.clone()));
            }
        }
        Ok(cors)
    }

    /// No origin is allowed: the layer is left out.
    pub fn is_off(&self) -> bool {
        !self.any && self.origins.is_empty()
    }

    fn allows(&self, origin: &str) -> bool {
        self.any || self.origins.contains(&origin.to_ascii_lowercase())
    }
}

/// `scheme://host[:port]` with nothing after it.
fn is_origin(s: &str) -> bool {
    if s.len() > CORS_ORIGIN_BYTES_MAX || !s.is_ascii() {
        return false;
    }
    let Some((scheme, rest)) = s.split_once("://") else {
        return false;
    };
    let scheme_ok = !scheme.is_empty()
        && scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    let (host, port) = match rest.rsplit_once(':') {
        // A bracketed IPv6 host has colons of its own.
        Some((host, port)) if !port.contains(']') => (host, Some(port)),
        _ => (rest, None),
    };
    let host_ok = !host.is_empty()
        && host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '[' | ']' | ':'));
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok());
    scheme_ok && host_ok && port_ok
}

/// Answers preflights and names the allowed origin on every answer to it.
pub async fn cors(State(cors): State<Arc<Cors>>, request: Request, next: Next) -> Response {
    let origin = request
        .headers()
        .get(ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let Some(origin) = origin else {
        return next.run(request).await;
    };
    let allowed = cors.allows(&origin);
    let preflight = request.method() == Method::OPTIONS
        && request
            .headers()
            .contains_key(ACCESS_CONTROL_REQUEST_METHOD);
    if preflight {
        if !allowed {
            return ApiError::new(
                StatusCode::FORBIDDEN,
                "cors_origin_not_allowed",
                format!(
                    "origin {origin:?} may not call this API from a browser; add it to [cors] allowed_origins"
                ),
            )
            .into_response();
        }
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        name_origin(headers, &origin, cors.any);
        headers.insert(
            ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOWED_METHODS),
        );
        headers.insert(
            ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(ALLOWED_HEADERS),
        );
        headers.insert(
            ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from(PREFLIGHT_MAX_AGE_S),
        );
        return response;
    }
    let mut response = next.run(request).await;
    if allowed {
        let headers = response.headers_mut();
        name_origin(headers, &origin, cors.any);
        headers.insert(
            ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(EXPOSED_HEADERS),
        );
    }
    response
}

fn name_origin(headers: &mut HeaderMap, origin: &str, any: bool) {
    let value = if any {
        Some(HeaderValue::from_static("*"))
    } else {
        HeaderValue::from_str(origin).ok()
    };
    if let Some(value) = value {
        headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
    }
    // Caches must not hand one origin's answer to another.
    headers.append(VARY, HeaderValue::from_static("origin"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_checked_as_browsers_send_them() {
        for ok in [
            "https://app.example.com",
            "http://localhost:5173",
            "http://127.0.0.1:8080",
            "http://[::1]:3000",
            "https://APP.example.com",
        ] {
            assert!(is_origin(ok), "{ok}");
        }
        for bad in [
            "app.example.com",
            "https://app.example.com/",
            "https://app.example.com/path",
            "https://",
            "https://host:99999",
            "https://host:",
            "ht tp://host",
            "https://hóst",
        ] {
            assert!(!is_origin(bad), "{bad}");
        }
    }

    #[test]
    fn exact_origins_match_without_regard_to_case_and_star_matches_any() {
        let cors = Cors::new(&["https://App.example.com".into()]).expect("valid");
        assert!(cors.allows("https://app.example.com"));
        assert!(!cors.allows("https://app.example.com:8443"));
        assert!(!cors.allows("http://app.example.com"));
        assert!(!cors.is_off());
        let any = Cors::new(&["*".into()]).expect("valid");
        assert!(any.allows("http://anything:1"));
        assert!(Cors::new(&[]).expect("valid").is_off());
        assert!(matches!(
            Cors::new(&["https://x/".into()]),
            Err(CorsConfigError::NotAnOrigin(_))
        ));
        let many: Vec<String> = (0..=CORS_ORIGINS_MAX)
            .map(|i| format!("http://h{i}"))
            .collect();
        assert!(matches!(Cors::new(&many), Err(CorsConfigError::TooMany(_))));
    }
}
