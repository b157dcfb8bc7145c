//! Clients whose path is gone: ICMP destination-unreachable reports.
//!
//! A client that went away without closing (its process killed, its
//! socket closed, its host off the network) would otherwise hold its
//! connection, its requests and their backend streams until the idle
//! timeout. When the kernel reports an ICMP port, host or network
//! unreachable for a datagram sent to a connection's client
//! (`spooky_uring::errqueue`), the connection gets [`UNREACHABLE_GRACE`]
//! to show the client is still there; then it is discarded silently (no
//! CONNECTION_CLOSE to an address that cannot receive it) and every
//! request on it is cancelled, which resets its backend stream.
//!
//! ICMP is unauthenticated, so a report counts only when it quotes the
//! start of a packet spooky sent on that connection: its first byte and
//! the connection's current destination connection id, which an off-path
//! attacker does not see. It must also name the connection's active
//! path: after a NAT rebinding or a migration the old address is
//! expected to be gone. Any packet from the client ends the grace.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use spooky_uring::errqueue::Unreachable;

use super::{Conn, Edge};
use crate::telemetry::WorkerMetrics;

/// How long a connection whose client ICMP reported unreachable waits
/// for a packet from it before it is discarded. A client that rebinds or
/// migrates sends from its new address well within this (its ACKs go out
/// every `max_ack_delay`); one that is gone costs its backends no more
/// than this instead of `quic.idle_timeout_ms`.
pub const UNREACHABLE_GRACE: Duration = Duration::from_secs(1);

impl Edge {
    /// Takes ICMP destination-unreachable reports (from this worker's
    /// socket, or handed over by another worker) and starts the grace of
    /// each connection they match. Returns the reports that matched no
    /// connection here: the kernel queues a report on whichever worker's
    /// socket the 4-tuple hashes to, so the caller hands those to the
    /// other workers (who return them again, and nothing more happens).
    pub fn handle_unreachable(
        &mut self,
        now: Instant,
        reports: &[Unreachable],
    ) -> Vec<Unreachable> {
        self.now = now;
        let mut matched = vec![false; reports.len()];
        // One pass over the connections, one lookup each: a burst of
        // (possibly forged) reports costs O(connections + reports).
        let mut by_peer: HashMap<SocketAddr, Vec<usize>> = HashMap::new();
        for (i, r) in reports.iter().enumerate() {
            by_peer.entry(canonical(r.peer)).or_default().push(i);
        }
        let mut due = Vec::new();
        for (ci, conn) in self.conns.iter_mut() {
            if !conn.established {
                continue;
            }
            let Some(peer) = conn
                .quic
                .path_stats()
                .find(|p| p.active)
                .map(|p| canonical(p.peer_addr))
            else {
                continue;
            };
            let Some(candidates) = by_peer.get(&peer) else {
                continue;
            };
            let Some(&i) = candidates
                .iter()
                .find(|&&i| quotes_our_packet(conn, reports[i].quoted()))
            else {
                continue;
            };
            matched[i] = true;
            if conn.unreachable_at.is_some() {
                // Already in its grace: a later report changes nothing.
                continue;
            }
            conn.unreachable_at = Some(now + UNREACHABLE_GRACE);
            due.push(ci);
            tracing::debug!(
                conn = conn.serial,
                %peer,
                errno = reports[i].errno,
                "ICMP: client unreachable; connection discarded unless it is heard from"
            );
        }
        for ci in due {
            self.update_timer(ci);
        }
        WorkerMetrics::add(
            &self.metrics.icmp_unreachable_matched,
            matched.iter().filter(|m| **m).count() as u64,
        );
        reports
            .iter()
            .zip(matched)
            .filter(|(_, m)| !m)
            .map(|(r, _)| *r)
            .collect()
    }

    /// The grace after an ICMP report ended without a word from the
    /// client: discard the connection and cancel its requests.
    pub(super) fn peer_unreachable(&mut self, ci: usize) {
        WorkerMetrics::inc(&self.metrics.unreachable_closes);
        if let Some(conn) = self.conns.get(ci) {
            tracing::info!(
                conn = conn.serial,
                requests = conn.streams.len(),
                "client unreachable (ICMP); connection discarded, its backend streams reset"
            );
        }
        self.remove_conn(ci);
    }
}

/// The address with a v4-mapped IPv6 address as plain IPv4, so that both
/// forms of one client compare equal.
fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}

/// Whether `quoted` starts a 1-RTT (short header) or long header packet
/// spooky sent on `conn`: the connection's destination connection id
/// where the header carries it.
fn quotes_our_packet(conn: &Conn, quoted: &[u8]) -> bool {
    let dcid = conn.quic.destination_id();
    let dcid: &[u8] = dcid.as_ref();
    let Some(&first) = quoted.first() else {
        return false;
    };
    if first & 0x80 == 0 {
        // Short header: flags, then the DCID (its length is implicit).
        quoted.get(1..1 + dcid.len()) == Some(dcid)
    } else {
        // Long header: flags, version (4), DCID length, DCID.
        quoted.get(5).map(|&l| usize::from(l)) == Some(dcid.len())
            && quoted.get(6..6 + dcid.len()) == Some(dcid)
    }
}
