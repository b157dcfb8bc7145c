//! Backend selection behind one small trait.
//!
//! A policy sees the backends of one upstream and what the caller knows of
//! the request, and returns an index into that list. One policy instance
//! serves one upstream in one worker: state lives in `Cell`/`RefCell`, never
//! behind a lock. The list handed to [`Policy::pick`] has the order and
//! length it had at [`build`] time; a config reload builds a new policy.
//!
//! | `policy:`         | type                | state                        |
//! |-------------------|---------------------|------------------------------|
//! | `round_robin`     | [`RoundRobin`]      | next index                   |
//! | `weighted`        | [`Weighted`]        | smooth WRR current weights   |
//! | `ip_hash`         | [`IpHash`]          | per-backend hash seeds       |
//! | `consistent_hash` | [`ConsistentHash`]  | Maglev lookup table          |
//! | `ewma`            | [`Ewma`]            | peak-EWMA latency, RNG       |
//! | `least_request`   | [`LeastRequest`]    | RNG                          |
//!
//! Every policy skips backends whose [`BackendView::available`] is false and
//! returns `None` when none is available; the caller then applies
//! `on_all_unhealthy`.

use std::hash::Hasher;
use std::net::{IpAddr, SocketAddr};

use siphasher::sip::SipHasher13;

use crate::config::Policy as PolicyKind;

mod consistent_hash;
mod ewma;
mod ip_hash;
mod least_request;
mod p2c;
mod round_robin;
mod weighted;

#[cfg(test)]
mod tests;

pub use consistent_hash::ConsistentHash;
pub use ewma::Ewma;
pub use ip_hash::IpHash;
pub use least_request::LeastRequest;
pub use round_robin::RoundRobin;
pub use weighted::Weighted;

/// What a policy may look at when picking.
#[derive(Debug, Clone, Copy)]
pub struct PickContext<'a> {
    pub client: SocketAddr,
    pub path: &'a str,
    /// Hash of the configured consistent-hash key (client ip, header, cookie
    /// or path), computed by the caller with [`hash_bytes`] / [`hash_ip`];
    /// `None` when the key is absent (then the client IP hash is used).
    pub key_hash: Option<u64>,
}

/// Per-backend facts a policy may use.
#[derive(Debug, Clone, Copy)]
pub struct BackendView {
    pub address: SocketAddr,
    pub weight: u32,
    /// False when unhealthy, ejected, or circuit-open: every policy skips it.
    pub available: bool,
    pub in_flight: u32,
}

/// A load-balancing policy.
pub trait Policy {
    fn name(&self) -> &'static str;

    /// Index of the chosen backend, or `None` when no backend is available
    /// (the caller applies `on_all_unhealthy`).
    fn pick(&self, ctx: &PickContext<'_>, backends: &[BackendView]) -> Option<usize>;

    /// Feedback once a request to `backend` got its response head (or
    /// failed): latency as measured by the caller.
    fn observe(&self, _backend: usize, _latency: std::time::Duration, _ok: bool) {}
}

/// SipHash-1-3 key for [`hash_bytes`]. Fixed on purpose: a key must map to
/// the same backend in every worker, every process and after a restart, so
/// std's per-process `RandomState` is out. Changing it remaps every key.
const HASH_KEY: (u64, u64) = (0x7370_6f6f_6b79_2d6c, 0x622d_6b65_7973_2d31);

/// The stable hash used for consistent-hash keys and backend identities:
/// SipHash-1-3 under a fixed key. Same bytes, same value, in any process.
pub fn hash_bytes(data: &[u8]) -> u64 {
    let mut h = SipHasher13::new_with_keys(HASH_KEY.0, HASH_KEY.1);
    h.write(data);
    h.finish()
}

/// [`hash_bytes`] of an IP address (no port). An IPv4-mapped IPv6 address
/// (`::ffff:a.b.c.d`, as seen on dual-stack sockets) hashes like the IPv4
/// address itself.
pub fn hash_ip(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(v4) => hash_bytes(&v4.octets()),
        IpAddr::V6(v6) => hash_bytes(&v6.octets()),
    }
}

/// The hash that identifies a backend (its address, not its position in the
/// list), so that reordering or removing other backends leaves its share of
/// the hash space where it was.
pub(crate) fn backend_seed(address: SocketAddr) -> u64 {
    hash_bytes(address.to_string().as_bytes())
}

/// MurmurHash3's 64-bit finalizer: a cheap bijective mixer.
pub(crate) fn fmix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^= x >> 33;
    x
}

/// Weights as the policies use them: a zero weight (rejected by config
/// validation anyway) counts as 1.
pub(crate) fn weight_of(w: u32) -> u32 {
    w.max(1)
}

/// Builds the policy configured for an upstream whose backends are
/// `(address, weight)`, in config order.
pub fn build(policy: PolicyKind, backends: &[(SocketAddr, u32)]) -> Box<dyn Policy> {
    match policy {
        PolicyKind::RoundRobin => Box::new(RoundRobin::starting_at(rand::random::<usize>())),
        PolicyKind::Weighted => Box::new(Weighted::new(backends.len())),
        PolicyKind::IpHash => Box::new(IpHash::new(backends)),
        PolicyKind::ConsistentHash => Box::new(ConsistentHash::new(backends)),
        PolicyKind::Ewma => Box::new(Ewma::new(backends.len())),
        PolicyKind::LeastRequest => Box::new(LeastRequest::new()),
    }
}
