//! `Validate` and `Validator`: checks that types alone cannot express.
//!
//! Validation collects problems instead of returning at the first one, so an operator fixing
//! a config sees every mistake in one run.

use std::fmt::Display;

/// Semantic checks on a config struct, run after it deserializes.
///
/// Keys given to the [`Validator`] are relative to this struct; the parent adds the section
/// prefix through [`Validator::nested`].
pub trait Validate {
    /// Records any problems with `self`. The default accepts everything.
    fn validate(&self, _v: &mut Validator) {}
}

impl<T: Validate> Validate for Option<T> {
    fn validate(&self, v: &mut Validator) {
        if let Some(inner) = self {
            inner.validate(v);
        }
    }
}

/// Collects validation problems, each under its full dotted key.
#[derive(Debug, Default)]
pub struct Validator {
    prefix: Vec<String>,
    problems: Vec<Problem>,
}

/// One validation failure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The full dotted key, e.g. `server.listeners`.
    pub key: String,
    /// The offending value as displayed.
    pub value: String,
    /// Why it is wrong, e.g. `must be at least 1`.
    pub reason: String,
}

impl Validator {
    /// An empty validator, for running a `Validate` impl in isolation (e.g. in its crate's tests).
    pub fn new() -> Self {
        Self::default()
    }

    /// Records a problem with `key` (relative to the current section).
    pub fn invalid(&mut self, key: &str, value: impl Display, reason: impl Into<String>) {
        let key = self
            .prefix
            .iter()
            .map(String::as_str)
            .chain([key])
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(".");
        self.problems.push(Problem {
            key,
            value: value.to_string(),
            reason: reason.into(),
        });
    }

    /// Records a problem unless `ok`.
    pub fn check(&mut self, ok: bool, key: &str, value: impl Display, reason: impl Into<String>) {
        if !ok {
            self.invalid(key, value, reason);
        }
    }

    /// Validates a nested struct, prefixing its keys with `section.`.
    pub fn nested(&mut self, section: &str, inner: &impl Validate) {
        self.prefix.push(section.to_owned());
        inner.validate(self);
        self.prefix.pop();
    }

    /// The problems recorded so far.
    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    /// Whether nothing has been recorded.
    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    /// The recorded problems.
    pub fn into_problems(self) -> Vec<Problem> {
        self.problems
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Inner(u32);

    impl Validate for Inner {
        fn validate(&self, v: &mut Validator) {
            v.check(self.0 > 0, "count", self.0, "must be positive");
        }
    }

    struct Outer {
        inner: Inner,
        deeper: Option<Inner>,
    }

    impl Validate for Outer {
        fn validate(&self, v: &mut Validator) {
            v.nested("inner", &self.inner);
            v.nested("deeper", &self.deeper);
            v.invalid("", "x", "whole struct");
        }
    }

    #[test]
    fn nested_keys_are_prefixed() {
        let mut v = Validator::new();
        Outer {
            inner: Inner(0),
            deeper: Some(Inner(0)),
        }
        .validate(&mut v);
        let keys: Vec<_> = v.problems().iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["inner.count", "deeper.count", ""]);
        assert_eq!(v.problems()[0].value, "0");
    }
}
