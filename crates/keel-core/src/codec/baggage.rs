//! The `baggage` header: application key/value pairs that ride along with a trace.
//!
//! Implements *W3C Baggage* (Candidate Recommendation), §3.2 "Header Content": a comma-separated
//! list of `key OWS "=" OWS value *(OWS ";" OWS property)`, keys are RFC 7230 tokens, values are
//! `baggage-octet`s with anything else percent-encoded and decoded as UTF-8 (invalid sequences
//! become U+FFFD), and properties are opaque metadata that Keel keeps verbatim.
//!
//! Limits (§3.3): a propagator must carry at least 180 list-members and 8192 bytes and may drop
//! more; Keel rejects a header beyond either limit outright, since half a baggage set is worse
//! than none. Where the grammar is silent, Keel is lenient in two ways: whitespace-only
//! list-members (a trailing comma) are skipped, and a `%` not followed by two hex digits is kept
//! as a literal `%`. A repeated key keeps its first position and its last value, the same rule
//! [`Baggage::set`] and [`Baggage::extend_from`] follow.

use super::{CodecError, hex};

const HEADER: &str = "baggage";

/// Parsed baggage: entries in the order received.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Baggage {
    entries: Vec<Entry>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    key: String,
    /// Percent-decoded.
    value: String,
    /// Everything after the first `;`, trimmed, verbatim; empty when there are none.
    properties: String,
}

impl Baggage {
    /// The most list-members Keel accepts (§3.3.1).
    pub const MAX_ENTRIES: usize = 180;
    /// The most bytes Keel accepts across all `baggage` header lines (§3.3.1).
    pub const MAX_BYTES: usize = 8192;

    /// Parses one `baggage` header value.
    pub fn parse(v: &[u8]) -> Result<Baggage, CodecError> {
        let mut b = Baggage::default();
        b.extend_from(v)?;
        Ok(b)
    }

    /// Merges another `baggage` header line, as if it were comma-joined to what is already here.
    /// The limits apply to the combination (the bytes already held are counted by their encoded
    /// length). On error `self` is left unchanged.
    pub fn extend_from(&mut self, v: &[u8]) -> Result<(), CodecError> {
        let held = if self.entries.is_empty() {
            0
        } else {
            self.encoded_len() + 1
        };
        if v.len() + held > Self::MAX_BYTES {
            return Err(CodecError::new(
                HEADER,
                format!("longer than {} bytes", Self::MAX_BYTES),
            ));
        }
        let mut parsed: Vec<Entry> = Vec::new();
        for (i, member) in v.split(|&b| b == b',').enumerate() {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            let entry = parse_member(i + 1, member)?;
            upsert(&mut parsed, entry);
        }
        let new_keys = parsed
            .iter()
            .filter(|e| self.position(&e.key).is_none())
            .count();
        if self.entries.len() + new_keys > Self::MAX_ENTRIES {
            return Err(CodecError::new(
                HEADER,
                format!("more than {} list-members", Self::MAX_ENTRIES),
            ));
        }
        for e in parsed {
            upsert(&mut self.entries, e);
        }
        Ok(())
    }

    /// The decoded value for `key` (keys are case-sensitive).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.position(key).map(|i| self.entries[i].value.as_str())
    }

    /// The raw properties attached to `key`'s entry (`"a;b=c"`), if it has any.
    pub fn properties(&self, key: &str) -> Option<&str> {
        self.position(key)
            .map(|i| self.entries[i].properties.as_str())
            .filter(|p| !p.is_empty())
    }

    /// Sets `key` to `value`, replacing (in place, dropping its properties) an existing entry or
    /// appending a new one. `key` must be an RFC 7230 token: an invalid key is a programming
    /// error, asserted in debug builds and skipped in release builds. The limits are not enforced
    /// here; a service that adds many entries must keep within them or receivers will drop the
    /// header.
    pub fn set(&mut self, key: impl Into<String>, value: impl Into<String>) {
        let key = key.into();
        if !valid_token(key.as_bytes()) {
            debug_assert!(false, "baggage key {key:?} is not an RFC 7230 token");
            return;
        }
        upsert(
            &mut self.entries,
            Entry {
                key,
                value: value.into(),
                properties: String::new(),
            },
        );
    }

    /// Removes `key`, returning its value; the other entries keep their order.
    pub fn remove(&mut self, key: &str) -> Option<String> {
        self.position(key).map(|i| self.entries.remove(i).value)
    }

    /// True when there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// `(key, decoded value)` pairs in order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.entries
            .iter()
            .map(|e| (e.key.as_str(), e.value.as_str()))
    }

    /// Encodes as one `baggage` header value: `key=value[;properties]` joined by `,`, with values
    /// percent-encoded (everything outside `baggage-octet`, and `%` itself). Round-trips with
    /// [`Baggage::parse`].
    pub fn encode(&self) -> String {
        let mut s = String::with_capacity(self.encoded_len());
        for (i, e) in self.entries.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&e.key);
            s.push('=');
            for &b in e.value.as_bytes() {
                if needs_escape(b) {
                    s.push('%');
                    s.push(hex::upper_digit(b >> 4));
                    s.push(hex::upper_digit(b));
                } else {
                    s.push(char::from(b));
                }
            }
            if !e.properties.is_empty() {
                s.push(';');
                s.push_str(&e.properties);
            }
        }
        s
    }

    /// The exact length of [`Baggage::encode`]'s output, so it allocates once.
    fn encoded_len(&self) -> usize {
        let commas = self.entries.len().saturating_sub(1);
        self.entries
            .iter()
            .map(|e| {
                let value: usize = e
                    .value
                    .bytes()
                    .map(|b| if needs_escape(b) { 3 } else { 1 })
                    .sum();
                let props = if e.properties.is_empty() {
                    0
                } else {
                    1 + e.properties.len()
                };
                e.key.len() + 1 + value + props
            })
            .sum::<usize>()
            + commas
    }

    fn position(&self, key: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.key == key)
    }
}

/// Replaces the value of an entry with the same key where it stands, or appends.
fn upsert(entries: &mut Vec<Entry>, entry: Entry) {
    match entries.iter_mut().find(|e| e.key == entry.key) {
        Some(e) => *e = entry,
        None => entries.push(entry),
    }
}

/// Parses one non-empty list-member; `i` (1-based) names it in errors.
fn parse_member(i: usize, member: &[u8]) -> Result<Entry, CodecError> {
    let (kv, props) = match member.iter().position(|&b| b == b';') {
        Some(semi) => (&member[..semi], Some(trim_ows(&member[semi + 1..]))),
        None => (member, None),
    };
    let Some(eq) = kv.iter().position(|&b| b == b'=') else {
        return Err(member_err(i, kv, "has no '='"));
    };
    let key = trim_ows(&kv[..eq]);
    let value = trim_ows(&kv[eq + 1..]);
    if !valid_token(key) {
        return Err(member_err(i, key, "has an invalid key"));
    }
    if !value.iter().all(|&b| is_baggage_octet(b)) {
        return Err(member_err(i, key, "has an invalid value"));
    }
    // A `;` promises at least one property, so `k=v;` is malformed.
    if props.is_some_and(|p| !p.split(|&b| b == b';').all(valid_property)) {
        return Err(member_err(i, key, "has an invalid property"));
    }
    // Key and properties were checked to be ASCII above.
    Ok(Entry {
        key: String::from_utf8_lossy(key).into_owned(),
        value: percent_decode(value),
        properties: String::from_utf8_lossy(props.unwrap_or_default()).into_owned(),
    })
}

fn member_err(i: usize, key: &[u8], what: &str) -> CodecError {
    // Quote at most a short prefix: the header is untrusted and ends up in logs.
    let shown = String::from_utf8_lossy(&key[..key.len().min(64)]);
    CodecError::new(HEADER, format!("list-member {i} ({shown:?}) {what}"))
}

/// `property = key OWS "=" OWS value / key OWS`.
fn valid_property(p: &[u8]) -> bool {
    let p = trim_ows(p);
    match p.iter().position(|&b| b == b'=') {
        Some(eq) => {
            valid_token(trim_ows(&p[..eq]))
                && trim_ows(&p[eq + 1..]).iter().all(|&b| is_baggage_octet(b))
        }
        None => valid_token(p),
    }
}

/// Percent-decodes a value already checked to be `baggage-octet`s; bytes that are not UTF-8
/// become U+FFFD as §3.2.1.1 requires, and a malformed escape stays as it came.
fn percent_decode(v: &[u8]) -> String {
    if !v.contains(&b'%') {
        // The common case: plain ASCII, nothing to decode.
        return String::from_utf8_lossy(v).into_owned();
    }
    let lenient = super::percent::Options {
        plus_as_space: false,
        keep_malformed: true,
    };
    // Cannot fail: malformed escapes are kept.
    super::percent::decode_lossy(v, lenient).unwrap_or_default()
}

/// `baggage-octet = %x21 / %x23-2B / %x2D-3A / %x3C-5B / %x5D-7E`: printable ASCII except
/// `"`, `,`, `;` and `\`.
fn is_baggage_octet(b: u8) -> bool {
    matches!(b, 0x21 | 0x23..=0x2b | 0x2d..=0x3a | 0x3c..=0x5b | 0x5d..=0x7e)
}

fn needs_escape(b: u8) -> bool {
    b == b'%' || !is_baggage_octet(b)
}

/// An RFC 7230 §3.2.6 `token`: one or more `tchar`.
fn valid_token(t: &[u8]) -> bool {
    !t.is_empty()
        && t.iter().all(|&b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'#'
                        | b'$'
                        | b'%'
                        | b'&'
                        | b'\''
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        })
}

/// OWS from RFC 7230: spaces and horizontal tabs only.
fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

#[cfg(test)]
mod tests;
