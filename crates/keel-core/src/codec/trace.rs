//! Trace identity: trace and span ids, and the `traceparent` / `tracestate` headers.
//!
//! Implements *W3C Trace Context* (Recommendation, level 1), §3.2 `traceparent` and §3.3
//! `tracestate`. Where level 1 leaves a choice, Keel takes the strict reading so it never forwards
//! something a conforming peer would drop: uppercase hex, all-zero ids, version `ff`, and a
//! version-00 header with trailing data are all errors, and the caller restarts the trace.
//!
//! `tracestate` is opaque to Keel (it belongs to the tracing vendors), so it is validated and kept
//! verbatim instead of being parsed into a map that would have to be re-serialised.

use std::fmt;

use super::{CodecError, hex, rand};

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// A 128-bit trace id. Displays as 32 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct TraceId(pub [u8; 16]);

/// A 64-bit span id (`parent-id` in W3C terms). Displays as 16 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SpanId(pub [u8; 8]);

/// A parsed `traceparent`: who the caller's span is and whether it is sampled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TraceParent {
    /// The whole trace's id.
    pub trace_id: TraceId,
    /// The id of the caller's span, which becomes the parent of ours.
    pub parent_id: SpanId,
    /// `trace-flags`; bit 0 is `sampled`.
    pub flags: u8,
}

/// A validated `tracestate` value, kept verbatim (trimmed of surrounding whitespace).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TraceState(String);

// Both id types share everything but their width; a macro keeps the two in lockstep.
macro_rules! hex_id {
    ($ty:ident, $n:literal) => {
        impl $ty {
            /// True unless every byte is zero, which the spec reserves as "invalid".
            pub fn is_valid(&self) -> bool {
                self.0 != [0; $n]
            }

            /// A new random id from the thread-local, non-cryptographic generator; never all zero.
            pub fn random() -> Self {
                let mut b = [0u8; $n];
                // All-zero is invalid; with 64+ random bits this loop runs once in practice.
                while b == [0; $n] {
                    rand::fill(&mut b);
                }
                Self(b)
            }

            /// Parses exactly
            #[doc = concat!(stringify!($n), " bytes written as lowercase hex.")]
            /// An all-zero id parses; check [`Self::is_valid`].
            pub fn from_hex(v: &[u8]) -> Option<Self> {
                hex::decode::<$n>(v).map(Self)
            }

            fn to_hex(self) -> [u8; 2 * $n] {
                let mut buf = [0u8; 2 * $n];
                hex::encode_into(&self.0, &mut buf);
                buf
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let buf = self.to_hex();
                f.write_str(std::str::from_utf8(&buf).map_err(|_| fmt::Error)?)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }
    };
}

hex_id!(TraceId, 16);
hex_id!(SpanId, 8);

impl TraceParent {
    /// The length of a version-00 `traceparent`: `vv-{32}-{16}-ff`.
    pub const LEN: usize = 55;

    /// Parses a `traceparent` value.
    ///
    /// Version `00` must be exactly 55 characters. Later versions (`01`..=`fe`) are parsed as
    /// §3.2.4 asks: at least 55 characters, the version-00 fields in place, and either the end or
    /// a `-` right after the flags; only the `sampled` flag is kept, since the other bits may
    /// mean something else in that version. Version `ff`, uppercase hex and all-zero ids are
    /// invalid.
    pub fn parse(v: &[u8]) -> Result<TraceParent, CodecError> {
        let err = |reason: &str| CodecError::new(TRACEPARENT, reason);
        if v.len() < Self::LEN {
            return Err(err("shorter than 55 characters"));
        }
        let [version] =
            hex::decode::<1>(&v[0..2]).ok_or_else(|| err("version is not lowercase hex"))?;
        if version == 0xff {
            return Err(err("version ff is invalid"));
        }
        if v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
            return Err(err("fields are not separated by '-'"));
        }
        match (version, v.get(Self::LEN)) {
            (0, Some(_)) => return Err(err("version 00 must be exactly 55 characters")),
            (_, Some(&c)) if c != b'-' => return Err(err("no '-' after trace-flags")),
            _ => {}
        }
        let trace_id =
            TraceId::from_hex(&v[3..35]).ok_or_else(|| err("trace-id is not 32 lowercase hex"))?;
        let parent_id =
            SpanId::from_hex(&v[36..52]).ok_or_else(|| err("parent-id is not 16 lowercase hex"))?;
        let [flags] =
            hex::decode::<1>(&v[53..55]).ok_or_else(|| err("trace-flags is not lowercase hex"))?;
        if !trace_id.is_valid() {
            return Err(err("trace-id is all zeros"));
        }
        if !parent_id.is_valid() {
            return Err(err("parent-id is all zeros"));
        }
        let flags = if version == 0 { flags } else { flags & 1 };
        Ok(TraceParent {
            trace_id,
            parent_id,
            flags,
        })
    }

    /// Whether the caller recorded its span (`trace-flags` bit 0).
    pub fn sampled(&self) -> bool {
        self.flags & 1 == 1
    }

    /// Encodes as version `00` (always 55 characters).
    pub fn encode(&self) -> String {
        String::from_utf8_lossy(self.encode_into(&mut [0; Self::LEN])).into_owned()
    }

    /// [`TraceParent::encode`] into a stack buffer: `00-{trace}-{parent}-{flags}`, lowercase
    /// hex (visible ASCII), for writers that take bytes without a `String` per call.
    pub fn encode_into<'a>(&self, buf: &'a mut [u8; Self::LEN]) -> &'a [u8] {
        buf[..3].copy_from_slice(b"00-");
        hex::encode_into(&self.trace_id.0, &mut buf[3..35]);
        buf[35] = b'-';
        hex::encode_into(&self.parent_id.0, &mut buf[36..52]);
        buf[52] = b'-';
        hex::encode_into(&[self.flags], &mut buf[53..55]);
        buf
    }

    /// The `traceparent` for the next hop: same trace and flags, with a fresh span id standing
    /// for the span this service opens.
    pub fn child(&self) -> TraceParent {
        TraceParent {
            parent_id: SpanId::random(),
            ..*self
        }
    }
}

impl TraceState {
    /// The most list-members a `tracestate` may hold (§3.3.1.1).
    const MAX_MEMBERS: usize = 32;
    /// The spec asks propagators to pass at least 512 bytes; we accept up to this many before
    /// calling the header abusive.
    const MAX_LEN: usize = 8192;

    /// Validates a `tracestate` value: at most 32 list-members of `key=value` with the §3.3.1.3
    /// key and value grammars and unique keys; empty list-members (`a=1,,b=2`) are allowed and
    /// skipped, as the spec says. Longer than 8192 bytes is an error.
    pub fn parse(v: &[u8]) -> Result<TraceState, CodecError> {
        let err = |reason: String| CodecError::new(TRACESTATE, reason);
        if v.len() > Self::MAX_LEN {
            return Err(err(format!("longer than {} bytes", Self::MAX_LEN)));
        }
        let v = trim_ows(v);
        // Remember the keys seen so far on the stack, to reject duplicates without allocating.
        let mut keys: [&[u8]; Self::MAX_MEMBERS] = [&[]; Self::MAX_MEMBERS];
        let mut n = 0;
        for member in v.split(|&b| b == b',') {
            let member = trim_ows(member);
            if member.is_empty() {
                continue;
            }
            if n == Self::MAX_MEMBERS {
                return Err(err(format!("more than {} list-members", Self::MAX_MEMBERS)));
            }
            let Some(eq) = member.iter().position(|&b| b == b'=') else {
                return Err(err(format!("list-member {} has no '='", n + 1)));
            };
            let (key, value) = (&member[..eq], &member[eq + 1..]);
            if !valid_key(key) {
                return Err(err(format!("list-member {} has an invalid key", n + 1)));
            }
            if !valid_value(value) {
                return Err(err(format!("list-member {} has an invalid value", n + 1)));
            }
            if keys[..n].contains(&key) {
                return Err(err(format!("list-member {} repeats a key", n + 1)));
            }
            keys[n] = key;
            n += 1;
        }
        // Everything accepted above is ASCII, so this conversion cannot fail.
        let s = std::str::from_utf8(v).map_err(|_| err("not ASCII".to_owned()))?;
        Ok(TraceState(s.to_owned()))
    }

    /// The validated header value.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True when the header held no list-members worth forwarding.
    pub fn is_empty(&self) -> bool {
        self.0.bytes().all(|b| b == b',' || b == b' ' || b == b'\t')
    }
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

/// `lcalpha / DIGIT / "_" / "-" / "*" / "/"`, the tail of every key part.
fn key_char(b: u8) -> bool {
    matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_' | b'-' | b'*' | b'/')
}

/// §3.3.1.3.1: `simple-key = lcalpha 0*255(keychar)` or
/// `multi-tenant-key = tenant-id "@" system-id`, where
/// `tenant-id = (lcalpha / DIGIT) 0*240(keychar)` and `system-id = lcalpha 0*13(keychar)`.
fn valid_key(key: &[u8]) -> bool {
    match key.iter().position(|&b| b == b'@') {
        None => {
            matches!(key, [b'a'..=b'z', rest @ ..] if rest.len() <= 255 && rest.iter().all(|&b| key_char(b)))
        }
        Some(at) => {
            let (tenant, system) = (&key[..at], &key[at + 1..]);
            matches!(tenant, [b'a'..=b'z' | b'0'..=b'9', rest @ ..] if rest.len() <= 240 && rest.iter().all(|&b| key_char(b)))
                && matches!(system, [b'a'..=b'z', rest @ ..] if rest.len() <= 13 && rest.iter().all(|&b| key_char(b)))
        }
    }
}

/// §3.3.1.3.2: `value = 0*255(chr) nblk-chr`, where `nblk-chr` is printable ASCII except `,` and
/// `=`, and `chr` adds the space.
fn valid_value(value: &[u8]) -> bool {
    let nblk = |b: u8| matches!(b, 0x21..=0x7e) && b != b',' && b != b'=';
    match value {
        [rest @ .., last] => {
            value.len() <= 256 && nblk(*last) && rest.iter().all(|&b| b == b' ' || nblk(b))
        }
        [] => false,
    }
}

#[cfg(test)]
mod tests;
