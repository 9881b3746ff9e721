//! `ConfigError`: everything that can go wrong while loading configuration.
//!
//! Messages are written for the operator who reads them in a crash log: each one names the
//! key, the offending value, the layer that supplied it and the reason.

use std::fmt;
use std::io;

use crate::format::Format;

/// An error from building or loading configuration.
///
/// [`Loader::load`](crate::Loader::load) collects every unknown key and validation failure it
/// finds into one [`ConfigError::Many`], which displays one problem per line.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The defaults could not be used as a schema.
    #[error("invalid defaults: {reason}")]
    Defaults {
        /// What is wrong with them.
        reason: String,
    },

    /// A config file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file's path as given.
        path: String,
        /// The I/O error.
        source: io::Error,
    },

    /// A config file's extension names no supported format.
    #[error("unsupported config file {path}: expected a .toml, .yaml or .yml extension")]
    UnknownExtension {
        /// The file's path as given.
        path: String,
    },

    /// A format name is not one of `toml`, `yaml`, `yml`.
    #[error("unsupported config format `{name}`: expected toml or yaml")]
    UnknownFormat {
        /// The name given.
        name: String,
    },

    /// A config file is not valid TOML or YAML, or holds something JSON cannot.
    #[error("cannot parse config file {path} as {format}: {message}")]
    Parse {
        /// The file's path or name.
        path: String,
        /// The format it was parsed as.
        format: Format,
        /// The parser's message, with line and column where the parser gives them.
        message: String,
    },

    /// A config file's top level is not a table of sections.
    #[error("config file {path} must hold a table of keys at the top level, found {found}")]
    NotATable {
        /// The file's path or name.
        path: String,
        /// What was found instead.
        found: &'static str,
    },

    /// A `--set` argument without `=`.
    #[error("invalid --set argument {arg:?}: expected key=value")]
    SetArgument {
        /// The argument as given.
        arg: String,
    },

    /// A key that cannot name anything, such as one with an empty segment.
    #[error("invalid key `{key}` (from {layer}): keys are non-empty names joined by `.`")]
    InvalidKey {
        /// The key as given.
        key: String,
        /// The layer that supplied it.
        layer: String,
    },

    /// A key the defaults do not have, usually a typo.
    #[error("unknown key `{key}` (from {layer}){}", hint(.suggestion))]
    UnknownKey {
        /// The dotted key.
        key: String,
        /// The layer that supplied it.
        layer: String,
        /// The closest known key, if one is close enough to be a likely typo.
        suggestion: Option<String>,
    },

    /// A value of the wrong type or that fails validation.
    #[error("invalid value {value} for `{key}` (from {layer}): {reason}")]
    Invalid {
        /// The dotted key.
        key: String,
        /// The value, displayed (strings in quotes).
        value: String,
        /// The layer that set it, or `defaults`.
        layer: String,
        /// Why it was rejected.
        reason: String,
    },

    /// The effective configuration could not be serialized back.
    #[error("cannot serialize the effective config: {reason}")]
    Serialize {
        /// The serializer's message.
        reason: String,
    },

    /// Several problems found in one load; displays one per line.
    #[error("{}", Lines(.0))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// The individual problems: the members of [`ConfigError::Many`], otherwise just `self`.
    pub fn problems(&self) -> &[ConfigError] {
        match self {
            ConfigError::Many(all) => all,
            one => std::slice::from_ref(one),
        }
    }

    /// One problem as itself, several as `Many`; `None` when there are none.
    pub(crate) fn collect(problems: Vec<ConfigError>) -> Option<ConfigError> {
        let mut flat = Vec::with_capacity(problems.len());
        for problem in problems {
            match problem {
                ConfigError::Many(inner) => flat.extend(inner),
                one => flat.push(one),
            }
        }
        match flat.len() {
            0 => None,
            1 => flat.pop(),
            _ => Some(ConfigError::Many(flat)),
        }
    }
}

fn hint(suggestion: &Option<String>) -> String {
    match suggestion {
        Some(s) => format!("; did you mean `{s}`?"),
        None => String::new(),
    }
}

struct Lines<'a>(&'a [ConfigError]);

impl fmt::Display for Lines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        Ok(())
    }
}
