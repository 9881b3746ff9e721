//! Outbound propagation: what a Keel client or producer writes so the next hop continues this
//! request — the remaining time, a child `traceparent` (and B3), `baggage`, `x-request-id`,
//! and the retry marker — and the header-map abstraction shared with inbound parsing.
//!
//! Deadlines travel as *remaining time minus a safety margin* (`keel-timeout` for HTTP,
//! `grpc-timeout` for gRPC), so the callee gives up slightly before the caller does and its
//! answer, if any, still arrives in time. Messages carry an absolute `keel-deadline` (unix
//! milliseconds) instead: a message may sit in a queue, and time spent there must count.
//! A call whose remaining time is already below the margin fails fast with
//! [`DeadlineExceeded`] without touching the network.
//!
//! Header names (all lower-case, as HTTP/2 requires) are in [`names`].

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::time::Instant;

use crate::codec::{self, CodecError, TraceParent, b3::B3};
use crate::context::Context;

/// The headers Keel reads and writes.
pub mod names {
    /// gRPC's remaining time (`1..8 digits` + unit `H M S m u n`).
    pub const GRPC_TIMEOUT: &str = "grpc-timeout";
    /// Keel's remaining time for HTTP, same syntax as `grpc-timeout`.
    pub const KEEL_TIMEOUT: &str = "keel-timeout";
    /// Envoy's expected request timeout in milliseconds (read only).
    pub const ENVOY_TIMEOUT: &str = "x-envoy-expected-rq-timeout-ms";
    /// Absolute deadline in unix milliseconds (message headers).
    pub const DEADLINE: &str = "keel-deadline";
    /// W3C trace parent.
    pub const TRACEPARENT: &str = "traceparent";
    /// W3C vendor trace state.
    pub const TRACESTATE: &str = "tracestate";
    /// B3 single header.
    pub const B3: &str = "b3";
    /// W3C baggage.
    pub const BAGGAGE: &str = "baggage";
    /// Request id.
    pub const REQUEST_ID: &str = "x-request-id";
    /// `1` when this request is a retry: the callee must not retry it again (chain stop).
    pub const RETRY: &str = "keel-retry";
    /// Traffic colour as a header of its own (`keel-color: canary`), the edge-friendly
    /// shorthand for the `keel-color` baggage entry; the baggage entry wins when both come.
    pub const COLOR: &str = "keel-color";
}

/// Read access to a header map — HTTP headers or a message's string headers — as one walk
/// over every header: inbound parsing looks for about fifteen names at once, and one pass
/// comparing names beats that many lookups. Names may come in any case.
pub trait HeaderScan {
    /// Call `f` with every (name, value) pair, in order.
    fn for_each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8]));
}

impl HeaderScan for http::HeaderMap {
    fn for_each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) {
        for (name, value) in self {
            f(name.as_str(), value.as_bytes());
        }
    }
}

/// Write access to a header map.
pub trait HeaderWriter {
    /// Set `name` (lower-case) to `value`, replacing any previous value.
    fn set(&mut self, name: &'static str, value: &str);

    /// [`HeaderWriter::set`] with an owned value, which a writer may keep without copying.
    fn set_owned(&mut self, name: &'static str, value: String) {
        self.set(name, &value);
    }

    /// [`HeaderWriter::set`] for a value one of Keel's own encoders made (visible ASCII: hex
    /// ids, digits and a unit, a request id), which an HTTP header map takes without checking
    /// each byte again.
    fn set_encoded(&mut self, name: &'static str, value: Encoded<'_>) {
        if let Ok(v) = std::str::from_utf8(value.as_bytes()) {
            self.set(name, v);
        }
    }
}

/// A header value one of Keel's encoders made: visible ASCII by construction. Only this crate
/// makes one, so [`HeaderWriter::set_encoded`] can trust it without letting any other caller
/// hand a header map unchecked bytes.
#[derive(Debug, Clone, Copy)]
pub struct Encoded<'a>(&'a [u8]);

impl<'a> Encoded<'a> {
    /// `v`, which the caller's encoder made visible ASCII.
    fn new(v: &'a [u8]) -> Self {
        debug_assert!(
            v.iter().all(u8::is_ascii_graphic),
            "not visible ASCII: {v:?}"
        );
        Encoded(v)
    }

    /// The value's bytes.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.0
    }
}

impl HeaderWriter for http::HeaderMap {
    fn set(&mut self, name: &'static str, value: &str) {
        // Every value Keel writes is produced by its own encoders (visible ASCII), so this
        // only fails on a bug; dropping the header then is better than a panic.
        if let Ok(v) = http::HeaderValue::from_str(value) {
            insert_named(self, name, v);
        }
    }

    fn set_owned(&mut self, name: &'static str, value: String) {
        // The encoder's buffer becomes the header value: validated, not copied.
        if let Ok(v) = http::HeaderValue::from_maybe_shared(bytes::Bytes::from(value)) {
            insert_named(self, name, v);
        }
    }

    fn set_encoded(&mut self, name: &'static str, value: Encoded<'_>) {
        insert_named(
            self,
            name,
            crate::header_value::visible_ascii(value.as_bytes()),
        );
    }
}

/// Insert under `name`, pre-built when it is one of Keel's, marked for HPACK as [`known`] says.
fn insert_named(map: &mut http::HeaderMap, name: &'static str, mut value: http::HeaderValue) {
    match known(name) {
        Some((header, sensitive)) => {
            value.set_sensitive(sensitive);
            map.insert(header.clone(), value);
        }
        None => {
            let repeats = name.eq_ignore_ascii_case("x-b3-sampled")
                || name.eq_ignore_ascii_case("x-b3-flags");
            value.set_sensitive(!repeats);
            map.insert(http::HeaderName::from_static(name), value);
        }
    }
}

/// The pre-built `HeaderName` of one of Keel's own headers, and whether its value must never be
/// indexed by HPACK. `HeaderName::from_static` called at run time parses and checks its
/// argument every time (it is `const` only for constant arguments), and every outbound call
/// writes half a dozen of these; a `match` on the name finds it by length and one compare.
///
/// Sensitive (never indexed): values new on every call — span ids, the request id, the time
/// left. Indexed, each would take a slot of the HTTP/2 connection's dynamic table that no
/// later call can use, push out the entries that do repeat, and make every later header
/// search the dead ones. What repeats across calls (baggage, trace state, the retry mark,
/// B3's sampling flags) stays indexable. HTTP/1.1 ignores the mark.
fn known(name: &str) -> Option<(&'static http::HeaderName, bool)> {
    use http::HeaderName;
    static KEEL_TIMEOUT: HeaderName = HeaderName::from_static(names::KEEL_TIMEOUT);
    static GRPC_TIMEOUT: HeaderName = HeaderName::from_static(names::GRPC_TIMEOUT);
    static DEADLINE: HeaderName = HeaderName::from_static(names::DEADLINE);
    static B3: HeaderName = HeaderName::from_static(names::B3);
    static TRACEPARENT: HeaderName = HeaderName::from_static(names::TRACEPARENT);
    static TRACESTATE: HeaderName = HeaderName::from_static(names::TRACESTATE);
    static BAGGAGE: HeaderName = HeaderName::from_static(names::BAGGAGE);
    static REQUEST_ID: HeaderName = HeaderName::from_static(names::REQUEST_ID);
    static RETRY: HeaderName = HeaderName::from_static(names::RETRY);
    Some(match name {
        names::KEEL_TIMEOUT => (&KEEL_TIMEOUT, true),
        names::GRPC_TIMEOUT => (&GRPC_TIMEOUT, true),
        names::DEADLINE => (&DEADLINE, true),
        names::B3 => (&B3, true),
        names::TRACEPARENT => (&TRACEPARENT, true),
        names::TRACESTATE => (&TRACESTATE, false),
        names::BAGGAGE => (&BAGGAGE, false),
        names::REQUEST_ID => (&REQUEST_ID, true),
        names::RETRY => (&RETRY, false),
        _ => return None,
    })
}

/// Message headers as string maps (AMQP, Kafka and NATS adapters convert to these). Reads
/// ignore case, since brokers and producers disagree on it; writes use Keel's lower-case
/// names and replace any differently-cased copy so a key never appears twice.
macro_rules! string_map_headers {
    ($map:ident) => {
        impl HeaderWriter for $map<String, String> {
            fn set(&mut self, name: &'static str, value: &str) {
                self.retain(|k, _| !k.eq_ignore_ascii_case(name));
                self.insert(name.to_string(), value.to_string());
            }
        }

        impl HeaderScan for $map<String, String> {
            fn for_each_header<'a>(&'a self, f: &mut dyn FnMut(&'a str, &'a [u8])) {
                for (name, value) in self {
                    f(name, value.as_bytes());
                }
            }
        }
    };
}

string_map_headers!(HashMap);
string_map_headers!(BTreeMap);

/// What kind of hop the headers are for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Carrier {
    /// Plain HTTP: `keel-timeout`.
    Http,
    /// gRPC: `grpc-timeout`.
    Grpc,
    /// A message: absolute `keel-deadline`.
    Message,
}

/// How B3 is written next to W3C trace context.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum B3Format {
    /// The `b3` single header (default: one header, understood by Zipkin-style tracers).
    #[default]
    Single,
    /// `X-B3-TraceId`, `X-B3-SpanId`, `X-B3-Sampled`, `X-B3-Flags`.
    Multi,
    /// W3C only.
    Off,
}

/// Outbound options.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbound {
    /// Subtracted from the remaining time before it is sent, so the callee times out first.
    pub margin: Duration,
    /// B3 alongside W3C.
    pub b3: B3Format,
    /// This attempt is a retry: mark it so the callee does not retry it again.
    pub retry: bool,
    /// The caller's own client span for this call, sent as the callee's parent. `None`: the
    /// request's span is the parent (no client span is recorded).
    pub span_id: Option<crate::codec::SpanId>,
}

impl Default for Outbound {
    fn default() -> Self {
        Outbound {
            margin: Duration::from_millis(5),
            b3: B3Format::Single,
            retry: false,
            span_id: None,
        }
    }
}

/// The call was not made: too little time was left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "deadline exceeded: {remaining:?} left is below the {margin:?} safety margin; call not sent"
)]
pub struct DeadlineExceeded {
    /// Time that was left.
    pub remaining: Duration,
    /// The configured margin.
    pub margin: Duration,
}

/// Write `ctx` into outbound headers for `carrier`.
pub fn inject<W: HeaderWriter + ?Sized>(
    ctx: &Context,
    carrier: Carrier,
    opts: &Outbound,
    w: &mut W,
) -> Result<(), DeadlineExceeded> {
    inject_at(ctx, carrier, opts, w, Instant::now())
}

/// [`inject`] for a call sent at `now`, a clock reading the caller already has (Keel's
/// client reads the clock once per attempt).
pub fn inject_at<W: HeaderWriter + ?Sized>(
    ctx: &Context,
    carrier: Carrier,
    opts: &Outbound,
    w: &mut W,
    now: Instant,
) -> Result<(), DeadlineExceeded> {
    let remaining = ctx.deadline().saturating_duration_since(now);
    if remaining <= opts.margin {
        return Err(DeadlineExceeded {
            remaining,
            margin: opts.margin,
        });
    }
    let budget = remaining - opts.margin;
    match carrier {
        Carrier::Http => w.set_encoded(
            names::KEEL_TIMEOUT,
            Encoded::new(codec::timeout::encode(budget).as_bytes()),
        ),
        Carrier::Grpc => w.set_encoded(
            names::GRPC_TIMEOUT,
            Encoded::new(codec::timeout::encode(budget).as_bytes()),
        ),
        Carrier::Message => {
            let at = SystemTime::now() + budget;
            let ms = at
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_millis())
                .unwrap_or(0);
            w.set(names::DEADLINE, &ms.to_string());
        }
    }
    let mut tp = ctx.trace().outbound();
    if let Some(span) = opts.span_id {
        tp.parent_id = span;
    }
    // Encoded on the stack: an HTTP header map cuts the values from a shared block.
    let mut buf = [0u8; TraceParent::LEN];
    let encoded = tp.encode_into(&mut buf);
    if opts.b3 == B3Format::Single {
        let mut b3 = [0u8; codec::b3::SINGLE_MAX];
        w.set_encoded(
            names::B3,
            Encoded::new(codec::b3::single_into(&tp, &mut b3)),
        );
    }
    w.set_encoded(names::TRACEPARENT, Encoded::new(encoded));
    if let Some(ts) = &ctx.trace().tracestate {
        w.set(names::TRACESTATE, ts.as_str());
    }
    match opts.b3 {
        B3Format::Single => {}
        B3Format::Multi => {
            for (name, value) in codec::b3::encode_multi(&B3::from_traceparent(&tp)) {
                w.set_owned(name, value);
            }
        }
        B3Format::Off => {}
    }
    if !ctx.baggage().is_empty() {
        w.set_owned(names::BAGGAGE, ctx.baggage().encode());
    }
    w.set_encoded(
        names::REQUEST_ID,
        Encoded::new(ctx.request_id_ref().as_bytes()),
    );
    if opts.retry {
        w.set(names::RETRY, "1");
    }
    Ok(())
}

/// Parse an absolute `keel-deadline` (unix milliseconds) into an `Instant` on this clock.
/// A deadline in the past maps to `now` (already expired).
pub fn parse_absolute(v: &[u8], now: Instant) -> Result<Instant, CodecError> {
    let bad = |reason: &str| CodecError {
        header: names::DEADLINE,
        reason: reason.to_string(),
    };
    if v.is_empty() || v.len() > 20 || !v.iter().all(u8::is_ascii_digit) {
        return Err(bad("expected unix milliseconds (decimal digits)"));
    }
    let ms: u64 = std::str::from_utf8(v)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("out of range"))?;
    let at = UNIX_EPOCH + Duration::from_millis(ms);
    Ok(match at.duration_since(SystemTime::now()) {
        Ok(ahead) => now + ahead,
        Err(_) => now,
    })
}
