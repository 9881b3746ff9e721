//! Printing a JSON tree as TOML, for `keel config print` and friends.
//!
//! Written by hand rather than through `toml::to_string` because TOML has no null: unset
//! options become `# key = (unset)` comments so the operator can still see they exist.

use std::fmt::Write as _;

use serde_json::{Map, Value};

/// `value` (a table) as a TOML document.
pub(crate) fn to_toml(value: &Value) -> String {
    let mut out = String::new();
    if let Value::Object(map) = value {
        write_table(&mut out, &[], map);
    }
    out
}

fn write_table(out: &mut String, path: &[&str], map: &Map<String, Value>) {
    let mut entries: Vec<(&String, &Value)> = map.iter().collect();
    entries.sort_by(|a, b| a.0.cmp(b.0));

    // Plain keys first: in TOML a key belongs to the most recent header above it.
    for &(k, v) in &entries {
        match v {
            Value::Null => {
                let _ = writeln!(out, "# {} = (unset)", key(k));
            }
            Value::Object(_) => {}
            Value::Array(items) if is_table_list(items) => {}
            _ => match inline(v) {
                Some(t) => {
                    let _ = writeln!(out, "{} = {t}", key(k));
                }
                None => {
                    let _ = writeln!(out, "# {} = {v} (not representable in TOML)", key(k));
                }
            },
        }
    }

    for &(k, v) in &entries {
        let mut child: Vec<&str> = path.to_vec();
        child.push(k);
        match v {
            Value::Object(inner) => {
                let _ = writeln!(out, "\n[{}]", header(&child));
                write_table(out, &child, inner);
            }
            Value::Array(items) if is_table_list(items) => {
                for item in items {
                    if let Value::Object(inner) = item {
                        let _ = writeln!(out, "\n[[{}]]", header(&child));
                        write_table(out, &child, inner);
                    }
                }
            }
            _ => {}
        }
    }
}

fn is_table_list(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(Value::is_object)
}

/// A value as inline TOML; `None` for what TOML cannot hold (null, integers above `i64::MAX`).
fn inline(value: &Value) -> Option<toml::Value> {
    Some(match value {
        Value::Null => return None,
        Value::Bool(b) => toml::Value::Boolean(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => toml::Value::Integer(i),
            None if n.is_u64() => return None,
            None => toml::Value::Float(n.as_f64()?),
        },
        Value::String(s) => toml::Value::String(s.clone()),
        // Nulls inside lists and inline tables have nowhere to go and are left out.
        Value::Array(items) => toml::Value::Array(items.iter().filter_map(inline).collect()),
        Value::Object(map) => toml::Value::Table(
            map.iter()
                .filter_map(|(k, v)| Some((k.clone(), inline(v)?)))
                .collect(),
        ),
    })
}

fn key(k: &str) -> String {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.to_owned()
    } else {
        toml::Value::String(k.to_owned()).to_string()
    }
}

fn header(path: &[&str]) -> String {
    path.iter().map(|k| key(k)).collect::<Vec<_>>().join(".")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn renders_parseable_toml_with_unset_comments() {
        let value = json!({
            "name": "svc",
            "tls": null,
            "server": {"addr": "0.0.0.0:80", "ports": [80, 443], "limits": {"body": "1MiB"}},
            "routes": [{"path": "/a", "to": null}, {"path": "/b"}],
            "labels": {"app.kubernetes.io/name": "x"},
            "huge": u64::MAX,
        });
        let text = to_toml(&value);
        assert!(text.contains("# tls = (unset)\n"), "{text}");
        assert!(text.contains("# to = (unset)\n"), "{text}");
        assert!(text.contains("(not representable in TOML)"), "{text}");

        let parsed: toml::Value = toml::from_str(&text).unwrap();
        let expected: toml::Value = toml::from_str(
            r#"
            name = "svc"
            [labels]
            "app.kubernetes.io/name" = "x"
            [server]
            addr = "0.0.0.0:80"
            ports = [80, 443]
            [server.limits]
            body = "1MiB"
            [[routes]]
            path = "/a"
            [[routes]]
            path = "/b"
            "#,
        )
        .unwrap();
        assert_eq!(parsed, expected);
    }
}
