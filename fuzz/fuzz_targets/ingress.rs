//! The datagram ingress path before quiche owns a packet: header parsing
//! (`quiche::Header::from_slice` with spooky's CID length), connection-ID
//! ownership (`edge::cid::CidGenerator::owner`, QUIC-LB layout), worker
//! hand-over, version negotiation, Retry, and the admission checks in
//! `Edge::handle_datagram` on a fresh sans-IO edge.
//!
//! Properties beyond "no panic":
//! * a datagram is handed to another worker only when its DCID is one this
//!   node's layout names and the worker it names is not this one;
//! * a CID spooky generates always names its own worker;
//! * everything the edge sends goes back to the sender, from the address
//!   the datagram arrived on;
//! * before any address is validated, the edge sends at most three times
//!   the bytes it received (RFC 9000 §8.1).
#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use spooky::edge::cid::{CidGenerator, CID_LEN};
use spooky_fuzz::{client_addr, config, edge, EdgeKnobs, MAX_SEGMENTS, SERVER_ADDR, TRANSMIT_BUF};
use std::time::Instant;

/// RFC 9000 §8.1: the anti-amplification factor before validation.
const AMPLIFICATION_LIMIT: usize = 3;

/// Datagrams one input feeds (more belongs to the stateful `edge_session`).
const MAX_DATAGRAMS: usize = 8;

#[derive(Debug, Arbitrary)]
struct Input {
    retry: bool,
    server_id: u8,
    worker: u8,
    max_connections: u8,
    v6: bool,
    host: u8,
    port: u16,
    datagrams: Vec<Datagram>,
}

#[derive(Debug, Arbitrary)]
struct Datagram {
    /// Overwrite the DCID with one in this node's layout (so ownership and
    /// hand-over are reached, not only garbage).
    own_layout: Option<OwnLayout>,
    bytes: Vec<u8>,
}

#[derive(Debug, Arbitrary)]
struct OwnLayout {
    worker: u8,
    /// Where the DCID starts: 1 for a short header, 6 for a long one.
    long: bool,
}

fuzz_target!(|input: Input| {
    let knobs = EdgeKnobs {
        retry: input.retry,
        server_id: u16::from(input.server_id).max(1),
        max_connections: u32::from(input.max_connections % 4) + 1,
    };
    let worker = input.worker;
    let cids = CidGenerator::new(knobs.server_id, worker);
    let mine = cids.generate(&mut spooky::source::FakeSource::new(
        1,
        std::time::UNIX_EPOCH,
    ));
    assert_eq!(cids.owner(&mine), Some(worker), "own CID not owned");

    let mut e = edge(&config(knobs), worker);
    let from = client_addr(input.v6, input.host, input.port);
    let now = Instant::now();
    let mut bytes_in = 0usize;
    let mut bytes_out = 0usize;
    let mut out = vec![0u8; TRANSMIT_BUF];
    for d in input.datagrams.iter().take(MAX_DATAGRAMS) {
        let mut buf = d.bytes.clone();
        if let Some(o) = &d.own_layout {
            stamp_cid(
                &mut buf,
                &CidGenerator::new(knobs.server_id, o.worker),
                o.long,
            );
        }
        let parsed = quiche::Header::from_slice(&mut buf.clone(), CID_LEN)
            .ok()
            .map(|h| h.dcid.to_vec());
        bytes_in += buf.len();
        let handed = e.edge.handle_datagram(now, &mut buf, from, SERVER_ADDR);
        if let Some(owner) = handed {
            assert_ne!(owner, worker, "handed to itself");
            let dcid = parsed.as_deref();
            assert!(dcid.is_some(), "unparseable datagram handed over");
            assert_eq!(
                dcid.and_then(|d| cids.owner(d)),
                Some(owner),
                "handed to a worker its DCID does not name"
            );
        }
        while let Some(t) = e.edge.poll_transmit(Instant::now(), &mut out, MAX_SEGMENTS) {
            assert_eq!(t.to, from, "sent to someone who did not send");
            assert_eq!(t.from, SERVER_ADDR, "sent from an address not received on");
            assert!(t.len <= out.len() && t.segment_size > 0);
            bytes_out += t.len;
        }
        assert!(
            bytes_out <= AMPLIFICATION_LIMIT * bytes_in,
            "amplification: {bytes_out} bytes out for {bytes_in} in"
        );
    }
    e.edge.handle_timeout(now);
    let _ = e.edge.poll_timeout();
});

/// Writes a CID of this node's layout where the header's DCID would be: a
/// short header carries it from octet 1; a long header from octet 6 after
/// its length octet (set to `CID_LEN`).
fn stamp_cid(buf: &mut Vec<u8>, gen: &CidGenerator, long: bool) {
    let cid = gen.generate(&mut spooky::source::FakeSource::new(
        2,
        std::time::UNIX_EPOCH,
    ));
    let start = if long { 6 } else { 1 };
    if buf.len() < start + CID_LEN {
        buf.resize(start + CID_LEN, 0);
    }
    if long {
        buf[0] |= 0x80;
        buf[5] = CID_LEN as u8;
    } else {
        buf[0] &= 0x7f;
    }
    buf[start..start + CID_LEN].copy_from_slice(&cid);
}
