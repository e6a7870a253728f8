//! Authentication and authorization of API calls: one tower layer,
//! [`AuthLayer`], in front of both the gRPC service and the REST gateway,
//! so that the two cannot drift.
//!
//! # API keys
//! Callers send `authorization: Bearer <key>` (gRPC metadata or HTTP
//! header; RFC 6750). quiver never stores a key: the configuration and the
//! keys file hold the SHA-256 digest of each (hex), and a request's key is
//! hashed and compared with every configured digest in constant time
//! (`subtle`). Keys are random 256-bit secrets (`quiver auth create-key`),
//! so a fast hash is the right one (as for GitHub's tokens): there is
//! nothing to brute-force that a slow hash would protect.
//!
//! Each key has a name (logged, never the key), scopes, optionally an
//! expiry, and optionally the feature views, feature services and event
//! types it is limited to:
//! - `read`: GetOnlineFeatures, GetHistoricalFeatures, GetRegistry and
//!   their REST paths;
//! - `write`: WriteFeatures, PushEvents and their REST paths;
//! - `admin`: `/metrics` when it is protected (operations, no feature
//!   data: a metrics scraper gets `admin` alone).
//!
//! Scopes do not imply each other; a key may have several.
//!
//! # Identity-provider tokens
//! With `[auth.jwt]`, a bearer JWT signed by the organisation's identity
//! provider is accepted as well, with the scopes its `scope` claim gives
//! (see [`crate::jwt`]).
//!
//! # Answers
//! No key, an unknown (or revoked) key, an expired key: `UNAUTHENTICATED`
//! / HTTP 401 with `WWW-Authenticate: Bearer`. A valid key without the
//! scope, or outside its feature views, services or event types:
//! `PERMISSION_DENIED` / HTTP 403. Messages name the key (by its name) and
//! what is missing; they never contain the key.
//!
//! # Rotation
//! The keys file is read again when it changes (checked every
//! `reload_interval`) and on SIGHUP; a file that does not load leaves the
//! previous keys in force and is reported at ERROR level.

use std::collections::BTreeSet;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use axum::extract::MatchedPath;
use axum::http::{header, HeaderMap, HeaderValue, Request, Response};
use quiver_core::time::{format_rfc3339, parse_rfc3339, Micros};
use quiver_core::{Clock, Error, ErrorKind};
use serde::de::IgnoredAny;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use tonic::transport::server::TcpConnectInfo;

use crate::grpc::HISTORICAL_PATH;
use crate::jwt::{JwtSettings, JwtVerifier};
use crate::limit::{CallerId, InFlight, Permit};
use crate::watch::{Files, Reload};

/// What a key may do. Scopes do not imply each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    /// Read features and the registry.
    Read,
    /// Write features and push events.
    Write,
    /// Operations: `/metrics` when protected.
    Admin,
}

impl Scope {
    /// The scope's name in configuration and messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        match self {
            Scope::Read => 1,
            Scope::Write => 2,
            Scope::Admin => 4,
        }
    }
}

/// One API key as configured (`[[auth.api_keys]]` or `[[keys]]` of the
/// keys file).
#[derive(Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeySpec {
    /// Who or what holds the key (logged; unique).
    pub name: String,
    /// SHA-256 digest of the key, 64 hex digits (`quiver auth hash-key`).
    #[serde(default)]
    pub sha256: String,
    /// At least one of `read`, `write`, `admin`.
    #[serde(default)]
    pub scopes: Vec<Scope>,
    /// RFC 3339 time from which the key is refused.
    #[serde(default)]
    pub expires: Option<String>,
    /// When set, the only feature views the key reads or writes.
    #[serde(default)]
    pub feature_views: Option<Vec<String>>,
    /// When set, feature services the key reads even if it is limited to
    /// feature views that do not cover them.
    #[serde(default)]
    pub feature_services: Option<Vec<String>>,
    /// When set, the only event types the key pushes.
    #[serde(default)]
    pub event_types: Option<Vec<String>>,
    /// Most requests of this key in flight at once, instead of
    /// `limits.max_in_flight_per_key`.
    #[serde(default)]
    pub max_in_flight: Option<usize>,
    /// A key in plain text: refused, with the way to store its digest.
    #[serde(default)]
    key: Option<IgnoredAny>,
    /// Another spelling of the same mistake.
    #[serde(default)]
    token: Option<IgnoredAny>,
}

impl std::fmt::Debug for KeySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySpec")
            .field("name", &self.name)
            .field("scopes", &self.scopes)
            .field("expires", &self.expires)
            .finish_non_exhaustive()
    }
}

impl KeySpec {
    /// A key named `name` with `scopes` whose digest is `sha256`.
    pub fn new(name: &str, sha256: &str, scopes: &[Scope]) -> KeySpec {
        KeySpec {
            name: name.to_owned(),
            sha256: sha256.to_owned(),
            scopes: scopes.to_vec(),
            expires: None,
            feature_views: None,
            feature_services: None,
            event_types: None,
            max_in_flight: None,
            key: None,
            token: None,
        }
    }
}

/// The SHA-256 digest of `key`, as configured: 64 lower-case hex digits.
pub fn key_digest(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Who a request was authenticated as, and what it may do.
#[derive(Debug)]
pub struct Principal {
    name: String,
    scopes: u8,
    feature_views: Option<BTreeSet<String>>,
    feature_services: Option<BTreeSet<String>>,
    event_types: Option<BTreeSet<String>>,
    max_in_flight: Option<usize>,
}

static UNRESTRICTED: LazyLock<Arc<Principal>> = LazyLock::new(|| {
    Arc::new(Principal {
        name: "anonymous".to_owned(),
        scopes: Scope::Read.bit() | Scope::Write.bit() | Scope::Admin.bit(),
        feature_views: None,
        feature_services: None,
        event_types: None,
        max_in_flight: None,
    })
});

impl Principal {
    /// Every scope, no limits: callers when authentication is off, and
    /// quiver's own in-process callers (the demo's seeding and generator).
    pub fn unrestricted() -> Arc<Principal> {
        UNRESTRICTED.clone()
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The principal of a verified identity-provider token
    /// ([`crate::jwt`]): `name` with `scopes`, no view, service or event
    /// type limits.
    pub fn from_token(name: String, scopes: &[Scope]) -> Arc<Principal> {
        Arc::new(Principal {
            name,
            scopes: scopes.iter().fold(0, |b, s| b | s.bit()),
            feature_views: None,
            feature_services: None,
            event_types: None,
            max_in_flight: None,
        })
    }

    /// Whether the key has `scope`.
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes & scope.bit() != 0
    }

    /// Whether the key may read or write features of view `view`.
    pub fn may_use_view(&self, view: &str) -> bool {
        self.feature_views.as_ref().is_none_or(|v| v.contains(view))
    }

    /// Whether the key is limited to some feature views.
    pub fn limited_to_views(&self) -> bool {
        self.feature_views.is_some()
    }

    /// Whether the key names feature service `service` explicitly.
    pub fn names_service(&self, service: &str) -> bool {
        self.feature_services
            .as_ref()
            .is_some_and(|s| s.contains(service))
    }

    /// The key's own concurrency limit, when it has one.
    pub fn max_in_flight(&self) -> Option<usize> {
        self.max_in_flight
    }

    /// Whether the key may push events of type `event_type`.
    pub fn may_push(&self, event_type: &str) -> bool {
        self.event_types
            .as_ref()
            .is_none_or(|t| t.contains(event_type))
    }

    fn scope_list(&self) -> String {
        let names: Vec<&str> = [Scope::Read, Scope::Write, Scope::Admin]
            .into_iter()
            .filter(|s| self.has(*s))
            .map(Scope::as_str)
            .collect();
        if names.is_empty() {
            "none".to_owned()
        } else {
            names.join(", ")
        }
    }
}

struct Key {
    digest: [u8; 32],
    principal: Arc<Principal>,
    expires_at: Option<Micros>,
}

/// The keys in force.
#[derive(Default)]
struct KeySet {
    keys: Vec<Key>,
}

impl KeySet {
    /// Checks and converts `specs` (read from `origin`).
    fn from_specs(specs: &[KeySpec], origin: &str) -> Result<KeySet, String> {
        let mut keys: Vec<Key> = Vec::with_capacity(specs.len());
        let mut names = BTreeSet::new();
        for (i, s) in specs.iter().enumerate() {
            let at = |m: String| format!("{origin}: key {} ({:?}): {m}", i + 1, s.name);
            if s.key.is_some() || s.token.is_some() {
                return Err(at(
                    "keys are not stored in plain text: replace the key by `sha256 = \"<digest>\"` (print it with `quiver auth hash-key`) and keep the key itself only with its holder".to_owned(),
                ));
            }
            if s.name.trim().is_empty() {
                return Err(at("name is empty; give each key a name".to_owned()));
            }
            if s.name.starts_with("jwt:") {
                return Err(at(
                    "names starting with \"jwt:\" are those of identity-provider tokens; choose another".to_owned(),
                ));
            }
            if !names.insert(s.name.as_str()) {
                return Err(at("another key has this name; names are unique".to_owned()));
            }
            let mut digest = [0u8; 32];
            if hex::decode_to_slice(s.sha256.trim(), &mut digest).is_err() {
                return Err(at(
                    "sha256 must be the key's SHA-256 digest, 64 hex digits (print it with `quiver auth hash-key`)".to_owned(),
                ));
            }
            if keys.iter().any(|k| k.digest == digest) {
                return Err(at(
                    "another key has the same digest; give each holder its own key".to_owned(),
                ));
            }
            if s.scopes.is_empty() {
                return Err(at(
                    "scopes is empty; give at least one of \"read\", \"write\", \"admin\""
                        .to_owned(),
                ));
            }
            if s.max_in_flight == Some(0) {
                return Err(at(
                    "max_in_flight is 0, which refuses every request; give at least 1 or leave it out for limits.max_in_flight_per_key".to_owned(),
                ));
            }
            let expires_at = match &s.expires {
                None => None,
                Some(t) => Some(parse_rfc3339(t).map_err(|e| at(format!("expires: {e}")))?),
            };
            let set = |v: &Option<Vec<String>>| v.as_ref().map(|v| v.iter().cloned().collect());
            keys.push(Key {
                digest,
                expires_at,
                principal: Arc::new(Principal {
                    name: s.name.clone(),
                    scopes: s.scopes.iter().fold(0, |b, s| b | s.bit()),
                    feature_views: set(&s.feature_views),
                    feature_services: set(&s.feature_services),
                    event_types: set(&s.event_types),
                    max_in_flight: s.max_in_flight,
                }),
            });
        }
        Ok(KeySet { keys })
    }

    /// The key whose digest is `digest`, compared with every key in
    /// constant time.
    fn find(&self, digest: &[u8; 32]) -> Option<&Key> {
        let mut found = None;
        for k in &self.keys {
            if bool::from(k.digest.ct_eq(digest)) {
                found = Some(k);
            }
        }
        found
    }
}

/// The `[auth]` settings.
#[derive(Debug, Clone, Default)]
pub struct AuthSettings {
    /// Keys given in the configuration itself.
    pub api_keys: Vec<KeySpec>,
    /// A TOML file of `[[keys]]`, read again when it changes and on SIGHUP.
    pub keys_file: Option<PathBuf>,
    /// `/health`, `/ready` and `grpc.health.v1` need a key (any scope).
    pub protect_health: bool,
    /// `/metrics` needs a key with scope `admin`.
    pub protect_metrics: bool,
    /// How often the keys file is checked for changes.
    pub reload_interval: Duration,
    /// Bearer JWTs of an identity provider, besides API keys.
    pub jwt: Option<JwtSettings>,
}

impl AuthSettings {
    /// Whether any key source is configured (authentication is on).
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.keys_file.is_some() || self.jwt.is_some()
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct KeysFile {
    #[serde(default)]
    keys: Vec<KeySpec>,
}

/// Checks requests' API keys against the configured ones.
pub struct Authenticator {
    settings: AuthSettings,
    keys: ArcSwap<KeySet>,
    files: Files,
    clock: Arc<dyn Clock>,
    jwt: Option<Arc<JwtVerifier>>,
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("keys", &self.keys.load().keys.len())
            .field("keys_file", &self.settings.keys_file)
            .finish_non_exhaustive()
    }
}

/// What a request needs to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Nothing (documentation; health and metrics unless protected).
    Open,
    /// A valid key of any scope.
    AnyKey,
    /// A valid key with this scope, for this operation.
    Scope(Scope, &'static str),
}

impl Authenticator {
    /// Loads the keys (the configured ones and the keys file's).
    ///
    /// # Errors
    /// A message naming the file and key when a key is malformed, two keys
    /// share a name or digest, or the file cannot be read.
    pub fn new(settings: AuthSettings, clock: Arc<dyn Clock>) -> Result<Authenticator, String> {
        let jwt = match &settings.jwt {
            Some(j) => Some(Arc::new(JwtVerifier::new(j.clone(), clock.clone())?)),
            None => None,
        };
        let auth = Authenticator {
            files: Files::new(settings.keys_file.iter().cloned().collect()),
            settings,
            keys: ArcSwap::from_pointee(KeySet::default()),
            clock,
            jwt,
        };
        auth.reload()?;
        Ok(auth)
    }

    /// Reads the keys file again and puts its keys (with the configured
    /// ones) in force; on an error the previous keys stay in force.
    /// Returns the number of keys in force.
    pub fn reload(&self) -> Result<usize, String> {
        let versions = self.files.versions();
        let result = self.load();
        // Marked even when it failed: the error is logged once per change.
        self.files.mark(versions);
        let set = result?;
        let n = set.keys.len();
        self.keys.store(Arc::new(set));
        Ok(n)
    }

    fn load(&self) -> Result<KeySet, String> {
        let mut specs = self.settings.api_keys.clone();
        let mut origin = "auth.api_keys".to_owned();
        if let Some(path) = &self.settings.keys_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read keys file {}: {e}", path.display()))?;
            let file: KeysFile = toml::from_str(&text)
                .map_err(|e| format!("keys file {}: {}", path.display(), e.message()))?;
            specs.extend(file.keys);
            origin = format!("auth.api_keys and keys file {}", path.display());
        }
        KeySet::from_specs(&specs, &origin)
    }

    /// Reloads the keys file when it changes and on SIGHUP, until `stop`
    /// resolves (see [`AuthSettings::reload_interval`]).
    pub fn watch(self: Arc<Self>, stop: impl Future<Output = ()> + Send + 'static) {
        let every = self.settings.reload_interval;
        crate::watch::watch(self, every, stop);
    }

    /// Keeps the identity provider's keys fresh until `stop` (see
    /// [`JwtVerifier::watch`]); nothing without `[auth.jwt]`.
    pub fn watch_jwks(&self, stop: impl Future<Output = ()> + Send + 'static) {
        if let Some(jwt) = &self.jwt {
            jwt.clone().watch(self.settings.reload_interval, stop);
        }
    }

    /// The identity-provider token verifier, when `[auth.jwt]` is set.
    pub fn jwt(&self) -> Option<&Arc<JwtVerifier>> {
        self.jwt.as_ref()
    }

    /// The principal of a request needing `access`; `None` for open
    /// access.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` (no key, malformed header, unknown or expired
    /// key) or `PERMISSION_DENIED` (the key lacks the scope).
    pub fn admit(
        &self,
        headers: &HeaderMap,
        access: Access,
    ) -> Result<Option<Arc<Principal>>, Error> {
        if access == Access::Open {
            return Ok(None);
        }
        let unauthenticated = |m: &str| Error::new(ErrorKind::Unauthenticated, m);
        let mut values = headers.get_all(header::AUTHORIZATION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            return Err(if headers.contains_key(header::AUTHORIZATION) {
                unauthenticated("send one authorization header, not several")
            } else {
                unauthenticated(
                    "this server needs an API key: send the header `authorization: Bearer <key>`",
                )
            });
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, rest) = v.split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or_else(|| unauthenticated("the authorization header is not `Bearer <key>`"))?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let keys = self.keys.load();
        let Some(key) = keys.find(&digest) else {
            // Not an API key: a JWT of the identity provider (three
            // base64url parts), when one is configured.
            if let Some(jwt) = &self.jwt {
                if token.bytes().filter(|b| *b == b'.').count() == 2 {
                    let p = jwt.verify(token)?;
                    return check_scope(&p, access).map(|()| Some(p));
                }
            }
            return Err(unauthenticated(
                "the API key is not valid (unknown or revoked)",
            ));
        };
        let p = &key.principal;
        if let Some(at) = key.expires_at {
            if self.clock.now_micros() >= at {
                return Err(unauthenticated(&format!(
                    "API key {:?} expired at {}; ask for a new one",
                    p.name,
                    format_rfc3339(at)
                )));
            }
        }
        check_scope(p, access)?;
        Ok(Some(p.clone()))
    }
}

/// `PERMISSION_DENIED` unless `p` has the scope `access` needs.
fn check_scope(p: &Principal, access: Access) -> Result<(), Error> {
    if let Access::Scope(scope, op) = access {
        if !p.has(scope) {
            let who = match p.name.strip_prefix("jwt:") {
                Some(sub) => format!("token of {}", quiver_core::error::quote(sub)),
                None => format!("API key {}", quiver_core::error::quote(&p.name)),
            };
            return Err(Error::denied(format!(
                "{who} lacks scope {:?}, which {op} needs (it has: {})",
                scope.as_str(),
                p.scope_list()
            )));
        }
    }
    Ok(())
}

impl Reload for Authenticator {
    const WHAT: &'static str = "API keys";

    fn files(&self) -> &Files {
        &self.files
    }

    fn reload(&self) -> Result<String, String> {
        Authenticator::reload(self).map(|n| format!("{n} keys in force"))
    }
}

/// The access a gRPC method needs.
pub fn grpc_access(path: &str, settings: &AuthSettings) -> Access {
    if let Some(m) = path.strip_prefix("/quiver.v1.FeatureService/") {
        return match m {
            "GetOnlineFeatures" => Access::Scope(Scope::Read, "GetOnlineFeatures"),
            "GetHistoricalFeatures" => Access::Scope(Scope::Read, "GetHistoricalFeatures"),
            "GetRegistry" => Access::Scope(Scope::Read, "GetRegistry"),
            "WriteFeatures" => Access::Scope(Scope::Write, "WriteFeatures"),
            "PushEvents" => Access::Scope(Scope::Write, "PushEvents"),
            _ => Access::AnyKey,
        };
    }
    if path.starts_with("/grpc.health.v1.Health/") {
        return if settings.protect_health {
            Access::AnyKey
        } else {
            Access::Open
        };
    }
    // Reflection (the schema, no data), unknown services and methods.
    Access::AnyKey
}

/// The access a REST route (its template, as axum matched it) needs;
/// `None` for a path no route matched.
pub fn http_access(route: Option<&str>, settings: &AuthSettings) -> Access {
    match route {
        Some("/api/v1/features/:entity/:id") => {
            Access::Scope(Scope::Read, "GET /api/v1/features/{entity}/{id}")
        }
        Some("/api/v1/features/online") => {
            Access::Scope(Scope::Read, "POST /api/v1/features/online")
        }
        Some("/api/v1/registry") => Access::Scope(Scope::Read, "GET /api/v1/registry"),
        Some("/api/v1/features/write") => {
            Access::Scope(Scope::Write, "POST /api/v1/features/write")
        }
        Some("/api/v1/events") => Access::Scope(Scope::Write, "POST /api/v1/events"),
        Some("/health" | "/ready") if !settings.protect_health => Access::Open,
        Some("/health" | "/ready") => Access::AnyKey,
        Some("/metrics") if !settings.protect_metrics => Access::Open,
        Some("/metrics") => Access::Scope(Scope::Admin, "GET /metrics"),
        Some("/openapi.json") => Access::Open,
        // The API viewer and its assets (crate::openapi::DOCS_PATH).
        Some(r) if r == "/docs" || r.starts_with("/docs/") => Access::Open,
        _ => Access::AnyKey,
    }
}

/// Which API a layer guards: decides how a refusal is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// gRPC: a trailers-only response with `grpc-status`.
    Grpc,
    /// REST: a JSON error body with the HTTP status.
    Http,
}

/// A response body a refusal can be written in.
pub trait DenialBody {
    /// The body of a refusal: the JSON text for REST, empty for gRPC.
    fn denial(json: Option<String>) -> Self;
}

impl DenialBody for axum::body::Body {
    fn denial(json: Option<String>) -> Self {
        axum::body::Body::from(json.unwrap_or_default())
    }
}

impl DenialBody for tonic::body::BoxBody {
    fn denial(_: Option<String>) -> Self {
        tonic::body::empty_body()
    }
}

/// The layer in front of both APIs: finds the access a request needs,
/// admits it (the [`Principal`] goes into the request's extensions) or
/// answers the refusal itself; then holds the caller to
/// `limits.max_in_flight_per_key` (see [`crate::limit`]) and the request to
/// `limits.request_timeout`. Without an [`Authenticator`], every request is
/// admitted as [`Principal::unrestricted`] and limited per client address.
#[derive(Debug, Clone)]
pub struct AuthLayer {
    guard: Arc<Guard>,
}

#[derive(Debug)]
struct Guard {
    auth: Option<Arc<Authenticator>>,
    transport: Transport,
    in_flight: Arc<InFlight>,
    max_in_flight: usize,
    timeout: Duration,
}

impl AuthLayer {
    /// The layer of `service`'s API on `transport`: its authenticator (if
    /// any), its limits, and the in-flight counts both transports share.
    pub fn new(service: &crate::FeatureServer, transport: Transport) -> Self {
        let limits = service.limits();
        AuthLayer {
            guard: Arc::new(Guard {
                auth: service.authenticator().cloned(),
                transport,
                in_flight: service.in_flight().clone(),
                max_in_flight: limits.max_in_flight_per_key,
                timeout: limits.request_timeout,
            }),
        }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> AuthService<S> {
        AuthService {
            inner,
            guard: self.guard.clone(),
        }
    }
}

/// The service of [`AuthLayer`].
#[derive(Debug, Clone)]
pub struct AuthService<S> {
    inner: S,
    guard: Arc<Guard>,
}

fn refusal<R: DenialBody>(transport: Transport, e: &Error) -> Response<R> {
    let message = crate::error::bounded(e.message());
    let mut resp = match transport {
        Transport::Grpc => {
            let mut r = Response::new(R::denial(None));
            let code = crate::error::grpc_code(e.kind()) as i32;
            let h = r.headers_mut();
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/grpc"),
            );
            h.insert("grpc-status", HeaderValue::from(code));
            let text: String =
                percent_encoding::utf8_percent_encode(&message, crate::grpc::GRPC_MESSAGE)
                    .collect();
            if let Ok(v) = HeaderValue::from_str(&text) {
                h.insert("grpc-message", v);
            }
            r
        }
        Transport::Http => {
            let body =
                serde_json::json!({"error": {"code": e.kind().as_str(), "message": message}});
            let mut r = Response::new(R::denial(Some(body.to_string())));
            *r.status_mut() = crate::error::http_status(e.kind());
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            r
        }
    };
    if e.kind() == ErrorKind::Unauthenticated {
        // RFC 6750 section 3.
        resp.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"quiver\""),
        );
    }
    if e.kind() == ErrorKind::TooManyRequests {
        // RFC 9110 section 10.2.3: a hint, not a promise.
        resp.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    }
    resp
}

impl Guard {
    /// The principal of `req`, or the refusal.
    /// The principal of `req` and whether its route is open, or the
    /// refusal.
    fn admit<B>(&self, req: &Request<B>) -> Result<(Option<Arc<Principal>>, bool), Error> {
        static NO_AUTH: LazyLock<AuthSettings> = LazyLock::new(AuthSettings::default);
        let settings = self.auth.as_ref().map_or(&*NO_AUTH, |a| &a.settings);
        let access = match self.transport {
            Transport::Grpc => grpc_access(req.uri().path(), settings),
            Transport::Http => http_access(
                req.extensions()
                    .get::<MatchedPath>()
                    .map(MatchedPath::as_str),
                settings,
            ),
        };
        let open = access == Access::Open;
        match &self.auth {
            None => Ok((Some(Principal::unrestricted()), open)),
            Some(auth) => auth.admit(req.headers(), access).map(|p| (p, open)),
        }
    }

    /// A slot among the caller's requests in flight, or the refusal.
    /// Requests of open routes (health and metrics unless protected,
    /// documentation) are not counted, with or without keys: a probe or a
    /// scraper is never refused because its address or key is busy.
    fn slot<B>(
        &self,
        req: &Request<B>,
        principal: Option<&Principal>,
        open: bool,
    ) -> Result<Option<Permit>, Error> {
        let Some(p) = principal.filter(|_| !open) else {
            return Ok(None);
        };
        let (id, max) = if self.auth.is_some() {
            (
                CallerId::Key(p.name().to_owned()),
                p.max_in_flight().unwrap_or(self.max_in_flight),
            )
        } else {
            let peer = req
                .extensions()
                .get::<TcpConnectInfo>()
                .and_then(TcpConnectInfo::remote_addr);
            let id = peer.map_or(CallerId::Local, |a| CallerId::Peer(a.ip()));
            (id, self.max_in_flight)
        };
        match self.in_flight.try_acquire(id.clone(), max) {
            Some(permit) => Ok(Some(permit)),
            None => Err(Error::new(
                ErrorKind::TooManyRequests,
                format!(
                    "{id} already has {max} requests in flight (limits.max_in_flight_per_key); wait for answers before sending more, or retry later"
                ),
            )),
        }
    }
}

impl<S, B, R> tower::Service<Request<B>> for AuthService<S>
where
    S: tower::Service<Request<B>, Response = Response<R>>,
    S::Future: Send + 'static,
    R: DenialBody + Send + 'static,
{
    type Response = Response<R>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Response<R>, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let guard = &self.guard;
        let transport = guard.transport;
        let admitted = guard.admit(&req).and_then(|(principal, open)| {
            let permit = guard.slot(&req, principal.as_deref(), open)?;
            Ok((principal, permit))
        });
        match admitted {
            Ok((principal, permit)) => {
                if let Some(p) = principal {
                    req.extensions_mut().insert(p);
                }
                // Streamed training sets are bounded by their own limits
                // and the caller's deadline, not by the unary timeout.
                let timeout = (req.uri().path() != HISTORICAL_PATH).then_some(guard.timeout);
                let call = self.inner.call(req);
                Box::pin(async move {
                    let result = match timeout {
                        None => call.await,
                        Some(timeout) => match tokio::time::timeout(timeout, call).await {
                            Ok(result) => result,
                            Err(_) => {
                                let e = Error::new(
                                ErrorKind::DeadlineExceeded,
                                format!(
                                    "the request took longer than limits.request_timeout ({}); retry, or ask for less per request",
                                    humantime::format_duration(timeout)
                                ),
                            );
                                tracing::warn!(error = %e, "request timed out");
                                Ok(refusal(transport, &e))
                            }
                        },
                    };
                    drop(permit);
                    result
                })
            }
            Err(e) => {
                tracing::debug!(error = %e, path = %crate::error::bounded(req.uri().path()), "request refused");
                let resp = refusal(transport, &e);
                Box::pin(async move { Ok(resp) })
            }
        }
    }
}

/// The principal the [`AuthLayer`] admitted a request as.
///
/// # Errors
/// `INTERNAL` when the request did not pass the layer (a wiring bug:
/// refused rather than served without a check).
pub fn principal_of(extensions: &axum::http::Extensions) -> Result<Arc<Principal>, Error> {
    extensions.get::<Arc<Principal>>().cloned().ok_or_else(|| {
        Error::internal("the request reached a handler without passing authentication")
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use quiver_core::ManualClock;

    fn auth(specs: Vec<KeySpec>) -> Authenticator {
        let settings = AuthSettings {
            api_keys: specs,
            ..Default::default()
        };
        Authenticator::new(settings, Arc::new(ManualClock::new(1_000_000))).unwrap()
    }

    fn bearer(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {key}").parse().unwrap(),
        );
        h
    }

    #[test]
    fn keys_are_checked_by_digest_scope_and_expiry() {
        let mut expired = KeySpec::new("old", &key_digest("k-old"), &[Scope::Read]);
        expired.expires = Some("1970-01-01T00:00:01Z".to_owned());
        let a = auth(vec![
            KeySpec::new("reader", &key_digest("k-read"), &[Scope::Read]),
            expired,
        ]);
        let read = Access::Scope(Scope::Read, "GetOnlineFeatures");
        let write = Access::Scope(Scope::Write, "WriteFeatures");
        let p = a.admit(&bearer("k-read"), read).unwrap().unwrap();
        assert_eq!(p.name(), "reader");
        let e = a.admit(&bearer("k-read"), write).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::PermissionDenied);
        assert!(e.message().contains("lacks scope \"write\""), "{e}");
        let e = a.admit(&bearer("k-nope"), read).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unauthenticated);
        assert!(!e.message().contains("k-nope"), "{e}");
        let e = a.admit(&bearer("k-old"), read).unwrap_err();
        assert!(
            e.message().contains("expired at 1970-01-01T00:00:01"),
            "{e}"
        );
        let e = a.admit(&HeaderMap::new(), read).unwrap_err();
        assert!(e.message().contains("authorization: Bearer"), "{e}");
        let mut basic = HeaderMap::new();
        basic.insert(header::AUTHORIZATION, "Basic a2V5".parse().unwrap());
        assert_eq!(
            a.admit(&basic, read).unwrap_err().kind(),
            ErrorKind::Unauthenticated
        );
        assert!(a.admit(&HeaderMap::new(), Access::Open).unwrap().is_none());
    }

    #[test]
    fn malformed_key_specs_are_refused_by_item() {
        let d = key_digest("x");
        let cases: Vec<(KeySpec, &str)> = vec![
            (KeySpec::new("", &d, &[Scope::Read]), "name is empty"),
            (KeySpec::new("a", "abc", &[Scope::Read]), "64 hex digits"),
            (KeySpec::new("a", &d, &[]), "scopes is empty"),
        ];
        for (spec, want) in cases {
            let e = KeySet::from_specs(&[spec], "test").err().unwrap();
            assert!(e.contains(want), "{e}");
        }
        let twice = [
            KeySpec::new("a", &d, &[Scope::Read]),
            KeySpec::new("a", &key_digest("y"), &[Scope::Read]),
        ];
        assert!(KeySet::from_specs(&twice, "t")
            .err()
            .unwrap()
            .contains("unique"));
        let same = [
            KeySpec::new("a", &d, &[Scope::Read]),
            KeySpec::new("b", &d, &[Scope::Read]),
        ];
        assert!(KeySet::from_specs(&same, "t")
            .err()
            .unwrap()
            .contains("same digest"));
        let plain: KeysFile =
            toml::from_str("[[keys]]\nname = \"a\"\nkey = \"secret\"\nscopes = [\"read\"]\n")
                .unwrap();
        let e = KeySet::from_specs(&plain.keys, "t").err().unwrap();
        assert!(
            e.contains("not stored in plain text") && !e.contains("secret"),
            "{e}"
        );
    }
}
