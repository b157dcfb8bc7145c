//! `ip_hash`: the client IP picks the backend.

use std::net::SocketAddr;

use super::{backend_seed, fmix64, hash_ip, weight_of, BackendView, PickContext, Policy};

/// Weighted rendezvous (highest-random-weight) hashing of the client IP.
///
/// Every backend scores every client IP with a hash of (IP, backend
/// address); the available backend with the highest score wins. The scores
/// give each IP its own probe order over the backends, so when an IP's
/// backend is unavailable the IP goes, deterministically, to the next one in
/// *its* order: the displaced clients spread over all the others instead of
/// piling onto one neighbour, and nobody else moves. When the backend comes
/// back its clients return to it.
///
/// Only the IP is hashed (not the port), and IPv4-mapped IPv6 addresses hash
/// like plain IPv4 ([`hash_ip`]). Backends are identified by address, so the
/// mapping survives restarts, is the same in every worker, and does not
/// depend on the order of the backend list.
///
/// Weights use the logarithmic method (score `w / -ln(u)` for a uniform
/// `u`), which gives backend `i` a share `w_i / W` of the IPs. With all
/// weights equal the comparison is done on the integer hashes, without
/// floating point. A pick costs one mix per available backend: O(N).
#[derive(Debug)]
pub struct IpHash {
    seeds: Box<[u64]>,
    weights: Box<[u32]>,
    uniform: bool,
}

impl IpHash {
    pub fn new(backends: &[(SocketAddr, u32)]) -> Self {
        let seeds: Box<[u64]> = backends.iter().map(|(a, _)| backend_seed(*a)).collect();
        let weights: Box<[u32]> = backends.iter().map(|(_, w)| weight_of(*w)).collect();
        let uniform = weights.windows(2).all(|w| w[0] == w[1]);
        IpHash {
            seeds,
            weights,
            uniform,
        }
    }

    /// The backend `key` maps to among the available ones.
    fn choose(&self, key: u64, backends: &[BackendView]) -> Option<usize> {
        let n = backends.len().min(self.seeds.len());
        let available = (0..n).filter(|&i| backends[i].available);
        if self.uniform {
            // Ties are (astronomically) rare; `max_by_key` keeps the last,
            // which is as deterministic as any.
            available.max_by_key(|&i| fmix64(key ^ self.seeds[i]))
        } else {
            available
                .map(|i| (i, self.score(key, i)))
                .max_by(|a, b| a.1.total_cmp(&b.1))
                .map(|(i, _)| i)
        }
    }

    /// `w / -ln(u)` with `u` uniform in (0, 1) from the (key, backend) hash.
    fn score(&self, key: u64, i: usize) -> f64 {
        let x = fmix64(key ^ self.seeds[i]);
        // 53 random bits, centred in their interval: u is never 0 or 1.
        let u = ((x >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64);
        f64::from(self.weights[i]) / -u.ln()
    }
}

impl Policy for IpHash {
    fn name(&self) -> &'static str {
        "ip_hash"
    }

    fn pick(&self, ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize> {
        self.choose(hash_ip(ctx.client.ip()), backends)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::tests::{addrs, views_at};
    use super::*;
    use proptest::prelude::*;
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    fn ctx_for(client: SocketAddr) -> PickContext<'static> {
        PickContext {
            client,
            path: "/",
            key_hash: None,
        }
    }

    #[test]
    fn ipv4_mapped_hashes_like_ipv4() {
        let v4 = Ipv4Addr::new(192, 0, 2, 7);
        assert_eq!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V6(v4.to_ipv6_mapped()))
        );
        assert_ne!(
            hash_ip(IpAddr::V4(v4)),
            hash_ip(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }

    #[test]
    fn spreads_by_weight() {
        let list = addrs(3);
        let weighted: Vec<_> = list
            .iter()
            .zip([1u32, 2, 5])
            .map(|(a, w)| (*a, w))
            .collect();
        let p = IpHash::new(&weighted);
        let b = views_at(&weighted);
        let mut counts = [0usize; 3];
        for k in 0..40_000u32 {
            let client = SocketAddr::from((Ipv4Addr::from(k.wrapping_mul(2_654_435_761)), 1));
            counts[p.pick(&ctx_for(client), &b).unwrap()] += 1;
        }
        for (c, w) in counts.iter().zip([1.0, 2.0, 5.0]) {
            let share = *c as f64 / 40_000.0;
            assert!((share - w / 8.0).abs() < 0.02, "{counts:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Same IP, any port, any instance: same backend; and a fallback only
        /// moves the clients of the unavailable backend.
        #[test]
        fn stable_across_instances_and_ports(
            n in 1usize..=16,
            ip in any::<u32>(),
            ports in prop::collection::vec(any::<u16>(), 2..6),
            down in any::<prop::sample::Index>(),
        ) {
            let list: Vec<_> = addrs(n).into_iter().map(|a| (a, 1)).collect();
            let a = IpHash::new(&list);
            let b = IpHash::new(&list);
            let mut v = views_at(&list);
            let first = a.pick(&ctx_for(SocketAddr::from((Ipv4Addr::from(ip), ports[0]))), &v).unwrap();
            for &port in &ports {
                let c = ctx_for(SocketAddr::from((Ipv4Addr::from(ip), port)));
                prop_assert_eq!(a.pick(&c, &v), Some(first));
                prop_assert_eq!(b.pick(&c, &v), Some(first));
            }
            // Another backend going down does not move this client.
            let d = down.index(n);
            v[d].available = false;
            let c = ctx_for(SocketAddr::from((Ipv4Addr::from(ip), ports[1])));
            let after = a.pick(&c, &v);
            if d != first {
                prop_assert_eq!(after, Some(first));
            } else if n > 1 {
                let after = after.unwrap();
                prop_assert!(after != d);
                prop_assert_eq!(b.pick(&c, &v), Some(after));
            } else {
                prop_assert_eq!(after, None);
            }
        }
    }
}
