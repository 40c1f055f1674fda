//! `Idempotency-Key` on `PUT`, `PATCH` and `DELETE`: a retried write answers what the first
//! answered and writes nothing.
//!
//! The node keeps, per key (and per token: two clients' keys never meet), a hash of the request
//! and the heads the write answered, durably and in the same transaction as the write
//! (`store::idempotency`). A retry of the same request gets the first answer again, marked
//! `Idempotent-Replayed: true`; the same key on another request is refused with `422
//! idempotency_key_reused`; the same key while its first request is still being written gets
//! `409 idempotency_key_in_flight` (retry it after a moment). A request that wrote nothing (an
//! error, or a write that changed nothing) keeps no record, so its retry runs again.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use sha2::{Digest, Sha256};
use verge_core::DocId;

use super::{ApiError, AppState};
use crate::documents::Idempotent;

/// Longest idempotency key accepted, in bytes.
pub const IDEMPOTENCY_KEY_BYTES_MAX: usize = 255;
/// Writes with idempotency keys that may be under way at once; more are refused with `503`.
pub const IDEMPOTENCY_IN_FLIGHT_MAX: usize = 65_536;
/// The response header that marks a replayed answer.
pub const REPLAYED_HEADER: &str = "idempotent-replayed";

/// The keys whose first request is being written.
#[derive(Debug, Default)]
pub struct InFlight(Mutex<HashSet<String>>);

/// The claim of a key by the request writing it; released when dropped.
#[derive(Debug)]
pub struct Claim {
    idempotent: Idempotent,
    in_flight: Arc<InFlight>,
}

impl Claim {
    /// What the write keeps.
    pub fn idempotent(&self) -> Idempotent {
        self.idempotent.clone()
    }
}

impl Drop for Claim {
    fn drop(&mut self) {
        self.in_flight
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.idempotent.key);
    }
}

/// How a write with an idempotency key goes on.
#[derive(Debug)]
pub enum Begin {
    /// The same request was written before: its answer.
    Replay(Vec<automerge::ChangeHash>),
    /// A new key: write, keeping the claim until the write is answered.
    Write(Claim),
}

/// The key of `headers`, if any, checked.
fn key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let bad = |why: &str| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_idempotency_key",
            format!(
                "Idempotency-Key {why}: use 1 to {IDEMPOTENCY_KEY_BYTES_MAX} visible ASCII \
                 characters, e.g. a UUID"
            ),
        )
    };
    let raw = value.as_bytes();
    if raw.is_empty() || raw.len() > IDEMPOTENCY_KEY_BYTES_MAX {
        return Err(bad(&format!("is {} bytes", raw.len())));
    }
    if !raw.iter().all(|b| (0x21..=0x7e).contains(b)) {
        return Err(bad("holds a space, a control or a non-ASCII byte"));
    }
    Ok(Some(value.to_str().map_err(|_| bad("is not ASCII"))?))
}

/// Hashes with each part's length first, so that no two lists of parts hash alike.
fn hash(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for part in parts {
        h.update((part.len() as u64).to_be_bytes());
        h.update(part);
    }
    h.finalize().into()
}

/// Looks up the request's idempotency key, if it has one: `None` without a key.
///
/// `token` is the name of the token that sent it (keys are per token), `method` and the rest
/// the request as it must repeat.
#[allow(clippy::too_many_arguments)]
pub fn begin(
    state: &AppState,
    headers: &HeaderMap,
    token: Option<&str>,
    method: &str,
    id: &DocId,
    params: &HashMap<String, String>,
    body: &[u8],
) -> Result<Option<Begin>, ApiError> {
    let Some(key) = key(headers)? else {
        return Ok(None);
    };
    let name = hex::encode(hash(&[
        b"verge-idempotency-1",
        token.unwrap_or("").as_bytes(),
        key.as_bytes(),
    ]));
    let mut query: Vec<(&String, &String)> = params.iter().collect();
    query.sort();
    let query: Vec<u8> = query
        .iter()
        .flat_map(|(k, v)| [k.as_bytes(), b"=", v.as_bytes(), b"&"].concat())
        .collect();
    let if_match = headers
        .get("if-match")
        .map_or(&b""[..], HeaderValue::as_bytes);
    let fingerprint = hash(&[
        method.as_bytes(),
        id.as_str().as_bytes(),
        &query,
        if_match,
        body,
    ]);
    {
        let mut in_flight = state
            .idempotency
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if in_flight.contains(&name) {
            state.metrics.idempotency("in_flight");
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_flight",
                "a request with this Idempotency-Key is being written; retry it in a moment",
            ));
        }
        if in_flight.len() >= IDEMPOTENCY_IN_FLIGHT_MAX {
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many writes with idempotency keys are under way",
            ));
        }
        in_flight.insert(name.clone());
    }
    // Claimed before the look-up: a record written meanwhile by the first request is seen.
    let claim = Claim {
        idempotent: Idempotent {
            key: name,
            fingerprint,
        },
        in_flight: Arc::clone(&state.idempotency),
    };
    match state.docs.remembered(&claim.idempotent.key)? {
        None => Ok(Some(Begin::Write(claim))),
        Some(kept) if kept.fingerprint == fingerprint => {
            state.metrics.idempotency("replayed");
            Ok(Some(Begin::Replay(kept.heads)))
        }
        Some(_) => {
            state.metrics.idempotency("reused");
            Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "idempotency_key_reused",
                "this Idempotency-Key was used for another request (another document, method, \
                 query, If-Match or body); use a new key for a new request",
            ))
        }
    }
}

/// Marks a replayed answer.
pub fn replayed(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(REPLAYED_HEADER, HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(key: &[u8]) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "idempotency-key",
            HeaderValue::from_bytes(key).expect("a header value"),
        );
        h
    }

    #[test]
    fn keys_are_bounded_visible_ascii() {
        assert_eq!(key(&HeaderMap::new()).expect("none"), None);
        assert_eq!(key(&headers(b"4f1c-9a")).expect("ok"), Some("4f1c-9a"));
        let long = vec![b'k'; IDEMPOTENCY_KEY_BYTES_MAX];
        assert!(key(&headers(&long)).is_ok());
        for bad in [
            &b""[..],
            &[b'k'; IDEMPOTENCY_KEY_BYTES_MAX + 1][..],
            b"a b",
            b"caf\xc3\xa9",
        ] {
            let e = key(&headers(bad)).expect_err("refused");
            assert_eq!(e.code(), "invalid_idempotency_key");
        }
    }

    #[test]
    fn parts_are_delimited_by_their_lengths() {
        assert_ne!(hash(&[b"ab", b"c"]), hash(&[b"a", b"bc"]));
        assert_eq!(hash(&[b"ab", b"c"]), hash(&[b"ab", b"c"]));
    }
}
