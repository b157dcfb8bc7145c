//! Header mapping between HTTP/3 (RFC 9114 §4) and HTTP/2 (RFC 9113 §8).

use std::net::SocketAddr;
use std::time::Instant;

use http::header::{HeaderMap, HeaderName, HeaderValue};
use quiche::h3::{Header, NameValue};

use super::{is_idempotent, Envelope, RequestError, TraceContext};

/// Fields that only make sense on one hop (RFC 9113 §8.2.2, RFC 9114 §4.2);
/// a request carrying them is malformed, a response has them stripped.
const CONNECTION_SPECIFIC: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
];

/// The `via` token spooky adds (RFC 9110 §7.6.3).
const VIA_REQUEST: &str = "3 spooky";
const VIA_RESPONSE: &str = "2 spooky";

/// RFC 9113 §6.5.2 field-size accounting: name + value + 32 per field.
pub fn header_section_size(list: &[Header]) -> usize {
    list.iter()
        .map(|h| h.name().len() + h.value().len() + 32)
        .sum()
}

fn malformed(msg: impl Into<String>) -> RequestError {
    RequestError::Malformed(msg.into())
}

/// Builds the envelope for a request's initial header section.
///
/// `more_frames` is false when the HEADERS frame ended the stream (no body).
pub fn build_envelope(
    list: &[Header],
    more_frames: bool,
    client: SocketAddr,
    request_id: u64,
    max_header_bytes: usize,
    now: Instant,
) -> Result<Envelope, RequestError> {
    let size = header_section_size(list);
    if size > max_header_bytes {
        return Err(RequestError::Refused {
            status: 431,
            reason: format!("request header section is {size} bytes, limit {max_header_bytes}"),
        });
    }

    let mut method = None;
    let mut scheme = None;
    let mut authority: Option<String> = None;
    let mut path = None;
    let mut protocol = false;
    let mut seen_regular = false;
    let mut headers = HeaderMap::with_capacity(list.len() + 4);
    let mut host_header: Option<String> = None;
    let mut content_length: Option<u64> = None;
    let mut trace = None;

    for h in list {
        let name = h.name();
        let value = h.value();
        if let Some(pseudo) = name.strip_prefix(b":") {
            if seen_regular {
                return Err(malformed("pseudo-header after regular header"));
            }
            let v = std::str::from_utf8(value)
                .map_err(|_| malformed("pseudo-header value is not UTF-8"))?
                .to_string();
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                b"protocol" => {
                    protocol = true;
                    continue;
                }
                _ => {
                    return Err(malformed(format!(
                        "unknown pseudo-header :{}",
                        String::from_utf8_lossy(pseudo)
                    )))
                }
            };
            if slot.is_some() {
                return Err(malformed(format!(
                    "duplicate pseudo-header :{}",
                    String::from_utf8_lossy(pseudo)
                )));
            }
            *slot = Some(v);
            continue;
        }
        seen_regular = true;
        if name.iter().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed("uppercase header name"));
        }
        let hname = HeaderName::from_bytes(name).map_err(|_| malformed("invalid header name"))?;
        let hvalue =
            HeaderValue::from_bytes(value).map_err(|_| malformed("invalid header value"))?;
        let n = hname.as_str();
        if CONNECTION_SPECIFIC.contains(&n) {
            return Err(malformed(format!("connection-specific header {n}")));
        }
        match n {
            "te" if !value.eq_ignore_ascii_case(b"trailers") => {
                return Err(malformed("te other than trailers"));
            }
            "host" => {
                let v = hvalue
                    .to_str()
                    .map_err(|_| malformed("invalid host"))?
                    .to_ascii_lowercase();
                host_header = Some(v);
                continue; // carried as :authority upstream
            }
            "content-length" => {
                let v: u64 = std::str::from_utf8(value)
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .ok_or_else(|| malformed("invalid content-length"))?;
                if content_length.is_some_and(|c| c != v) {
                    return Err(malformed("conflicting content-length"));
                }
                content_length = Some(v);
            }
            "traceparent" => {
                trace = std::str::from_utf8(value)
                    .ok()
                    .and_then(TraceContext::parse);
                continue; // re-added below with spooky's span as parent
            }
            _ => {}
        }
        headers.append(hname, hvalue);
    }

    let method = method.ok_or_else(|| malformed("missing :method"))?;
    let method =
        http::Method::from_bytes(method.as_bytes()).map_err(|_| malformed("invalid :method"))?;
    if method == http::Method::CONNECT || protocol {
        return Err(RequestError::Refused {
            status: 501,
            reason: "CONNECT is not supported".into(),
        });
    }
    let scheme = scheme.ok_or_else(|| malformed("missing :scheme"))?;
    if scheme != "https" && scheme != "http" {
        return Err(malformed("unsupported :scheme"));
    }
    let path = path.ok_or_else(|| malformed("missing :path"))?;
    if path.is_empty()
        || !(path.starts_with('/') || (path == "*" && method == http::Method::OPTIONS))
    {
        return Err(malformed("invalid :path"));
    }
    let authority = match (authority.map(|a| a.to_ascii_lowercase()), host_header) {
        (Some(a), Some(h)) if a != h => return Err(malformed(":authority and host differ")),
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) => return Err(malformed("missing :authority and host")),
    };
    if authority.is_empty()
        || authority.contains('@')
        || http::uri::Authority::try_from(authority.as_str()).is_err()
    {
        return Err(malformed("invalid :authority"));
    }
    if content_length.is_some_and(|c| c > 0) && !more_frames {
        return Err(malformed("content-length with no body"));
    }

    // Forwarding headers (RFC 7239, de-facto x-forwarded-*, RFC 9110 via).
    let ip = client.ip().to_canonical();
    append(&mut headers, "x-forwarded-for", &ip.to_string());
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    let for_value = if ip.is_ipv6() {
        format!("for=\"[{ip}]\"")
    } else {
        format!("for={ip}")
    };
    append(
        &mut headers,
        "forwarded",
        &format!("{for_value};proto=https;host=\"{authority}\""),
    );
    append(&mut headers, "via", VIA_REQUEST);

    let trace = match trace {
        Some(t) => t,
        None => TraceContext::generate(),
    };
    if let Ok(v) = HeaderValue::from_str(&trace.child().to_header()) {
        headers.insert("traceparent", v);
    }

    Ok(Envelope {
        request_id,
        idempotent: is_idempotent(&method),
        method,
        scheme,
        authority,
        path,
        headers,
        client,
        content_length,
        has_body: more_frames,
        trace,
        received_at: now,
    })
}

/// Appends to a comma-separated list header, joining with any existing value.
fn append(headers: &mut HeaderMap, name: &'static str, value: &str) {
    let joined = match headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(existing) => format!("{existing}, {value}"),
        None => value.to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&joined) {
        headers.insert(name, v);
    }
}

/// Maps an HTTP/2 response head to an HTTP/3 header list.
pub fn response_headers(status: http::StatusCode, headers: &HeaderMap) -> Vec<Header> {
    let mut out = Vec::with_capacity(headers.len() + 2);
    out.push(Header::new(b":status", status.as_str().as_bytes()));
    let mut via: Option<String> = None;
    for (name, value) in headers {
        let n = name.as_str();
        if CONNECTION_SPECIFIC.contains(&n) || n == "te" {
            continue;
        }
        if n == "via" {
            let v = String::from_utf8_lossy(value.as_bytes()).into_owned();
            via = Some(match via {
                Some(prev) => format!("{prev}, {v}"),
                None => v,
            });
            continue;
        }
        out.push(Header::new(name.as_str().as_bytes(), value.as_bytes()));
    }
    let via = match via {
        Some(prev) => format!("{prev}, {VIA_RESPONSE}"),
        None => VIA_RESPONSE.to_string(),
    };
    out.push(Header::new(b"via", via.as_bytes()));
    out
}

/// A response synthesised by spooky itself (errors), with a short text body.
pub fn synthetic_response(status: u16, body_len: usize) -> Vec<Header> {
    vec![
        Header::new(b":status", status.to_string().as_bytes()),
        Header::new(b"content-type", b"text/plain"),
        Header::new(b"content-length", body_len.to_string().as_bytes()),
        Header::new(b"server", b"spooky"),
    ]
}

/// Client trailers (HTTP/3) to HTTP/2; pseudo-headers in trailers are malformed.
pub fn trailers_from_h3(list: &[Header]) -> Result<HeaderMap, RequestError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for h in list {
        if h.name().starts_with(b":") {
            return Err(malformed("pseudo-header in trailers"));
        }
        if h.name().iter().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed("uppercase trailer name"));
        }
        let n = HeaderName::from_bytes(h.name()).map_err(|_| malformed("invalid trailer name"))?;
        let v =
            HeaderValue::from_bytes(h.value()).map_err(|_| malformed("invalid trailer value"))?;
        if CONNECTION_SPECIFIC.contains(&n.as_str()) {
            continue;
        }
        map.append(n, v);
    }
    Ok(map)
}

/// Backend trailers (HTTP/2) to HTTP/3.
pub fn trailers_to_h3(map: &HeaderMap) -> Vec<Header> {
    map.iter()
        .filter(|(n, _)| !CONNECTION_SPECIFIC.contains(&n.as_str()))
        .map(|(n, v)| Header::new(n.as_str().as_bytes(), v.as_bytes()))
        .collect()
}

/// Alias kept for symmetry with [`trailers_to_h3`].
pub fn trailers_from_h2(map: &HeaderMap) -> Vec<Header> {
    trailers_to_h3(map)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn h(n: &str, v: &str) -> Header {
        Header::new(n.as_bytes(), v.as_bytes())
    }

    fn base() -> Vec<Header> {
        vec![
            h(":method", "GET"),
            h(":scheme", "https"),
            h(":authority", "Example.com:8443"),
            h(":path", "/a?b=c"),
            h("accept", "*/*"),
        ]
    }

    fn client() -> SocketAddr {
        "192.0.2.7:5555".parse().unwrap_or_else(|_| unreachable!())
    }

    fn build(list: &[Header]) -> Result<Envelope, RequestError> {
        build_envelope(list, false, client(), 1, 65536, Instant::now())
    }

    #[test]
    fn maps_pseudo_headers_and_adds_forwarding() {
        let env = build(&base()).expect("valid");
        assert_eq!(env.method, http::Method::GET);
        assert_eq!(env.authority, "example.com:8443");
        assert_eq!(env.host(), "example.com");
        assert_eq!(env.path, "/a?b=c");
        assert!(env.idempotent);
        assert_eq!(env.headers["x-forwarded-for"], "192.0.2.7");
        assert_eq!(env.headers["via"], "3 spooky");
        assert!(env.headers["forwarded"]
            .to_str()
            .unwrap_or_default()
            .starts_with("for=192.0.2.7;proto=https"));
        let tp = env.headers["traceparent"].to_str().unwrap_or_default();
        assert!(tp.contains(&env.trace.trace_id_hex()));
    }

    #[test]
    fn appends_to_existing_forwarding_headers_and_keeps_client_trace() {
        let mut l = base();
        l.push(h("x-forwarded-for", "10.0.0.1"));
        l.push(h(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ));
        let env = build(&l).expect("valid");
        assert_eq!(env.headers["x-forwarded-for"], "10.0.0.1, 192.0.2.7");
        assert_eq!(env.trace.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn rejects_malformed_requests() {
        let cases: Vec<Vec<Header>> = vec![
            vec![h(":scheme", "https"), h(":authority", "a"), h(":path", "/")],
            vec![h(":method", "GET"), h(":authority", "a"), h(":path", "/")],
            vec![
                h(":method", "GET"),
                h(":scheme", "https"),
                h(":authority", "a"),
            ],
            vec![h(":method", "GET"), h(":scheme", "https"), h(":path", "/")],
            {
                let mut l = base();
                l.push(h("Upper", "x"));
                l
            },
            {
                let mut l = base();
                l.push(h("connection", "close"));
                l
            },
            {
                let mut l = base();
                l.push(h("transfer-encoding", "chunked"));
                l
            },
            {
                let mut l = base();
                l.push(h("te", "gzip"));
                l
            },
            {
                let mut l = base();
                l.push(h(":method", "GET"));
                l
            },
            {
                let mut l = base();
                l.insert(0, h(":foo", "x"));
                l
            },
            {
                let mut l = base();
                l.push(h("host", "other.example"));
                l
            },
            {
                let mut l = base();
                l.push(h("content-length", "abc"));
                l
            },
            vec![
                h(":method", "GET"),
                h(":scheme", "https"),
                h(":authority", "a"),
                h(":path", "nope"),
            ],
        ];
        for (i, l) in cases.iter().enumerate() {
            match build(l) {
                Err(RequestError::Malformed(_)) => {}
                other => panic!("case {i}: expected malformed, got {other:?}"),
            }
        }
    }

    #[test]
    fn oversize_headers_are_refused_with_431() {
        let mut l = base();
        l.push(h("x-big", &"a".repeat(70_000)));
        match build(&l) {
            Err(RequestError::Refused { status: 431, .. }) => {}
            other => panic!("expected 431, got {other:?}"),
        }
    }

    #[test]
    fn host_header_serves_as_authority() {
        let l = vec![
            h(":method", "POST"),
            h(":scheme", "https"),
            h(":path", "/echo"),
            h("host", "svc.local"),
            h("content-length", "3"),
        ];
        let env = build_envelope(&l, true, client(), 2, 65536, Instant::now()).expect("valid");
        assert_eq!(env.authority, "svc.local");
        assert!(!env.idempotent);
        assert_eq!(env.content_length, Some(3));
        assert!(env.headers.get("host").is_none());
    }

    #[test]
    fn response_mapping_strips_hop_by_hop_and_adds_via() {
        let mut m = HeaderMap::new();
        m.insert("content-type", HeaderValue::from_static("text/plain"));
        m.insert("connection", HeaderValue::from_static("close"));
        m.insert("via", HeaderValue::from_static("1.1 backend"));
        let out = response_headers(http::StatusCode::OK, &m);
        assert_eq!(out[0].name(), b":status");
        assert_eq!(out[0].value(), b"200");
        assert!(out.iter().all(|h| h.name() != b"connection"));
        let via = out
            .iter()
            .find(|h| h.name() == b"via")
            .map(|h| h.value().to_vec());
        assert_eq!(via.as_deref(), Some(&b"1.1 backend, 2 spooky"[..]));
    }

    #[test]
    fn trailers_reject_pseudo_headers() {
        assert!(trailers_from_h3(&[h(":status", "200")]).is_err());
        let m = trailers_from_h3(&[h("x-checksum", "abc")]).expect("valid");
        assert_eq!(m["x-checksum"], "abc");
    }
}
