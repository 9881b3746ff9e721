//! A fast, non-cryptographic hasher for Keel's small hot-path maps whose keys are bounded and
//! not chosen freely by request input: the client's maps keyed by socket address (outlier
//! state, connection pools; keys from configuration and discovery), telemetry's series
//! keyed by route label (templates, and a capped set of gRPC methods) or by upstream and
//! topic name, and the gateway's clusters and rate buckets (configured names, verified
//! token subjects). HashDoS resistance (what std's SipHash buys) is not needed there, and
//! SipHash was a visible share of every call's and every request's cost.

use std::hash::{BuildHasherDefault, Hasher};

/// `HashMap` with [`AddrHasher`].
pub type FastMap<K, V> = std::collections::HashMap<K, V, BuildHasherDefault<AddrHasher>>;

/// Multiply-rotate hashing in the style of rustc's FxHash.
#[derive(Debug, Default, Clone, Copy)]
pub struct AddrHasher(u64);

const SEED: u64 = 0x51_7c_c1_b7_27_22_0a_95;

impl AddrHasher {
    #[inline]
    fn add(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(SEED);
    }
}

impl Hasher for AddrHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        let mut chunks = bytes.chunks_exact(8);
        for c in &mut chunks {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
        let rest = chunks.remainder();
        if !rest.is_empty() {
            let mut w = [0u8; 8];
            w[..rest.len()].copy_from_slice(rest);
            self.add(u64::from_le_bytes(w));
        }
    }

    #[inline]
    fn write_u8(&mut self, i: u8) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u16(&mut self, i: u16) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u32(&mut self, i: u32) {
        self.add(u64::from(i));
    }

    #[inline]
    fn write_u64(&mut self, i: u64) {
        self.add(i);
    }

    #[inline]
    fn write_usize(&mut self, i: usize) {
        self.add(i as u64);
    }

    #[inline]
    fn finish(&self) -> u64 {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;

    #[test]
    fn distinct_addresses_land_in_distinct_buckets_of_a_map() {
        let mut m: FastMap<SocketAddr, u16> = FastMap::default();
        for port in 1..=2000u16 {
            m.insert(
                SocketAddr::from(([10, 0, (port >> 8) as u8, port as u8], port)),
                port,
            );
        }
        assert_eq!(m.len(), 2000);
        for port in 1..=2000u16 {
            let a = SocketAddr::from(([10, 0, (port >> 8) as u8, port as u8], port));
            assert_eq!(m.get(&a), Some(&port));
        }
    }
}
