//! File formats: which one a path means, and turning TOML or YAML text into a JSON tree.
//!
//! All layers are merged as `serde_json::Value`, so each format is converted once at the edge
//! and nothing downstream needs to know where a table came from.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde_json::{Map, Number, Value};

use crate::error::ConfigError;

/// The syntax of a config file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    /// TOML, from `.toml` files.
    Toml,
    /// YAML, from `.yaml` or `.yml` files.
    Yaml,
}

impl Format {
    /// The format a file's extension names, if any (case-insensitive).
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?;
        ext.parse().ok()
    }
}

impl FromStr for Format {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "toml" => Ok(Format::Toml),
            "yaml" | "yml" => Ok(Format::Yaml),
            _ => Err(ConfigError::UnknownFormat { name: s.to_owned() }),
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Format::Toml => "TOML",
            Format::Yaml => "YAML",
        })
    }
}

/// Parses `contents` as `format` into a JSON object; `name` is only used in errors.
pub(crate) fn parse(format: Format, name: &str, contents: &str) -> Result<Value, ConfigError> {
    let parse_error = |message: String| ConfigError::Parse {
        path: name.to_owned(),
        format,
        message: message.trim_end().to_owned(),
    };
    let value = match format {
        Format::Toml => {
            let value: toml::Value =
                toml::from_str(contents).map_err(|e| parse_error(e.to_string()))?;
            from_toml(value, "").map_err(parse_error)?
        }
        Format::Yaml => {
            let mut value: serde_yaml::Value =
                serde_yaml::from_str(contents).map_err(|e| parse_error(e.to_string()))?;
            // `<<: *base` merge keys are how YAML users share blocks; resolve them here so
            // they are not seen as unknown keys.
            value
                .apply_merge()
                .map_err(|e| parse_error(e.to_string()))?;
            from_yaml(value, "").map_err(parse_error)?
        }
    };
    match value {
        Value::Object(_) => Ok(value),
        // An empty YAML document is an empty config, not a mistake worth failing a deploy over.
        Value::Null => Ok(Value::Object(Map::new())),
        other => Err(ConfigError::NotATable {
            path: name.to_owned(),
            found: kind(&other),
        }),
    }
}

/// A short name for a value's JSON type, for messages.
pub(crate) fn kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a table",
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn float(f: f64, path: &str) -> Result<Value, String> {
    Number::from_f64(f)
        .map(Value::Number)
        .ok_or_else(|| format!("`{path}` is {f}, which is not supported; use a finite number"))
}

fn from_toml(value: toml::Value, path: &str) -> Result<Value, String> {
    Ok(match value {
        toml::Value::String(s) => Value::String(s),
        toml::Value::Integer(i) => Value::from(i),
        toml::Value::Float(f) => float(f, path)?,
        toml::Value::Boolean(b) => Value::Bool(b),
        // Dates have no JSON type; their RFC 3339 text is what a typed field would parse anyway.
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| from_toml(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        toml::Value::Table(table) => Value::Object(
            table
                .into_iter()
                .map(|(k, v)| {
                    let child = from_toml(v, &join(path, &k))?;
                    Ok((k, child))
                })
                .collect::<Result<_, String>>()?,
        ),
    })
}

fn from_yaml(value: serde_yaml::Value, path: &str) -> Result<Value, String> {
    use serde_yaml::Value as Y;
    Ok(match value {
        Y::Null => Value::Null,
        Y::Bool(b) => Value::Bool(b),
        Y::Number(n) => {
            if let Some(i) = n.as_i64() {
                Value::from(i)
            } else if let Some(u) = n.as_u64() {
                Value::from(u)
            } else {
                float(n.as_f64().unwrap_or(f64::NAN), path)?
            }
        }
        Y::String(s) => Value::String(s),
        Y::Sequence(items) => Value::Array(
            items
                .into_iter()
                .enumerate()
                .map(|(i, v)| from_yaml(v, &format!("{path}[{i}]")))
                .collect::<Result<_, _>>()?,
        ),
        Y::Mapping(mapping) => {
            let mut map = Map::new();
            for (k, v) in mapping {
                let Y::String(key) = k else {
                    let shown = serde_yaml::to_string(&k).unwrap_or_default();
                    let at = if path.is_empty() {
                        "the top level".to_owned()
                    } else {
                        format!("`{path}`")
                    };
                    return Err(format!(
                        "keys must be strings, found key {} under {at}",
                        shown.trim_end()
                    ));
                };
                let child = from_yaml(v, &join(path, &key))?;
                map.insert(key, child);
            }
            Value::Object(map)
        }
        // Tags like `!secret` carry no meaning for config; use the value underneath.
        Y::Tagged(tagged) => from_yaml(tagged.value, path)?,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn toml_and_yaml_become_the_same_tree() {
        let toml = parse(
            Format::Toml,
            "a.toml",
            "[server]\nport = 80\nratio = 0.5\ntags = [\"a\"]\n",
        )
        .unwrap();
        let yaml = parse(
            Format::Yaml,
            "a.yaml",
            "server:\n  port: 80\n  ratio: 0.5\n  tags: [a]\n",
        )
        .unwrap();
        let expected = json!({"server": {"port": 80, "ratio": 0.5, "tags": ["a"]}});
        assert_eq!(toml, expected);
        assert_eq!(yaml, expected);
    }

    #[test]
    fn yaml_rejects_non_string_keys_and_non_tables() {
        let err = parse(Format::Yaml, "a.yaml", "server:\n  1: x\n").unwrap_err();
        assert!(err.to_string().contains("keys must be strings"), "{err}");
        assert!(err.to_string().contains("`server`"), "{err}");

        let err = parse(Format::Yaml, "a.yaml", "- 1\n- 2\n").unwrap_err();
        assert!(err.to_string().contains("must hold a table"), "{err}");

        assert_eq!(parse(Format::Yaml, "a.yaml", "").unwrap(), json!({}));
    }

    #[test]
    fn yaml_merge_keys_are_resolved() {
        let yaml = "base: &b\n  x: 1\nother:\n  <<: *b\n  y: 2\n";
        let value = parse(Format::Yaml, "a.yaml", yaml).unwrap();
        assert_eq!(value["other"], json!({"x": 1, "y": 2}));
    }

    #[test]
    fn format_names_and_extensions() {
        assert_eq!(
            Format::from_path(Path::new("/etc/keel.TOML")),
            Some(Format::Toml)
        );
        assert_eq!(Format::from_path(Path::new("keel.yml")), Some(Format::Yaml));
        assert_eq!(Format::from_path(Path::new("keel.json")), None);
        assert_eq!("yaml".parse::<Format>().unwrap(), Format::Yaml);
        assert!("ini".parse::<Format>().is_err());
    }
}
