//! Zipkin B3 propagation: the `b3` single header and the `X-B3-*` multi headers.
//!
//! Implements *openzipkin/b3-propagation* (README, "Single Header" and "Multiple Headers").
//! Ids are lowercase hex like W3C Trace Context; a 64-bit trace id (16 hex digits) is held
//! left-padded with zeros to 128 bits, and is written back as 16 digits so 64-bit-only peers keep
//! working. All-zero trace and span ids are rejected, as Zipkin's own libraries do, because they
//! could never be continued as a W3C trace; an all-zero parent span id means "no parent".
//!
//! Debug (`d` / `X-B3-Flags: 1`) implies an accept decision, so a debug [`B3`] always reports
//! `sampled == Some(true)`.

use super::{CodecError, SpanId, TraceId, TraceParent, hex};

const SINGLE: &str = "b3";
const TRACE_ID: &str = "x-b3-traceid";
const SPAN_ID: &str = "x-b3-spanid";
const PARENT_SPAN_ID: &str = "x-b3-parentspanid";
const SAMPLED: &str = "x-b3-sampled";
const FLAGS: &str = "x-b3-flags";

/// A B3 trace context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct B3 {
    /// 128-bit trace id; 64-bit ids are left-padded with zeros.
    pub trace_id: TraceId,
    /// The caller's span.
    pub span_id: SpanId,
    /// The caller's parent span, if it sent one.
    pub parent_span_id: Option<SpanId>,
    /// The sampling decision; `None` means the caller deferred it to us.
    pub sampled: Option<bool>,
    /// Debug: record this trace regardless of sampling, and flag it to the collector.
    pub debug: bool,
}

/// Parses a `b3` single header: `{traceid}-{spanid}[-{sampling}[-{parentspanid}]]`.
///
/// A lone sampling state (`0`, `1`, `d`) carries no identity and yields `Ok(None)`; read the
/// decision with [`parse_single_sampling`].
pub fn parse_single(v: &[u8]) -> Result<Option<B3>, CodecError> {
    if parse_single_sampling(v).is_some() {
        return Ok(None);
    }
    let err = |reason: &str| CodecError::new(SINGLE, reason);
    let mut fields = v.split(|&b| b == b'-');
    let trace_id = trace_id(fields.next().unwrap_or_default())
        .ok_or_else(|| err("trace id is not 16 or 32 lowercase hex"))?;
    let span_id = fields
        .next()
        .and_then(span_id)
        .ok_or_else(|| err("span id is missing or not 16 lowercase hex"))?;
    let (sampled, debug) = match fields.next() {
        None => (None, false),
        Some(b"0") => (Some(false), false),
        Some(b"1") => (Some(true), false),
        Some(b"d") => (Some(true), true),
        Some(_) => return Err(err("sampling state is not 0, 1 or d")),
    };
    let parent_span_id = match fields.next() {
        None => None,
        Some(p) => parent(p).ok_or_else(|| err("parent span id is not 16 lowercase hex"))?,
    };
    if fields.next().is_some() {
        return Err(err("more than four fields"));
    }
    Ok(Some(B3 {
        trace_id,
        span_id,
        parent_span_id,
        sampled,
        debug,
    }))
}

/// The decision in a `b3` header that is a lone sampling state: `Some(Some(false))` for `0`,
/// `Some(Some(true))` for `1` and `d` (debug implies sampled); `None` for anything else.
pub fn parse_single_sampling(v: &[u8]) -> Option<Option<bool>> {
    match v {
        b"0" => Some(Some(false)),
        b"1" | b"d" => Some(Some(true)),
        _ => None,
    }
}

/// Parses the `X-B3-*` multi headers.
///
/// `get` is called with lowercase header names (`"x-b3-traceid"`, ...) and must look them up
/// case-insensitively. Returns `Ok(None)` when neither the trace id nor the span id is present
/// (a bare `X-B3-Sampled` is a decision without identity: see [`parse_multi_sampling`]), and an
/// error when only one of them is or any header present is malformed. `X-B3-Flags` values other
/// than `1` are ignored, as the spec allows.
pub fn parse_multi<'a>(get: impl Fn(&str) -> Option<&'a [u8]>) -> Result<Option<B3>, CodecError> {
    let (trace, span) = match (get(TRACE_ID), get(SPAN_ID)) {
        (None, None) => return Ok(None),
        (Some(_), None) => {
            return Err(CodecError::new(
                SPAN_ID,
                "missing while x-b3-traceid is present",
            ));
        }
        (None, Some(_)) => {
            return Err(CodecError::new(
                TRACE_ID,
                "missing while x-b3-spanid is present",
            ));
        }
        (Some(t), Some(s)) => (t, s),
    };
    let trace_id =
        trace_id(trace).ok_or_else(|| CodecError::new(TRACE_ID, "not 16 or 32 lowercase hex"))?;
    let span_id = span_id(span).ok_or_else(|| CodecError::new(SPAN_ID, "not 16 lowercase hex"))?;
    let parent_span_id = match get(PARENT_SPAN_ID) {
        None => None,
        Some(p) => {
            parent(p).ok_or_else(|| CodecError::new(PARENT_SPAN_ID, "not 16 lowercase hex"))?
        }
    };
    let debug = get(FLAGS) == Some(b"1");
    let sampled = match get(SAMPLED) {
        None => None,
        Some(s) => Some(sampled(s)?),
    };
    Ok(Some(B3 {
        trace_id,
        span_id,
        parent_span_id,
        // Debug overrides a contradicting `X-B3-Sampled: 0`: the caller asked for this trace.
        sampled: if debug { Some(true) } else { sampled },
        debug,
    }))
}

/// The sampling decision carried by the multi headers on their own (`X-B3-Flags: 1` or
/// `X-B3-Sampled`), for a request that has no ids. `Err` if `X-B3-Sampled` is malformed.
pub fn parse_multi_sampling<'a>(
    get: impl Fn(&str) -> Option<&'a [u8]>,
) -> Result<Option<bool>, CodecError> {
    if get(FLAGS) == Some(b"1") {
        return Ok(Some(true));
    }
    get(SAMPLED).map(sampled).transpose()
}

/// Encodes the `b3` single header.
///
/// The sampling state is omitted when unknown, and then so is the parent span id: the grammar
/// only allows a parent after a sampling state, and the parent is optional.
pub fn encode_single(b: &B3) -> String {
    let sampling = sampling_char(b);
    let parent = b.parent_span_id.filter(|_| sampling.is_some());
    let trace = trace_id_hex(&b.trace_id);
    let len = trace.len() + 17 + sampling.map_or(0, |_| 2) + parent.map_or(0, |_| 17);
    let mut s = String::with_capacity(len);
    hex::push(&mut s, trace);
    s.push('-');
    hex::push(&mut s, &b.span_id.0);
    if let Some(c) = sampling {
        s.push('-');
        s.push(c);
    }
    if let Some(p) = parent {
        s.push('-');
        hex::push(&mut s, &p.0);
    }
    s
}

/// The longest `b3` single header [`single_into`] writes: a 128-bit trace id, a span id and the
/// sampling flag.
pub const SINGLE_MAX: usize = 32 + 1 + 16 + 2;

/// The `b3` single header for the next hop (`{trace}-{span}-{sampled}`), written into a stack
/// buffer: equal to `encode_single(&B3::from_traceparent(tp))` (a test holds them together),
/// without a `String` per call.
pub fn single_into<'a>(tp: &TraceParent, buf: &'a mut [u8; SINGLE_MAX]) -> &'a [u8] {
    let trace = trace_id_hex(&tp.trace_id);
    let mut at = 2 * trace.len();
    hex::encode_into(trace, &mut buf[..at]);
    buf[at] = b'-';
    hex::encode_into(&tp.parent_id.0, &mut buf[at + 1..at + 17]);
    at += 17;
    buf[at] = b'-';
    buf[at + 1] = if tp.sampled() { b'1' } else { b'0' };
    &buf[..at + 2]
}

/// Encodes the multi headers as `(lowercase name, value)` pairs: trace id, span id, then the
/// parent span id if known, `x-b3-sampled` (`1`/`0`) if known, and `x-b3-flags: 1` for debug. A
/// debug context sends only the flag, because the spec says debug implies the accept decision
/// and `X-B3-Sampled` should then be left out.
pub fn encode_multi(b: &B3) -> Vec<(&'static str, String)> {
    let mut out = Vec::with_capacity(4);
    out.push((TRACE_ID, hex_string(trace_id_hex(&b.trace_id))));
    out.push((SPAN_ID, hex_string(&b.span_id.0)));
    if let Some(p) = b.parent_span_id {
        out.push((PARENT_SPAN_ID, hex_string(&p.0)));
    }
    if b.debug {
        out.push((FLAGS, "1".to_owned()));
    } else if let Some(s) = b.sampled {
        out.push((SAMPLED, if s { "1" } else { "0" }.to_owned()));
    }
    out
}

impl B3 {
    /// The W3C `traceparent` continuing this trace: the B3 span becomes the W3C parent. The
    /// sampled flag is set when B3 says sampled or debug; an unknown decision maps to
    /// not-sampled, because `traceparent` has no "deferred" state and recording is the costlier
    /// mistake. (Keel's sampler may still decide to sample and set the flag itself.)
    pub fn to_traceparent(&self) -> TraceParent {
        let sampled = self.debug || self.sampled == Some(true);
        TraceParent {
            trace_id: self.trace_id,
            parent_id: self.span_id,
            flags: u8::from(sampled),
        }
    }

    /// The B3 context continuing a W3C trace: the W3C parent becomes the B3 span, the sampling
    /// decision is always known, and there is no parent span id or debug flag to carry.
    pub fn from_traceparent(tp: &TraceParent) -> B3 {
        B3 {
            trace_id: tp.trace_id,
            span_id: tp.parent_id,
            parent_span_id: None,
            sampled: Some(tp.sampled()),
            debug: false,
        }
    }
}

/// A 16- or 32-digit trace id, left-padded to 128 bits; all-zero is rejected.
fn trace_id(v: &[u8]) -> Option<TraceId> {
    let id = match v.len() {
        16 => {
            let low = hex::decode::<8>(v)?;
            let mut b = [0u8; 16];
            b[8..].copy_from_slice(&low);
            TraceId(b)
        }
        _ => TraceId::from_hex(v)?,
    };
    id.is_valid().then_some(id)
}

/// A 16-digit span id; all-zero is rejected.
fn span_id(v: &[u8]) -> Option<SpanId> {
    SpanId::from_hex(v).filter(SpanId::is_valid)
}

/// A 16-digit parent span id, where all-zero means "root span" rather than an error.
fn parent(v: &[u8]) -> Option<Option<SpanId>> {
    SpanId::from_hex(v).map(|p| p.is_valid().then_some(p))
}

/// `X-B3-Sampled`: `1`/`0`, or `true`/`false` from older tracers, as the spec permits.
fn sampled(v: &[u8]) -> Result<bool, CodecError> {
    match v {
        b"1" | b"true" => Ok(true),
        b"0" | b"false" => Ok(false),
        _ => Err(CodecError::new(SAMPLED, "not 0, 1, true or false")),
    }
}

fn sampling_char(b: &B3) -> Option<char> {
    match (b.debug, b.sampled) {
        (true, _) => Some('d'),
        (false, Some(true)) => Some('1'),
        (false, Some(false)) => Some('0'),
        (false, None) => None,
    }
}

/// The bytes of the trace id to write: the low half only when the high half is zero, so a
/// 64-bit trace id goes back out as the 16 digits it came in as.
fn trace_id_hex(t: &TraceId) -> &[u8] {
    if t.0[..8] == [0; 8] { &t.0[8..] } else { &t.0 }
}

fn hex_string(b: &[u8]) -> String {
    let mut s = String::with_capacity(2 * b.len());
    hex::push(&mut s, b);
    s
}

#[cfg(test)]
mod tests;
