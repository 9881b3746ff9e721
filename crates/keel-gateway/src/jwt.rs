//! Bearer tokens (JWT, RFC 7519) verified at the edge, the way Envoy's `jwt_authn` or Kong's
//! `jwt` plugin does it: [`Verifier::verify`] answers with the token's [`Claims`] or a
//! [`Rejection`] that becomes a 401.
//!
//! [`bearer_token`] reads the token from `Authorization: Bearer …`.
//!
//! **What is accepted.** RS256 (RSA of 2048 to 8192 bits) and ES256 (P-256) only. The header's
//! `alg` is never trusted on its own: the key named by `kid` carries its own algorithm, fixed
//! when the JWKS was loaded, and the two must agree. So `alg: none`, HS256 signed with a public
//! key as the HMAC secret (the classic key confusion), or ES256 against an RSA key are all
//! rejected before any signature is checked. Header parameters that point at keys (`jku`,
//! `x5u`, `jwk`) are ignored: keys come from the configured JWKS only.
//!
//! **Claims.** `exp` is required, `nbf` is checked when present, both with
//! [`JwtConfig::leeway`] for clock skew. `iss` must equal [`JwtConfig::issuer`] when one is
//! set, and `aud` (a string or an array) must name one of [`JwtConfig::audiences`] when any
//! are set; a token lacking the claim is then rejected too. Scopes are read from `scope` (a
//! space-separated string, as OAuth 2.0 has it) and `scp` (an array, or a string as some
//! issuers write it). **Whether the scopes suffice is the caller's decision**: answer 403
//! (`insufficient_scope`) there; everything this module rejects is a 401.
//!
//! **Keys.** A JWKS (RFC 7517, `{"keys": [...]}`) from a file or an `https://` or `http://` URL,
//! indexed by `kid`. Keys this module cannot use (HMAC, RS384, encryption keys, P-384, short
//! RSA moduli, keys without `kid`) are skipped with a warning; a JWKS left with no usable key
//! is an error. Over `https://` the server's certificate is verified (rustls with ring, TLS 1.2
//! and 1.3) against the system's trust store — plus [`JwtConfig::ca_file`], for an issuer
//! behind a private CA — and must name the URL's host; a certificate that does not verify
//! fails the fetch like an unreachable server. Plain `http://` is only for a trusted network:
//! whoever can change the keys in flight can mint tokens.
//!
//! **Refresh.** The key set lives behind an [`ArcSwap`]: `verify` reads it without a lock and
//! never waits on the network for a known `kid`. The JWKS is reloaded every
//! [`JwtConfig::refresh`], and when a token names a `kid` not in the set (a rotation the
//! periodic refresh has not yet seen) — but at most once per [`JwtConfig::min_refetch`], so a
//! flood of made-up kids costs the JWKS endpoint one request per window, and a request awaits
//! at most one fetch. A failed reload keeps the keys already loaded (and says so with
//! `tracing::warn!`); a fetch gives up after [`FETCH_TIMEOUT`] and refuses a body over
//! [`MAX_JWKS_BYTES`].
//!
//! ```no_run
//! use http::header::WWW_AUTHENTICATE;
//! use http::{HeaderMap, HeaderValue, Response, StatusCode};
//! use keel_gateway::jwt::{JwksLocation, JwtConfig, Verifier, bearer_token};
//!
//! # async fn example(headers: HeaderMap) -> Result<(), keel_gateway::jwt::JwtError> {
//! // Once, at start-up:
//! let verifier = Verifier::new(JwtConfig {
//!     issuer: Some("https://issuer.example".to_owned()),
//!     audiences: vec!["orders-api".to_owned()],
//!     ..JwtConfig::new(JwksLocation::parse("http://jwks.internal/.well-known/jwks.json"))
//! })
//! .await?;
//!
//! // Per request:
//! let answer = |status: StatusCode, challenge: HeaderValue| {
//!     Response::builder().status(status).header(WWW_AUTHENTICATE, challenge).body(())
//! };
//! let Some(token) = bearer_token(&headers) else {
//!     // No token is not a bad token: a bare challenge (RFC 6750 §3.1).
//!     let _ = answer(StatusCode::UNAUTHORIZED, HeaderValue::from_static("Bearer"));
//!     return Ok(());
//! };
//! match verifier.verify(token).await {
//!     Ok(claims) if claims.has_scope("orders:write") => { /* forward, with claims.subject */ }
//!     Ok(_) => {
//!         // The route's decision, not the verifier's: a valid token without the scope.
//!         let challenge = HeaderValue::from_static(r#"Bearer error="insufficient_scope""#);
//!         let _ = answer(StatusCode::FORBIDDEN, challenge);
//!     }
//!     Err(rejection) => {
//!         let _ = answer(rejection.status(), rejection.www_authenticate());
//!     }
//! }
//! # Ok(())
//! # }
//! ```

use std::collections::HashMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use base64::Engine as _;
use base64::alphabet;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http::header::{ACCEPT, AUTHORIZATION, HOST};
use http::{HeaderMap, HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::rt::TokioIo;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

/// Clock skew allowed on `exp` and `nbf` unless configured: a minute covers NTP-disciplined
/// hosts with room to spare, and is what most gateways default to.
pub const DEFAULT_LEEWAY: Duration = Duration::from_secs(60);
/// How often the JWKS is reloaded unless configured: issuers publish a new key well before
/// signing with it, so five minutes is ample, and cheap for the issuer.
pub const DEFAULT_REFRESH: Duration = Duration::from_secs(5 * 60);
/// The least time between two loads caused by unknown kids unless configured.
pub const DEFAULT_MIN_REFETCH: Duration = Duration::from_secs(30);
/// A JWKS fetch (connect, request, whole body) that takes longer fails.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// A JWKS larger than this (1 MiB) is refused: real ones hold a handful of keys in a few KiB.
pub const MAX_JWKS_BYTES: usize = 1 << 20;
/// A token longer than this (16 KiB) is malformed without further reading: it could not have
/// come through any sane header limit, and nothing should be decoded for it.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// base64url as JWKs are found in the wild: with or without `=` padding.
const LENIENT_B64URL: GeneralPurpose = GeneralPurpose::new(
    &alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Where the JWKS comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksLocation {
    /// A file, re-read on each refresh (so a replaced file is picked up).
    File(PathBuf),
    /// An `https://` URL (the certificate verified; see [`JwtConfig::ca_file`]) or an `http://` one.
    Url(String),
}

impl JwksLocation {
    /// A location as written in config: anything with `://` is a URL, anything else a path.
    pub fn parse(s: &str) -> JwksLocation {
        if s.contains("://") {
            JwksLocation::Url(s.to_owned())
        } else {
            JwksLocation::File(PathBuf::from(s))
        }
    }
}

impl fmt::Display for JwksLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            JwksLocation::File(path) => write!(f, "{}", path.display()),
            JwksLocation::Url(url) => f.write_str(url),
        }
    }
}

/// What [`Verifier::new`] needs. Start from [`JwtConfig::new`] for the defaults.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfig {
    /// The JWKS holding the issuer's public keys.
    pub jwks: JwksLocation,
    /// The `iss` every token must carry; `None` accepts any issuer (the keys alone then say
    /// who may issue).
    pub issuer: Option<String>,
    /// Tokens must name one of these in `aud`; empty skips the audience check, which is only
    /// safe when the keys sign tokens for this gateway and nothing else.
    pub audiences: Vec<String>,
    /// Clock skew allowed on `exp` and `nbf` (whole seconds count).
    pub leeway: Duration,
    /// How often the JWKS is reloaded (a file is re-read too); more than zero.
    pub refresh: Duration,
    /// The least time between two loads, for loads caused by a token naming an unknown `kid`.
    pub min_refetch: Duration,
    /// PEM certificates trusted for an `https://` JWKS besides the system's roots (a private
    /// CA); `None`: the system's roots alone.
    pub ca_file: Option<PathBuf>,
}

impl JwtConfig {
    /// Keys from `jwks`, no issuer or audience check, default leeway and refresh periods.
    pub fn new(jwks: JwksLocation) -> JwtConfig {
        JwtConfig {
            jwks,
            issuer: None,
            audiences: Vec::new(),
            leeway: DEFAULT_LEEWAY,
            refresh: DEFAULT_REFRESH,
            min_refetch: DEFAULT_MIN_REFETCH,
            ca_file: None,
        }
    }
}

/// A configuration the verifier cannot start with: which setting, its value, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("jwt.{key} = {value:?}: {reason}")]
pub struct JwtError {
    key: &'static str,
    value: String,
    reason: String,
}

impl JwtError {
    fn new(key: &'static str, value: impl fmt::Display, reason: impl Into<String>) -> JwtError {
        JwtError {
            key,
            value: value.to_string(),
            reason: reason.into(),
        }
    }

    /// The setting at fault (`jwks`, `refresh`, `issuer`).
    pub fn key(&self) -> &str {
        self.key
    }

    /// Its value as configured.
    pub fn value(&self) -> &str {
        &self.value
    }

    /// What is wrong with it.
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// Why a token was refused. Every variant is the client's fault and answers 401
/// ([`Rejection::status`], [`Rejection::www_authenticate`]).
///
/// The `Display` text is for logs; details taken from the token are clipped to 64 characters.
/// The response header carries a fixed description only, never echoing the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Rejection {
    /// Not three base64url parts of JSON, a required claim missing, or too long.
    #[error("malformed token: {0}")]
    Malformed(&'static str),
    /// The header's `alg` is not RS256 or ES256, or not the algorithm of the key it names.
    #[error("algorithm {alg:?} is not accepted")]
    UnsupportedAlgorithm {
        /// The header's `alg`.
        alg: String,
    },
    /// No key with the token's `kid`, even after a refetch (or no `kid` at all).
    #[error("no key with kid {}", kid.as_deref().map_or_else(|| "(none)".to_owned(), |k| format!("{k:?}")))]
    UnknownKey {
        /// The header's `kid`.
        kid: Option<String>,
    },
    /// The signature does not verify with the key named.
    #[error("bad signature")]
    BadSignature,
    /// `exp` is past (beyond the leeway).
    #[error("token expired")]
    Expired,
    /// `nbf` is still ahead (beyond the leeway).
    #[error("token not valid yet")]
    NotYetValid,
    /// `aud` names none of the configured audiences, or is missing.
    #[error("wrong audience")]
    WrongAudience,
    /// `iss` is not the configured issuer, or is missing.
    #[error("wrong issuer")]
    WrongIssuer,
}

/// `HeaderValue::from_static` of the RFC 6750 challenge for an invalid token; a macro so the
/// header text is a literal, checked when the value is built and never formatted per request.
macro_rules! invalid_token {
    ($description:literal) => {
        HeaderValue::from_static(concat!(
            "Bearer error=\"invalid_token\", error_description=\"",
            $description,
            "\""
        ))
    };
}

impl Rejection {
    /// 401 for every rejection: the token is missing its mark, not the client its rights.
    pub fn status(&self) -> StatusCode {
        StatusCode::UNAUTHORIZED
    }

    /// `WWW-Authenticate` for the 401 (RFC 6750 §3):
    /// `Bearer error="invalid_token", error_description="…"`.
    pub fn www_authenticate(&self) -> HeaderValue {
        match self {
            Rejection::Malformed(_) => invalid_token!("malformed token"),
            Rejection::UnsupportedAlgorithm { .. } => invalid_token!("algorithm not accepted"),
            Rejection::UnknownKey { .. } => invalid_token!("unknown signing key"),
            Rejection::BadSignature => invalid_token!("bad signature"),
            Rejection::Expired => invalid_token!("token expired"),
            Rejection::NotYetValid => invalid_token!("token not valid yet"),
            Rejection::WrongAudience => invalid_token!("wrong audience"),
            Rejection::WrongIssuer => invalid_token!("wrong issuer"),
        }
    }
}

/// What a verified token says. Not `non_exhaustive`, so that a handler's tests can make one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    /// `sub`.
    pub subject: Option<String>,
    /// `iss`.
    pub issuer: Option<String>,
    /// `aud`, as an array even when the token had a string.
    pub audiences: Vec<String>,
    /// `scope` split on spaces, then `scp`, without duplicates, in token order.
    pub scopes: Vec<String>,
    /// `exp`, seconds since the Unix epoch.
    pub expires: u64,
    /// `nbf`, seconds since the Unix epoch.
    pub not_before: Option<u64>,
    /// The `kid` of the key that verified the token.
    pub key_id: String,
}

impl Claims {
    /// Whether the token grants `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.scopes.iter().any(|s| s == scope)
    }
}

/// Counters of the JWKS loads, for a metric or a test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct JwksStats {
    /// Loads attempted, the one at start-up included.
    pub loads: u64,
    /// Loads that failed (the keys before them stayed in use).
    pub failures: u64,
    /// Usable keys in the current set.
    pub keys: usize,
}

/// Verifies tokens against a cached JWKS. Build one per issuer and share it (`Arc`): the
/// refresh task it starts stops when it is dropped.
#[derive(Debug)]
pub struct Verifier {
    shared: Arc<Shared>,
    rs256: Validation,
    es256: Validation,
    refresher: Option<AbortHandle>,
}

/// What the refresh task shares with the verifier.
#[derive(Debug)]
struct Shared {
    source: Source,
    keys: ArcSwap<KeySet>,
    min_refetch: Duration,
    /// When the last load started: unknown kids may cause one only `min_refetch` after.
    last_load: Mutex<Instant>,
    /// One load at a time; a request that waited for another's load looks again before
    /// loading itself.
    load_lock: tokio::sync::Mutex<()>,
    /// The reasons keys were skipped at the last load, to warn only when they change rather
    /// than on every refresh.
    skipped: Mutex<Vec<String>>,
    loads: AtomicU64,
    failures: AtomicU64,
}

type KeySet = HashMap<String, Arc<Key>>;

/// A usable public key and the one algorithm it verifies.
struct Key {
    alg: Algorithm,
    decoding: DecodingKey,
}

impl fmt::Debug for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Key").field("alg", &self.alg).finish()
    }
}

#[derive(Debug)]
enum Source {
    File(PathBuf),
    Http {
        url: String,
        authority: String,
        host: String,
        port: u16,
        path: String,
        /// For `https://`: the TLS client and the name the certificate must carry.
        tls: Option<Tls>,
    },
}

/// The TLS side of an `https://` source.
struct Tls {
    connector: tokio_rustls::TlsConnector,
    name: rustls_pki_types::ServerName<'static>,
}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Aborts the HTTP connection task when the fetch ends (done, failed or timed out).
struct AbortOnDrop(AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

/// The JWK members this module reads (RFC 7517 §4, RFC 7518 §6); the rest are ignored.
#[derive(Deserialize)]
struct RawJwk {
    kty: Option<String>,
    kid: Option<String>,
    alg: Option<String>,
    #[serde(rename = "use")]
    use_: Option<String>,
    crv: Option<String>,
    n: Option<String>,
    e: Option<String>,
    x: Option<String>,
    y: Option<String>,
}

#[derive(Deserialize)]
struct RawHeader {
    alg: String,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
struct RawClaims {
    sub: Option<String>,
    iss: Option<String>,
    aud: Option<OneOrMany>,
    // Numbers may be written with a fraction; jsonwebtoken's checks read them the same way.
    exp: Option<f64>,
    nbf: Option<f64>,
    scope: Option<String>,
    scp: Option<OneOrMany>,
}

impl Verifier {
    /// Checks `cfg`, loads the JWKS once (a failure here is an error: a gateway without keys
    /// would refuse everything) and starts the periodic refresh on the current Tokio runtime.
    pub async fn new(cfg: JwtConfig) -> Result<Verifier, JwtError> {
        if cfg.refresh.is_zero() {
            return Err(JwtError::new(
                "refresh",
                format_args!("{:?}", cfg.refresh),
                "must be more than zero",
            ));
        }
        if cfg.issuer.as_deref() == Some("") {
            return Err(JwtError::new(
                "issuer",
                "",
                "empty; leave it unset to accept any issuer",
            ));
        }
        let source = Source::new(&cfg.jwks, cfg.ca_file.as_deref())?;
        let (keys, skipped) = match source.load().await {
            Ok(keys) => keys,
            Err(reason) => return Err(JwtError::new("jwks", &cfg.jwks, reason)),
        };
        warn_skipped(&source, &skipped);
        let shared = Arc::new(Shared {
            source,
            keys: ArcSwap::from_pointee(keys),
            min_refetch: cfg.min_refetch,
            last_load: Mutex::new(Instant::now()),
            load_lock: tokio::sync::Mutex::new(()),
            skipped: Mutex::new(skipped),
            loads: AtomicU64::new(1),
            failures: AtomicU64::new(0),
        });
        let refresher = spawn_refresh(&shared, cfg.refresh);
        Ok(Verifier {
            rs256: validation(Algorithm::RS256, &cfg),
            es256: validation(Algorithm::ES256, &cfg),
            shared,
            refresher,
        })
    }

    /// The claims of `token` (the part after `Bearer `), or why it is refused.
    ///
    /// Reads the cached keys only, unless the token names an unknown `kid`: then the JWKS may
    /// be reloaded first (at most once per `min_refetch`, whoever asks), and this call awaits
    /// that one load.
    pub async fn verify(&self, token: &str) -> Result<Claims, Rejection> {
        let (alg, kid) = header(token)?;
        let key = self
            .shared
            .key(&kid)
            .await
            .ok_or_else(|| Rejection::UnknownKey {
                kid: Some(clip(&kid)),
            })?;
        if key.alg != alg {
            tracing::debug!(kid = %clip(&kid), key_alg = ?key.alg, token_alg = ?alg, "JWT alg does not match its key");
            return Err(Rejection::UnsupportedAlgorithm {
                alg: format!("{alg:?}"),
            });
        }
        let validation = if alg == Algorithm::RS256 {
            &self.rs256
        } else {
            &self.es256
        };
        let data = jsonwebtoken::decode::<RawClaims>(token, &key.decoding, validation)
            .map_err(|e| rejection(e.into_kind(), alg))?;
        Ok(claims(data.claims, kid))
    }

    /// Counters of the JWKS loads.
    pub fn stats(&self) -> JwksStats {
        JwksStats {
            loads: self.shared.loads.load(Ordering::Relaxed),
            failures: self.shared.failures.load(Ordering::Relaxed),
            keys: self.shared.keys.load().len(),
        }
    }
}

impl Drop for Verifier {
    fn drop(&mut self) {
        if let Some(refresher) = &self.refresher {
            refresher.abort();
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header (the scheme is case-insensitive,
/// RFC 6750 §2.1). `None` when there is none: answer 401 with a bare `WWW-Authenticate:
/// Bearer`, since no token is not an invalid token.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

impl Shared {
    /// The key for `kid`: from the cache, or after one rate-limited reload.
    async fn key(&self, kid: &str) -> Option<Arc<Key>> {
        if let Some(key) = self.keys.load().get(kid) {
            return Some(Arc::clone(key));
        }
        if !self.may_refetch() {
            return None;
        }
        let _one_load = self.load_lock.lock().await;
        // Whoever held the lock before may just have loaded this kid, or used up the window.
        if let Some(key) = self.keys.load().get(kid) {
            return Some(Arc::clone(key));
        }
        if !self.may_refetch() {
            return None;
        }
        self.reload("a token names an unknown kid").await;
        self.keys.load().get(kid).cloned()
    }

    fn may_refetch(&self) -> bool {
        let last = *self
            .last_load
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        last.elapsed() >= self.min_refetch
    }

    /// Loads the JWKS and swaps it in; on failure keeps the current keys. The caller holds
    /// `load_lock`.
    async fn reload(&self, why: &'static str) {
        *self
            .last_load
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Instant::now();
        self.loads.fetch_add(1, Ordering::Relaxed);
        match self.source.load().await {
            Ok((keys, skipped)) => {
                tracing::debug!(jwks = %self.source, keys = keys.len(), why, "JWKS loaded");
                self.keys.store(Arc::new(keys));
                let mut before = self.skipped.lock().unwrap_or_else(PoisonError::into_inner);
                if *before != skipped {
                    warn_skipped(&self.source, &skipped);
                    *before = skipped;
                }
            }
            Err(reason) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(jwks = %self.source, %reason, why, "JWKS reload failed; the keys loaded before stay in use");
            }
        }
    }
}

/// Reloads every `every` while the verifier lives (the task holds only a weak reference).
fn spawn_refresh(shared: &Arc<Shared>, every: Duration) -> Option<AbortHandle> {
    // A period too long to add to the clock is a refresh that never comes.
    let first = Instant::now().checked_add(every)?;
    let weak = Arc::downgrade(shared);
    let task = tokio::spawn(async move {
        let mut ticks = tokio::time::interval_at(first, every);
        ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(shared) = weak.upgrade() else {
                return;
            };
            let _one_load = shared.load_lock.lock().await;
            shared.reload("periodic refresh").await;
        }
    });
    Some(task.abort_handle())
}

fn warn_skipped(source: &Source, skipped: &[String]) {
    if !skipped.is_empty() {
        tracing::warn!(jwks = %source, skipped = %skipped.join("; "), "JWKS keys skipped");
    }
}

impl Source {
    fn new(location: &JwksLocation, ca_file: Option<&std::path::Path>) -> Result<Source, JwtError> {
        let url = match location {
            JwksLocation::File(path) => return Ok(Source::File(path.clone())),
            JwksLocation::Url(url) => url,
        };
        let err = |reason: &str| JwtError::new("jwks", url, reason);
        let uri: Uri = url.parse().map_err(|e| err(&format!("not a URL: {e}")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(err(
                    "only https:// or http:// URLs or file paths are supported",
                ));
            }
        };
        let (Some(authority), Some(host)) = (uri.authority(), uri.host()) else {
            return Err(err("the URL has no host"));
        };
        // `Uri::host` keeps an IPv6 literal's brackets, which a socket address has not.
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let tls = if https {
            let name = rustls_pki_types::ServerName::try_from(host.clone()).map_err(|e| {
                err(&format!(
                    "the host is not a name a certificate can carry: {e}"
                ))
            })?;
            Some(Tls {
                connector: tls_connector(ca_file)?,
                name,
            })
        } else {
            None
        };
        Ok(Source::Http {
            url: url.clone(),
            authority: authority.as_str().to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            host,
            path: uri.path_and_query().map_or("/", |p| p.as_str()).to_owned(),
            tls,
        })
    }

    /// The usable keys and the reasons others were skipped; `Err` says why none could be had.
    async fn load(&self) -> Result<(KeySet, Vec<String>), String> {
        let bytes = match self {
            Source::File(path) => read_capped(path).await?,
            Source::Http { .. } => tokio::time::timeout(FETCH_TIMEOUT, self.fetch())
                .await
                .map_err(|_| format!("no complete answer within {FETCH_TIMEOUT:?}"))??,
        };
        parse_jwks(&bytes)
    }

    async fn fetch(&self) -> Result<Bytes, String> {
        let Source::Http {
            authority,
            host,
            port,
            path,
            tls,
            ..
        } = self
        else {
            return Err("not an http source".to_owned());
        };
        let stream = TcpStream::connect((host.as_str(), *port))
            .await
            .map_err(|e| format!("cannot connect: {e}"))?;
        let (mut sender, _conn) = match tls {
            None => handshake(stream).await?,
            Some(Tls { connector, name }) => {
                let stream = connector
                    .connect(name.clone(), stream)
                    .await
                    .map_err(|e| format!("TLS handshake failed: {e}"))?;
                handshake(stream).await?
            }
        };
        let request = Request::get(path.as_str())
            .header(HOST, authority.as_str())
            .header(ACCEPT, "application/json")
            .body(Empty::<Bytes>::new())
            .map_err(|e| format!("cannot build the request: {e}"))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let body = Limited::new(response.into_body(), MAX_JWKS_BYTES)
            .collect()
            .await
            .map_err(|e| {
                if e.is::<http_body_util::LengthLimitError>() {
                    format!("body over {MAX_JWKS_BYTES} bytes")
                } else {
                    format!("reading the body failed: {e}")
                }
            })?;
        Ok(body.to_bytes())
    }
}

/// An HTTP/1.1 client connection over `io`, its task aborted when the guard drops.
async fn handshake<T>(
    io: T,
) -> Result<
    (
        hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
        AbortOnDrop,
    ),
    String,
>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {e}"))?;
    Ok((sender, AbortOnDrop(tokio::spawn(conn).abort_handle())))
}

/// The TLS client for an `https://` JWKS: the system's roots plus `ca_file`'s certificates,
/// ring's algorithms, TLS 1.2 and 1.3 (rustls offers nothing older). Built once, at start.
fn tls_connector(
    ca_file: Option<&std::path::Path>,
) -> Result<tokio_rustls::TlsConnector, JwtError> {
    use rustls_pki_types::pem::PemObject as _;
    let mut roots = rustls::RootCertStore::empty();
    // Unreadable system certificates are skipped (rustls-native-certs reports them); the
    // store must not end up empty, which is checked below.
    let system = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(system.certs);
    if let Some(path) = ca_file {
        let shown = path.display().to_string();
        let err = |reason: String| JwtError::new("ca_file", &shown, &reason);
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .map_err(|e| err(format!("cannot read it: {e}")))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| err(format!("not PEM certificates: {e}")))?;
        if certs.is_empty() {
            return Err(err("holds no certificate".into()));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| err(format!("a certificate is not usable as a root: {e}")))?;
        }
    }
    if roots.is_empty() {
        return Err(JwtError::new(
            "ca_file",
            "",
            "no trusted certificate: the system has no CA bundle (Debian: ca-certificates); \
             name one with ca_file",
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| JwtError::new("jwks", "", format!("TLS setup failed: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::File(path) => write!(f, "{}", path.display()),
            Source::Http { url, .. } => f.write_str(url),
        }
    }
}

async fn read_capped(path: &std::path::Path) -> Result<Bytes, String> {
    let file = tokio::fs::File::open(path)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    let mut bytes = Vec::new();
    // One byte over the cap tells "at the cap" from "over it" without trusting the metadata.
    file.take(MAX_JWKS_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .await
        .map_err(|e| format!("cannot read: {e}"))?;
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(format!("file over {MAX_JWKS_BYTES} bytes"));
    }
    Ok(Bytes::from(bytes))
}

fn parse_jwks(bytes: &[u8]) -> Result<(KeySet, Vec<String>), String> {
    let set: JwkSet = serde_json::from_slice(bytes)
        .map_err(|e| format!(r#"not a JWKS (RFC 7517: {{"keys": [...]}}): {e}"#))?;
    let mut keys = KeySet::new();
    let mut skipped = Vec::new();
    for (i, value) in set.keys.into_iter().enumerate() {
        let jwk: RawJwk = match serde_json::from_value(value) {
            Ok(jwk) => jwk,
            Err(e) => {
                skipped.push(format!("key #{i}: {e}"));
                continue;
            }
        };
        let name = jwk
            .kid
            .as_deref()
            .map_or_else(|| format!("key #{i}"), |kid| format!("kid {kid:?}"));
        match key_from_jwk(&jwk) {
            Ok(key) => {
                let Some(kid) = jwk.kid else {
                    skipped.push(format!("{name}: no kid (tokens find keys by kid)"));
                    continue;
                };
                if keys.contains_key(&kid) {
                    skipped.push(format!("{name}: a second key with this kid"));
                    continue;
                }
                keys.insert(kid, Arc::new(key));
            }
            Err(reason) => skipped.push(format!("{name}: {reason}")),
        }
    }
    if keys.is_empty() {
        return Err(format!(
            "no usable key (RS256 with a 2048-8192 bit RSA key, or ES256 on P-256, each with a kid); skipped: {}",
            if skipped.is_empty() {
                "none, the set is empty".to_owned()
            } else {
                skipped.join("; ")
            }
        ));
    }
    Ok((keys, skipped))
}

/// The key of `jwk` if this module can verify with it, or why not.
fn key_from_jwk(jwk: &RawJwk) -> Result<Key, String> {
    if let Some(use_) = jwk.use_.as_deref().filter(|u| *u != "sig") {
        return Err(format!("use {use_:?}, not \"sig\""));
    }
    let alg = jwk.alg.as_deref();
    let b64 = |member: &str, value: &Option<String>| -> Result<Vec<u8>, String> {
        let value = value.as_deref().ok_or(format!("no {member}"))?;
        LENIENT_B64URL
            .decode(value)
            .map_err(|e| format!("{member} is not base64url: {e}"))
    };
    match jwk.kty.as_deref() {
        Some("RSA") => {
            if alg.is_some_and(|a| a != "RS256") {
                return Err(format!(
                    "alg {alg:?} (RSA keys are accepted for RS256 only)"
                ));
            }
            let n = b64("n", &jwk.n)?;
            let e = b64("e", &jwk.e)?;
            // ring verifies RS256 with 2048 to 8192 bit moduli and odd exponents from 3 to 33
            // bits only; a key outside that would fail every token as a bad signature, so it
            // is refused here, by name.
            let bits = significant_bits(&n);
            if !(2048..=8192).contains(&bits) {
                return Err(format!(
                    "RSA modulus of {bits} bits (2048 to 8192 accepted)"
                ));
            }
            let odd = e.last().is_some_and(|low| low & 1 == 1);
            if !odd || !(2..=33).contains(&significant_bits(&e)) {
                return Err("RSA exponent e must be odd, at least 3, at most 33 bits".to_owned());
            }
            Ok(Key {
                alg: Algorithm::RS256,
                decoding: DecodingKey::from_rsa_raw_components(&n, &e),
            })
        }
        Some("EC") => {
            if jwk.crv.as_deref() != Some("P-256") {
                return Err(format!("curve {:?} (only P-256, for ES256)", jwk.crv));
            }
            if alg.is_some_and(|a| a != "ES256") {
                return Err(format!(
                    "alg {alg:?} (P-256 keys are accepted for ES256 only)"
                ));
            }
            let x = b64("x", &jwk.x)?;
            let y = b64("y", &jwk.y)?;
            if x.len() != 32 || y.len() != 32 {
                return Err("x and y must be 32 bytes each on P-256".to_owned());
            }
            // Re-encoded canonically: jsonwebtoken reads these strictly, without padding.
            let decoding = DecodingKey::from_ec_components(
                &URL_SAFE_NO_PAD.encode(x),
                &URL_SAFE_NO_PAD.encode(y),
            )
            .map_err(|e| format!("unusable EC key: {e}"))?;
            Ok(Key {
                alg: Algorithm::ES256,
                decoding,
            })
        }
        kty => Err(format!("kty {kty:?} (RSA and EC only)")),
    }
}

/// The bit length of a big-endian unsigned integer.
fn significant_bits(n: &[u8]) -> usize {
    let n = &n[n.iter().take_while(|b| **b == 0).count()..];
    n.first()
        .map_or(0, |top| n.len() * 8 - top.leading_zeros() as usize)
}

/// The header's algorithm (RS256 or ES256) and `kid`, read before any key is chosen.
fn header(token: &str) -> Result<(Algorithm, String), Rejection> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Rejection::Malformed("token too long"));
    }
    let mut parts = token.split('.');
    let (Some(header), Some(claims), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Rejection::Malformed("not three dot-separated parts"));
    };
    // Checked here so that garbage is called malformed, not a bad signature: the signature is
    // checked before the claims are decoded.
    let base64url = |part: &str| {
        part.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !base64url(claims) || !base64url(signature) {
        return Err(Rejection::Malformed("a part is not base64url"));
    }
    let header = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| Rejection::Malformed("header is not base64url"))?;
    let header: RawHeader = serde_json::from_slice(&header)
        .map_err(|_| Rejection::Malformed("header is not a JSON object with alg"))?;
    if header.crit.is_some() {
        // RFC 7515 §4.1.11: extensions marked critical must be understood; none are here.
        return Err(Rejection::Malformed(
            "critical header extensions are not supported",
        ));
    }
    let alg = match header.alg.as_str() {
        "RS256" => Algorithm::RS256,
        "ES256" => Algorithm::ES256,
        _ => {
            return Err(Rejection::UnsupportedAlgorithm {
                alg: clip(&header.alg),
            });
        }
    };
    let kid = header.kid.ok_or(Rejection::UnknownKey { kid: None })?;
    Ok((alg, kid))
}

/// jsonwebtoken's checks for tokens of `alg`, as configured.
fn validation(alg: Algorithm, cfg: &JwtConfig) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = cfg.leeway.as_secs();
    v.validate_exp = true;
    v.validate_nbf = true;
    let mut required = vec!["exp"];
    if let Some(issuer) = &cfg.issuer {
        v.set_issuer(&[issuer]);
        required.push("iss");
    }
    if cfg.audiences.is_empty() {
        v.validate_aud = false;
    } else {
        v.set_audience(&cfg.audiences);
        required.push("aud");
    }
    v.set_required_spec_claims(&required);
    v
}

fn rejection(kind: ErrorKind, alg: Algorithm) -> Rejection {
    match kind {
        ErrorKind::InvalidSignature => Rejection::BadSignature,
        // The key could not check the signature: to the client, the same as a wrong one.
        ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) | ErrorKind::Crypto(_) => {
            Rejection::BadSignature
        }
        ErrorKind::ExpiredSignature => Rejection::Expired,
        ErrorKind::ImmatureSignature => Rejection::NotYetValid,
        ErrorKind::InvalidAudience => Rejection::WrongAudience,
        ErrorKind::InvalidIssuer => Rejection::WrongIssuer,
        ErrorKind::MissingRequiredClaim(claim) => match claim.as_str() {
            "aud" => Rejection::WrongAudience,
            "iss" => Rejection::WrongIssuer,
            _ => Rejection::Malformed("no exp claim"),
        },
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => {
            Rejection::UnsupportedAlgorithm {
                alg: format!("{alg:?}"),
            }
        }
        ErrorKind::Base64(_) => Rejection::Malformed("a part is not base64url"),
        _ => Rejection::Malformed("claims are not a JSON object of the expected types"),
    }
}

fn claims(raw: RawClaims, key_id: String) -> Claims {
    let mut scopes: Vec<String> = Vec::new();
    let mut add = |s: &str| {
        if !s.is_empty() && !scopes.iter().any(|have| have == s) {
            scopes.push(s.to_owned());
        }
    };
    raw.scope
        .iter()
        .flat_map(|s| s.split_whitespace())
        .for_each(&mut add);
    match &raw.scp {
        Some(OneOrMany::One(s)) => s.split_whitespace().for_each(&mut add),
        Some(OneOrMany::Many(list)) => list.iter().map(String::as_str).for_each(&mut add),
        None => {}
    }
    Claims {
        subject: raw.sub,
        issuer: raw.iss,
        audiences: match raw.aud {
            Some(OneOrMany::One(aud)) => vec![aud],
            Some(OneOrMany::Many(list)) => list,
            None => Vec::new(),
        },
        scopes,
        // Negative or fractional times clamp and truncate; jsonwebtoken has compared them.
        expires: raw.exp.map_or(0, |t| t as u64),
        not_before: raw.nbf.map(|t| t as u64),
        key_id,
    }
}

/// A token-supplied string, cut to 64 characters for logs and errors.
fn clip(s: &str) -> String {
    s.chars().take(64).collect()
}
