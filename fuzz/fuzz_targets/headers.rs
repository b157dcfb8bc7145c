//! Header mapping both ways, through the entry points the edge and the
//! upstream task call (`router::headers`):
//!
//! * h3 → h2: `build_envelope` on an arbitrary HTTP/3 field list, then
//!   `trailers_from_h3`;
//! * h2 → h3: `ResponseHead::from_h2` on an arbitrary (valid) `http::HeaderMap`
//!   and its `h3_fields`,
//!   then `trailers_to_h3`.
//!
//! Beyond "no panic", a request the mapping accepts must be one the h2
//! library sends (RFC 9114 §4.1.2: a malformed request is the client's
//! error, never something that fails on the way to a backend): its URI
//! builds the way `upstream::proxy` builds it, and it carries none of the
//! fields h2 refuses locally (connection-specific ones, `te` other than
//! exactly `trailers`, RFC 9113 §8.2.2). What goes back to the client never
//! carries a connection-specific field, and starts with `:status`.
#![no_main]

use std::net::SocketAddr;
use std::time::Instant;

use arbitrary::Arbitrary;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use libfuzzer_sys::fuzz_target;
use quiche::h3::{Header, NameValue};
use spooky::router::headers;

/// Fields h2 refuses in a request it is asked to send (h2's
/// `frame::headers` connection-header check), plus what RFC 9113 §8.2.2
/// forbids in either direction.
const H2_REFUSED: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// The most fields one input builds (keeps executions fast).
const MAX_FIELDS: usize = 32;

#[derive(Debug, Arbitrary)]
struct Input {
    /// The request's header section, pseudo-headers included, as the client sent it.
    request: Vec<(Vec<u8>, Vec<u8>)>,
    /// Whether more frames (a body) follow the HEADERS frame.
    more_frames: bool,
    /// `limits.max_request_header_bytes`.
    max_header_bytes: u16,
    client_v6: bool,
    /// Request trailers from the client.
    trailers: Vec<(Vec<u8>, Vec<u8>)>,
    /// The backend's response: status code and fields.
    status: u16,
    response: Vec<(Vec<u8>, Vec<u8>)>,
}

fuzz_target!(|input: Input| {
    request_side(&input);
    response_side(&input);
});

fn h3_list(fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<Header> {
    fields
        .iter()
        .take(MAX_FIELDS)
        .map(|(n, v)| Header::new(n, v))
        .collect()
}

fn request_side(input: &Input) {
    let list = h3_list(&input.request);
    let client: SocketAddr = if input.client_v6 {
        "[2001:db8::1]:4433"
            .parse()
            .unwrap_or(([127, 0, 0, 1], 1).into())
    } else {
        SocketAddr::from(([192, 0, 2, 1], 4433))
    };
    let limit = usize::from(input.max_header_bytes).max(1);
    if let Ok(env) = headers::build_envelope(
        &list,
        input.more_frames,
        client,
        1,
        limit,
        Instant::now(),
        &mut spooky::source::FakeSource::new(1, std::time::UNIX_EPOCH),
    ) {
        assert!(
            headers::header_section_size(&list) <= limit,
            "over-limit header section accepted"
        );
        // The URI exactly as `upstream::proxy::attempt` builds it.
        let uri = http::Uri::builder()
            .scheme("http")
            .authority(env.authority.as_str())
            .path_and_query(env.path.as_str())
            .build();
        assert!(
            uri.is_ok(),
            "accepted request whose URI h2 cannot build: authority {:?} path {:?}",
            env.authority,
            env.path
        );
        for (name, value) in &env.headers {
            let n = name.as_str();
            assert!(
                !H2_REFUSED.contains(&n),
                "forwarded connection-specific {n}"
            );
            if n == "te" {
                assert_eq!(value.as_bytes(), b"trailers", "forwarded te h2 refuses");
            }
            assert!(!n.starts_with(':'), "forwarded a pseudo-header {n}");
        }
        if env.content_length.is_some_and(|c| c > 0) {
            assert!(env.has_body, "content-length > 0 on a request with no body");
        }
    }
    if let Ok(map) = headers::trailers_from_h3(&h3_list(&input.trailers)) {
        for name in map.keys() {
            assert!(
                !H2_REFUSED.contains(&name.as_str()),
                "forwarded connection-specific trailer {name}"
            );
        }
    }
}

fn response_side(input: &Input) {
    let Ok(status) = http::StatusCode::from_u16(input.status) else {
        return;
    };
    // What the h2 library hands the upstream task: only valid names and
    // values can be in a `HeaderMap`.
    let mut map = HeaderMap::new();
    for (n, v) in input.response.iter().take(MAX_FIELDS) {
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(n), HeaderValue::from_bytes(v)) {
            map.append(n, v);
        }
    }
    let head = headers::ResponseHead::from_h2(status, map.clone());
    let out = head.h3_fields();
    assert_eq!(out.first().map(|h| h.name()), Some(&b":status"[..]));
    assert_eq!(out[0].value(), status.as_str().as_bytes());
    assert_eq!(
        out.iter().filter(|h| h.name().starts_with(b":")).count(),
        1,
        "a response carries exactly one pseudo-header"
    );
    for h in &out {
        let name = String::from_utf8_lossy(h.name());
        assert!(
            !H2_REFUSED.contains(&name.as_ref()) && name != "te",
            "connection-specific {name} sent to the client"
        );
    }
    assert!(
        out.iter().any(|h| h.name() == b"via"),
        "response without via"
    );
    for h in headers::trailers_to_h3(&map) {
        let name = String::from_utf8_lossy(h.name());
        assert!(
            !H2_REFUSED.contains(&name.as_ref()),
            "connection-specific trailer {name} sent to the client"
        );
    }
}
