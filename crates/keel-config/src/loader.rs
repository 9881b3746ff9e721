//! `Loader`: collects layers in order and turns them into a typed, validated [`Loaded`].
//!
//! Loading runs in four steps, each reporting with the layer's name attached:
//! 1. check every key against the defaults and type every env/flag string;
//! 2. merge all layers into one JSON tree, recording which layer set each leaf;
//! 3. deserialize the tree (serde stops at the first error, so that one is reported);
//! 4. run [`Validate`] and report every problem it records.

use std::fmt;
use std::path::Path;

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::coerce::coerce;
use crate::error::ConfigError;
use crate::format::{self, Format};
use crate::loaded::{LayerInfo, Loaded};
use crate::merge::{self, Origin, Sources};
use crate::schema::{self, Slot, Unknown};
use crate::validate::{Validate, Validator};

const FLAGS: &str = "flags --set";

/// Builds a configuration from layers; later layers override earlier ones.
pub struct Loader {
    defaults: Value,
    entries: Vec<Entry>,
    layers: Vec<LayerInfo>,
}

/// One source of values, named as errors will name it.
struct Entry {
    layer: String,
    input: Input,
}

enum Input {
    /// A whole tree, from a file.
    Tree(Value),
    /// One key as an untyped string, from the environment or a flag.
    Raw {
        key: String,
        path: Vec<String>,
        raw: String,
    },
}

/// An entry ready to merge.
struct Assignment {
    path: Vec<String>,
    value: Value,
    origin: Origin,
    raw: Option<String>,
    fallback: Option<Value>,
    deferred: Option<&'static str>,
}

/// One step of a serde path, kept structured so the value can be found in the tree.
enum Segment {
    Key(String),
    Index(usize),
}

impl Loader {
    /// Starts from the defaults, usually `T::default()`.
    ///
    /// Their serialized shape is also the schema: it decides which keys exist and how
    /// environment and flag strings are typed. They must serialize to a table.
    pub fn defaults<T: Serialize>(value: &T) -> Result<Loader, ConfigError> {
        let defaults = serde_json::to_value(value).map_err(|e| ConfigError::Defaults {
            reason: e.to_string(),
        })?;
        if !defaults.is_object() {
            return Err(ConfigError::Defaults {
                reason: format!(
                    "they must serialize to a table, not {}",
                    format::kind(&defaults)
                ),
            });
        }
        let layers = vec![LayerInfo {
            name: "defaults".to_owned(),
            keys: count_leaves(&defaults),
        }];
        Ok(Loader {
            defaults,
            entries: Vec::new(),
            layers,
        })
    }

    /// Adds a file layer, named `file <path>`; the format follows the extension
    /// (`.toml`, `.yaml` or `.yml`).
    pub fn file(self, path: impl AsRef<Path>) -> Result<Loader, ConfigError> {
        let path = path.as_ref();
        let shown = path.display().to_string();
        let Some(format) = Format::from_path(path) else {
            return Err(ConfigError::UnknownExtension { path: shown });
        };
        let contents = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: shown.clone(),
            source,
        })?;
        self.file_contents(&shown, format, &contents)
    }

    /// Adds a file layer from text already in hand, named `file <name>`.
    pub fn file_contents(
        mut self,
        name: &str,
        format: Format,
        contents: &str,
    ) -> Result<Loader, ConfigError> {
        let tree = format::parse(format, name, contents)?;
        let layer = format!("file {name}");
        self.layers.push(LayerInfo {
            name: layer.clone(),
            keys: count_leaves(&tree),
        });
        self.entries.push(Entry {
            layer,
            input: Input::Tree(tree),
        });
        Ok(self)
    }

    /// Adds the variables named `<PREFIX>_<SECTION>__<KEY>` from `vars`.
    ///
    /// The name after the prefix is split on `__` and lowercased, so
    /// `KEEL_SERVER__MAX_BODY_BYTES` sets `server.max_body_bytes`. Prefixed names without
    /// `__` (such as `KEEL_CONFIG`) are left alone: they are reserved for the binary's own use.
    pub fn env_vars<I>(mut self, prefix: &str, vars: I) -> Loader
    where
        I: IntoIterator<Item = (String, String)>,
    {
        let prefix = format!("{}_", prefix.trim_end_matches('_'));
        let mut picked: Vec<(String, String)> = vars
            .into_iter()
            .filter(|(name, _)| {
                name.strip_prefix(&prefix)
                    .is_some_and(|rest| rest.contains("__"))
            })
            .collect();
        // The process environment has no order; sorting makes the outcome reproducible and
        // puts `A__B` before `A__B__C`, so the more specific variable wins.
        picked.sort();
        self.layers.push(LayerInfo {
            name: format!("env {prefix}*"),
            keys: picked.len(),
        });
        for (name, raw) in picked {
            let path: Vec<String> = name[prefix.len()..]
                .split("__")
                .map(str::to_lowercase)
                .collect();
            self.entries.push(Entry {
                layer: format!("env {name}"),
                input: Input::Raw {
                    key: path.join("."),
                    path,
                    raw,
                },
            });
        }
        self
    }

    /// Adds the process environment's `<PREFIX>_…__…` variables (non-UTF-8 ones are skipped).
    pub fn env(self, prefix: &str) -> Loader {
        let vars = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        self.env_vars(prefix, vars)
    }

    /// Adds one flag: a dotted key and its value as typed on the command line.
    pub fn set(mut self, key: &str, value: &str) -> Loader {
        let key = key.trim();
        match self.layers.last_mut() {
            Some(info) if info.name == FLAGS => info.keys += 1,
            _ => self.layers.push(LayerInfo {
                name: FLAGS.to_owned(),
                keys: 1,
            }),
        }
        self.entries.push(Entry {
            layer: format!("flag --set {key}"),
            input: Input::Raw {
                key: key.to_owned(),
                path: key.split('.').map(str::to_owned).collect(),
                raw: value.to_owned(),
            },
        });
        self
    }

    /// Adds one flag from a `key=value` argument, as given to `--set`.
    pub fn set_arg(self, arg: &str) -> Result<Loader, ConfigError> {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(ConfigError::SetArgument {
                arg: arg.to_owned(),
            });
        };
        Ok(self.set(key, value))
    }

    /// Merges the layers, deserializes and validates.
    ///
    /// Unknown keys, untypeable strings and validation failures are all reported together;
    /// a deserialization error is reported alongside the key problems found before it.
    pub fn load<T>(self) -> Result<Loaded<T>, ConfigError>
    where
        T: DeserializeOwned + Serialize + Validate,
    {
        let Loader {
            defaults,
            entries,
            layers,
        } = self;
        let mut problems = Vec::new();
        let mut assignments = prepare(&defaults, entries, &mut problems);

        let (value, merged, sources) = loop {
            let (merged, sources) = merge_all(&defaults, &assignments);
            let err = match serde_path_to_error::deserialize::<_, T>(&merged) {
                Ok(value) => break (value, merged, sources),
                Err(err) => err,
            };
            let segments = segments(err.path());
            let key = display_key(&segments);
            let origin = sources.lookup(&key).cloned();
            let culprit = origin
                .as_ref()
                .and_then(|o| assignments.iter_mut().find(|a| a.origin.seq == o.seq));
            if let Some(assignment) = culprit {
                // A guessed type was wrong: retry with the plain string. Each guess has one
                // fallback, taken once, so this loop ends.
                if let Some(fallback) = assignment.fallback.take() {
                    assignment.value = fallback;
                    continue;
                }
                if let (Some(reason), Some(raw)) = (assignment.deferred, &assignment.raw) {
                    problems.push(ConfigError::Invalid {
                        key,
                        value: quote(raw),
                        layer: assignment.origin.layer.clone(),
                        reason: reason.to_owned(),
                    });
                    return Err(fail(problems));
                }
            }
            problems.push(ConfigError::Invalid {
                value: show(value_at(&merged, &segments)),
                key: if key.is_empty() {
                    "<root>".to_owned()
                } else {
                    key
                },
                layer: origin.map_or_else(|| "defaults".to_owned(), |o| o.layer),
                reason: err.into_inner().to_string(),
            });
            return Err(fail(problems));
        };

        let mut validator = Validator::new();
        value.validate(&mut validator);
        for problem in validator.into_problems() {
            let layer = sources
                .lookup(&problem.key)
                .map_or("defaults", |o| o.layer.as_str())
                .to_owned();
            problems.push(ConfigError::Invalid {
                key: problem.key,
                value: problem.value,
                layer,
                reason: problem.reason,
            });
        }
        if let Some(err) = ConfigError::collect(problems) {
            return Err(err);
        }

        let effective = serde_json::to_value(&value).map_err(|e| ConfigError::Serialize {
            reason: e.to_string(),
        })?;
        Ok(Loaded::new(value, effective, merged, sources, layers))
    }
}

// Hand-written so that debugging a loader never prints file contents, which may hold secrets.
impl fmt::Debug for Loader {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Loader")
            .field("layers", &self.layers)
            .finish_non_exhaustive()
    }
}

/// Checks keys and types strings, turning entries into assignments; problems are collected.
fn prepare(
    defaults: &Value,
    entries: Vec<Entry>,
    problems: &mut Vec<ConfigError>,
) -> Vec<Assignment> {
    let mut assignments = Vec::with_capacity(entries.len());
    for (i, entry) in entries.into_iter().enumerate() {
        // Sequence 0 is the defaults; later layers count up so "latest" is a comparison.
        let origin = Origin {
            seq: i + 1,
            layer: entry.layer,
        };
        let mut unknown = Vec::new();
        let assignment = match entry.input {
            Input::Tree(tree) => Assignment {
                path: Vec::new(),
                value: schema::prune(defaults, tree, "", &mut unknown),
                raw: None,
                fallback: None,
                deferred: None,
                origin,
            },
            Input::Raw { key, path, raw } => {
                if path.iter().any(String::is_empty) {
                    problems.push(ConfigError::InvalidKey {
                        key,
                        layer: origin.layer,
                    });
                    continue;
                }
                let slot = match schema::locate(defaults, &path) {
                    Ok(slot) => slot,
                    Err(u) => {
                        problems.push(unknown_key(u, &origin.layer));
                        continue;
                    }
                };
                let typed = match coerce(&slot, &raw) {
                    Ok(typed) => typed,
                    Err(reason) => {
                        problems.push(ConfigError::Invalid {
                            key,
                            value: quote(&raw),
                            layer: origin.layer,
                            reason,
                        });
                        continue;
                    }
                };
                let value = match slot {
                    Slot::Known(default) => schema::prune(default, typed.value, &key, &mut unknown),
                    Slot::Open => typed.value,
                };
                Assignment {
                    path,
                    value,
                    raw: Some(raw),
                    fallback: typed.fallback,
                    deferred: typed.deferred,
                    origin,
                }
            }
        };
        problems.extend(
            unknown
                .into_iter()
                .map(|u| unknown_key(u, &assignment.origin.layer)),
        );
        assignments.push(assignment);
    }
    assignments
}

fn merge_all(defaults: &Value, assignments: &[Assignment]) -> (Value, Sources) {
    let mut tree = defaults.clone();
    let mut sources = Sources::default();
    for a in assignments {
        merge::apply(&mut tree, &mut sources, &a.path, a.value.clone(), &a.origin);
    }
    (tree, sources)
}

fn fail(problems: Vec<ConfigError>) -> ConfigError {
    ConfigError::collect(problems).unwrap_or_else(|| ConfigError::Defaults {
        reason: "loading failed without a reported problem".to_owned(),
    })
}

fn unknown_key(unknown: Unknown, layer: &str) -> ConfigError {
    ConfigError::UnknownKey {
        key: unknown.key,
        layer: layer.to_owned(),
        suggestion: unknown.suggestion,
    }
}

fn segments(path: &serde_path_to_error::Path) -> Vec<Segment> {
    use serde_path_to_error::Segment as S;
    let mut out = Vec::new();
    for segment in path.iter() {
        out.push(match segment {
            S::Seq { index } => Segment::Index(*index),
            S::Map { key } => Segment::Key(key.clone()),
            S::Enum { variant } => Segment::Key(variant.clone()),
            // Past an untracked step the rest of the path would point somewhere wrong.
            S::Unknown => break,
        });
    }
    out
}

fn display_key(segments: &[Segment]) -> String {
    let mut key = String::new();
    for segment in segments {
        match segment {
            Segment::Key(k) => {
                if !key.is_empty() {
                    key.push('.');
                }
                key.push_str(k);
            }
            Segment::Index(i) => key.push_str(&format!("[{i}]")),
        }
    }
    key
}

fn value_at<'a>(tree: &'a Value, segments: &[Segment]) -> Option<&'a Value> {
    segments
        .iter()
        .try_fold(tree, |node, segment| match segment {
            Segment::Key(k) => node.get(k),
            Segment::Index(i) => node.get(i),
        })
}

/// A value for a message: compact JSON, cut short so one bad table cannot flood the log.
fn show(value: Option<&Value>) -> String {
    const MAX: usize = 80;
    let Some(value) = value else {
        return "(missing)".to_owned();
    };
    let text = value.to_string();
    if text.chars().count() <= MAX {
        return text;
    }
    let cut: String = text.chars().take(MAX - 1).collect();
    format!("{cut}…")
}

fn quote(raw: &str) -> String {
    Value::String(raw.to_owned()).to_string()
}

fn count_leaves(value: &Value) -> usize {
    match value {
        Value::Object(map) => map.values().map(count_leaves).sum(),
        _ => 1,
    }
}
