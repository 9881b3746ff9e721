//! Hiding secrets before the effective config is printed, logged or served.
//!
//! Matching is by key name because config structs live in other crates and cannot all be
//! annotated here; the list errs towards hiding too much, since a hidden value costs a lookup
//! and a leaked one costs a rotation.

use serde_json::{Map, Value};

/// What replaces a secret.
pub(crate) const REDACTED: &str = "<redacted>";

/// Key fragments that mark a value as secret (compared lowercase, `-` read as `_`).
const SECRET_WORDS: [&str; 7] = [
    "password",
    "passwd",
    "secret",
    "token",
    "credential",
    "private_key",
    "api_key",
];

/// A copy of `value` with secrets replaced by `<redacted>`.
pub(crate) fn redact(value: &Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| {
                    // A secret key hides its whole value, even a table: `secrets = { db = … }`
                    // is as sensitive as `secret = "…"`.
                    let v = if is_secret_key(k) && !is_empty(v) {
                        Value::String(REDACTED.to_owned())
                    } else {
                        redact(v)
                    };
                    (k.clone(), v)
                })
                .collect::<Map<_, _>>(),
        ),
        Value::Array(items) => Value::Array(items.iter().map(redact).collect()),
        Value::String(s) => Value::String(redact_userinfo(s).unwrap_or_else(|| s.clone())),
        other => other.clone(),
    }
}

fn is_secret_key(key: &str) -> bool {
    let key = key.to_ascii_lowercase().replace('-', "_");
    key == "key" || SECRET_WORDS.iter().any(|w| key.contains(w))
}

/// Unset and empty values are shown as they are: knowing a secret is missing is useful and
/// reveals nothing.
fn is_empty(value: &Value) -> bool {
    match value {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

/// `scheme://user:pass@host/…` → `scheme://user:<redacted>@host/…`; `None` if there is no
/// password in the string.
fn redact_userinfo(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let valid_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
        && scheme
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
    if !valid_scheme {
        return None;
    }
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    // The last `@` ends the userinfo: passwords may contain `@`, hosts may not.
    let at = rest[..authority_end].rfind('@')?;
    let (user, password) = rest[..at].split_once(':')?;
    if password.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{user}:{REDACTED}{}", &rest[at..]))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn secret_keys_are_hidden() {
        let value = json!({
            "db": {"password": "hunter2", "user": "app", "api-key": "k", "key": "k2", "monkey": "m"},
            "auth": {"token": "", "client_secret": null, "private_key_path": "/k.pem"},
            "secrets": {"a": "b"},
        });
        assert_eq!(
            redact(&value),
            json!({
                "db": {"password": REDACTED, "user": "app", "api-key": REDACTED, "key": REDACTED, "monkey": "m"},
                "auth": {"token": "", "client_secret": null, "private_key_path": REDACTED},
                "secrets": REDACTED,
            })
        );
    }

    #[test]
    fn url_passwords_are_hidden() {
        let value = json!({"url": "postgres://app:s3cr@t@db:5432/x", "peers": ["redis://:pw@r/0", "http://h/p@x"]});
        assert_eq!(
            redact(&value),
            json!({"url": "postgres://app:<redacted>@db:5432/x", "peers": ["redis://:<redacted>@r/0", "http://h/p@x"]})
        );
        assert_eq!(redact_userinfo("https://user@host"), None);
        assert_eq!(redact_userinfo("not a url: a:b@c"), None);
    }
}
