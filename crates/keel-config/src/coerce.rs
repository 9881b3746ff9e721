//! Typing environment and flag strings by looking at the default value at the same key.
//!
//! `KEEL_SERVER__LISTENERS=4` must become the number 4, not the string "4", before serde sees
//! it. The defaults know each key's JSON type, so they decide; where they cannot (an unset
//! option, an open map) the type is inferred and a string fallback is kept in case the guess
//! was wrong, so an `Option<String>` still accepts "123".

use serde_json::{Number, Value};

use crate::schema::Slot;

/// A raw string turned into a JSON value.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Typed {
    pub(crate) value: Value,
    /// What to use instead if `value` was a guess that deserialization rejected.
    pub(crate) fallback: Option<Value>,
    /// A typing failure held back until deserialization confirms it: the string is passed
    /// through because the field may still accept it (a `ByteSize` whose default printed as
    /// an integer accepts "1MiB"), and this reason is reported only if it does not.
    pub(crate) deferred: Option<&'static str>,
}

const EXPECTED_BOOL: &str = "expected a boolean (true/false, yes/no, on/off, 1/0)";
const EXPECTED_INTEGER: &str = "expected an integer";
const EXPECTED_NUMBER: &str = "expected a number";

/// Types `raw` for a key whose place in the defaults is `slot`; the error is the reason.
pub(crate) fn coerce(slot: &Slot<'_>, raw: &str) -> Result<Typed, String> {
    let default = match slot {
        Slot::Known(value) => *value,
        Slot::Open => &Value::Null,
    };
    let exact = |value| Typed {
        value,
        fallback: None,
        deferred: None,
    };
    match default {
        Value::Null => Ok(infer(raw)),
        Value::Bool(_) => parse_bool(raw)
            .map(|b| exact(Value::Bool(b)))
            .ok_or_else(|| EXPECTED_BOOL.to_owned()),
        Value::Number(n) if n.is_f64() => parse_float(raw)
            .map(exact)
            .ok_or_else(|| EXPECTED_NUMBER.to_owned()),
        Value::Number(_) => match parse_integer(raw) {
            Some(value) => Ok(exact(value)),
            None if looks_like_quantity(raw) => Ok(Typed {
                value: Value::String(raw.to_owned()),
                fallback: None,
                deferred: Some(EXPECTED_INTEGER),
            }),
            None => Err(EXPECTED_INTEGER.to_owned()),
        },
        Value::String(_) => Ok(exact(Value::String(raw.to_owned()))),
        Value::Array(items) => parse_list(raw, items.first()),
        Value::Object(_) => {
            if raw.trim_start().starts_with('{') {
                match serde_json::from_str::<Value>(raw) {
                    Ok(value @ Value::Object(_)) => Ok(exact(value)),
                    Ok(_) => Err("expected a JSON object".to_owned()),
                    Err(e) => Err(format!("expected a JSON object: {e}")),
                }
            } else {
                Err(
                    "expected a table; set its keys one by one (section.key) or give a JSON object"
                        .to_owned(),
                )
            }
        }
    }
}

/// Guesses a type for a key the defaults cannot type, keeping the string as a fallback.
fn infer(raw: &str) -> Typed {
    let guess = if looks_numeric(raw) {
        parse_number(raw)
    } else if raw.trim().eq_ignore_ascii_case("true") || raw.trim().eq_ignore_ascii_case("false") {
        Some(Value::Bool(raw.trim().eq_ignore_ascii_case("true")))
    } else {
        None
    };
    match guess {
        Some(value) => Typed {
            value,
            fallback: Some(Value::String(raw.to_owned())),
            deferred: None,
        },
        None => Typed {
            value: Value::String(raw.to_owned()),
            fallback: None,
            deferred: None,
        },
    }
}

fn parse_list(raw: &str, first_default: Option<&Value>) -> Result<Typed, String> {
    let trimmed = raw.trim();
    if trimmed.starts_with('[') {
        return match serde_json::from_str::<Value>(trimmed) {
            Ok(value @ Value::Array(_)) => Ok(Typed {
                value,
                fallback: None,
                deferred: None,
            }),
            Ok(_) => Err("expected a JSON array".to_owned()),
            Err(e) => Err(format!("expected a JSON array: {e}")),
        };
    }
    let items: Vec<&str> = if trimmed.is_empty() {
        Vec::new()
    } else {
        trimmed.split(',').map(str::trim).collect()
    };
    let strings = || {
        Value::Array(
            items
                .iter()
                .map(|s| Value::String((*s).to_owned()))
                .collect(),
        )
    };
    let typed = |parse: fn(&str) -> Option<Value>, reason: &str| {
        items
            .iter()
            .map(|s| parse(s))
            .collect::<Option<Vec<_>>>()
            .map(|values| Typed {
                value: Value::Array(values),
                fallback: None,
                deferred: None,
            })
            .ok_or_else(|| reason.to_owned())
    };
    match first_default {
        Some(Value::Number(n)) if n.is_f64() => {
            typed(parse_float, "expected a comma-separated list of numbers")
        }
        Some(Value::Number(_)) => {
            typed(parse_integer, "expected a comma-separated list of integers")
        }
        Some(Value::Bool(_)) => typed(
            |s| parse_bool(s).map(Value::Bool),
            "expected a comma-separated list of booleans",
        ),
        Some(_) => Ok(Typed {
            value: strings(),
            fallback: None,
            deferred: None,
        }),
        // An empty default list says nothing about its items: guess each, fall back to strings.
        None => {
            let guesses: Vec<Typed> = items.iter().map(|s| infer(s)).collect();
            let guessed = guesses.iter().any(|t| t.fallback.is_some());
            Ok(Typed {
                value: Value::Array(guesses.into_iter().map(|t| t.value).collect()),
                fallback: guessed.then(strings),
                deferred: None,
            })
        }
    }
}

fn parse_bool(raw: &str) -> Option<bool> {
    match raw.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn parse_integer(raw: &str) -> Option<Value> {
    let s = raw.trim();
    s.parse::<i64>()
        .map(Value::from)
        .or_else(|_| s.parse::<u64>().map(Value::from))
        .ok()
}

fn parse_float(raw: &str) -> Option<Value> {
    if !looks_numeric(raw) {
        return None;
    }
    raw.trim()
        .parse::<f64>()
        .ok()
        .and_then(Number::from_f64)
        .map(Value::Number)
}

fn parse_number(raw: &str) -> Option<Value> {
    parse_integer(raw).or_else(|| parse_float(raw))
}

/// Digits up front, so Rust's float parser does not turn "inf" or "NaN" into numbers.
fn looks_numeric(raw: &str) -> bool {
    let s = raw.trim();
    let s = s.strip_prefix(['-', '+']).unwrap_or(s);
    let s = s.strip_prefix('.').unwrap_or(s);
    s.starts_with(|c: char| c.is_ascii_digit())
}

/// A number followed by a unit, like "1MiB" or "30s".
fn looks_like_quantity(raw: &str) -> bool {
    let s = raw.trim();
    s.starts_with(|c: char| c.is_ascii_digit()) && s.chars().any(|c| c.is_alphabetic())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn typed(default: Value, raw: &str) -> Result<Typed, String> {
        coerce(&Slot::Known(&default), raw)
    }

    #[test]
    fn follows_the_default_type() {
        assert_eq!(typed(json!(false), "Yes").unwrap().value, json!(true));
        assert_eq!(typed(json!(true), "off").unwrap().value, json!(false));
        assert_eq!(typed(json!(1), "42").unwrap().value, json!(42));
        assert_eq!(
            typed(json!(1), "18446744073709551615").unwrap().value,
            json!(u64::MAX)
        );
        assert_eq!(typed(json!(0.5), "2").unwrap().value, json!(2.0));
        assert_eq!(typed(json!("x"), "123").unwrap().value, json!("123"));
        assert_eq!(
            typed(json!(["a"]), "a, b ,c").unwrap().value,
            json!(["a", "b", "c"])
        );
        assert_eq!(typed(json!([1]), "80,443").unwrap().value, json!([80, 443]));
        assert_eq!(
            typed(json!(["a"]), "[\"x,y\"]").unwrap().value,
            json!(["x,y"])
        );
        assert_eq!(typed(json!(["a"]), "").unwrap().value, json!([]));
        assert_eq!(
            typed(json!({}), "{\"a\":\"b\"}").unwrap().value,
            json!({"a": "b"})
        );
    }

    #[test]
    fn rejects_strings_that_do_not_fit() {
        assert_eq!(typed(json!(false), "maybe").unwrap_err(), EXPECTED_BOOL);
        assert_eq!(typed(json!(1), "abc").unwrap_err(), EXPECTED_INTEGER);
        assert_eq!(typed(json!(1), "1.5").unwrap_err(), EXPECTED_INTEGER);
        assert_eq!(typed(json!(0.5), "inf").unwrap_err(), EXPECTED_NUMBER);
        assert!(typed(json!([1]), "1,x").is_err());
        assert!(typed(json!({"a": 1}), "x").is_err());
    }

    #[test]
    fn integer_with_unit_is_deferred_not_rejected() {
        let t = typed(json!(1000), "1MiB").unwrap();
        assert_eq!(t.value, json!("1MiB"));
        assert_eq!(t.deferred, Some(EXPECTED_INTEGER));
    }

    #[test]
    fn infers_where_the_default_is_null() {
        let t = typed(Value::Null, "8").unwrap();
        assert_eq!((t.value, t.fallback), (json!(8), Some(json!("8"))));
        let t = coerce(&Slot::Open, "TRUE").unwrap();
        assert_eq!((t.value, t.fallback), (json!(true), Some(json!("TRUE"))));
        let t = typed(Value::Null, "nan").unwrap();
        assert_eq!((t.value, t.fallback), (json!("nan"), None));
        let t = typed(json!([]), "1,a").unwrap();
        assert_eq!(
            (t.value, t.fallback),
            (json!([1, "a"]), Some(json!(["1", "a"])))
        );
    }
}
