//! Connection IDs and stateless Retry tokens.
//!
//! Every connection ID spooky hands out follows the QUIC-LB plaintext layout
//! (draft-ietf-quic-load-balancers): octet 0 carries the config rotation
//! bits (`000`) and the self-encoded length (`len - 1`); octets 1–2 the
//! node's `quic.server_id` and octet 3 the worker id, the rest is random.
//! An L4 balancer (Katran, IPVS with a QUIC-LB plugin) routes on the server
//! id; inside the node, a packet that the kernel hashed to the wrong worker
//! (NAT rebinding, migration) is handed to the worker named in octet 3.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::source::Source;
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Length of every connection ID spooky issues (the QUIC maximum).
pub const CID_LEN: usize = 20;

/// How long a Retry token is accepted.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// QUIC-LB first octet: config rotation `000`, length self-encoded.
const FIRST_OCTET: u8 = (CID_LEN - 1) as u8;

/// Generates connection IDs in the QUIC-LB plaintext layout.
#[derive(Debug, Clone)]
pub struct CidGenerator {
    server_id: u16,
    worker: u8,
}

impl CidGenerator {
    pub fn new(server_id: u16, worker: u8) -> Self {
        Self { server_id, worker }
    }

    pub fn generate(&self, source: &mut dyn Source) -> quiche::ConnectionId<'static> {
        let mut id = [0u8; CID_LEN];
        source.fill_random(&mut id);
        id[0] = FIRST_OCTET;
        id[1..3].copy_from_slice(&self.server_id.to_be_bytes());
        id[3] = self.worker;
        quiche::ConnectionId::from_vec(id.to_vec())
    }

    /// The worker that owns `cid`, if it is a CID this node issued.
    pub fn owner(&self, cid: &[u8]) -> Option<u8> {
        (cid.len() == CID_LEN && cid[0] == FIRST_OCTET && cid[1..3] == self.server_id.to_be_bytes())
            .then(|| cid[3])
    }

    /// Stateless reset token for a CID (HMAC of the CID under the worker key).
    pub fn reset_token(&self, key: &[u8; 32], cid: &[u8]) -> u128 {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(b"spooky-reset");
        mac.update(cid);
        let out = mac.finalize().into_bytes();
        let mut t = [0u8; 16];
        t.copy_from_slice(&out[..16]);
        u128::from_be_bytes(t)
    }
}

impl Default for CidGenerator {
    fn default() -> Self {
        Self::new(1, 0)
    }
}

/// Mints and checks Retry tokens: HMAC-SHA256 over (peer address, original
/// DCID, expiry), so a token can neither be forged nor replayed from another
/// address or after it expires.
#[derive(Clone)]
pub struct RetryTokens {
    key: [u8; 32],
}

impl std::fmt::Debug for RetryTokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RetryTokens(..)")
    }
}

const TOKEN_MAGIC: &[u8; 4] = b"spk1";

impl RetryTokens {
    pub fn new(key: [u8; 32]) -> Self {
        Self { key }
    }

    /// A fresh random key.
    pub fn random(source: &mut dyn Source) -> Self {
        let mut key = [0u8; 32];
        source.fill_random(&mut key);
        Self::new(key)
    }

    pub fn key(&self) -> &[u8; 32] {
        &self.key
    }

    fn mac(&self, peer: &SocketAddr, odcid: &[u8], expiry: u64) -> [u8; 32] {
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
        mac.update(TOKEN_MAGIC);
        match peer {
            SocketAddr::V4(a) => mac.update(&a.ip().octets()),
            SocketAddr::V6(a) => mac.update(&a.ip().octets()),
        }
        mac.update(&peer.port().to_be_bytes());
        mac.update(&expiry.to_be_bytes());
        mac.update(odcid);
        mac.finalize().into_bytes().into()
    }

    /// Token layout: magic(4) | expiry secs (8) | odcid len (1) | odcid | mac(32).
    pub fn mint(&self, peer: &SocketAddr, odcid: &[u8], now: SystemTime) -> Vec<u8> {
        let expiry = now
            .checked_add(TOKEN_LIFETIME)
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut out = Vec::with_capacity(4 + 8 + 1 + odcid.len() + 32);
        out.extend_from_slice(TOKEN_MAGIC);
        out.extend_from_slice(&expiry.to_be_bytes());
        out.push(odcid.len() as u8);
        out.extend_from_slice(odcid);
        out.extend_from_slice(&self.mac(peer, odcid, expiry));
        out
    }

    /// Returns the original DCID if the token is authentic, for this peer, and
    /// not expired.
    pub fn validate(
        &self,
        token: &[u8],
        peer: &SocketAddr,
        now: SystemTime,
    ) -> Option<quiche::ConnectionId<'static>> {
        let rest = token.strip_prefix(TOKEN_MAGIC.as_slice())?;
        if rest.len() < 9 {
            return None;
        }
        let expiry = u64::from_be_bytes(rest[..8].try_into().ok()?);
        let len = rest[8] as usize;
        let rest = &rest[9..];
        if len > CID_LEN || rest.len() != len + 32 {
            return None;
        }
        let (odcid, tag) = rest.split_at(len);
        let expected = self.mac(peer, odcid, expiry);
        // Constant-time comparison.
        let diff = expected
            .iter()
            .zip(tag)
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        if diff != 0 {
            return None;
        }
        let now_secs = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        if now_secs > expiry {
            return None;
        }
        Some(quiche::ConnectionId::from_vec(odcid.to_vec()))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap_or_else(|_| unreachable!())
    }

    #[test]
    fn token_round_trip_binds_peer_and_expiry() {
        let t = RetryTokens::random(&mut crate::source::SystemSource);
        let now = SystemTime::now();
        let peer = addr("192.0.2.1:4433");
        let tok = t.mint(&peer, b"odcid-bytes", now);
        assert_eq!(
            t.validate(&tok, &peer, now).map(|c| c.to_vec()),
            Some(b"odcid-bytes".to_vec())
        );
        assert!(t.validate(&tok, &addr("192.0.2.1:4434"), now).is_none());
        assert!(t
            .validate(&tok, &peer, now + Duration::from_secs(60))
            .is_none());
        let mut forged = tok.clone();
        let n = forged.len();
        forged[n - 1] ^= 1;
        assert!(t.validate(&forged, &peer, now).is_none());
        assert!(RetryTokens::random(&mut crate::source::SystemSource)
            .validate(&tok, &peer, now)
            .is_none());
        assert!(t.validate(b"", &peer, now).is_none());
        assert!(t.validate(b"spk1\0\0", &peer, now).is_none());
    }

    #[test]
    fn cids_are_full_length_and_distinct() {
        let g = CidGenerator::new(0x1234, 7);
        let a = g.generate(&mut crate::source::SystemSource);
        let b = g.generate(&mut crate::source::SystemSource);
        assert_eq!(a.len(), CID_LEN);
        assert_ne!(a, b);
        assert_eq!(
            a[0], 19,
            "QUIC-LB: config rotation 000, length 20 self-encoded"
        );
        assert_eq!(&a[1..3], &[0x12, 0x34]);
        assert_eq!(g.owner(&a), Some(7));
        assert_eq!(CidGenerator::new(0x1234, 3).owner(&a), Some(7));
        assert_eq!(
            CidGenerator::new(0x9999, 7).owner(&a),
            None,
            "another node's CID"
        );
        assert_eq!(g.owner(&a[..8]), None);
    }
}
