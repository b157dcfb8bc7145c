//! Header mapping between HTTP/3 (RFC 9114 §4) and HTTP/2 (RFC 9113 §8).

use crate::source::Source;
use std::net::SocketAddr;
use std::time::Instant;

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderName, HeaderValue, InvalidHeaderValue};
use quiche::h3::{Header, HeaderRef, NameValue};

use super::{
    is_idempotent, Envelope, MalformedReason, MalformedRequest, RequestError, TraceContext,
};

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

/// The header values of one request, copied into one shared buffer.
///
/// h2 takes a request's `HeaderMap` by value, so every attempt clones the
/// envelope's map; a value made by `HeaderValue::from_bytes` owns a `Vec`
/// whose first clone allocates. Values cut from one shared buffer clone by
/// bumping its reference count: one buffer per request instead of one
/// allocation per value at build and another at the first attempt.
struct ValueArena(BytesMut);

impl ValueArena {
    /// Room for values of `len` bytes in all (forwarding headers included).
    fn with_capacity(len: usize) -> Self {
        Self(BytesMut::with_capacity(len))
    }

    fn value(&mut self, v: &[u8]) -> Result<HeaderValue, InvalidHeaderValue> {
        self.0.extend_from_slice(v);
        HeaderValue::from_maybe_shared(self.0.split().freeze())
    }
}

/// Room for the values spooky adds (forwarding, `via`, `traceparent`).
const ADDED_VALUE_BYTES: usize = 192;

/// RFC 9113 §6.5.2 field-size accounting: name + value + 32 per field.
pub fn header_section_size(list: &[Header]) -> usize {
    list.iter()
        .map(|h| h.name().len() + h.value().len() + 32)
        .sum()
}

fn malformed(reason: MalformedReason, detail: impl Into<String>) -> RequestError {
    RequestError::Malformed(MalformedRequest::new(reason, detail))
}

/// The pseudo-headers of a request (RFC 9114 §4.3.1).
#[derive(Default)]
struct Pseudo {
    method: Option<String>,
    scheme: Option<String>,
    authority: Option<String>,
    path: Option<String>,
    protocol: bool,
}

/// Regular fields gathered for forwarding, with the ones spooky interprets.
struct Fields {
    headers: HeaderMap,
    host: Option<String>,
    content_length: Option<u64>,
    te_trailers: bool,
    trace: Option<TraceContext>,
}

/// Builds the envelope for a request's initial header section.
///
/// Validates and normalises everything that is forwarded, so that the HTTP/2
/// library never refuses the mapped request (its refusal would otherwise look
/// like a backend failure): `content-length` digits only, `te` only
/// `trailers` (forwarded lowercase), `:path` per RFC 3986.
///
/// `more_frames` is false when the HEADERS frame ended the stream (no body).
pub fn build_envelope(
    list: &[Header],
    more_frames: bool,
    client: SocketAddr,
    request_id: u64,
    max_header_bytes: usize,
    now: Instant,
    source: &mut dyn Source,
) -> Result<Envelope, RequestError> {
    let size = header_section_size(list);
    if size > max_header_bytes {
        return Err(RequestError::Refused {
            status: 431,
            reason: format!("request header section is {size} bytes, limit {max_header_bytes}"),
        });
    }
    let (pseudo, rest) = split_pseudo(list)?;
    let values: usize = rest.iter().map(|h| h.value().len()).sum();
    let mut arena = ValueArena::with_capacity(values + ADDED_VALUE_BYTES);
    let mut fields = regular_fields(rest, &mut arena)?;

    let method = pseudo_method(&pseudo)?;
    let scheme = pseudo
        .scheme
        .ok_or_else(|| malformed(MalformedReason::PseudoHeader, "missing :scheme"))?;
    if scheme != "https" && scheme != "http" {
        return Err(malformed(MalformedReason::Scheme, "unsupported :scheme"));
    }
    let path = pseudo
        .path
        .ok_or_else(|| malformed(MalformedReason::PseudoHeader, "missing :path"))?;
    check_path(&path, &method)?;
    let authority = pick_authority(pseudo.authority, fields.host.take())?;
    if fields.content_length.is_some_and(|c| c > 0) && !more_frames {
        return Err(malformed(
            MalformedReason::BodyLength,
            "content-length with no body",
        ));
    }
    let headers = &mut fields.headers;
    if let Some(cl) = fields.content_length {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(cl));
    }
    if fields.te_trailers {
        headers.insert(http::header::TE, HeaderValue::from_static("trailers"));
    }
    add_forwarding(headers, client, &authority, &mut arena);
    let trace = fields
        .trace
        .unwrap_or_else(|| TraceContext::generate(source));
    if let Ok(v) = arena.value(trace.child(source).to_header().as_bytes()) {
        headers.insert("traceparent", v);
    }

    Ok(Envelope {
        request_id,
        idempotent: is_idempotent(&method),
        method,
        scheme,
        authority,
        path,
        headers: fields.headers,
        client,
        content_length: fields.content_length,
        has_body: more_frames,
        trace,
        received_at: now,
    })
}

/// Takes the leading pseudo-headers; returns them and the regular fields.
fn split_pseudo(list: &[Header]) -> Result<(Pseudo, &[Header]), RequestError> {
    let mut p = Pseudo::default();
    let first_regular = list
        .iter()
        .position(|h| !h.name().starts_with(b":"))
        .unwrap_or(list.len());
    let (pseudo, rest) = list.split_at(first_regular);
    if rest.iter().any(|h| h.name().starts_with(b":")) {
        return Err(malformed(
            MalformedReason::PseudoHeader,
            "pseudo-header after regular header",
        ));
    }
    for h in pseudo {
        let name = &h.name()[1..];
        let v = std::str::from_utf8(h.value())
            .map_err(|_| malformed(MalformedReason::PseudoHeader, "pseudo-header not UTF-8"))?
            .to_string();
        let slot = match name {
            b"method" => &mut p.method,
            b"scheme" => &mut p.scheme,
            b"authority" => &mut p.authority,
            b"path" => &mut p.path,
            b"protocol" => {
                p.protocol = true;
                continue;
            }
            _ => {
                return Err(malformed(
                    MalformedReason::PseudoHeader,
                    format!("unknown pseudo-header :{}", String::from_utf8_lossy(name)),
                ))
            }
        };
        if slot.is_some() {
            return Err(malformed(
                MalformedReason::PseudoHeader,
                format!("duplicate pseudo-header :{}", String::from_utf8_lossy(name)),
            ));
        }
        *slot = Some(v);
    }
    Ok((p, rest))
}

/// `:method`; CONNECT (RFC 9114 §4.4) is rejected, `:protocol` without it
/// is malformed (RFC 9220 §3: spooky never enables extended CONNECT).
fn pseudo_method(p: &Pseudo) -> Result<http::Method, RequestError> {
    let method = p
        .method
        .as_deref()
        .ok_or_else(|| malformed(MalformedReason::PseudoHeader, "missing :method"))?;
    let method = http::Method::from_bytes(method.as_bytes())
        .map_err(|_| malformed(MalformedReason::Method, "invalid :method"))?;
    if method == http::Method::CONNECT {
        return Err(RequestError::Rejected("CONNECT is not supported"));
    }
    if p.protocol {
        return Err(malformed(
            MalformedReason::Method,
            ":protocol outside extended CONNECT",
        ));
    }
    Ok(method)
}

/// Validates the regular fields and collects the ones to forward.
fn regular_fields(list: &[Header], arena: &mut ValueArena) -> Result<Fields, RequestError> {
    let mut f = Fields {
        headers: HeaderMap::with_capacity(list.len() + 4),
        host: None,
        content_length: None,
        te_trailers: false,
        trace: None,
    };
    for h in list {
        let name = h.name();
        if name.iter().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed(
                MalformedReason::HeaderName,
                "uppercase header name",
            ));
        }
        let hname = HeaderName::from_bytes(name)
            .map_err(|_| malformed(MalformedReason::HeaderName, "invalid header name"))?;
        // RFC 9110 §5.5: leading and trailing whitespace is not part of the
        // value, and RFC 9113 §8.2.1 forbids forwarding it.
        let value = h.value().trim_ascii();
        let hvalue = arena
            .value(value)
            .map_err(|_| malformed(MalformedReason::HeaderValue, "invalid header value"))?;
        let n = hname.as_str();
        if CONNECTION_SPECIFIC.contains(&n) {
            return Err(malformed(
                MalformedReason::ConnectionSpecific,
                format!("connection-specific header {n}"),
            ));
        }
        match n {
            "te" => {
                if !value.eq_ignore_ascii_case(b"trailers") {
                    return Err(malformed(MalformedReason::Te, "te other than trailers"));
                }
                f.te_trailers = true;
            }
            "host" => f.host = Some(String::from_utf8_lossy(value).to_ascii_lowercase()),
            "content-length" => {
                let v = parse_content_length(value)?;
                if f.content_length.is_some_and(|c| c != v) {
                    return Err(malformed(
                        MalformedReason::ContentLength,
                        "conflicting content-length",
                    ));
                }
                f.content_length = Some(v);
            }
            // Re-added with spooky's span as parent.
            "traceparent" => {
                f.trace = std::str::from_utf8(value)
                    .ok()
                    .and_then(TraceContext::parse)
            }
            _ => {
                f.headers.append(hname, hvalue);
            }
        }
    }
    Ok(f)
}

/// Most digits a `content-length` may have: 19 always fit a u64 (and are
/// the most the HTTP/2 library parses).
const MAX_CONTENT_LENGTH_DIGITS: usize = 19;

/// RFC 9110 §8.6: `Content-Length = 1*DIGIT`. A list of identical values
/// (`5, 5`) is the same length; differing ones are malformed.
pub fn parse_content_length(value: &[u8]) -> Result<u64, RequestError> {
    let mut length = None;
    for part in value.split(|b| *b == b',') {
        let digits = part.trim_ascii();
        if digits.is_empty()
            || digits.len() > MAX_CONTENT_LENGTH_DIGITS
            || !digits.iter().all(u8::is_ascii_digit)
        {
            return Err(malformed(
                MalformedReason::ContentLength,
                "content-length is not digits only",
            ));
        }
        let v = digits
            .iter()
            .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
        if length.is_some_and(|l| l != v) {
            return Err(malformed(
                MalformedReason::ContentLength,
                "conflicting content-length",
            ));
        }
        length = Some(v);
    }
    length.ok_or_else(|| malformed(MalformedReason::ContentLength, "empty content-length"))
}

/// `:path` must be origin-form (`/` then RFC 3986 path and query
/// characters, `%` only before two hex digits), or `*` for OPTIONS.
pub fn check_path(path: &str, method: &http::Method) -> Result<(), RequestError> {
    if path == "*" && *method == http::Method::OPTIONS {
        return Ok(());
    }
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return Err(malformed(MalformedReason::Path, "invalid :path"));
    }
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        if c == b'%' {
            let hex = b.get(i + 1..i + 3).unwrap_or_default();
            if hex.len() != 2 || !hex.iter().all(u8::is_ascii_hexdigit) {
                return Err(malformed(
                    MalformedReason::Path,
                    "bad percent-encoding in :path",
                ));
            }
            i += 3;
            continue;
        }
        if !is_path_char(c) {
            return Err(malformed(
                MalformedReason::Path,
                format!("byte 0x{c:02x} not allowed in :path"),
            ));
        }
        i += 1;
    }
    Ok(())
}

/// RFC 3986 §3.3/§3.4: pchar (unreserved, sub-delims, `:`, `@`) plus `/`
/// and `?`; `%` is handled by the caller.
fn is_path_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/?".contains(&c)
}

/// `:authority` or, without it, `host`; both present must agree.
fn pick_authority(authority: Option<String>, host: Option<String>) -> Result<String, RequestError> {
    let authority = match (authority.map(|a| a.to_ascii_lowercase()), host) {
        (Some(a), Some(h)) if a != h => {
            return Err(malformed(
                MalformedReason::Authority,
                ":authority and host differ",
            ))
        }
        (Some(a), _) => a,
        (None, Some(h)) => h,
        (None, None) => {
            return Err(malformed(
                MalformedReason::Authority,
                "missing :authority and host",
            ))
        }
    };
    if authority.is_empty()
        || authority.contains('@')
        || http::uri::Authority::try_from(authority.as_str()).is_err()
    {
        return Err(malformed(MalformedReason::Authority, "invalid :authority"));
    }
    Ok(authority)
}

/// Forwarding headers (RFC 7239, de-facto x-forwarded-*, RFC 9110 via).
fn add_forwarding(
    headers: &mut HeaderMap,
    client: SocketAddr,
    authority: &str,
    arena: &mut ValueArena,
) {
    let ip = client.ip().to_canonical();
    append(headers, "x-forwarded-for", &ip.to_string(), arena);
    headers.insert("x-forwarded-proto", HeaderValue::from_static("https"));
    let for_value = if ip.is_ipv6() {
        format!("for=\"[{ip}]\"")
    } else {
        format!("for={ip}")
    };
    append(
        headers,
        "forwarded",
        &format!("{for_value};proto=https;host=\"{authority}\""),
        arena,
    );
    append(headers, "via", VIA_REQUEST, arena);
}

/// Appends to a comma-separated list header, joining with any existing value.
fn append(headers: &mut HeaderMap, name: &'static str, value: &str, arena: &mut ValueArena) {
    let v = match headers.get(name).and_then(|v| v.to_str().ok()) {
        Some(existing) => arena.value(format!("{existing}, {value}").as_bytes()),
        None => arena.value(value.as_bytes()),
    };
    if let Ok(v) = v {
        headers.insert(name, v);
    }
}

/// A response head on its way to the client: status and fields as h2
/// decoded them, moved (not copied) from the backend's response into the
/// edge, which hands quiche borrowed fields ([`ResponseHead::h3_fields`]).
/// Copying every field into an owned `h3::Header` (two `Vec`s each) was
/// ~15 allocations per request.
#[derive(Debug, Clone)]
pub struct ResponseHead {
    pub status: http::StatusCode,
    pub headers: HeaderMap,
}

impl ResponseHead {
    /// A head with no fields (tests; synthetic answers add theirs).
    pub fn new(status: http::StatusCode) -> Self {
        Self {
            status,
            headers: HeaderMap::new(),
        }
    }

    /// The backend's response head mapped for HTTP/3 (RFC 9114 §4.2):
    /// connection-specific fields and `te` removed, spooky's `via` token
    /// appended (RFC 9110 §7.6.3) after any the backend sent.
    pub fn from_h2(status: http::StatusCode, mut headers: HeaderMap) -> Self {
        for name in CONNECTION_SPECIFIC {
            headers.remove(*name);
        }
        headers.remove(http::header::TE);
        let via = if headers.contains_key(http::header::VIA) {
            let mut joined = String::new();
            for v in headers.get_all(http::header::VIA) {
                joined.push_str(&String::from_utf8_lossy(v.as_bytes()));
                joined.push_str(", ");
            }
            joined.push_str(VIA_RESPONSE);
            HeaderValue::from_str(&joined).unwrap_or(HeaderValue::from_static(VIA_RESPONSE))
        } else {
            HeaderValue::from_static(VIA_RESPONSE)
        };
        // Replaces every `via` the backend sent by the joined one.
        headers.insert(http::header::VIA, via);
        Self { status, headers }
    }

    /// A response synthesised by spooky itself (errors), with a short text
    /// body of `body_len` bytes.
    pub fn synthetic(status: u16, body_len: usize) -> Self {
        let status =
            http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::INTERNAL_SERVER_ERROR);
        let mut head = Self::new(status);
        let h = &mut head.headers;
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain"),
        );
        h.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body_len));
        h.insert(http::header::SERVER, HeaderValue::from_static("spooky"));
        head
    }

    /// The fields as quiche encodes them, `:status` first, borrowed.
    pub fn h3_fields(&self) -> Vec<HeaderRef<'_>> {
        let mut out = Vec::with_capacity(self.headers.len() + 1);
        out.push(HeaderRef::new(b":status", self.status.as_str().as_bytes()));
        for (name, value) in &self.headers {
            out.push(HeaderRef::new(name.as_str().as_bytes(), value.as_bytes()));
        }
        out
    }
}

/// Client trailers (HTTP/3) to HTTP/2; pseudo-headers in trailers are malformed.
pub fn trailers_from_h3(list: &[Header]) -> Result<HeaderMap, RequestError> {
    let mut map = HeaderMap::with_capacity(list.len());
    for h in list {
        if h.name().starts_with(b":") {
            return Err(malformed(
                MalformedReason::Trailers,
                "pseudo-header in trailers",
            ));
        }
        if h.name().iter().any(|b| b.is_ascii_uppercase()) {
            return Err(malformed(
                MalformedReason::Trailers,
                "uppercase trailer name",
            ));
        }
        let n = HeaderName::from_bytes(h.name())
            .map_err(|_| malformed(MalformedReason::Trailers, "invalid trailer name"))?;
        let v = HeaderValue::from_bytes(h.value())
            .map_err(|_| malformed(MalformedReason::Trailers, "invalid trailer value"))?;
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
    use crate::source::SystemSource;

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
        build_with(list, false, 1)
    }

    /// `build_envelope` with the tests' client, a 64 KiB header limit and
    /// the real source.
    fn build_with(list: &[Header], more_frames: bool, id: u64) -> Result<Envelope, RequestError> {
        build_envelope(
            list,
            more_frames,
            client(),
            id,
            65536,
            Instant::now(),
            &mut SystemSource,
        )
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

    fn reason_of(list: &[Header], more_frames: bool) -> Option<MalformedReason> {
        match build_with(list, more_frames, 1) {
            Err(RequestError::Malformed(m)) => Some(m.reason),
            _ => None,
        }
    }

    fn with(extra: &[(&str, &[u8])]) -> Vec<Header> {
        let mut l = base();
        for (n, v) in extra {
            l.push(Header::new(n.as_bytes(), v));
        }
        l
    }

    #[test]
    fn te_is_matched_case_insensitively_and_forwarded_lowercase() {
        for v in ["Trailers", "TRAILERS", "trailers", " trailers "] {
            let env = build(&with(&[("te", v.as_bytes())])).expect("valid");
            assert_eq!(env.headers.get_all("te").iter().count(), 1);
            assert_eq!(env.headers["te"], "trailers", "te: {v:?}");
        }
        for v in ["gzip", "trailers, gzip", "trailers;q=1", ""] {
            assert_eq!(
                reason_of(&with(&[("te", v.as_bytes())]), false),
                Some(MalformedReason::Te),
                "te: {v:?}"
            );
        }
    }

    #[test]
    fn content_length_is_digits_only() {
        for v in [
            "+0", "-1", "0x10", "1 2", "1_0", "", " ", "1e3", "5, 6", "٣",
        ] {
            assert_eq!(
                reason_of(&with(&[("content-length", v.as_bytes())]), true),
                Some(MalformedReason::ContentLength),
                "content-length: {v:?}"
            );
        }
        let too_long = "1".repeat(20);
        assert_eq!(
            reason_of(&with(&[("content-length", too_long.as_bytes())]), true),
            Some(MalformedReason::ContentLength)
        );
        // Two fields that disagree.
        let l = with(&[("content-length", b"3"), ("content-length", b"4")]);
        assert_eq!(reason_of(&l, true), Some(MalformedReason::ContentLength));
    }

    #[test]
    fn agreeing_content_lengths_are_forwarded_as_one() {
        let l = with(&[("content-length", b"5, 5"), ("content-length", b"5")]);
        let env = build_with(&l, true, 1).expect("valid");
        assert_eq!(env.content_length, Some(5));
        let all: Vec<_> = env.headers.get_all("content-length").iter().collect();
        assert_eq!(all, vec!["5"]);
    }

    fn with_path(path: &[u8], method: &str) -> Vec<Header> {
        vec![
            Header::new(b":method", method.as_bytes()),
            Header::new(b":scheme", b"https"),
            Header::new(b":authority", b"a.example"),
            Header::new(b":path", path),
        ]
    }

    #[test]
    fn path_characters_follow_rfc_3986() {
        let bad: [&[u8]; 11] = [
            b"/a b",
            b"/a\x01b",
            b"/\x7f",
            b"/a#frag",
            b"/%zz",
            b"/%4",
            b"/a\\b",
            b"/<x>",
            b"/a\tb",
            b"*",
            b"/\xc3\xa9",
        ];
        for p in bad {
            assert_eq!(
                reason_of(&with_path(p, "GET"), false),
                Some(MalformedReason::Path),
                ":path {:?}",
                String::from_utf8_lossy(p)
            );
        }
        for p in ["/", "/a%20b?x=1&y=2", "/a;p=1/b:c@d?q=/?x~y", "/!$&'()*+,="] {
            let env = build(&with_path(p.as_bytes(), "GET")).expect(p);
            assert_eq!(env.path, p);
        }
        assert!(build(&with_path(b"*", "OPTIONS")).is_ok());
    }

    #[test]
    fn connect_is_rejected_and_protocol_without_it_is_malformed() {
        let connect = vec![h(":method", "CONNECT"), h(":authority", "a.example:443")];
        assert!(matches!(build(&connect), Err(RequestError::Rejected(_))));
        let mut ext = with_path(b"/chat", "CONNECT");
        ext.push(h(":protocol", "websocket"));
        assert!(matches!(build(&ext), Err(RequestError::Rejected(_))));
        let mut get = with_path(b"/", "GET");
        get.push(h(":protocol", "websocket"));
        assert_eq!(reason_of(&get, false), Some(MalformedReason::Method));
    }

    #[test]
    fn header_values_are_trimmed_and_controls_refused() {
        let env = build(&with(&[("x-a", b"  v  ")])).expect("valid");
        assert_eq!(env.headers["x-a"], "v");
        for v in [&b"a\x00b"[..], b"a\rb", b"a\nb", b"a\x7fb"] {
            assert_eq!(
                reason_of(&with(&[("x-a", v)]), false),
                Some(MalformedReason::HeaderValue)
            );
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
        let env = build_with(&l, true, 2).expect("valid");
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
        m.append("via", HeaderValue::from_static("1.0 cache"));
        m.insert("te", HeaderValue::from_static("trailers"));
        let head = ResponseHead::from_h2(http::StatusCode::OK, m);
        let out = head.h3_fields();
        assert_eq!(out[0].name(), b":status");
        assert_eq!(out[0].value(), b"200");
        assert!(out
            .iter()
            .all(|h| h.name() != b"connection" && h.name() != b"te"));
        assert!(out.iter().any(|h| h.name() == b"content-type"));
        let via = out
            .iter()
            .find(|h| h.name() == b"via")
            .map(|h| h.value().to_vec());
        assert_eq!(
            via.as_deref(),
            Some(&b"1.1 backend, 1.0 cache, 2 spooky"[..])
        );
        let bare = ResponseHead::from_h2(http::StatusCode::NO_CONTENT, HeaderMap::new());
        assert_eq!(bare.headers["via"], "2 spooky");
    }

    #[test]
    fn trailers_reject_pseudo_headers() {
        assert!(trailers_from_h3(&[h(":status", "200")]).is_err());
        let m = trailers_from_h3(&[h("x-checksum", "abc")]).expect("valid");
        assert_eq!(m["x-checksum"], "abc");
    }
}
