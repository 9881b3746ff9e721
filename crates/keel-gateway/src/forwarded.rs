//! Who the request came from, told to the upstream: `X-Forwarded-For`, `X-Forwarded-Proto`,
//! `X-Forwarded-Host` and RFC 7239 `Forwarded`, believed only from configured proxies.
//!
//! Anyone can send `X-Forwarded-For: 10.0.0.1`. A gateway that passes it on lets a client
//! choose the address an upstream logs, rate-limits or allow-lists. So:
//!
//! - the connection's peer is in [`Forwarding`]'s trusted ranges (a load balancer in front):
//!   what it says is kept, and the peer is appended — `X-Forwarded-For: client, lb`;
//! - any other peer (the default: nothing is trusted): whatever it sent in those four headers
//!   is dropped, and they are set afresh from what this gateway saw.
//!
//! The rightmost address an upstream reads is therefore always one this gateway vouches for.

use std::net::{IpAddr, SocketAddr};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static FORWARDED: HeaderName = HeaderName::from_static("forwarded");

/// An address range, `10.0.0.0/8` or `2001:db8::/32`; a bare address is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    net: IpAddr,
    bits: u8,
}

impl Cidr {
    /// Parse `addr` or `addr/bits`; the error says what is wrong with `spec`.
    pub fn parse(spec: &str) -> Result<Cidr, String> {
        let spec = spec.trim();
        let (addr, bits) = match spec.split_once('/') {
            Some((a, b)) => (a, Some(b)),
            None => (spec, None),
        };
        let net: IpAddr = addr
            .parse()
            .map_err(|_| format!("{spec:?}: not an IP address or range (e.g. 10.0.0.0/8)"))?;
        let max = if net.is_ipv4() { 32 } else { 128 };
        let bits = match bits {
            None => max,
            Some(b) => b
                .parse::<u8>()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| format!("{spec:?}: the prefix length must be 0 to {max}"))?,
        };
        Ok(Cidr { net, bits })
    }

    /// Whether `ip` is in the range. An IPv4 address seen as IPv6 (`::ffff:a.b.c.d`, as a
    /// dual-stack listener reports it) matches the IPv4 range.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.net, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => prefix_eq(
                u128::from(n.to_bits()),
                u128::from(a.to_bits()),
                self.bits,
                32,
            ),
            (IpAddr::V6(n), IpAddr::V6(a)) => prefix_eq(n.to_bits(), a.to_bits(), self.bits, 128),
            _ => false,
        }
    }
}

fn prefix_eq(net: u128, addr: u128, bits: u8, width: u32) -> bool {
    let shift = width - u32::from(bits);
    if shift >= 128 {
        return true;
    }
    net >> shift == addr >> shift
}

/// How a gateway tells upstreams where requests came from (see the module doc).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarding {
    trusted: Vec<Cidr>,
}

impl Forwarding {
    /// Trust the proxies in `ranges`.
    pub fn trusting(ranges: Vec<Cidr>) -> Forwarding {
        Forwarding { trusted: ranges }
    }

    /// Parse a comma-separated list of addresses and ranges (empty: trust nobody).
    pub fn parse(spec: &str) -> Result<Forwarding, String> {
        let trusted = spec
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(Cidr::parse)
            .collect::<Result<_, _>>()?;
        Ok(Forwarding { trusted })
    }

    /// Whether what `peer` says about earlier hops is believed.
    pub fn trusts(&self, peer: IpAddr) -> bool {
        self.trusted.iter().any(|c| c.contains(peer))
    }

    /// What earlier proxies said, when `peer` is trusted to have relayed it and it said
    /// anything; `None` otherwise (nearly always), at the cost of one pass over the names.
    pub fn capture(&self, headers: &HeaderMap, peer: Option<SocketAddr>) -> Option<Earlier> {
        if !peer.is_some_and(|p| self.trusts(p.ip())) || !headers.keys().any(is_forwarding_header) {
            return None;
        }
        Some(Earlier {
            for_: joined(headers, &X_FORWARDED_FOR),
            forwarded: joined(headers, &FORWARDED),
            proto: headers.get(&X_FORWARDED_PROTO).cloned(),
            host: headers.get(&X_FORWARDED_HOST).cloned(),
        })
    }

    /// Write the forwarding headers into `out` (which holds none of them): what `earlier`
    /// proxies said followed by this hop — `peer`, `host`, `proto`.
    pub fn write(
        &self,
        out: &mut HeaderMap,
        earlier: Option<Earlier>,
        peer: Option<SocketAddr>,
        host: Option<&HeaderValue>,
        proto: &'static str,
    ) {
        let peer = peer.map(|p| canonical(p.ip()));
        let values = match earlier {
            // Nearly every request: the values follow from the peer, the host and the
            // protocol alone, which a connection's requests share — the last ones made on
            // this thread serve again when those match (two reference counts instead of
            // formatting, checking and allocating both values).
            None => LAST
                .try_with(|last| {
                    let mut last = last.borrow_mut();
                    match last.as_ref() {
                        Some(made)
                            if made.peer == peer
                                && made.proto == proto
                                && same(made.host.as_ref(), host) =>
                        {
                            made.values.clone()
                        }
                        _ => {
                            let values = Values::of(Earlier::default(), peer, host, proto);
                            *last = Some(Made {
                                peer,
                                host: host.cloned(),
                                proto,
                                values: values.clone(),
                            });
                            values
                        }
                    }
                })
                // Only while the thread is being torn down.
                .unwrap_or_else(|_| Values::of(Earlier::default(), peer, host, proto)),
            Some(earlier) => Values::of(earlier, peer, host, proto),
        };
        if let Some(v) = values.for_ {
            out.insert(X_FORWARDED_FOR.clone(), v);
        }
        if let Some(v) = values.forwarded {
            out.insert(FORWARDED.clone(), v);
        }
        out.insert(X_FORWARDED_PROTO.clone(), values.proto);
        if let Some(h) = values.host {
            out.insert(X_FORWARDED_HOST.clone(), h);
        }
    }
}

thread_local! {
    /// The values [`Forwarding::write`] last made on this thread with nothing from earlier
    /// proxies, and what they were made from.
    static LAST: std::cell::RefCell<Option<Made>> = const { std::cell::RefCell::new(None) };
}

/// See [`LAST`].
struct Made {
    peer: Option<IpAddr>,
    host: Option<HeaderValue>,
    proto: &'static str,
    values: Values,
}

fn same(a: Option<&HeaderValue>, b: Option<&HeaderValue>) -> bool {
    a.map(HeaderValue::as_bytes) == b.map(HeaderValue::as_bytes)
}

/// The four headers' values for one request.
#[derive(Clone)]
struct Values {
    for_: Option<HeaderValue>,
    forwarded: Option<HeaderValue>,
    proto: HeaderValue,
    host: Option<HeaderValue>,
}

impl Values {
    /// What `earlier` proxies said followed by this hop — `peer` (canonical), `host`, `proto`.
    fn of(
        earlier: Earlier,
        peer: Option<IpAddr>,
        host: Option<&HeaderValue>,
        proto: &'static str,
    ) -> Values {
        // Only the visible ASCII a `Host` should be is repeated; anything else is left out.
        let host = host.filter(|h| {
            !h.is_empty()
                && h.as_bytes()
                    .iter()
                    .all(|&b| b.is_ascii_graphic() && b != b'"')
        });
        let mut ip = IpText::default();
        let peer_ip = peer.map(|p| ip.of(p));

        let for_ = peer_ip.and_then(|ip| {
            match earlier.for_ {
                Some(mut all) => {
                    all.push_str(", ");
                    all.push_str(ip);
                    HeaderValue::from_maybe_shared(Bytes::from(all))
                }
                None => HeaderValue::from_str(ip),
            }
            .ok()
        });

        // Sized for `for=` an IPv6 address, a host and the proto without growing.
        let mut element = earlier.forwarded.unwrap_or_default();
        element.reserve(64 + host.map_or(0, HeaderValue::len));
        if !element.is_empty() {
            element.push_str(", ");
        }
        if let Some(ip) = peer_ip {
            element.push_str("for=");
            if ip.contains(':') {
                element.push_str("\"[");
                element.push_str(ip);
                element.push_str("]\"");
            } else {
                element.push_str(ip);
            }
            element.push(';');
        }
        if let Some(h) = host {
            element.push_str("host=");
            let quote = !h.as_bytes().iter().all(|&b| is_token(b));
            if quote {
                element.push('"');
            }
            // Checked above: visible ASCII only.
            element.push_str(h.to_str().unwrap_or_default());
            if quote {
                element.push('"');
            }
            element.push(';');
        }
        element.push_str("proto=");
        element.push_str(proto);
        Values {
            for_,
            forwarded: HeaderValue::from_maybe_shared(Bytes::from(element)).ok(),
            proto: earlier.proto.unwrap_or(HeaderValue::from_static(proto)),
            host: earlier.host.or_else(|| host.cloned()),
        }
    }
}

/// What earlier proxies said about a request (see [`Forwarding::capture`]).
#[derive(Debug, Default)]
pub struct Earlier {
    for_: Option<String>,
    forwarded: Option<String>,
    proto: Option<HeaderValue>,
    host: Option<HeaderValue>,
}

/// `x-forwarded-for`, `-proto`, `-host` and `forwarded`: the headers [`Forwarding`] owns. A
/// proxy copying a request leaves these out and has [`Forwarding::write`] set them.
pub fn is_forwarding_header(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "x-forwarded-for" | "x-forwarded-proto" | "x-forwarded-host" | "forwarded"
    )
}

/// An address as text, IPv4 written by hand: `Display` goes through the formatting
/// machinery, several hundred instructions for what is a few digits.
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl Default for IpText {
    fn default() -> Self {
        IpText {
            buf: [0; 48],
            len: 0,
        }
    }
}

impl IpText {
    fn of(&mut self, ip: IpAddr) -> &str {
        self.len = 0;
        match ip {
            IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.push(b'.');
                    }
                    if octet >= 100 {
                        self.push(b'0' + octet / 100);
                    }
                    if octet >= 10 {
                        self.push(b'0' + octet / 10 % 10);
                    }
                    self.push(b'0' + octet % 10);
                }
            }
            IpAddr::V6(v6) => {
                use std::io::Write;
                let mut cursor = std::io::Cursor::new(&mut self.buf[..]);
                // 39 bytes at most: the buffer always has room.
                let _ = write!(cursor, "{v6}");
                self.len = usize::try_from(cursor.position()).unwrap_or(0);
            }
        }
        // Only ASCII digits, dots, hex and colons were written.
        std::str::from_utf8(&self.buf[..self.len]).unwrap_or("")
    }

    fn push(&mut self, b: u8) {
        self.buf[self.len] = b;
        self.len += 1;
    }
}

/// An IPv4 peer seen through a dual-stack socket, as the IPv4 address it is.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// RFC 9110 `tchar`: a `Forwarded` value made of these needs no quotes.
fn is_token(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Every value of `name`, joined with `, ` (how repeated list headers combine).
fn joined(headers: &HeaderMap, name: &HeaderName) -> Option<String> {
    let parts: Vec<&str> = headers
        .get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(", "))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn cidr(s: &str) -> Cidr {
        Cidr::parse(s).unwrap()
    }

    #[test]
    fn addresses_written_by_hand_read_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "9.10.99.100",
            "255.254.1.200",
            "127.0.0.1",
            "::1",
            "2001:db8::17",
            "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff",
        ] {
            let ip: IpAddr = ip.parse().unwrap();
            assert_eq!(IpText::default().of(ip), ip.to_string());
        }
    }

    #[test]
    fn ranges_parse_and_match_by_prefix() {
        let lan = cidr("10.0.0.0/8");
        assert!(lan.contains("10.255.1.2".parse().unwrap()));
        assert!(!lan.contains("11.0.0.1".parse().unwrap()));
        assert!(
            lan.contains("::ffff:10.1.2.3".parse().unwrap()),
            "IPv4-mapped"
        );
        let one = cidr("192.0.2.7");
        assert!(one.contains("192.0.2.7".parse().unwrap()));
        assert!(!one.contains("192.0.2.8".parse().unwrap()));
        let v6 = cidr("2001:db8::/32");
        assert!(v6.contains("2001:db8:ffff::1".parse().unwrap()));
        assert!(!v6.contains("2001:db9::1".parse().unwrap()));
        assert!(!v6.contains("10.0.0.1".parse().unwrap()));
        assert!(cidr("0.0.0.0/0").contains("203.0.113.9".parse().unwrap()));
        assert!(cidr("::/0").contains("2001:db8::1".parse().unwrap()));
    }

    #[test]
    fn bad_ranges_are_refused_with_the_reason() {
        for (spec, says) in [
            ("10.0.0.0/33", "0 to 32"),
            ("::/129", "0 to 128"),
            ("10.0.0.0/x", "prefix length"),
            ("ten.zero", "not an IP"),
            ("", "not an IP"),
        ] {
            let e = Cidr::parse(spec).unwrap_err();
            assert!(e.contains(says), "{spec:?}: {e}");
        }
        let e = Forwarding::parse("10.0.0.0/8, nope").unwrap_err();
        assert!(e.contains("\"nope\""), "{e}");
        assert_eq!(Forwarding::parse(" ").unwrap(), Forwarding::default());
    }

    /// What a proxy does with `incoming` from `peer` for `host`: capture what a trusted peer
    /// said, copy the other headers, write this hop's.
    fn forward(
        fwd: &Forwarding,
        incoming: &HeaderMap,
        peer: Option<SocketAddr>,
        host: Option<&HeaderValue>,
    ) -> HeaderMap {
        let earlier = fwd.capture(incoming, peer);
        let mut out = HeaderMap::new();
        for (name, value) in incoming {
            if !is_forwarding_header(name) {
                out.append(name.clone(), value.clone());
            }
        }
        fwd.write(&mut out, earlier, peer, host, "http");
        out
    }

    fn spoofed() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", "6.6.6.6".parse().unwrap());
        h.append("x-forwarded-for", "7.7.7.7".parse().unwrap());
        h.insert("x-forwarded-host", "evil.example".parse().unwrap());
        h.insert("x-forwarded-proto", "https".parse().unwrap());
        h.insert("forwarded", "for=6.6.6.6".parse().unwrap());
        h
    }

    #[test]
    fn an_untrusted_peer_cannot_choose_what_the_upstream_is_told() {
        let host = HeaderValue::from_static("shop.example:8080");
        let peer: SocketAddr = "203.0.113.5:5000".parse().unwrap();
        let h = forward(&Forwarding::default(), &spoofed(), Some(peer), Some(&host));
        assert_eq!(h["x-forwarded-for"], "203.0.113.5");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "shop.example:8080");
        assert_eq!(
            h["forwarded"],
            "for=203.0.113.5;host=\"shop.example:8080\";proto=http"
        );
    }

    #[test]
    fn a_trusted_proxy_is_believed_and_appended() {
        let host = HeaderValue::from_static("shop");
        let lb: SocketAddr = "10.1.2.3:40000".parse().unwrap();
        let fwd = Forwarding::trusting(vec![cidr("10.0.0.0/8")]);
        let h = forward(&fwd, &spoofed(), Some(lb), Some(&host));
        assert_eq!(h["x-forwarded-for"], "6.6.6.6, 7.7.7.7, 10.1.2.3");
        assert_eq!(h["x-forwarded-proto"], "https", "the proxy saw TLS");
        assert_eq!(h["x-forwarded-host"], "evil.example");
        assert_eq!(
            h["forwarded"],
            "for=6.6.6.6, for=10.1.2.3;host=shop;proto=http"
        );
        // The same ranges do not trust anyone else.
        let outside: SocketAddr = "192.0.2.1:1".parse().unwrap();
        let h = forward(&fwd, &spoofed(), Some(outside), Some(&host));
        assert_eq!(h["x-forwarded-for"], "192.0.2.1");
    }

    #[test]
    fn ipv6_peers_are_bracketed_and_quoted_in_forwarded() {
        let none = HeaderMap::new();
        let peer: SocketAddr = "[2001:db8::17]:443".parse().unwrap();
        let h = forward(&Forwarding::default(), &none, Some(peer), None);
        assert_eq!(h["x-forwarded-for"], "2001:db8::17");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::17]\";proto=http");
        let mapped: SocketAddr = "[::ffff:192.0.2.9]:1".parse().unwrap();
        let h = forward(&Forwarding::default(), &none, Some(mapped), None);
        assert_eq!(h["x-forwarded-for"], "192.0.2.9");
    }

    #[test]
    fn an_unknown_peer_claims_nothing_and_a_strange_host_is_left_out() {
        let host = HeaderValue::from_static("a\"b");
        let h = forward(&Forwarding::default(), &spoofed(), None, Some(&host));
        assert!(!h.contains_key("x-forwarded-for"));
        assert!(!h.contains_key("x-forwarded-host"));
        assert_eq!(h["forwarded"], "proto=http");
    }

    #[test]
    fn values_made_again_on_one_thread_follow_every_change_of_peer_host_and_proto() {
        let fwd = Forwarding::default();
        let none = HeaderMap::new();
        let a: SocketAddr = "192.0.2.1:5000".parse().unwrap();
        let b: SocketAddr = "[2001:db8::9]:5000".parse().unwrap();
        let h1 = HeaderValue::from_static("shop.example");
        let h2 = HeaderValue::from_static("other.example:8080");
        let seen = |peer, host: Option<&HeaderValue>, proto| {
            let mut out = HeaderMap::new();
            fwd.write(&mut out, fwd.capture(&none, peer), peer, host, proto);
            let get = |n: &HeaderName| out.get(n).map(|v| v.to_str().unwrap().to_string());
            (
                get(&X_FORWARDED_FOR),
                get(&FORWARDED),
                get(&X_FORWARDED_PROTO),
                get(&X_FORWARDED_HOST),
            )
        };
        let s = |v: &str| Some(v.to_string());
        // Each call differs from the one before in one input; the first comes again at the
        // end, after the values were made for something else.
        let first = (
            Some(a),
            Some(&h1),
            "http",
            (
                s("192.0.2.1"),
                s("for=192.0.2.1;host=shop.example;proto=http"),
                s("http"),
                s("shop.example"),
            ),
        );
        let cases = [
            first.clone(),
            first.clone(),
            (
                Some(b),
                Some(&h1),
                "http",
                (
                    s("2001:db8::9"),
                    s("for=\"[2001:db8::9]\";host=shop.example;proto=http"),
                    s("http"),
                    s("shop.example"),
                ),
            ),
            (
                Some(b),
                Some(&h2),
                "http",
                (
                    s("2001:db8::9"),
                    s("for=\"[2001:db8::9]\";host=\"other.example:8080\";proto=http"),
                    s("http"),
                    s("other.example:8080"),
                ),
            ),
            (
                Some(b),
                Some(&h2),
                "https",
                (
                    s("2001:db8::9"),
                    s("for=\"[2001:db8::9]\";host=\"other.example:8080\";proto=https"),
                    s("https"),
                    s("other.example:8080"),
                ),
            ),
            (
                None,
                Some(&h2),
                "https",
                (
                    None,
                    s("host=\"other.example:8080\";proto=https"),
                    s("https"),
                    s("other.example:8080"),
                ),
            ),
            (
                None,
                None,
                "https",
                (None, s("proto=https"), s("https"), None),
            ),
            first,
        ];
        for (peer, host, proto, want) in cases {
            assert_eq!(seen(peer, host, proto), want, "{peer:?} {host:?} {proto}");
        }
    }
}
