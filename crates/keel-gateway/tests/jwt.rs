//! `keel_gateway::jwt`: tokens signed here with the fixture keys (`tests/fixtures/README.md`)
//! against a JWKS from a file or from a tiny HTTP server on 127.0.0.1 that counts its requests.
#![cfg(feature = "jwt")]
#![allow(clippy::unwrap_used)]

use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keel_gateway::jwt::{JwksLocation, JwtConfig, Rejection, Verifier, bearer_token};
use serde_json::{Value, json};
use tokio::net::TcpListener;

const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "keel";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The DER inside a PEM fixture: PKCS#1 for the RSA keys, PKCS#8 for the EC key, as
/// jsonwebtoken's `from_rsa_der` / `from_ec_der` (ring) want them.
fn der(name: &str) -> Vec<u8> {
    let pem = std::fs::read_to_string(fixture(name)).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

fn rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_der(&der("rsa-1.pem"))
}

fn other_rsa_key() -> EncodingKey {
    EncodingKey::from_rsa_der(&der("rsa-other.pem"))
}

fn ec_key() -> EncodingKey {
    EncodingKey::from_ec_der(&der("ec-1.pem"))
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims every test starts from: valid for five more minutes, for this gateway.
fn good_claims() -> Value {
    json!({
        "sub": "user-1",
        "iss": ISSUER,
        "aud": AUDIENCE,
        "exp": now() + 300,
        "scope": "orders:read orders:write",
    })
}

fn sign(alg: Algorithm, kid: &str, claims: &Value, key: &EncodingKey) -> String {
    let mut header = Header::new(alg);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, key).unwrap()
}

fn rs256(claims: &Value) -> String {
    sign(Algorithm::RS256, "rsa-1", claims, &rsa_key())
}

fn with(mut claims: Value, key: &str, value: Value) -> Value {
    claims[key] = value;
    claims
}

fn without(mut claims: Value, key: &str) -> Value {
    claims.as_object_mut().unwrap().remove(key);
    claims
}

fn config(jwks: JwksLocation) -> JwtConfig {
    JwtConfig {
        issuer: Some(ISSUER.to_owned()),
        audiences: vec![AUDIENCE.to_owned()],
        ..JwtConfig::new(jwks)
    }
}

async fn verifier() -> Verifier {
    Verifier::new(config(JwksLocation::File(fixture("jwks.json"))))
        .await
        .unwrap()
}

/// A token from raw JSON parts, for what jsonwebtoken would refuse to build.
fn hand_built(header: &str, claims: &Value, signature: &str) -> String {
    format!(
        "{}.{}.{signature}",
        URL_SAFE_NO_PAD.encode(header),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    )
}

#[tokio::test]
async fn a_valid_rs256_token_is_accepted_with_its_subject_and_scopes() {
    let v = verifier().await;
    let claims = good_claims();
    let got = v.verify(&rs256(&claims)).await.unwrap();
    assert_eq!(got.subject.as_deref(), Some("user-1"));
    assert_eq!(got.issuer.as_deref(), Some(ISSUER));
    assert_eq!(got.audiences, vec![AUDIENCE]);
    assert_eq!(got.scopes, vec!["orders:read", "orders:write"]);
    assert!(got.has_scope("orders:write"));
    assert!(!got.has_scope("orders"));
    assert_eq!(got.expires, claims["exp"].as_u64().unwrap());
    assert_eq!(got.key_id, "rsa-1");
}

#[tokio::test]
async fn a_valid_es256_token_is_accepted_with_aud_as_an_array_and_scp() {
    let v = verifier().await;
    let claims = json!({
        "sub": "svc-billing",
        "iss": ISSUER,
        "aud": ["someone-else", AUDIENCE],
        "exp": now() + 300,
        "scope": "a b",
        "scp": ["b", "c"],
    });
    let got = v
        .verify(&sign(Algorithm::ES256, "ec-1", &claims, &ec_key()))
        .await
        .unwrap();
    assert_eq!(got.subject.as_deref(), Some("svc-billing"));
    assert_eq!(got.audiences, vec!["someone-else", AUDIENCE]);
    assert_eq!(
        got.scopes,
        vec!["a", "b", "c"],
        "merged, no duplicates, in order"
    );
    assert_eq!(got.key_id, "ec-1");
}

#[tokio::test]
async fn expiry_is_checked_with_the_leeway() {
    let v = verifier().await;
    let expired = with(good_claims(), "exp", json!(now() - 120));
    assert_eq!(v.verify(&rs256(&expired)).await, Err(Rejection::Expired));

    // 10 s past `exp` is within the default minute of leeway…
    let just = with(good_claims(), "exp", json!(now() - 10));
    assert!(v.verify(&rs256(&just)).await.is_ok());
    // …and not within none.
    let strict = Verifier::new(JwtConfig {
        leeway: Duration::ZERO,
        ..config(JwksLocation::File(fixture("jwks.json")))
    })
    .await
    .unwrap();
    assert_eq!(strict.verify(&rs256(&just)).await, Err(Rejection::Expired));

    let no_exp = without(good_claims(), "exp");
    assert!(matches!(
        v.verify(&rs256(&no_exp)).await,
        Err(Rejection::Malformed(_))
    ));
}

#[tokio::test]
async fn a_token_not_valid_yet_is_refused() {
    let v = verifier().await;
    let future = with(good_claims(), "nbf", json!(now() + 600));
    assert_eq!(v.verify(&rs256(&future)).await, Err(Rejection::NotYetValid));
    let skewed = with(good_claims(), "nbf", json!(now() + 10));
    assert!(v.verify(&rs256(&skewed)).await.is_ok(), "within the leeway");
}

#[tokio::test]
async fn the_audience_must_be_ours() {
    let v = verifier().await;
    for aud in [json!("someone-else"), json!(["a", "b"]), json!([])] {
        let claims = with(good_claims(), "aud", aud.clone());
        assert_eq!(
            v.verify(&rs256(&claims)).await,
            Err(Rejection::WrongAudience),
            "aud {aud}"
        );
    }
    let missing = without(good_claims(), "aud");
    assert_eq!(
        v.verify(&rs256(&missing)).await,
        Err(Rejection::WrongAudience)
    );
}

#[tokio::test]
async fn the_issuer_must_be_ours() {
    let v = verifier().await;
    let other = with(good_claims(), "iss", json!("https://evil.example"));
    assert_eq!(v.verify(&rs256(&other)).await, Err(Rejection::WrongIssuer));
    let missing = without(good_claims(), "iss");
    assert_eq!(
        v.verify(&rs256(&missing)).await,
        Err(Rejection::WrongIssuer)
    );
}

#[tokio::test]
async fn without_issuer_or_audiences_configured_neither_is_checked() {
    let v = Verifier::new(JwtConfig::new(JwksLocation::File(fixture("jwks.json"))))
        .await
        .unwrap();
    let claims = with(
        with(good_claims(), "iss", json!("anyone")),
        "aud",
        json!("anything"),
    );
    assert!(v.verify(&rs256(&claims)).await.is_ok());
}

#[tokio::test]
async fn an_unknown_kid_is_refused() {
    let v = verifier().await;
    let token = sign(Algorithm::RS256, "nope", &good_claims(), &rsa_key());
    assert_eq!(
        v.verify(&token).await,
        Err(Rejection::UnknownKey {
            kid: Some("nope".to_owned())
        })
    );
    let no_kid =
        jsonwebtoken::encode(&Header::new(Algorithm::RS256), &good_claims(), &rsa_key()).unwrap();
    assert_eq!(
        v.verify(&no_kid).await,
        Err(Rejection::UnknownKey { kid: None })
    );
}

#[tokio::test]
async fn alg_none_is_refused() {
    let v = verifier().await;
    for header in [
        r#"{"alg":"none","typ":"JWT"}"#,
        r#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#,
        r#"{"alg":"None","kid":"rsa-1"}"#,
    ] {
        let token = hand_built(header, &good_claims(), "");
        let got = v.verify(&token).await;
        assert!(
            matches!(&got, Err(Rejection::UnsupportedAlgorithm { alg }) if alg.eq_ignore_ascii_case("none")),
            "{header}: {got:?}"
        );
    }
}

#[tokio::test]
async fn hs256_signed_with_the_public_key_is_refused() {
    // The classic key confusion: a verifier that lets the header pick the algorithm would
    // take the RSA public key (which anyone has) as the HMAC secret and accept this.
    let public_pem = std::fs::read(fixture("rsa-1.pub.pem")).unwrap();
    let token = sign(
        Algorithm::HS256,
        "rsa-1",
        &good_claims(),
        &EncodingKey::from_secret(&public_pem),
    );
    // The forgery is real: HMAC with the public key as the secret does verify it.
    let mut naive = jsonwebtoken::Validation::new(Algorithm::HS256);
    naive.set_audience(&[AUDIENCE]);
    assert!(
        jsonwebtoken::decode::<Value>(
            &token,
            &jsonwebtoken::DecodingKey::from_secret(&public_pem),
            &naive
        )
        .is_ok()
    );

    let v = verifier().await;
    assert_eq!(
        v.verify(&token).await,
        Err(Rejection::UnsupportedAlgorithm {
            alg: "HS256".to_owned()
        })
    );
}

#[tokio::test]
async fn the_header_alg_must_be_the_keys_own() {
    let v = verifier().await;
    // A genuine ES256 signature, but naming the RSA key: refused before any signature check.
    let token = sign(Algorithm::ES256, "rsa-1", &good_claims(), &ec_key());
    assert!(matches!(
        v.verify(&token).await,
        Err(Rejection::UnsupportedAlgorithm { .. })
    ));
    let token = sign(Algorithm::RS256, "ec-1", &good_claims(), &rsa_key());
    assert!(matches!(
        v.verify(&token).await,
        Err(Rejection::UnsupportedAlgorithm { .. })
    ));
    // RS384 / PS256 with a known RSA kid: not an accepted algorithm at all.
    for alg in [Algorithm::RS384, Algorithm::PS256] {
        let token = sign(alg, "rsa-1", &good_claims(), &rsa_key());
        assert!(matches!(
            v.verify(&token).await,
            Err(Rejection::UnsupportedAlgorithm { .. })
        ));
    }
}

#[tokio::test]
async fn a_signature_by_another_key_or_over_other_claims_is_bad() {
    let v = verifier().await;
    let forged = sign(Algorithm::RS256, "rsa-1", &good_claims(), &other_rsa_key());
    assert_eq!(v.verify(&forged).await, Err(Rejection::BadSignature));

    // A real signature moved onto different claims.
    let genuine = rs256(&good_claims());
    let promoted = rs256(&with(good_claims(), "sub", json!("admin")));
    let (head_and_claims, _) = promoted.rsplit_once('.').unwrap();
    let (_, signature) = genuine.rsplit_once('.').unwrap();
    let spliced = format!("{head_and_claims}.{signature}");
    assert_eq!(v.verify(&spliced).await, Err(Rejection::BadSignature));

    let es = sign(Algorithm::ES256, "ec-1", &good_claims(), &ec_key());
    let (rest, sig) = es.rsplit_once('.').unwrap();
    let mut sig = URL_SAFE_NO_PAD.decode(sig).unwrap();
    sig[10] ^= 1;
    let flipped = format!("{rest}.{}", URL_SAFE_NO_PAD.encode(sig));
    assert_eq!(v.verify(&flipped).await, Err(Rejection::BadSignature));
}

#[tokio::test]
async fn garbage_is_malformed() {
    let v = verifier().await;
    let good = rs256(&good_claims());
    let (header, rest) = good.split_once('.').unwrap();
    let (_, signature) = rest.split_once('.').unwrap();
    let cases = [
        String::new(),
        "garbage".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        "!!!.###.$$$".to_owned(),
        format!("{good}.x"),
        // A header that is base64url of something that is not JSON.
        format!("{}.{rest}", URL_SAFE_NO_PAD.encode("not json")),
        // Claims that are not base64url, or (correctly signed) not an object of the right types.
        format!("{header}.***.{signature}"),
        rs256(&json!("x")),
        rs256(&json!([1, 2])),
        rs256(&with(good_claims(), "exp", json!("tomorrow"))),
        rs256(&with(good_claims(), "sub", json!(42))),
        "x".repeat(20_000),
        hand_built(
            r#"{"alg":"RS256","kid":"rsa-1","crit":["exp"]}"#,
            &good_claims(),
            "c2ln",
        ),
    ];
    for token in cases {
        let got = v.verify(&token).await;
        assert!(
            matches!(got, Err(Rejection::Malformed(_))),
            "{:?}: {got:?}",
            token.get(..40).unwrap_or(&token)
        );
    }
}

#[tokio::test]
async fn every_rejection_is_a_401_with_a_bearer_challenge() {
    let all = [
        Rejection::Malformed("x"),
        Rejection::UnsupportedAlgorithm {
            alg: "none".to_owned(),
        },
        Rejection::UnknownKey { kid: None },
        Rejection::BadSignature,
        Rejection::Expired,
        Rejection::NotYetValid,
        Rejection::WrongAudience,
        Rejection::WrongIssuer,
    ];
    let mut descriptions = Vec::new();
    for r in &all {
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let challenge = r.www_authenticate();
        let text = challenge.to_str().unwrap();
        let description = text
            .strip_prefix(r#"Bearer error="invalid_token", error_description=""#)
            .and_then(|d| d.strip_suffix('"'))
            .unwrap_or_else(|| panic!("{text}"));
        assert!(!description.is_empty() && !description.contains(['"', '\\']));
        descriptions.push(description.to_owned());
        assert!(!r.to_string().is_empty());
    }
    descriptions.dedup();
    assert_eq!(descriptions.len(), all.len(), "each says what is wrong");
}

#[tokio::test]
async fn verify_can_run_on_any_worker_thread() {
    fn send<T: Send>(t: T) -> T {
        t
    }
    let v = Arc::new(verifier().await);
    let token = rs256(&good_claims());
    let task = tokio::spawn(send(async move { v.verify(&token).await }));
    assert!(task.await.unwrap().is_ok());
}

#[test]
fn bearer_tokens_are_read_from_authorization() {
    let mut headers = HeaderMap::new();
    assert_eq!(bearer_token(&headers), None);
    for (value, want) in [
        ("Bearer abc.def.ghi", Some("abc.def.ghi")),
        ("bearer  abc", Some("abc")),
        ("Basic dXNlcjpwYXNz", None),
        ("Bearer ", None),
        ("Bearer", None),
    ] {
        headers.insert(http::header::AUTHORIZATION, HeaderValue::from_static(value));
        assert_eq!(bearer_token(&headers), want, "{value}");
    }
}

#[tokio::test]
async fn config_errors_name_the_setting_its_value_and_why() {
    let missing = fixture("no-such-jwks.json");
    let err = Verifier::new(JwtConfig::new(JwksLocation::File(missing.clone())))
        .await
        .unwrap_err();
    assert_eq!(err.key(), "jwks");
    assert_eq!(err.value(), missing.display().to_string());
    assert!(err.reason().contains("cannot read"), "{err}");
    assert!(err.to_string().contains("no-such-jwks.json"), "{err}");

    let err = Verifier::new(JwtConfig::new(JwksLocation::File(fixture("rsa-1.pem"))))
        .await
        .unwrap_err();
    assert!(err.reason().starts_with("not a JWKS"), "{err}");

    let err = Verifier::new(JwtConfig::new(JwksLocation::File(fixture(
        "jwks-unusable.json",
    ))))
    .await
    .unwrap_err();
    assert!(err.reason().starts_with("no usable key"), "{err}");
    for named in [
        r#""hmac-1""#,
        r#""rsa-384""#,
        r#""rsa-enc""#,
        r#""ed-1""#,
        r#""ec-384""#,
        r#""rsa-small""#,
        "no kid",
    ] {
        assert!(err.reason().contains(named), "{named} in {err}");
    }

    let err = Verifier::new(JwtConfig::new(JwksLocation::parse(
        "ftp://issuer.example/jwks",
    )))
    .await
    .unwrap_err();
    assert!(err.reason().contains("only https:// or http://"), "{err}");

    let no_ca = fixture("no-such-ca.pem");
    let err = Verifier::new(JwtConfig {
        ca_file: Some(no_ca.clone()),
        ..JwtConfig::new(JwksLocation::parse("https://127.0.0.1:1/jwks.json"))
    })
    .await
    .unwrap_err();
    assert_eq!(
        (err.key(), err.value()),
        ("ca_file", &*no_ca.display().to_string())
    );
    assert!(err.reason().contains("cannot read"), "{err}");
    let err = Verifier::new(JwtConfig {
        ca_file: Some(fixture("jwks.json")),
        ..JwtConfig::new(JwksLocation::parse("https://127.0.0.1:1/jwks.json"))
    })
    .await
    .unwrap_err();
    assert_eq!(err.key(), "ca_file");
    assert!(err.reason().contains("no certificate"), "{err}");

    let err = Verifier::new(JwtConfig {
        refresh: Duration::ZERO,
        ..JwtConfig::new(JwksLocation::File(fixture("jwks.json")))
    })
    .await
    .unwrap_err();
    assert_eq!((err.key(), err.value()), ("refresh", "0ns"));
}

#[tokio::test]
async fn unusable_keys_are_skipped_and_the_rest_used() {
    let v = Verifier::new(config(JwksLocation::File(fixture("jwks-mixed.json"))))
        .await
        .unwrap();
    assert_eq!(v.stats().keys, 1);
    assert!(v.verify(&rs256(&good_claims())).await.is_ok());
    // The same RSA key is in the set as "rsa-384" (RS384): not usable, so not known.
    let token = sign(Algorithm::RS256, "rsa-384", &good_claims(), &rsa_key());
    assert!(matches!(
        v.verify(&token).await,
        Err(Rejection::UnknownKey { .. })
    ));
}

/// A JWKS endpoint on 127.0.0.1 serving whatever `body` holds with `status`, counting requests.
struct JwksServer {
    addr: SocketAddr,
    body: Arc<Mutex<String>>,
    status: Arc<AtomicU16>,
    hits: Arc<AtomicUsize>,
}

impl JwksServer {
    async fn start(body: String) -> JwksServer {
        JwksServer::start_with("127.0.0.1", body, None).await
    }

    /// Over TLS on `ip`, with the fixture certificate for `localhost` and 127.0.0.1 (signed by
    /// the fixture CA, `tls-ca.pem`).
    async fn start_tls(ip: &str, body: String) -> JwksServer {
        use rustls_pki_types::pem::PemObject as _;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(fixture("tls-server.pem"))
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key =
            rustls_pki_types::PrivateKeyDer::from_pem_file(fixture("tls-server.key")).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        JwksServer::start_with(ip, body, Some(acceptor)).await
    }

    async fn start_with(
        ip: &str,
        body: String,
        tls: Option<tokio_rustls::TlsAcceptor>,
    ) -> JwksServer {
        let listener = TcpListener::bind((ip, 0)).await.unwrap();
        let server = JwksServer {
            addr: listener.local_addr().unwrap(),
            body: Arc::new(Mutex::new(body)),
            status: Arc::new(AtomicU16::new(200)),
            hits: Arc::new(AtomicUsize::new(0)),
        };
        let (body, status, hits) = (
            server.body.clone(),
            server.status.clone(),
            server.hits.clone(),
        );
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (body, status, hits) = (body.clone(), status.clone(), hits.clone());
                let service = service_fn(move |_request| {
                    hits.fetch_add(1, Ordering::SeqCst);
                    let response = Response::builder()
                        .status(status.load(Ordering::SeqCst))
                        .header("content-type", "application/json")
                        .body(Full::new(Bytes::from(body.lock().unwrap().clone())))
                        .unwrap();
                    async move { Ok::<_, Infallible>(response) }
                });
                let tls = tls.clone();
                tokio::spawn(async move {
                    let http = hyper::server::conn::http1::Builder::new();
                    match tls {
                        None => {
                            let _ = http.serve_connection(TokioIo::new(stream), service).await;
                        }
                        // A client that refuses the certificate ends the handshake here.
                        Some(tls) => {
                            if let Ok(stream) = tls.accept(stream).await {
                                let _ = http.serve_connection(TokioIo::new(stream), service).await;
                            }
                        }
                    }
                });
            }
        });
        server
    }

    fn url(&self) -> JwksLocation {
        JwksLocation::Url(format!("http://{}/.well-known/jwks.json", self.addr))
    }

    /// The `https://` URL, by `host` (the certificate names `localhost` and 127.0.0.1).
    fn https_url(&self, host: &str) -> JwksLocation {
        let port = self.addr.port();
        JwksLocation::Url(format!("https://{host}:{port}/.well-known/jwks.json"))
    }

    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    fn add_key(&self, jwk: Value) {
        let mut body = self.body.lock().unwrap();
        let mut jwks: Value = serde_json::from_str(&body).unwrap();
        jwks["keys"].as_array_mut().unwrap().push(jwk);
        *body = jwks.to_string();
    }
}

fn jwks_json() -> String {
    std::fs::read_to_string(fixture("jwks.json")).unwrap()
}

fn rotated_jwk() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixture("rsa-other.jwk.json")).unwrap()).unwrap()
}

#[tokio::test]
async fn a_key_added_to_the_served_jwks_is_found_by_a_refetch() {
    let server = JwksServer::start(jwks_json()).await;
    let v = Verifier::new(JwtConfig {
        min_refetch: Duration::from_millis(300),
        refresh: Duration::from_secs(3600),
        ..config(server.url())
    })
    .await
    .unwrap();
    assert_eq!(server.hits(), 1);
    assert!(v.verify(&rs256(&good_claims())).await.is_ok());

    server.add_key(rotated_jwk());
    let token = sign(Algorithm::RS256, "rsa-2", &good_claims(), &other_rsa_key());
    // Right after start-up the window is closed: no fetch, not found yet.
    assert!(matches!(
        v.verify(&token).await,
        Err(Rejection::UnknownKey { .. })
    ));
    assert_eq!(server.hits(), 1);

    tokio::time::sleep(Duration::from_millis(400)).await;
    let got = v.verify(&token).await.unwrap();
    assert_eq!(got.key_id, "rsa-2");
    assert_eq!(server.hits(), 2, "one refetch");
    // Now cached: no more fetches, and the keys before stay.
    assert!(v.verify(&token).await.is_ok());
    assert!(v.verify(&rs256(&good_claims())).await.is_ok());
    assert_eq!(server.hits(), 2);
    assert_eq!(v.stats().keys, 3);
}

#[tokio::test]
async fn a_flood_of_unknown_kids_costs_at_most_one_fetch_per_window() {
    let server = JwksServer::start(jwks_json()).await;
    let v = Verifier::new(JwtConfig {
        min_refetch: Duration::from_secs(1),
        refresh: Duration::from_secs(3600),
        ..config(server.url())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(1100)).await;

    let flood = |round: usize| {
        let v = &v;
        futures_util::future::join_all((0..100).map(move |i| async move {
            let token = sign(
                Algorithm::RS256,
                &format!("random-{round}-{i}"),
                &good_claims(),
                &rsa_key(),
            );
            v.verify(&token).await
        }))
    };
    let answers = flood(0).await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Err(Rejection::UnknownKey { .. })))
    );
    assert_eq!(server.hits(), 2, "the window was open: exactly one refetch");
    flood(1).await;
    assert_eq!(server.hits(), 2, "the window is closed again");
    assert_eq!(v.stats().loads, 2);
}

#[tokio::test]
async fn a_failed_refresh_keeps_the_keys_loaded_before() {
    let server = JwksServer::start(jwks_json()).await;
    let v = Verifier::new(JwtConfig {
        refresh: Duration::from_millis(100),
        ..config(server.url())
    })
    .await
    .unwrap();
    server.status.store(500, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let stats = v.stats();
    assert!(stats.failures >= 2, "{stats:?}");
    assert_eq!(stats.keys, 2);
    assert!(v.verify(&rs256(&good_claims())).await.is_ok());

    // And the periodic refresh picks up a rotation once the endpoint is back.
    server.add_key(rotated_jwk());
    server.status.store(200, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(350)).await;
    assert_eq!(v.stats().keys, 3);

    // Dropped, the verifier stops refreshing.
    drop(v);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let after_drop = server.hits();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(server.hits(), after_drop);
}

#[tokio::test]
async fn a_jwks_endpoint_that_fails_at_start_up_is_an_error() {
    let server = JwksServer::start(jwks_json()).await;
    server.status.store(404, Ordering::SeqCst);
    let err = Verifier::new(config(server.url())).await.unwrap_err();
    assert_eq!(err.key(), "jwks");
    assert!(err.value().starts_with("http://127.0.0.1:"), "{err}");
    assert!(err.reason().contains("404"), "{err}");

    server.status.store(200, Ordering::SeqCst);
    *server.body.lock().unwrap() = format!(r#"{{"keys":[],"pad":"{}"}}"#, "x".repeat(2 << 20));
    let err = Verifier::new(config(server.url())).await.unwrap_err();
    assert!(err.reason().contains("body over 1048576 bytes"), "{err}");

    // Nothing listens here any more: bind, take the port, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = Verifier::new(config(JwksLocation::Url(format!(
        "http://127.0.0.1:{port}/jwks"
    ))))
    .await
    .unwrap_err();
    assert!(err.reason().contains("cannot connect"), "{err}");
}

#[tokio::test]
async fn an_https_jwks_is_fetched_when_its_certificate_verifies() {
    let server = JwksServer::start_tls("127.0.0.1", jwks_json()).await;
    for host in ["127.0.0.1", "localhost"] {
        let v = Verifier::new(JwtConfig {
            ca_file: Some(fixture("tls-ca.pem")),
            ..config(server.https_url(host))
        })
        .await
        .unwrap_or_else(|e| panic!("{host}: {e}"));
        let claims = v.verify(&rs256(&good_claims())).await.unwrap();
        assert_eq!(claims.subject.as_deref(), Some("user-1"));
    }
    assert_eq!(server.hits(), 2);
}

#[tokio::test]
async fn an_https_jwks_whose_certificate_does_not_verify_is_never_read() {
    let server = JwksServer::start_tls("127.0.0.1", jwks_json()).await;
    // Not signed by anything the system trusts: refused, and no key is read from it.
    let err = Verifier::new(config(server.https_url("127.0.0.1")))
        .await
        .unwrap_err();
    assert_eq!(err.key(), "jwks");
    assert!(err.reason().contains("TLS handshake failed"), "{err}");
    assert!(err.reason().contains("UnknownIssuer"), "{err}");
    assert_eq!(
        server.hits(),
        0,
        "nothing was fetched over an unverified connection"
    );

    // Signed by a trusted CA, but for other names than the one asked for (127.0.0.2 is
    // loopback too; the certificate names localhost and 127.0.0.1): refused as well.
    let elsewhere = JwksServer::start_tls("127.0.0.2", jwks_json()).await;
    let err = Verifier::new(JwtConfig {
        ca_file: Some(fixture("tls-ca.pem")),
        ..config(elsewhere.https_url("127.0.0.2"))
    })
    .await
    .unwrap_err();
    assert!(err.reason().contains("not valid for name"), "{err}");
    assert_eq!(elsewhere.hits(), 0);
}
