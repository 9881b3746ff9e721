//! The defaults as a schema: finding unknown keys and suggesting what was meant.
//!
//! Serde's `deny_unknown_fields` would stop at the first typo and cannot say which layer it
//! came from, so keys are checked here, against the serialized defaults, before deserializing.
//! Two shapes are open rather than closed: an empty table (a free-form map such as labels)
//! and null (an unset `Option<Struct>`), since the defaults say nothing about their keys.

use serde_json::{Map, Value};

/// A key the defaults do not know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Unknown {
    pub(crate) key: String,
    pub(crate) suggestion: Option<String>,
}

/// Where a path lands in the defaults.
#[derive(Debug)]
pub(crate) enum Slot<'a> {
    /// A known key, with its default value.
    Known(&'a Value),
    /// Inside an open map or unset option: any key is allowed and nothing is known of its type.
    Open,
}

/// Follows `path` through the defaults, failing at the first segment they do not have.
pub(crate) fn locate<'a>(defaults: &'a Value, path: &[String]) -> Result<Slot<'a>, Unknown> {
    let mut node = defaults;
    for (i, segment) in path.iter().enumerate() {
        match node {
            Value::Null => return Ok(Slot::Open),
            Value::Object(map) if map.is_empty() => return Ok(Slot::Open),
            Value::Object(map) => match map.get(segment) {
                Some(child) => node = child,
                None => {
                    let parent = &path[..i];
                    return Err(Unknown {
                        key: path[..=i].join("."),
                        suggestion: suggest(segment, map)
                            .map(|s| join_all(parent.iter().map(String::as_str).chain([s]))),
                    });
                }
            },
            // A scalar or list has no keys below it.
            _ => {
                return Err(Unknown {
                    key: path[..=i].join("."),
                    suggestion: None,
                });
            }
        }
    }
    Ok(Slot::Known(node))
}

/// Removes, and reports, every key in `value` that the `default` tree at `key` lacks.
///
/// Dropping them keeps a typo from also surfacing as a confusing deserialization error.
pub(crate) fn prune(default: &Value, value: Value, key: &str, unknown: &mut Vec<Unknown>) -> Value {
    match (default, value) {
        (Value::Object(defaults), Value::Object(given)) if !defaults.is_empty() => {
            let mut kept = Map::new();
            for (k, v) in given {
                let child_key = join_all([key, k.as_str()]);
                match defaults.get(&k) {
                    Some(d) => {
                        let pruned = prune(d, v, &child_key, unknown);
                        kept.insert(k, pruned);
                    }
                    None => unknown.push(Unknown {
                        suggestion: suggest(&k, defaults).map(|s| join_all([key, s])),
                        key: child_key,
                    }),
                }
            }
            Value::Object(kept)
        }
        // Type mismatches (a table where a string belongs) are left for serde to describe;
        // lists are not descended because an empty default list says nothing of its items.
        (_, value) => value,
    }
}

/// Joins non-empty segments with `.`.
pub(crate) fn join_all<'a>(segments: impl IntoIterator<Item = &'a str>) -> String {
    let mut out = String::new();
    for segment in segments.into_iter().filter(|s| !s.is_empty()) {
        if !out.is_empty() {
            out.push('.');
        }
        out.push_str(segment);
    }
    out
}

/// The sibling closest to `given`, if close enough to be a typo: within a third of its
/// length, and never stricter than two edits so short keys still get help.
fn suggest<'a>(given: &str, siblings: &'a Map<String, Value>) -> Option<&'a str> {
    let limit = (given.chars().count() / 3).max(2);
    let mut candidates: Vec<&str> = siblings.keys().map(String::as_str).collect();
    // Sorted so ties resolve the same way whatever order the map iterates in.
    candidates.sort_unstable();
    let close = candidates
        .iter()
        .map(|c| (levenshtein(given, c), *c))
        .filter(|&(d, _)| d <= limit)
        .min_by_key(|&(d, _)| d)
        .map(|(_, c)| c);
    // Abbreviations and their long forms (`address` for `addr`, `timeout` for `timeout_ms`)
    // are far apart by edit distance but are the mistakes people actually make.
    close.or_else(|| {
        candidates.into_iter().find(|c| {
            let (short, long) = if c.len() < given.len() {
                (*c, given)
            } else {
                (given, *c)
            };
            short.len() >= 3 && long.starts_with(short)
        })
    })
}

/// Edit distance (insertions, deletions, substitutions) between two strings, by characters.
pub(crate) fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    // One row of the classic table suffices: each cell needs only the row above and its left.
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let substitution = diagonal + usize::from(ca != cb);
            diagonal = row[j + 1];
            row[j + 1] = substitution.min(row[j] + 1).min(diagonal + 1);
        }
    }
    row[b.len()]
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn path(s: &str) -> Vec<String> {
        s.split('.').map(str::to_owned).collect()
    }

    #[test]
    fn levenshtein_distances() {
        assert_eq!(levenshtein("", ""), 0);
        assert_eq!(levenshtein("addr", "adr"), 1);
        assert_eq!(levenshtein("kitten", "sitting"), 3);
        assert_eq!(levenshtein("abc", ""), 3);
        assert_eq!(levenshtein("µs", "us"), 1);
    }

    #[test]
    fn locate_suggests_close_siblings_only() {
        let defaults = json!({"server": {"addr": "", "listeners": 1}, "labels": {}, "tls": null});
        let err = locate(&defaults, &path("server.adr")).unwrap_err();
        assert_eq!(err.key, "server.adr");
        assert_eq!(err.suggestion.as_deref(), Some("server.addr"));

        let err = locate(&defaults, &path("server.completely_different")).unwrap_err();
        assert_eq!(err.suggestion, None);

        // The long form of an abbreviated key is suggested although it is far by distance.
        let err = locate(&defaults, &path("server.address")).unwrap_err();
        assert_eq!(err.suggestion.as_deref(), Some("server.addr"));
        // Two letters are not enough to guess from.
        let err = locate(&defaults, &path("server.ad")).unwrap_err();
        assert_ne!(err.suggestion.as_deref(), Some("server.addr_long"));

        let err = locate(&defaults, &path("server.addr.port")).unwrap_err();
        assert_eq!(err.key, "server.addr.port");

        assert!(matches!(
            locate(&defaults, &path("labels.team")),
            Ok(Slot::Open)
        ));
        assert!(matches!(
            locate(&defaults, &path("tls.cert")),
            Ok(Slot::Open)
        ));
        assert!(
            matches!(locate(&defaults, &path("server.listeners")), Ok(Slot::Known(v)) if v == &json!(1))
        );
    }

    #[test]
    fn prune_reports_every_unknown_key() {
        let defaults = json!({"server": {"addr": "", "listeners": 1}, "labels": {}});
        let given = json!({"server": {"adr": "x", "listenres": 2, "addr": "y"}, "labels": {"a": "b"}, "zzz": 1});
        let mut unknown = Vec::new();
        let kept = prune(&defaults, given, "", &mut unknown);
        assert_eq!(kept, json!({"server": {"addr": "y"}, "labels": {"a": "b"}}));
        let keys: Vec<_> = unknown
            .iter()
            .map(|u| (u.key.as_str(), u.suggestion.as_deref()))
            .collect();
        assert_eq!(
            keys,
            [
                ("server.adr", Some("server.addr")),
                ("server.listenres", Some("server.listeners")),
                ("zzz", None)
            ]
        );
    }
}
