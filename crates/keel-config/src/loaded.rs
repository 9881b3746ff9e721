//! `Loaded`: the typed config plus what is needed to explain it — where each key came from,
//! which layers were applied, a stable hash, and redacted views for printing.

use std::fmt;

use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::merge::Sources;
use crate::{redact, render};

/// A layer that took part in a load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerInfo {
    /// `defaults`, `file <path>`, `env KEEL_*` or `flags --set`.
    pub name: String,
    /// How many leaf keys (or variables, or flags) it supplied.
    pub keys: usize,
}

/// A loaded configuration and its provenance.
pub struct Loaded<T> {
    /// The typed, validated configuration.
    pub value: T,
    /// The value serialized back: the canonical effective config, with units normalised.
    effective: Value,
    /// The merged input tree, as deserialized.
    merged: Value,
    sources: Sources,
    layers: Vec<LayerInfo>,
    hash: String,
}

impl<T> Loaded<T> {
    pub(crate) fn new(
        value: T,
        effective: Value,
        merged: Value,
        sources: Sources,
        layers: Vec<LayerInfo>,
    ) -> Self {
        let hash = hash(&effective);
        Self {
            value,
            effective,
            merged,
            sources,
            layers,
            hash,
        }
    }

    /// The layers applied, in order.
    pub fn layers(&self) -> &[LayerInfo] {
        &self.layers
    }

    /// Hex SHA-256 of the effective config as canonical JSON (sorted keys, no whitespace).
    ///
    /// It is computed from the typed value serialized back, so `"90s"` and `"1m30s"` hash the
    /// same, and it does not depend on key order or on which layer supplied a value.
    pub fn hash(&self) -> &str {
        &self.hash
    }

    /// The layer that last set `dotted_key`: `defaults` if no layer touched it, `None` if the
    /// key does not exist. For a table, the latest layer that set anything inside it.
    pub fn source_of(&self, dotted_key: &str) -> Option<&str> {
        lookup(&self.merged, dotted_key)?;
        Some(
            self.sources
                .lookup(dotted_key)
                .map_or("defaults", |origin| origin.layer.as_str()),
        )
    }

    /// Every leaf set by a layer other than the defaults, with that layer, sorted by key.
    pub fn sources(&self) -> impl Iterator<Item = (&str, &str)> {
        self.sources.iter()
    }

    /// The effective config with secrets replaced by `<redacted>`.
    pub fn redacted(&self) -> Value {
        redact::redact(&self.effective)
    }

    /// The redacted effective config as TOML; unset options appear as `# key = (unset)`.
    pub fn to_toml_redacted(&self) -> String {
        render::to_toml(&self.redacted())
    }

    /// The typed configuration.
    pub fn into_value(self) -> T {
        self.value
    }
}

// Hand-written so that printing a `Loaded` never prints the unredacted trees.
impl<T: fmt::Debug> fmt::Debug for Loaded<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loaded")
            .field("value", &self.value)
            .field("layers", &self.layers)
            .field("hash", &self.hash)
            .finish_non_exhaustive()
    }
}

/// Finds a dotted key such as `server.listeners` or `routes[0].path` in a tree.
fn lookup<'a>(tree: &'a Value, dotted_key: &str) -> Option<&'a Value> {
    if dotted_key.is_empty() {
        return Some(tree);
    }
    let mut node = tree;
    for part in dotted_key.split('.') {
        let (name, indices) = part.split_at(part.find('[').unwrap_or(part.len()));
        if !name.is_empty() {
            node = node.get(name)?;
        }
        for index in indices.split('[').skip(1) {
            node = node.get(index.strip_suffix(']')?.parse::<usize>().ok()?)?;
        }
    }
    Some(node)
}

fn hash(value: &Value) -> String {
    let mut canonical = String::new();
    write_canonical(value, &mut canonical);
    Sha256::digest(canonical.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// JSON with object keys sorted, so the hash does not depend on map iteration order (which
/// serde_json's `preserve_order` feature, enabled anywhere in a build, would change).
fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn lookup_follows_keys_and_indices() {
        let tree = json!({"routes": [{"path": "/a"}], "m": {"x": [[1, 2]]}});
        assert_eq!(lookup(&tree, "routes[0].path"), Some(&json!("/a")));
        assert_eq!(lookup(&tree, "m.x[0][1]"), Some(&json!(2)));
        assert_eq!(lookup(&tree, "routes[1]"), None);
        assert_eq!(lookup(&tree, "nope"), None);
    }

    #[test]
    fn canonical_json_sorts_keys() {
        let mut out = String::new();
        write_canonical(
            &json!({"b": [1, {"z": null, "a": "x"}], "a": true}),
            &mut out,
        );
        assert_eq!(out, r#"{"a":true,"b":[1,{"a":"x","z":null}]}"#);
    }
}
