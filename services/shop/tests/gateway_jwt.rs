//! JWT bearer tokens at the gateway, end to end: tokens signed here with keel-gateway's
//! fixture keys, checked by the real gateway against the fixture JWKS, and what the upstream
//! then sees.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keel_shop::gateway::{self, Settings};
use serde_json::{Value, json};
use support::{Gateway, recording_upstream};

const ISSUER: &str = "https://issuer.example";
const AUDIENCE: &str = "shop";

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../crates/keel-gateway/tests/fixtures")
        .join(name)
}

fn rsa_key(name: &str) -> EncodingKey {
    let pem = std::fs::read_to_string(fixture(name)).unwrap();
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    EncodingKey::from_rsa_der(&STANDARD.decode(body).unwrap())
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(scope: &str) -> Value {
    json!({ "sub": "user-7", "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 300, "scope": scope })
}

fn sign(kid: &str, claims: &Value, key: &str) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some(kid.to_owned());
    jsonwebtoken::encode(&header, claims, &rsa_key(key)).unwrap()
}

/// `method path` with `Authorization: Bearer token`: the status and `WWW-Authenticate`.
async fn send(addr: SocketAddr, method: &str, token: &str) -> (u16, String) {
    let request = format!(
        "{method} /api/orders/o1 HTTP/1.1\r\nhost: shop\r\nauthorization: Bearer {token}\r\n\
         content-length: 0\r\nconnection: close\r\n\r\n"
    );
    let raw = tokio::task::spawn_blocking(move || {
        keel_test_support::raw_exchange(addr, request.as_bytes(), std::time::Duration::from_secs(5))
    })
    .await
    .unwrap()
    .unwrap();
    let text = String::from_utf8_lossy(&raw).to_string();
    let challenge = text
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .starts_with("www-authenticate:")
                .then(|| l.to_string())
        })
        .unwrap_or_default();
    (keel_test_support::status_of(&raw).unwrap(), challenge)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tokens_are_verified_scoped_and_turned_into_identity_headers() {
    let (orders, seen) = recording_upstream().await;
    let unused = keel_test_support::free_addr;
    let mut settings: Settings =
        gateway::settings(&Settings::default(), gateway::DEMO_KEYS, 1e6, 1e6);
    settings.jwt.jwks = fixture("jwks.json").display().to_string();
    settings.jwt.issuer = ISSUER.into();
    settings.jwt.audiences = vec![AUDIENCE.into()];
    let gw = Gateway::start(settings, [unused(), orders, unused()]).await;

    // Valid, with the scope: forwarded as the user, the token itself left behind.
    let token = sign("rsa-1", &claims("orders:read"), "rsa-1.pem");
    assert_eq!(send(gw.addr, "GET", &token).await.0, 200);
    {
        let seen = seen.lock().unwrap();
        let (path, headers) = seen.last().unwrap();
        assert_eq!(path, "/orders/o1");
        assert_eq!(headers["x-shop-user"], "user-7");
        assert_eq!(headers["x-shop-scopes"], "orders:read");
        assert!(headers.get("authorization").is_none());
        assert!(headers.get("x-shop-key").is_none());
    }
    let forwarded = seen.lock().unwrap().len();

    // Valid, without the scope a write needs: 403.
    assert_eq!(send(gw.addr, "POST", &token).await.0, 403);
    assert_eq!(
        send(
            gw.addr,
            "POST",
            &sign("rsa-1", &claims("orders:*"), "rsa-1.pem")
        )
        .await
        .0,
        200
    );
    let forwarded = forwarded + 1;

    // Refused with 401 and an `invalid_token` challenge.
    let mut expired = claims("orders:read");
    expired["exp"] = json!(now() - 3600);
    let mut wrong_audience = claims("orders:read");
    wrong_audience["aud"] = json!("someone-else");
    let mut wrong_issuer = claims("orders:read");
    wrong_issuer["iss"] = json!("https://evil.example");
    let none = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(r#"{"alg":"none","typ":"JWT","kid":"rsa-1"}"#),
        URL_SAFE_NO_PAD.encode(claims("orders:*").to_string())
    );
    let refused = [
        ("expired", sign("rsa-1", &expired, "rsa-1.pem")),
        (
            "wrong audience",
            sign("rsa-1", &wrong_audience, "rsa-1.pem"),
        ),
        ("wrong issuer", sign("rsa-1", &wrong_issuer, "rsa-1.pem")),
        (
            "unknown kid",
            sign("rsa-9", &claims("orders:read"), "rsa-1.pem"),
        ),
        (
            "forged with another key",
            sign("rsa-1", &claims("orders:read"), "rsa-other.pem"),
        ),
        ("alg none", none),
        ("garbage", "not.a.token".to_string()),
    ];
    for (what, token) in refused {
        let (status, challenge) = send(gw.addr, "GET", &token).await;
        assert_eq!(status, 401, "{what}");
        assert!(challenge.contains("invalid_token"), "{what}: {challenge:?}");
    }
    assert_eq!(
        seen.lock().unwrap().len(),
        forwarded,
        "nothing refused was forwarded"
    );

    // API keys work beside tokens, as bearer or x-api-key.
    assert_eq!(send(gw.addr, "GET", "reader-secret-key").await.0, 200);
    gw.stop().await;
}
