//! Bearer JWTs of an identity provider, over real gRPC and HTTP: tokens
//! signed with a key of the provider's JWKS (a file, reloaded when it
//! changes, or a URL) are admitted with the scopes they carry; expired,
//! foreign, misaddressed, unsigned and algorithm-confused tokens are 401.

mod common;

use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use common::{redis_store, Backend, TestServer, REGISTRY};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use quiver_core::Registry;
use quiver_proto::v1 as pb;
use quiver_server::auth::{key_digest, AuthSettings, KeySpec, Scope};
use quiver_server::jwt::JwtSettings;
use quiver_server::Limits;
use quiver_testkit::RedisServer;
use serde_json::{json, Value};
use tonic::Code;

const ISSUER: &str = "https://idp.test/realms/ml";
const AUDIENCE: &str = "quiver";

/// A signing key of the test provider and its JWK.
struct SigningKey {
    kid: String,
    key: rcgen::KeyPair,
}

impl SigningKey {
    fn new(kid: &str) -> SigningKey {
        SigningKey {
            kid: kid.to_owned(),
            key: rcgen::KeyPair::generate().unwrap(),
        }
    }

    fn jwk(&self) -> Value {
        let raw = self.key.public_key_raw();
        assert_eq!((raw.len(), raw[0]), (65, 4), "uncompressed P-256 point");
        json!({"kty": "EC", "crv": "P-256", "alg": "ES256", "use": "sig", "kid": self.kid,
               "x": URL_SAFE_NO_PAD.encode(&raw[1..33]), "y": URL_SAFE_NO_PAD.encode(&raw[33..])})
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        let key = EncodingKey::from_ec_der(&self.key.serialize_der());
        jsonwebtoken::encode(&header, claims, &key).unwrap()
    }
}

fn jwks(keys: &[&SigningKey]) -> String {
    json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()}).to_string()
}

/// Claims of a token for `sub` with `scope`, valid for an hour from `now`
/// (seconds).
fn claims(sub: &str, scope: &str, now: i64) -> Value {
    json!({"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
           "iat": now, "exp": now + 3600})
}

async fn start(jwt: JwtSettings) -> TestServer {
    let redis = RedisServer::start();
    let store = redis_store(&redis, Duration::from_secs(2));
    let registry = Arc::new(Registry::from_toml("r", REGISTRY).unwrap());
    let settings = AuthSettings {
        api_keys: vec![KeySpec::new(
            "ops",
            &key_digest("qv_ops.key_0123456789abcdef.0123456789"),
            &[Scope::Read],
        )],
        reload_interval: Duration::from_millis(50),
        jwt: Some(jwt),
        ..Default::default()
    };
    TestServer::start_with_auth(
        registry,
        store,
        Backend::Redis(redis),
        Limits::default(),
        None,
        None,
        Some(settings),
    )
    .await
}

fn settings() -> JwtSettings {
    JwtSettings {
        issuer: ISSUER.into(),
        audience: AUDIENCE.into(),
        ..Default::default()
    }
}

/// Status and body of a REST read and a REST write with `token`.
async fn rest(server: &TestServer, token: &str) -> ((u16, String), (u16, String)) {
    let http = reqwest::Client::new();
    let read = http
        .get(server.url("/api/v1/features/user/u1?features=user_profile:age"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    let read = (read.status().as_u16(), read.text().await.unwrap());
    let write = http
        .post(server.url("/api/v1/features/write"))
        .bearer_auth(token)
        .json(&json!({"feature_view": "user_profile", "rows": [{"entity_key": {"user_id": "u1"},
               "event_timestamp": quiver_core::time::format_rfc3339(common::now()), "features": {"age": 30}}]}))
        .send()
        .await
        .unwrap();
    let write = (write.status().as_u16(), write.text().await.unwrap());
    (read, write)
}

/// Waits (up to 5 s) until `token` is admitted: keys load in the background.
async fn admitted_soon(server: &TestServer, token: &str) {
    let mut last = (0, String::new());
    for _ in 0..100 {
        last = rest(server, token).await.0;
        if last.0 == 200 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!(
        "the token was not admitted within 5 s: {} {}",
        last.0, last.1
    );
}

async fn grpc_read(server: &TestServer, token: &str) -> Result<(), tonic::Status> {
    let mut req = tonic::Request::new(pb::GetOnlineFeaturesRequest {
        kind: Some(pb::get_online_features_request::Kind::Features(
            pb::FeatureList {
                val: vec!["user_profile:age".into()],
            },
        )),
        entities: [(
            "user_id".to_owned(),
            pb::RepeatedValue {
                val: vec![pb::Value {
                    kind: Some(pb::value::Kind::StringVal("u1".into())),
                }],
            },
        )]
        .into(),
        full_feature_names: false,
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    server
        .client()
        .await
        .get_online_features(req)
        .await
        .map(|_| ())
}

#[tokio::test]
async fn tokens_of_the_provider_carry_their_scopes() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("jwks.json");
    let k1 = SigningKey::new("k1");
    std::fs::write(&file, jwks(&[&k1])).unwrap();
    let server = start(JwtSettings {
        jwks_file: Some(file.clone()),
        ..settings()
    })
    .await;
    let now = common::now() / 1_000_000;

    // A reader: reads on both APIs, may not write.
    let reader = k1.sign(&claims("model-a", "openid read", now));
    let (read, write) = rest(&server, &reader).await;
    assert_eq!(read.0, 200, "{}", read.1);
    assert_eq!(write.0, 403, "{}", write.1);
    assert!(
        write
            .1
            .contains(r#"token of \"model-a\" lacks scope \"write\""#),
        "{}",
        write.1
    );
    grpc_read(&server, &reader).await.unwrap();
    // Scopes as an array claim work too; API keys still work beside tokens.
    let both = k1.sign(
        &json!({"iss": ISSUER, "aud": [AUDIENCE, "other"], "sub": "etl",
                               "scope": ["read", "write"], "exp": now + 60}),
    );
    let (read, write) = rest(&server, &both).await;
    assert_eq!((read.0, write.0), (200, 200), "{} {}", read.1, write.1);
    // (An API key with two dots is still an API key.)
    let (read, _) = rest(&server, "qv_ops.key_0123456789abcdef.0123456789").await;
    assert_eq!(read.0, 200, "{}", read.1);
    // A valid token granting none of quiver's scopes is refused even
    // where any key would do.
    let nothing = k1.sign(&claims("viewer", "openid profile", now));
    let (read, _) = rest(&server, &nothing).await;
    assert_eq!(read.0, 403, "{}", read.1);
    assert!(
        read.1.contains("grants none of quiver's scopes"),
        "{}",
        read.1
    );

    // Refused, each with its reason, never quoting the token.
    let other = SigningKey::new("k1");
    let mut expired = claims("model-a", "read", now - 7200);
    expired["exp"] = json!(now - 3600);
    let mut hs = Header::new(Algorithm::HS256);
    hs.kid = Some("k1".into());
    let confused = jsonwebtoken::encode(
        &hs,
        &claims("x", "read write", now),
        &EncodingKey::from_secret(k1.jwk().to_string().as_bytes()),
    )
    .unwrap();
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims("x", "read", now).to_string())
    );
    let mut wrong_aud = claims("model-a", "read", now);
    wrong_aud["aud"] = json!("someone-else");
    let mut wrong_iss = claims("model-a", "read", now);
    wrong_iss["iss"] = json!("https://evil.test/");
    let mut no_exp = claims("model-a", "read", now);
    no_exp.as_object_mut().unwrap().remove("exp");
    let mut float_nbf = claims("model-a", "read", now);
    float_nbf["nbf"] = json!(1.5);
    let cases = [
        ("expired", k1.sign(&expired), "expired at"),
        (
            "another key, same kid",
            other.sign(&claims("model-a", "read", now)),
            "InvalidSignature",
        ),
        (
            "unknown kid",
            SigningKey::new("k9").sign(&claims("model-a", "read", now)),
            "is not among the provider's keys",
        ),
        (
            "HS256 with the public key",
            confused,
            "HS256 is not accepted",
        ),
        ("alg none", unsigned, "not a well-formed JWT"),
        ("audience", k1.sign(&wrong_aud), "InvalidAudience"),
        ("issuer", k1.sign(&wrong_iss), "InvalidIssuer"),
        ("no exp", k1.sign(&no_exp), "exp"),
        (
            "nbf not whole seconds",
            k1.sign(&float_nbf),
            "nbf is not a whole number",
        ),
    ];
    for (what, token, want) in cases {
        let (read, _) = rest(&server, &token).await;
        assert_eq!(read.0, 401, "{what}: {}", read.1);
        assert!(read.1.contains(want), "{what}: {}", read.1);
        assert!(!read.1.contains(&token), "{what}: the token is echoed");
        let e = grpc_read(&server, &token).await.unwrap_err();
        assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
    }
    // A token of the next hour is refused until then (nbf), with leeway.
    let mut early = claims("model-a", "read", now);
    early["nbf"] = json!(now + 600);
    assert_eq!(rest(&server, &k1.sign(&early)).await.0 .0, 401);
    early["nbf"] = json!(now + 30);
    assert_eq!(rest(&server, &k1.sign(&early)).await.0 .0, 200);

    // The provider rotates: the file is replaced, and tokens of the new key
    // are admitted without a restart.
    let k2 = SigningKey::new("k2");
    let tmp = dir.path().join("jwks.json.tmp");
    std::fs::write(&tmp, jwks(&[&k1, &k2])).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let token = k2.sign(&claims("model-b", "read", now));
    admitted_soon(&server, &token).await;
    // A broken file keeps the keys in force.
    std::fs::write(&file, "{not json").unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(rest(&server, &token).await.0 .0, 200);
}

#[tokio::test]
async fn keys_come_from_the_providers_jwks_url() {
    let k1 = SigningKey::new("url-1");
    let body = Arc::new(std::sync::Mutex::new(jwks(&[&k1])));
    let served = body.clone();
    let app = axum::Router::new().route(
        "/jwks",
        axum::routing::get(move || {
            let b = served.lock().unwrap().clone();
            async move { ([("content-type", "application/json")], b) }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let server = start(JwtSettings {
        jwks_url: Some(format!("http://{addr}/jwks")),
        ..settings()
    })
    .await;
    let now = common::now() / 1_000_000;
    let token = k1.sign(&claims("model-a", "read", now));
    admitted_soon(&server, &token).await;
    // A key the set lacks makes the server fetch it again: once the
    // provider publishes it, its tokens are admitted.
    let k2 = SigningKey::new("url-2");
    *body.lock().unwrap() = jwks(&[&k1, &k2]);
    let token = k2.sign(&claims("model-b", "read", now));
    let first = rest(&server, &token).await.0;
    assert_eq!(first.0, 401, "{}", first.1);
    admitted_soon(&server, &token).await;
}

#[test]
fn jwt_settings_mistakes_are_named() {
    let clock: Arc<dyn quiver_core::Clock> = Arc::new(quiver_core::SystemClock);
    let cases = [
        (
            JwtSettings {
                issuer: String::new(),
                ..settings()
            },
            "issuer is empty",
        ),
        (
            JwtSettings {
                audience: String::new(),
                ..settings()
            },
            "audience is empty",
        ),
        (settings(), "jwks_url"),
        (
            JwtSettings {
                jwks_url: Some("http://idp.example.com/jwks".into()),
                ..settings()
            },
            "plain http",
        ),
        (
            JwtSettings {
                jwks_url: Some("https://idp/jwks".into()),
                jwks_refresh: Duration::ZERO,
                ..settings()
            },
            "jwks_refresh must be at least 10s",
        ),
        (
            JwtSettings {
                jwks_url: Some("https://idp/jwks".into()),
                leeway: Duration::from_secs(86_400),
                ..settings()
            },
            "leeway must be at most 5m",
        ),
        (
            JwtSettings {
                jwks_url: Some("ftp://x".into()),
                ..settings()
            },
            "not an http(s) URL",
        ),
        (
            JwtSettings {
                jwks_file: Some("/nonexistent/jwks.json".into()),
                ..settings()
            },
            "cannot read JWKS file",
        ),
    ];
    for (s, want) in cases {
        let e = quiver_server::jwt::JwtVerifier::new(s, clock.clone()).unwrap_err();
        assert!(e.contains(want), "{e}");
    }
    // Token names are not API key names.
    let settings = AuthSettings {
        api_keys: vec![KeySpec::new("jwt:alice", &key_digest("k"), &[Scope::Read])],
        ..Default::default()
    };
    let e = quiver_server::auth::Authenticator::new(settings, clock).unwrap_err();
    assert!(e.contains("jwt:"), "{e}");
}
