//! Bearer tokens from an identity provider: JWTs (RFC 7519) signed with a
//! key of the provider's JWKS (RFC 7517), for organisations whose callers
//! already get tokens from an OIDC provider (Keycloak, Okta, Auth0, Entra
//! ID, Google, Dex, ...). Checked by the same layer as API keys
//! ([`crate::auth`]); a request carries either.
//!
//! # What is checked
//! - the signature, with the JWKS key named by the token's `kid` (or the
//!   only key when the set has one); only asymmetric algorithms (RS*, PS*,
//!   ES*, EdDSA), the JWK's own `alg` when it names one, else one of the
//!   key's type: a token signed with `HS256` using the public key as
//!   secret, or `alg: none`, is refused;
//! - `iss` equals `issuer`, `aud` is or contains `audience`;
//! - `exp` (required) and `nbf` against the server's clock, with `leeway`;
//! - scopes: the `scopes_claim` claim (a space-separated string, as OAuth
//!   2.0's `scope`, or an array, as `scp` or `roles`) holding
//!   `{scope_prefix}read`, `{scope_prefix}write`, `{scope_prefix}admin`.
//!
//! The caller's name is `jwt:` and the `name_claim` claim (default `sub`);
//! it appears in logs and messages and is the unit of per-caller limits.
//! Tokens are never logged.
//!
//! # Keys
//! From `jwks_file` (read again when it changes and on SIGHUP) or
//! `jwks_url` (fetched at start, every `jwks_refresh`, and again, at most
//! every 30 s, when a token names a key id the set lacks: the provider
//! rotated its keys). A set that does not load leaves the previous one in
//! force.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use quiver_core::{Clock, Error, ErrorKind};
use serde_json::Value as Json;

use crate::auth::{Principal, Scope};
use crate::watch::{Files, Reload};

/// The `[auth.jwt]` settings.
#[derive(Debug, Clone, PartialEq, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JwtSettings {
    /// The provider's issuer identifier (`iss`), e.g. `https://idp.example.com/realms/ml`.
    pub issuer: String,
    /// This API's identifier, which tokens must name in `aud`.
    pub audience: String,
    /// A JWKS file (`{"keys": [...]}`).
    pub jwks_file: Option<PathBuf>,
    /// The provider's JWKS URL (`jwks_uri` of its OIDC discovery document).
    pub jwks_url: Option<String>,
    /// How often `jwks_url` is fetched again.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub jwks_refresh: Duration,
    /// The claim holding the scopes (`scope`, `scp`, `roles`, ...).
    pub scopes_claim: String,
    /// Prefix of quiver's scopes in that claim (`"quiver:"` for `quiver:read`).
    pub scope_prefix: String,
    /// The claim naming the caller.
    pub name_claim: String,
    /// Clock skew allowed for `exp` and `nbf`.
    #[serde(deserialize_with = "quiver_core::time::deserialize_duration")]
    pub leeway: Duration,
}

impl Default for JwtSettings {
    fn default() -> Self {
        JwtSettings {
            issuer: String::new(),
            audience: String::new(),
            jwks_file: None,
            jwks_url: None,
            jwks_refresh: Duration::from_secs(300),
            scopes_claim: "scope".to_owned(),
            scope_prefix: String::new(),
            name_claim: "sub".to_owned(),
            leeway: Duration::from_secs(60),
        }
    }
}

impl JwtSettings {
    /// Checks the settings.
    ///
    /// # Errors
    /// A message naming the setting that is missing or malformed.
    pub fn check(&self) -> Result<(), String> {
        if self.issuer.trim().is_empty() {
            return Err(
                "auth.jwt.issuer is empty; give the provider's issuer (the iss of its tokens)"
                    .into(),
            );
        }
        if self.audience.trim().is_empty() {
            return Err(
                "auth.jwt.audience is empty; give this API's identifier (the aud its tokens name)"
                    .into(),
            );
        }
        if self.jwks_refresh < Duration::from_secs(10) {
            return Err("auth.jwt.jwks_refresh must be at least 10s".into());
        }
        if self.leeway > Duration::from_secs(300) {
            return Err(
                "auth.jwt.leeway must be at most 5m (it extends every token's life)".into(),
            );
        }
        match (&self.jwks_file, &self.jwks_url) {
            (Some(_), Some(_)) => Err("auth.jwt: give jwks_file or jwks_url, not both".into()),
            (None, None) => Err(
                "auth.jwt needs the provider's keys: jwks_url (its jwks_uri) or jwks_file".into(),
            ),
            (None, Some(u)) => check_jwks_url(u),
            _ => Ok(()),
        }
    }
}

/// The JWKS is the trust anchor: anyone who can alter it mints tokens. So
/// `https://` only (plain `http://` to a loopback address, a sidecar or a
/// test, aside).
fn check_jwks_url(u: &str) -> Result<(), String> {
    let url =
        url::Url::parse(u).map_err(|e| format!("auth.jwt.jwks_url {u:?} is not a URL: {e}"))?;
    let loopback = match url.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    };
    match url.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        "http" => Err(format!(
            "auth.jwt.jwks_url {u:?} is plain http: whoever can alter it on the way can sign tokens; use the provider's https:// jwks_uri"
        )),
        _ => Err(format!("auth.jwt.jwks_url {u:?} is not an http(s) URL")),
    }
}

/// Asymmetric algorithms only: a verifier that accepts HMAC with a public
/// key as secret can be fooled by anyone who has that public key.
const ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Verifies tokens against the provider's keys.
pub struct JwtVerifier {
    settings: JwtSettings,
    keys: ArcSwap<JwkSet>,
    files: Files,
    clock: Arc<dyn Clock>,
    /// When `jwks_url` was last fetched because of an unknown key id.
    last_miss_fetch: Mutex<Option<Instant>>,
    http: reqwest::Client,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.settings.issuer)
            .field("keys", &self.keys.load().keys.len())
            .finish_non_exhaustive()
    }
}

/// The signature keys of a JWKS text. Keys of other uses (`"use":
/// "enc"`) and keys this verifier cannot read (an algorithm it does not
/// know) are left out, with a warning; a set with no usable key is an
/// error.
fn parse_jwks(text: &str, origin: &str) -> Result<JwkSet, String> {
    #[derive(serde::Deserialize)]
    struct RawSet {
        keys: Vec<Json>,
    }
    let raw: RawSet = serde_json::from_str(text)
        .map_err(|e| format!("{origin} is not a JWKS ({{\"keys\": [...]}}): {e}"))?;
    let mut keys = Vec::with_capacity(raw.keys.len());
    for (i, k) in raw.keys.into_iter().enumerate() {
        if k.get("use")
            .and_then(Json::as_str)
            .is_some_and(|u| u != "sig")
        {
            continue;
        }
        match serde_json::from_value::<Jwk>(k) {
            Ok(jwk) => keys.push(jwk),
            Err(e) => tracing::warn!(
                origin,
                key = i,
                error = %e,
                "JWKS key left out: it cannot verify tokens here"
            ),
        }
    }
    if keys.is_empty() {
        return Err(format!("{origin} holds no signature key quiver can use"));
    }
    Ok(JwkSet { keys })
}

impl JwtVerifier {
    /// Checks `settings` and loads the JWKS file (a URL is fetched by
    /// [`JwtVerifier::watch`]).
    ///
    /// # Errors
    /// A message naming the setting or the file that is wrong.
    pub fn new(settings: JwtSettings, clock: Arc<dyn Clock>) -> Result<JwtVerifier, String> {
        settings.check()?;
        let v = JwtVerifier {
            files: Files::new(settings.jwks_file.iter().cloned().collect()),
            settings,
            keys: ArcSwap::from_pointee(JwkSet { keys: Vec::new() }),
            clock,
            last_miss_fetch: Mutex::new(None),
            // No redirects: one could lead off https to a place that can
            // be altered.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .map_err(|e| format!("auth.jwt: no HTTP client: {e}"))?,
        };
        if v.settings.jwks_file.is_some() {
            Reload::reload(&v)?;
        }
        Ok(v)
    }

    /// Fetches `jwks_url` once and puts its keys in force.
    ///
    /// # Errors
    /// Why the set was not fetched or not usable (the previous stays).
    pub async fn fetch(&self) -> Result<usize, String> {
        let Some(url) = &self.settings.jwks_url else {
            return Ok(self.keys.load().keys.len());
        };
        let resp = self
            .http
            .get(url)
            .send()
            .await
            .and_then(reqwest::Response::error_for_status)
            .map_err(|e| format!("fetching the JWKS {url}: {e}"))?;
        let text = resp
            .text()
            .await
            .map_err(|e| format!("reading the JWKS {url}: {e}"))?;
        let set = parse_jwks(&text, url)?;
        let n = set.keys.len();
        self.keys.store(Arc::new(set));
        Ok(n)
    }

    /// Keeps the keys fresh until `stop`: the file on change and SIGHUP,
    /// the URL at once and every `jwks_refresh`.
    pub fn watch(
        self: Arc<Self>,
        every: Duration,
        stop: impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        if self.settings.jwks_url.is_none() {
            crate::watch::watch(self, every, stop);
            return;
        }
        tokio::spawn(async move {
            tokio::pin!(stop);
            loop {
                // A failed fetch is tried again soon, not a refresh later.
                let next = match self.fetch().await {
                    Ok(n) => {
                        tracing::info!(keys = n, "JWKS fetched");
                        self.settings.jwks_refresh
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "JWKS not fetched; the keys fetched before stay in force");
                        self.settings.jwks_refresh.min(Duration::from_secs(10))
                    }
                };
                tokio::select! {
                    _ = &mut stop => return,
                    _ = tokio::time::sleep(next) => {}
                }
            }
        });
    }

    /// A token names a key id the set lacks: fetch the URL again in the
    /// background, at most every 30 s.
    fn refetch_on_miss(self: &Arc<Self>) {
        // Before the first fetch succeeded the watch loop is fetching (and
        // retries every jwks_refresh): no second fetch, no spent interval.
        if self.settings.jwks_url.is_none() || self.keys.load().keys.is_empty() {
            return;
        }
        {
            let mut last = self
                .last_miss_fetch
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(30)) {
                return;
            }
            *last = Some(Instant::now());
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let me = self.clone();
            rt.spawn(async move {
                if let Err(e) = me.fetch().await {
                    tracing::warn!(error = %e, "JWKS not fetched after an unknown key id");
                }
            });
        }
    }

    /// The principal of a verified token.
    ///
    /// # Errors
    /// `UNAUTHENTICATED` saying what is wrong with the token (never
    /// quoting it).
    pub fn verify(self: &Arc<Self>, token: &str) -> Result<Arc<Principal>, Error> {
        let bad = |m: String| Error::new(ErrorKind::Unauthenticated, m);
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| bad(format!("the bearer token is not a well-formed JWT ({e})")))?;
        if !ALGORITHMS.contains(&header.alg) {
            return Err(bad(format!(
                "JWT algorithm {:?} is not accepted; tokens are signed with an asymmetric key of the provider (RS256, ES256, ...)",
                header.alg
            )));
        }
        let keys = self.keys.load();
        let jwk: &Jwk = match &header.kid {
            Some(kid) => match keys.find(kid) {
                Some(k) => k,
                None => {
                    self.refetch_on_miss();
                    return Err(bad(format!(
                        "the JWT's key id {} is not among the provider's keys ({} loaded); if the provider just rotated its keys, retry shortly",
                        quiver_core::error::quote(kid),
                        keys.keys.len()
                    )));
                }
            },
            None if keys.keys.len() == 1 => &keys.keys[0],
            None => {
                return Err(bad(
                    "the JWT has no key id (kid) and the provider has several keys".into(),
                ))
            }
        };
        if let Some(alg) = jwk.common.key_algorithm {
            if format!("{alg:?}") != format!("{:?}", header.alg) {
                return Err(bad(format!(
                    "the JWT's algorithm {:?} is not its key's ({alg:?})",
                    header.alg
                )));
            }
        }
        let key = DecodingKey::from_jwk(jwk)
            .map_err(|e| bad(format!("the provider's key cannot verify tokens: {e}")))?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.settings.issuer]);
        validation.set_audience(&[&self.settings.audience]);
        // Times are checked below against the server's clock.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.set_required_spec_claims(&["exp", "iss", "aud"]);
        let data = jsonwebtoken::decode::<serde_json::Map<String, Json>>(token, &key, &validation)
            .map_err(|e| bad(format!("the JWT is not valid: {e}")))?;
        let claims = data.claims;
        let now = self.clock.now_micros() / 1_000_000;
        let leeway = self.settings.leeway.as_secs() as i64;
        let num = |name: &str| claims.get(name).and_then(Json::as_i64);
        let exp = num("exp")
            .ok_or_else(|| bad("the JWT's exp is not a whole number of seconds".into()))?;
        if now >= exp.saturating_add(leeway) {
            return Err(bad(format!(
                "the JWT expired at {}; get a new token from the provider",
                quiver_core::time::format_rfc3339(exp.saturating_mul(1_000_000))
            )));
        }
        if claims.contains_key("nbf") {
            let nbf = num("nbf")
                .ok_or_else(|| bad("the JWT's nbf is not a whole number of seconds".into()))?;
            if now < nbf.saturating_sub(leeway) {
                return Err(bad("the JWT is not valid yet (nbf)".into()));
            }
        }
        let name = match claims.get(&self.settings.name_claim) {
            Some(Json::String(s)) if !s.is_empty() => s.clone(),
            _ => {
                return Err(bad(format!(
                    "the JWT has no {} claim naming the caller",
                    self.settings.name_claim
                )))
            }
        };
        let granted: Vec<&str> = match claims.get(&self.settings.scopes_claim) {
            Some(Json::String(s)) => s.split_whitespace().collect(),
            Some(Json::Array(a)) => a.iter().filter_map(Json::as_str).collect(),
            _ => Vec::new(),
        };
        let scopes: Vec<Scope> = [Scope::Read, Scope::Write, Scope::Admin]
            .into_iter()
            .filter(|s| {
                granted.iter().any(|g| {
                    g.strip_prefix(self.settings.scope_prefix.as_str()) == Some(s.as_str())
                })
            })
            .collect();
        if scopes.is_empty() {
            let p = &self.settings.scope_prefix;
            return Err(Error::denied(format!(
                "token of {} grants none of quiver's scopes ({p}read, {p}write, {p}admin in its {} claim)",
                quiver_core::error::quote(&name),
                self.settings.scopes_claim
            )));
        }
        Ok(Principal::from_token(format!("jwt:{name}"), &scopes))
    }
}

impl Reload for JwtVerifier {
    const WHAT: &'static str = "JWKS";

    fn files(&self) -> &Files {
        &self.files
    }

    fn reload(&self) -> Result<String, String> {
        let Some(path) = &self.settings.jwks_file else {
            return Ok("no file".into());
        };
        let versions = self.files.versions();
        let result = std::fs::read_to_string(path)
            .map_err(|e| format!("cannot read JWKS file {}: {e}", path.display()))
            .and_then(|t| parse_jwks(&t, &format!("JWKS file {}", path.display())));
        self.files.mark(versions);
        let set = result?;
        let n = set.keys.len();
        self.keys.store(Arc::new(set));
        Ok(format!("{n} keys in force"))
    }
}
