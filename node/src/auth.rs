//! API authentication and authorization: bearer tokens with a role, scoped to document-id
//! prefixes.
//!
//! The node keeps only the SHA-256 of each token, so a leaked config file or a core dump does
//! not hand out working credentials, and the token itself is never logged. Tokens are random
//! 32-byte values, so a plain hash (no salt, no key stretching) is enough: there is no
//! dictionary to attack. A presented token is hashed and compared with every configured hash in
//! constant time, so response timing says nothing about how close a guess was.
//!
//! Which route needs which role lives in `http::auth`; this module holds the tokens, the
//! config they come from and the decisions that depend only on a token.

use std::fmt;
use std::net::SocketAddr;

use rand::RngCore;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// What a token may do. Each role includes the ones before it: `write` can read, `admin` can
/// read and write (within its prefixes) and also see the node's status and metrics.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read documents, list them, watch them.
    Read,
    /// Also write documents and sync them.
    Write,
    /// Also read the node's status and metrics.
    Admin,
}

impl Role {
    /// The name used in the config file and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Read => "read",
            Self::Write => "write",
            Self::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[auth] mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// No authentication: anyone who reaches the port has full access.
    None,
    /// Every request but the probes carries a configured bearer token.
    Tokens,
}

/// One `[[auth.tokens]]` entry of the config file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenFileConfig {
    /// A name for logs and messages (the token itself is never shown).
    pub name: String,
    /// `sha256:` followed by the 64 hex digits of the SHA-256 of the token.
    pub hash: String,
    /// What the token may do.
    pub role: Role,
    /// Document-id prefixes the token reaches; `""` reaches every document.
    pub prefixes: Vec<String>,
    /// Most requests per second (and at once) for this token; overrides
    /// `[limits] requests_per_second_per_token`. Unlimited when neither is set.
    #[serde(default)]
    pub requests_per_second: Option<u32>,
}

/// `[auth]` in the config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthFileConfig {
    /// `"tokens"` (the default when the section is present) or `"none"`.
    pub mode: Option<AuthMode>,
    /// The accepted tokens.
    #[serde(default)]
    pub tokens: Vec<TokenFileConfig>,
}

/// Why the `[auth]` configuration is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid setting {key}: {message}")]
pub struct AuthConfigError {
    /// The setting.
    pub key: &'static str,
    /// What is wrong.
    pub message: String,
}

/// A configured token: its name, the hash of its secret, its role and its scope.
#[derive(Clone, PartialEq, Eq)]
pub struct Token {
    name: String,
    hash: [u8; 32],
    role: Role,
    prefixes: Vec<String>,
    requests_per_second: Option<u32>,
}

// Written by hand so that no hash ends up in a log line through `{:?}` of the config.
impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("prefixes", &self.prefixes)
            .field("requests_per_second", &self.requests_per_second)
            .finish_non_exhaustive()
    }
}

impl Token {
    /// The token's configured name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The token's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The token's prefixes.
    pub fn prefixes(&self) -> &[String] {
        &self.prefixes
    }

    /// The token's own request rate limit, if it has one.
    pub fn requests_per_second(&self) -> Option<u32> {
        self.requests_per_second
    }

    /// Whether the token reaches every document (one of its prefixes is empty).
    pub fn reaches_everything(&self) -> bool {
        self.prefixes.iter().any(String::is_empty)
    }

    /// Whether the token reaches the document `id`.
    pub fn covers(&self, id: &str) -> bool {
        self.prefixes.iter().any(|p| id.starts_with(p.as_str()))
    }

    /// The prefix a listing or watch with the `requested` prefix is limited to.
    ///
    /// A requested prefix must lie inside one of the token's prefixes (every id it selects then
    /// does too). Without one, a token reaching everything lists everything, a token with a
    /// single prefix lists that prefix, and a token with several is refused: answering with a
    /// merge of several prefixes would break the id order the cursor relies on.
    pub fn listing_prefix(&self, requested: Option<&str>) -> Result<String, Denied> {
        match requested {
            Some(p) if self.covers(p) => Ok(p.to_owned()),
            Some(p) => Err(Denied::Prefix {
                token: self.name.clone(),
                target: format!("prefix {p:?}"),
            }),
            None if self.prefixes.iter().any(String::is_empty) => Ok(String::new()),
            None => match self.prefixes.as_slice() {
                [only] => Ok(only.clone()),
                _ => Err(Denied::AmbiguousPrefix {
                    token: self.name.clone(),
                }),
            },
        }
    }
}

/// The API's authentication, resolved from the config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Auth {
    /// Every request is allowed.
    Open {
        /// `mode = "none"` was configured (rather than assumed for a loopback-only API).
        explicit: bool,
    },
    /// Requests need one of these tokens.
    Tokens(Vec<Token>),
}

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denied {
    /// No `Authorization` header.
    Missing,
    /// An `Authorization` header that is not `Bearer <token>`.
    Malformed,
    /// A bearer token that is not configured.
    Unknown,
    /// The token's role is below the one the route needs.
    Role {
        /// The token's name.
        token: String,
        /// The role it has.
        has: Role,
        /// The role the route needs.
        needs: Role,
    },
    /// The document or prefix lies outside the token's prefixes.
    Prefix {
        /// The token's name.
        token: String,
        /// What was asked for, for the message.
        target: String,
    },
    /// A listing without a prefix by a token with several prefixes.
    AmbiguousPrefix {
        /// The token's name.
        token: String,
    },
}

impl Denied {
    /// Whether this is a 401 (no valid credentials) rather than a 403 (valid but not enough).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(self, Self::Missing | Self::Malformed | Self::Unknown)
    }

    /// The `reason` label of `verge_auth_failures_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing => "missing",
            Self::Malformed => "malformed",
            Self::Unknown => "unknown_token",
            Self::Role { .. } => "role",
            Self::Prefix { .. } | Self::AmbiguousPrefix { .. } => "prefix",
        }
    }

    /// The message answered to the client. It names the token (never its secret) so that an
    /// operator can tell which credential lacks what.
    pub fn message(&self) -> String {
        match self {
            Self::Missing => {
                "this route needs a bearer token: send `Authorization: Bearer <token>`".into()
            }
            Self::Malformed => {
                "the Authorization header must be `Bearer <token>` with a visible-ASCII token"
                    .into()
            }
            Self::Unknown => "the bearer token is not one this node accepts".into(),
            Self::Role { token, has, needs } => {
                format!("token {token:?} has role {has}; this request needs {needs}")
            }
            Self::Prefix { token, target } => {
                format!("token {token:?} does not reach {target}")
            }
            Self::AmbiguousPrefix { token } => format!(
                "token {token:?} is scoped to several prefixes; pass ?prefix= with one of them"
            ),
        }
    }
}

/// How many bytes of randomness a generated token holds.
pub const TOKEN_RANDOM_BYTES: usize = 32;
/// What every generated token starts with, so that secret scanners and people recognise one.
pub const TOKEN_PREFIX: &str = "vg_";
/// What a configured hash starts with.
const HASH_PREFIX: &str = "sha256:";
/// Longest bearer token looked at; anything longer cannot be one of ours.
const TOKEN_BYTES_MAX: usize = 1024;

/// SHA-256 of a token, as kept in the config.
pub fn hash_token(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The config form of a hash: `sha256:<hex>`.
pub fn format_hash(hash: &[u8; 32]) -> String {
    format!("{HASH_PREFIX}{}", hex::encode(hash))
}

/// A new random token: `vg_` and 64 hex digits.
pub fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_RANDOM_BYTES];
    rand::rng().fill_bytes(&mut bytes);
    format!("{TOKEN_PREFIX}{}", hex::encode(bytes))
}

/// The `[[auth.tokens]]` lines for a token, ready to paste into verge.toml.
pub fn config_snippet(name: &str, role: Role, prefixes: &[String], hash: &[u8; 32]) -> String {
    let prefixes = prefixes
        .iter()
        .map(|p| format!("{p:?}"))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "[[auth.tokens]]\nname = {name:?}\nhash = \"{}\"\nrole = \"{role}\"\nprefixes = [{prefixes}]\n",
        format_hash(hash)
    )
}

/// Flags of `verge token`.
#[derive(Debug, Clone, clap::Args)]
pub struct TokenArgs {
    /// A name for the token, shown in logs and refusals (1-64 bytes of `[A-Za-z0-9._~:/@+-]`).
    #[arg(long)]
    pub name: String,
    /// What the token may do; each role includes the ones before it.
    #[arg(long, value_enum)]
    pub role: Role,
    /// A document-id prefix the token reaches (repeatable; "" reaches every document).
    #[arg(long = "prefix", value_name = "PREFIX", required = true)]
    pub prefixes: Vec<String>,
}

/// Creates a token for `verge token`: the text to print, holding the token (shown this once)
/// and the config lines that accept it.
pub fn create_token(args: &TokenArgs) -> Result<String, String> {
    check_name(&args.name)?;
    for p in &args.prefixes {
        check_prefix(p)?;
    }
    let token = generate_token();
    let snippet = config_snippet(&args.name, args.role, &args.prefixes, &hash_token(&token));
    Ok(format!(
        "token: {token}\n\
         # The token is shown only now; the node keeps only its hash. Give it to the client\n\
         # (Authorization: Bearer <token>, or verge --token / VERGE_TOKEN) and add these lines\n\
         # to verge.toml:\n\n{snippet}"
    ))
}

/// Checks a token name: 1-64 bytes of the document-id alphabet, so that it reads cleanly in
/// logs and metrics.
pub fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 64 || !name.bytes().all(verge_core::doc_id::is_id_byte) {
        return Err(format!(
            "token name {name:?} must be 1-64 bytes of [A-Za-z0-9._~:/@+-]"
        ));
    }
    Ok(())
}

/// Checks a scope prefix: a possibly empty beginning of a document id.
pub fn check_prefix(prefix: &str) -> Result<(), String> {
    if prefix.len() > verge_core::limits::DOC_ID_BYTES_MAX
        || !prefix.bytes().all(verge_core::doc_id::is_id_byte)
    {
        return Err(format!(
            "prefix {prefix:?} must be at most {} bytes of [A-Za-z0-9._~:/@+-] (\"\" reaches every document)",
            verge_core::limits::DOC_ID_BYTES_MAX
        ));
    }
    Ok(())
}

fn parse_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix(HASH_PREFIX)?;
    let bytes = hex::decode(hex_part).ok()?;
    bytes.try_into().ok()
}

impl Auth {
    /// Resolves `[auth]` for an API listening on `api_addr`.
    ///
    /// Without an `[auth]` section the API is open only when it listens on loopback, where only
    /// local processes reach it; listening beyond loopback without tokens is refused unless
    /// `mode = "none"` says so explicitly, so that a node is never exposed by omission.
    pub fn resolve(
        file: Option<&AuthFileConfig>,
        api_addr: SocketAddr,
    ) -> Result<Self, AuthConfigError> {
        let invalid = |key, message: String| AuthConfigError { key, message };
        let Some(file) = file else {
            if api_addr.ip().is_loopback() {
                return Ok(Self::Open { explicit: false });
            }
            return Err(invalid(
                "auth",
                format!(
                    "the API listens on {api_addr}, beyond loopback, and no [auth] tokens are \
                     configured; create tokens with `verge token` and add them under [auth], or \
                     set [auth] mode = \"none\" to serve without authentication on purpose"
                ),
            ));
        };
        match file.mode.unwrap_or(AuthMode::Tokens) {
            AuthMode::None if file.tokens.is_empty() => Ok(Self::Open { explicit: true }),
            AuthMode::None => Err(invalid(
                "auth.mode",
                "mode = \"none\" turns authentication off, yet tokens are listed; remove them or use mode = \"tokens\"".into(),
            )),
            AuthMode::Tokens => {
                if file.tokens.is_empty() {
                    return Err(invalid(
                        "auth.tokens",
                        "mode = \"tokens\" needs at least one [[auth.tokens]] entry; create one with `verge token`".into(),
                    ));
                }
                let mut tokens: Vec<Token> = Vec::with_capacity(file.tokens.len());
                for t in &file.tokens {
                    check_name(&t.name).map_err(|m| invalid("auth.tokens.name", m))?;
                    if tokens.iter().any(|other| other.name == t.name) {
                        return Err(invalid(
                            "auth.tokens.name",
                            format!("token name {:?} appears twice", t.name),
                        ));
                    }
                    let hash = parse_hash(&t.hash).ok_or_else(|| {
                        invalid(
                            "auth.tokens.hash",
                            format!(
                                "token {:?}: the hash must be \"sha256:\" and 64 hex digits, as `verge token` prints it",
                                t.name
                            ),
                        )
                    })?;
                    if tokens.iter().any(|other| other.hash == hash) {
                        return Err(invalid(
                            "auth.tokens.hash",
                            format!("token {:?} has the same hash as another token", t.name),
                        ));
                    }
                    if t.prefixes.is_empty() {
                        return Err(invalid(
                            "auth.tokens.prefixes",
                            format!(
                                "token {:?} has no prefixes; use [\"\"] to reach every document",
                                t.name
                            ),
                        ));
                    }
                    for p in &t.prefixes {
                        check_prefix(p).map_err(|m| {
                            invalid("auth.tokens.prefixes", format!("token {:?}: {m}", t.name))
                        })?;
                    }
                    if t.requests_per_second == Some(0) {
                        return Err(invalid(
                            "auth.tokens.requests_per_second",
                            format!(
                                "token {:?}: requests_per_second must be at least 1 (omit it for no limit)",
                                t.name
                            ),
                        ));
                    }
                    tokens.push(Token {
                        name: t.name.clone(),
                        hash,
                        role: t.role,
                        prefixes: t.prefixes.clone(),
                        requests_per_second: t.requests_per_second,
                    });
                }
                Ok(Self::Tokens(tokens))
            }
        }
    }

    /// Whether requests are served without a token.
    pub fn is_open(&self) -> bool {
        matches!(self, Self::Open { .. })
    }

    /// The token an `Authorization` header value presents.
    ///
    /// Every configured hash is compared, each in constant time, so the time taken does not
    /// depend on which token matched or how much of a guess was right.
    pub fn authenticate(&self, header: Option<&[u8]>) -> Result<&Token, Denied> {
        let tokens = match self {
            Self::Tokens(tokens) => tokens,
            // Callers check `is_open` first; an open API has no token to return.
            Self::Open { .. } => return Err(Denied::Unknown),
        };
        let header = header.ok_or(Denied::Missing)?;
        let presented = bearer_token(header).ok_or(Denied::Malformed)?;
        let hash = hash_token(presented);
        let mut found: Option<&Token> = None;
        for token in tokens {
            if bool::from(token.hash.ct_eq(&hash)) {
                found = Some(token);
            }
        }
        found.ok_or(Denied::Unknown)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 7235), if the value has that
/// shape and the token is visible ASCII of a sane length.
fn bearer_token(value: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(value).ok()?;
    let (scheme, rest) = text.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = rest.trim_matches(' ');
    if token.is_empty()
        || token.len() > TOKEN_BYTES_MAX
        || !token.bytes().all(|b| b.is_ascii_graphic())
    {
        return None;
    }
    Some(token)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 7070))
    }

    fn everywhere() -> SocketAddr {
        SocketAddr::from(([0, 0, 0, 0], 7070))
    }

    fn entry(name: &str, token: &str, role: Role, prefixes: &[&str]) -> TokenFileConfig {
        TokenFileConfig {
            name: name.into(),
            hash: format_hash(&hash_token(token)),
            role,
            prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
            requests_per_second: None,
        }
    }

    fn tokens(entries: Vec<TokenFileConfig>) -> Auth {
        Auth::resolve(
            Some(&AuthFileConfig {
                mode: None,
                tokens: entries,
            }),
            everywhere(),
        )
        .expect("valid tokens")
    }

    #[test]
    fn no_section_is_open_on_loopback_only() {
        assert_eq!(
            Auth::resolve(None, loopback()),
            Ok(Auth::Open { explicit: false })
        );
        let v6 = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 7070));
        assert!(Auth::resolve(None, v6).is_ok());
        let err = Auth::resolve(None, everywhere()).expect_err("exposed without tokens");
        assert_eq!(err.key, "auth");
        assert!(err.message.contains("verge token"), "{err}");
    }

    #[test]
    fn explicit_none_is_open_anywhere() {
        let file = AuthFileConfig {
            mode: Some(AuthMode::None),
            tokens: Vec::new(),
        };
        assert_eq!(
            Auth::resolve(Some(&file), everywhere()),
            Ok(Auth::Open { explicit: true })
        );
        let contradictory = AuthFileConfig {
            mode: Some(AuthMode::None),
            tokens: vec![entry("a", "t", Role::Read, &[""])],
        };
        assert!(Auth::resolve(Some(&contradictory), everywhere()).is_err());
    }

    #[test]
    fn bad_token_entries_are_refused() {
        let resolve = |entries| {
            Auth::resolve(
                Some(&AuthFileConfig {
                    mode: Some(AuthMode::Tokens),
                    tokens: entries,
                }),
                loopback(),
            )
        };
        assert_eq!(resolve(vec![]).expect_err("no tokens").key, "auth.tokens");
        let mut bad_hash = entry("a", "t", Role::Read, &[""]);
        bad_hash.hash = "md5:abc".into();
        assert_eq!(
            resolve(vec![bad_hash]).expect_err("hash").key,
            "auth.tokens.hash"
        );
        assert_eq!(
            resolve(vec![entry("a", "t", Role::Read, &[])])
                .expect_err("no prefixes")
                .key,
            "auth.tokens.prefixes"
        );
        assert_eq!(
            resolve(vec![entry("a", "t", Role::Read, &["a b"])])
                .expect_err("bad prefix")
                .key,
            "auth.tokens.prefixes"
        );
        assert_eq!(
            resolve(vec![
                entry("a", "t1", Role::Read, &[""]),
                entry("a", "t2", Role::Read, &[""])
            ])
            .expect_err("duplicate name")
            .key,
            "auth.tokens.name"
        );
        assert_eq!(
            resolve(vec![
                entry("a", "t", Role::Read, &[""]),
                entry("b", "t", Role::Read, &[""])
            ])
            .expect_err("duplicate secret")
            .key,
            "auth.tokens.hash"
        );
    }

    #[test]
    fn authenticates_by_hash() {
        let auth = tokens(vec![
            entry("reader", "secret-r", Role::Read, &[""]),
            entry("writer", "secret-w", Role::Write, &["cart/"]),
        ]);
        let ok = auth
            .authenticate(Some(b"Bearer secret-w"))
            .expect("known token");
        assert_eq!(ok.name(), "writer");
        assert_eq!(
            auth.authenticate(Some(b"bearer secret-r"))
                .expect("scheme is case-insensitive")
                .name(),
            "reader"
        );
        assert_eq!(auth.authenticate(None), Err(Denied::Missing));
        assert_eq!(
            auth.authenticate(Some(b"Basic c2VjcmV0")),
            Err(Denied::Malformed)
        );
        assert_eq!(auth.authenticate(Some(b"Bearer ")), Err(Denied::Malformed));
        assert_eq!(
            auth.authenticate(Some(b"Bearer secret-x")),
            Err(Denied::Unknown)
        );
        assert_eq!(
            auth.authenticate(Some(b"Bearer secret-w\x01")),
            Err(Denied::Malformed)
        );
    }

    #[test]
    fn scope_and_listing() {
        let auth = tokens(vec![
            entry("all", "t-all", Role::Read, &[""]),
            entry("cart", "t-cart", Role::Write, &["cart/"]),
            entry("two", "t-two", Role::Read, &["cart/", "user/"]),
        ]);
        let get = |t: &str| {
            auth.authenticate(Some(format!("Bearer {t}").as_bytes()))
                .expect("known")
                .clone()
        };
        let (all, cart, two) = (get("t-all"), get("t-cart"), get("t-two"));
        assert!(all.covers("anything"));
        assert!(cart.covers("cart/u-1") && !cart.covers("user/u-1") && !cart.covers("cart"));
        assert_eq!(all.listing_prefix(None), Ok(String::new()));
        assert_eq!(cart.listing_prefix(None), Ok("cart/".into()));
        assert_eq!(cart.listing_prefix(Some("cart/u")), Ok("cart/u".into()));
        assert_eq!(
            cart.listing_prefix(Some("car")).map_err(|d| d.reason()),
            Err("prefix")
        );
        assert!(matches!(
            two.listing_prefix(None),
            Err(Denied::AmbiguousPrefix { .. })
        ));
        assert_eq!(two.listing_prefix(Some("user/")), Ok("user/".into()));
    }

    #[test]
    fn generated_tokens_are_random_and_hash_to_their_snippet() {
        let a = generate_token();
        let b = generate_token();
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX));
        assert_eq!(a.len(), TOKEN_PREFIX.len() + 2 * TOKEN_RANDOM_BYTES);
        let snippet = config_snippet("svc", Role::Write, &["cart/".into()], &hash_token(&a));
        let file: toml::Value = toml::from_str(&snippet).expect("snippet is TOML");
        let parsed: AuthFileConfig = file
            .get("auth")
            .cloned()
            .expect("auth table")
            .try_into()
            .expect("snippet has the config shape");
        let auth = Auth::resolve(Some(&parsed), everywhere()).expect("resolves");
        let token = auth
            .authenticate(Some(format!("Bearer {a}").as_bytes()))
            .expect("the printed token matches the printed hash");
        assert_eq!(token.role(), Role::Write);
        assert_eq!(token.prefixes(), ["cart/".to_owned()]);
    }

    #[test]
    fn debug_output_has_no_hash() {
        let auth = tokens(vec![entry("svc", "secret", Role::Admin, &[""])]);
        let hash = hex::encode(hash_token("secret"));
        assert!(!format!("{auth:?}").contains(&hash));
    }
}
