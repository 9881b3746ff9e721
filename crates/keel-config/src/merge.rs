//! Merging layers into one tree while remembering which layer set each leaf.
//!
//! Tables merge key by key; anything else (scalars, lists) from a later layer replaces the
//! earlier value whole. Replacing lists rather than appending keeps "what you wrote is what
//! you get" for the operator reading a single layer.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

/// The layer behind a value: its position (later wins) and its name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Origin {
    pub(crate) seq: usize,
    pub(crate) layer: String,
}

/// For every leaf set by a layer other than the defaults, the layer that set it last.
#[derive(Debug, Clone, Default)]
pub(crate) struct Sources {
    by_key: BTreeMap<String, Origin>,
}

impl Sources {
    /// The origin of `key`: its own, else that of its nearest recorded ancestor (a list or
    /// scalar replaced whole), else the latest among its descendants (for a table).
    /// `None` means the defaults.
    pub(crate) fn lookup(&self, key: &str) -> Option<&Origin> {
        if let Some(origin) = self.by_key.get(key) {
            return Some(origin);
        }
        let mut ancestor = parent(key);
        while let Some(k) = ancestor {
            if let Some(origin) = self.by_key.get(k) {
                return Some(origin);
            }
            ancestor = parent(k);
        }
        self.by_key
            .iter()
            .filter(|(k, _)| is_below(k, key))
            .map(|(_, origin)| origin)
            .max_by_key(|origin| origin.seq)
    }

    /// Every recorded leaf and the layer that set it, sorted by key.
    pub(crate) fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.by_key
            .iter()
            .map(|(k, origin)| (k.as_str(), origin.layer.as_str()))
    }

    fn clear_under(&mut self, key: &str) {
        self.by_key.retain(|k, _| k != key && !is_below(k, key));
    }

    fn record_leaves(&mut self, key: &str, value: &Value, origin: &Origin) {
        match value {
            Value::Object(map) if !map.is_empty() => {
                for (k, v) in map {
                    self.record_leaves(&join(key, k), v, origin);
                }
            }
            _ => {
                self.by_key.insert(key.to_owned(), origin.clone());
            }
        }
    }
}

/// Sets `value` at `path` in `tree`, merging tables and recording the leaves it sets.
pub(crate) fn apply(
    tree: &mut Value,
    sources: &mut Sources,
    path: &[String],
    value: Value,
    origin: &Origin,
) {
    let mut key = String::new();
    let mut node = tree;
    for segment in path {
        if !node.is_object() {
            // A null (an unset `Option<Struct>`) or scalar becomes a table so the nested key
            // has somewhere to live; whatever was recorded for the old value no longer holds.
            sources.clear_under(&key);
            *node = Value::Object(Map::new());
        }
        key = join(&key, segment);
        let Value::Object(map) = node else {
            // Made a table just above.
            return;
        };
        node = map.entry(segment.clone()).or_insert(Value::Null);
    }
    merge_into(node, value, &key, sources, origin);
}

fn merge_into(target: &mut Value, value: Value, key: &str, sources: &mut Sources, origin: &Origin) {
    match (target, value) {
        (Value::Object(existing), Value::Object(incoming)) => {
            for (k, v) in incoming {
                let child_key = join(key, &k);
                let slot = existing.entry(k).or_insert(Value::Null);
                merge_into(slot, v, &child_key, sources, origin);
            }
        }
        (target, value) => {
            sources.clear_under(key);
            sources.record_leaves(key, &value, origin);
            *target = value;
        }
    }
}

fn join(key: &str, segment: &str) -> String {
    if key.is_empty() {
        segment.to_owned()
    } else {
        format!("{key}.{segment}")
    }
}

/// The key one level up: `a.b` → `a`, `a.b[2]` → `a.b`, `a` → none.
fn parent(key: &str) -> Option<&str> {
    if key.ends_with(']') {
        return key.rfind('[').map(|i| &key[..i]);
    }
    key.rfind('.').map(|i| &key[..i])
}

/// Whether `candidate` lies strictly inside `key` (`""` is the root, above everything).
fn is_below(candidate: &str, key: &str) -> bool {
    if key.is_empty() {
        return !candidate.is_empty();
    }
    candidate
        .strip_prefix(key)
        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn origin(seq: usize, layer: &str) -> Origin {
        Origin {
            seq,
            layer: layer.to_owned(),
        }
    }

    fn path(s: &str) -> Vec<String> {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn tables_merge_and_lists_replace() {
        let mut tree = json!({"server": {"addr": "a", "ports": [1, 2]}, "tls": null});
        let mut sources = Sources::default();
        let file = origin(1, "file f");
        apply(
            &mut tree,
            &mut sources,
            &[],
            json!({"server": {"ports": [3]}}),
            &file,
        );
        apply(
            &mut tree,
            &mut sources,
            &path("tls.cert"),
            json!("c.pem"),
            &origin(2, "env X"),
        );
        assert_eq!(
            tree,
            json!({"server": {"addr": "a", "ports": [3]}, "tls": {"cert": "c.pem"}})
        );

        assert_eq!(sources.lookup("server.ports").unwrap().layer, "file f");
        assert_eq!(sources.lookup("server.ports[0]").unwrap().layer, "file f");
        assert_eq!(sources.lookup("server.addr"), None);
        assert_eq!(sources.lookup("server").unwrap().layer, "file f");
        assert_eq!(sources.lookup("tls").unwrap().layer, "env X");
    }

    #[test]
    fn replacing_a_table_forgets_its_old_leaves() {
        let mut tree = json!({"labels": {}});
        let mut sources = Sources::default();
        apply(
            &mut tree,
            &mut sources,
            &path("labels.a"),
            json!("1"),
            &origin(1, "file"),
        );
        apply(
            &mut tree,
            &mut sources,
            &path("labels"),
            json!(["x"]),
            &origin(2, "flag"),
        );
        let all: Vec<_> = sources.iter().collect();
        assert_eq!(all, [("labels", "flag")]);
    }

    #[test]
    fn parents_and_descendants() {
        assert_eq!(parent("a.b[2]"), Some("a.b"));
        assert_eq!(parent("a.b"), Some("a"));
        assert_eq!(parent("a"), None);
        assert!(is_below("a.b", "a"));
        assert!(is_below("a[0]", "a"));
        assert!(!is_below("ab", "a"));
    }
}
