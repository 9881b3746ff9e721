//! TIME_WAIT sockets towards an upstream, read from `/proc/net/tcp` and `/proc/net/tcp6`.
//!
//! A client that closes connections it could have reused leaves each one in TIME_WAIT for
//! 60 s on Linux; enough of them exhaust the ephemeral ports towards one destination. The
//! count is the honest measure of pool churn, so it is exported beside the reuse ratio. Read
//! on demand (a scrape, `/debug/clients`), never on the request path.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// A TCP state, as the `st` column of `/proc/net/tcp` spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TcpState {
    /// `01`: open.
    Established,
    /// `06`: closed by this side, waiting out 2×MSL.
    TimeWait,
}

impl TcpState {
    fn code(self) -> &'static str {
        match self {
            TcpState::Established => "01",
            TcpState::TimeWait => "06",
        }
    }
}

/// TIME_WAIT sockets of this network namespace whose remote end is one of `remotes`, per
/// remote. Addresses missing from the tables count 0; unreadable tables (not Linux) give
/// zeros.
pub fn time_wait_towards(remotes: &[SocketAddr]) -> HashMap<SocketAddr, usize> {
    sockets_towards(remotes, TcpState::TimeWait)
}

/// Sockets in `state` whose remote end is one of `remotes`, per remote.
pub fn sockets_towards(remotes: &[SocketAddr], state: TcpState) -> HashMap<SocketAddr, usize> {
    let mut counts: HashMap<SocketAddr, usize> = remotes.iter().map(|a| (*a, 0)).collect();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        for remote in remotes_in(&text, state) {
            if let Some(n) = counts.get_mut(&remote) {
                *n += 1;
            }
        }
    }
    counts
}

/// Remote addresses of the rows in `state` of one `/proc/net/tcp{,6}` table. IPv4-mapped
/// IPv6 addresses (a dual-stack socket talking IPv4) are reported as IPv4.
pub fn remotes_in(table: &str, state: TcpState) -> impl Iterator<Item = SocketAddr> + '_ {
    table.lines().skip(1).filter_map(move |line| {
        let mut cols = line.split_whitespace();
        let remote = cols.nth(2)?;
        if cols.next()? != state.code() {
            return None;
        }
        parse_addr(remote)
    })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits `:PORT` (IPv6). The kernel prints each 32-bit
/// word of the address in host byte order, so the bytes of every word are reversed on
/// little-endian machines.
fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    // The word as the kernel held it in memory: its native-endian bytes are the address's
    // bytes in network order.
    let word = |hex: &str| u32::from_str_radix(hex, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut bytes = [0u8; 16];
            for (i, chunk) in bytes.chunks_exact_mut(4).enumerate() {
                chunk.copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            let v6 = Ipv6Addr::from(bytes);
            v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4)
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip, port))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    #[cfg(target_endian = "little")]
    fn rows_in_time_wait_are_parsed_for_ipv4_ipv6_and_mapped_addresses() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:D431 0100007F:1F90 06 00000000:00000000 03:00001767 00000000     0        0 0 3 0000000000000000
   1: 0100007F:D432 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 0 1 0000000000000000
   2: 00000000000000000000000001000000:D433 00000000000000000000000001000000:0050 06 00000000:00000000 03:00001767 00000000 0 0 0 3 0
   3: 0000000000000000FFFF00000100007F:D434 0000000000000000FFFF00000100007F:1F91 06 00000000:00000000 03:00001767 00000000 0 0 0 3 0
";
        let got: Vec<SocketAddr> = remotes_in(table, TcpState::TimeWait).collect();
        assert_eq!(
            got,
            vec![
                "127.0.0.1:8080".parse().unwrap(),
                "[::1]:80".parse().unwrap(),
                "127.0.0.1:8081".parse().unwrap(),
            ]
        );
        let open: Vec<SocketAddr> = remotes_in(table, TcpState::Established).collect();
        assert_eq!(open, vec!["127.0.0.1:8080".parse().unwrap()]);
    }

    #[test]
    fn malformed_rows_are_skipped() {
        let table = "header\n 0: zz:1 qq:2 06\n 1: 0100007F:1 0100007F 06\n";
        assert_eq!(remotes_in(table, TcpState::TimeWait).count(), 0);
    }

    #[test]
    fn a_closed_connection_shows_up_in_time_wait_towards_its_server() {
        // The side that closes first keeps TIME_WAIT: close the client end first.
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let server = listener.local_addr().unwrap();
        let client = std::net::TcpStream::connect(server).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        drop(client);
        // Wait for the FIN exchange to finish so the client side moves to TIME_WAIT.
        let mut buf = [0u8; 1];
        assert_eq!(std::io::Read::read(&mut &accepted, &mut buf).unwrap(), 0);
        drop(accepted);
        let mut seen = 0;
        for _ in 0..100 {
            seen = time_wait_towards(&[server])[&server];
            if seen > 0 {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert_eq!(seen, 1);
    }
}
