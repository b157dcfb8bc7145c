//! Connection IDs and stateless Retry tokens.
//!
//! spooky generates every connection ID it hands out so that a future
//! QUIC-LB layout (server id + worker id in the first octets) can route
//! packets of a migrated connection to their owner. Today the ID is 20
//! random bytes whose first octet is reserved for that layout.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

/// Length of every connection ID spooky issues (the QUIC maximum).
pub const CID_LEN: usize = 20;

/// How long a Retry token is accepted.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(10);

/// Generates connection IDs.
#[derive(Debug, Clone)]
pub struct CidGenerator {
    /// First octet: reserved for the QUIC-LB config rotation bits; kept at a
    /// fixed value so all spooky CIDs are recognisable.
    first_octet: u8,
}

impl CidGenerator {
    pub fn new() -> Self {
        Self { first_octet: 0x00 }
    }

    pub fn generate(&self) -> quiche::ConnectionId<'static> {
        let mut id = [0u8; CID_LEN];
        rand::thread_rng().fill_bytes(&mut id);
        id[0] = self.first_octet | (id[0] & 0x3f);
        quiche::ConnectionId::from_vec(id.to_vec())
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
        Self::new()
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

    pub fn random() -> Self {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
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
        let t = RetryTokens::random();
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
        assert!(RetryTokens::random().validate(&tok, &peer, now).is_none());
        assert!(t.validate(b"", &peer, now).is_none());
        assert!(t.validate(b"spk1\0\0", &peer, now).is_none());
    }

    #[test]
    fn cids_are_full_length_and_distinct() {
        let g = CidGenerator::new();
        let a = g.generate();
        let b = g.generate();
        assert_eq!(a.len(), CID_LEN);
        assert_ne!(a, b);
    }
}
