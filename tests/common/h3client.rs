#![allow(dead_code)]

//! Blocking HTTP/3 test client built on quiche.
//!
//! One `H3Client` drives one QUIC connection (`quiche::Connection`) plus its
//! HTTP/3 layer (`quiche::h3::Connection`) over a std `UdpSocket`, on a single
//! thread, with the real clock (`conn.timeout()` / `on_timeout()` are
//! honoured). Every public call has an overall deadline (`H3Client::timeout`)
//! and returns an error instead of hanging.
//!
//! Response bodies are read as they arrive (flow-control credit is returned
//! continuously); `send_digest*` hashes them without storing them.
//!
//! Address changes:
//! * [`H3Client::rebind`] simulates a NAT rebinding: packets start leaving from
//!   a fresh UDP socket (new ephemeral port) while quiche keeps believing its
//!   local address is unchanged (received packets are fed with the *old*
//!   local address in `RecvInfo::to`, and `SendInfo::from` is ignored). A
//!   quiche 0.30 client never switches its active path by itself (only
//!   `migrate*` does; a packet arriving on an unknown local address would
//!   merely create a second, inactive path), so hiding the change is what
//!   models a NAT. The server sees the same DCID from a new 4-tuple and must
//!   validate / migrate the path on its side.
//! * [`H3Client::migrate`] performs a real client-initiated active migration
//!   (`Connection::migrate_source`) to a fresh socket: requires a spare
//!   connection ID from the server; the client hands out spare IDs of its own
//!   right after the handshake.

use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use quiche::h3::NameValue;
use rand::RngCore;
use sha2::{Digest, Sha256};

/// `H3_NO_ERROR`.
pub const H3_NO_ERROR: u64 = 0x100;
/// `H3_REQUEST_CANCELLED`.
pub const H3_REQUEST_CANCELLED: u64 = 0x10c;

const MAX_DATAGRAM_SIZE: usize = 1350;
const RECV_BUF_SIZE: usize = 65535;
const BODY_CHUNK: usize = 64 * 1024;
/// Upper bound for a single blocking socket wait, so deadlines stay accurate.
const MAX_WAIT: Duration = Duration::from_millis(50);

pub type Result<T> = std::result::Result<T, ClientError>;

#[derive(Debug)]
pub enum ClientError {
    Io(io::Error),
    Quic(quiche::Error),
    H3(quiche::h3::Error),
    Timeout(String),
    StreamReset {
        stream_id: u64,
        code: u64,
    },
    ConnectionClosed {
        peer: bool,
        code: u64,
        reason: String,
    },
    Protocol(String),
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::Io(e) => write!(f, "i/o error: {e}"),
            ClientError::Quic(e) => write!(f, "quic error: {e:?}"),
            ClientError::H3(e) => write!(f, "http/3 error: {e:?}"),
            ClientError::Timeout(what) => write!(f, "timeout: {what}"),
            ClientError::StreamReset { stream_id, code } => {
                write!(f, "stream {stream_id} reset by peer with code {code:#x}")
            }
            ClientError::ConnectionClosed { peer, code, reason } => write!(
                f,
                "connection closed by {} (code {code:#x}, reason {reason:?})",
                if *peer { "peer" } else { "us" }
            ),
            ClientError::Protocol(msg) => write!(f, "protocol error: {msg}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(e) => Some(e),
            _ => None,
        }
    }
}

impl From<io::Error> for ClientError {
    fn from(e: io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<quiche::Error> for ClientError {
    fn from(e: quiche::Error) -> Self {
        ClientError::Quic(e)
    }
}

impl From<quiche::h3::Error> for ClientError {
    fn from(e: quiche::h3::Error) -> Self {
        ClientError::H3(e)
    }
}

/// A complete response (body kept in memory).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    /// Response header fields, without pseudo-headers, in received order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub trailers: Vec<(String, String)>,
}

impl Response {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// Body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A response whose body was hashed while arriving, never stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DigestResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    /// Number of body bytes received.
    pub len: u64,
    /// Lower-case hex SHA-256 of the body.
    pub sha256: String,
    pub trailers: Vec<(String, String)>,
}

impl DigestResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// Request body.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Body {
    #[default]
    Empty,
    Bytes(Vec<u8>),
    /// `n` bytes where byte `i` is `(i % 251) as u8`, generated on the fly.
    Pattern(u64),
    /// The first `n` bytes of [`Body::Pattern`], and then nothing: the
    /// stream is never finished (a client whose upload stalls).
    Stalled(u64),
}

impl Body {
    pub fn len(&self) -> u64 {
        match self {
            Body::Empty => 0,
            Body::Bytes(b) => b.len() as u64,
            Body::Pattern(n) | Body::Stalled(n) => *n,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// An HTTP request. `send` adds `:method`, `:scheme` (https), `:authority`,
/// `:path` and `user-agent: spooky-test` before `headers`. No header is added
/// implicitly for the body (use [`Request::post`] or add `content-length`
/// yourself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Body,
}

impl Request {
    pub fn new(method: &str, path: &str) -> Self {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            headers: Vec::new(),
            body: Body::Empty,
        }
    }

    pub fn get(path: &str) -> Self {
        Request::new("GET", path)
    }

    /// A POST with `body` and a matching `content-length` header.
    pub fn post(path: &str, body: Body) -> Self {
        let len = body.len();
        Request::new("POST", path)
            .header("content-length", &len.to_string())
            .body(body)
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: Body) -> Self {
        self.body = body;
        self
    }
}

/// Fills `out` with the `Body::Pattern` bytes starting at absolute offset
/// `off` (byte `i` is `(i % 251) as u8`).
pub fn fill_pattern(off: u64, out: &mut [u8]) {
    let mut v = (off % 251) as u8;
    for b in out.iter_mut() {
        *b = v;
        v = if v == 250 { 0 } else { v + 1 };
    }
}

/// SHA-256 (lower-case hex) of `Body::Pattern(n)`, computed streaming.
pub fn pattern_sha256(n: u64) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; BODY_CHUNK];
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(BODY_CHUNK as u64) as usize;
        fill_pattern(off, &mut buf[..len]);
        h.update(&buf[..len]);
        off += len as u64;
    }
    hex::encode(h.finalize())
}

/// Sends one raw UDP datagram to `server` from a fresh ephemeral socket.
pub fn raw_socket_send(server: SocketAddr, bytes: &[u8]) -> Result<()> {
    let sock = UdpSocket::bind(bind_addr_for(server))?;
    sock.send_to(bytes, server)?;
    Ok(())
}

fn bind_addr_for(server: SocketAddr) -> SocketAddr {
    let ip = match server.ip() {
        IpAddr::V4(ip) if ip.is_loopback() => IpAddr::V4(ip),
        IpAddr::V6(ip) if ip.is_loopback() => IpAddr::V6(ip),
        IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::UNSPECIFIED),
    };
    SocketAddr::new(ip, 0)
}

/// Connection options.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub idle_timeout_ms: u64,
    pub initial_max_data: u64,
    /// Applied to bidi-local, bidi-remote and uni streams.
    pub initial_max_stream_data: u64,
    pub alpn: Vec<Vec<u8>>,
    /// TLS SNI override. Default: host part of the authority, none for an IP
    /// literal.
    pub server_name: Option<String>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            idle_timeout_ms: 30_000,
            initial_max_data: 64 * 1024 * 1024,
            initial_max_stream_data: 16 * 1024 * 1024,
            alpn: vec![b"h3".to_vec()],
            server_name: None,
        }
    }
}

/// Host part of an authority (`host`, `host:port`, `[v6]:port`).
fn authority_host(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        Some((host, port)) if !host.contains(':') && port.parse::<u16>().is_ok() => host,
        _ => authority,
    }
}

enum Sink {
    Store(Vec<u8>),
    Hash(Sha256),
}

/// One request/response exchange driven by the event loop.
struct Exchange {
    method: String,
    headers: Vec<quiche::h3::Header>,
    body: Body,
    body_sent: u64,
    body_done: bool,
    stream_id: Option<u64>,
    sink: Sink,
    len: u64,
    status: Option<u16>,
    resp_headers: Vec<(String, String)>,
    trailers: Vec<(String, String)>,
    content_length: Option<u64>,
    /// Cancel the stream once this many body bytes were read (then Ok).
    cancel_after: Option<u64>,
    /// Stop driving (return to the caller) once this many body bytes were
    /// read; the exchange keeps going afterwards.
    hook_after: Option<u64>,
    result: Option<Result<()>>,
}

impl Exchange {
    fn new(req: Request, authority: &str, hash: bool) -> Self {
        let mut headers = vec![
            quiche::h3::Header::new(b":method", req.method.as_bytes()),
            quiche::h3::Header::new(b":scheme", b"https"),
            quiche::h3::Header::new(b":authority", authority.as_bytes()),
            quiche::h3::Header::new(b":path", req.path.as_bytes()),
            quiche::h3::Header::new(b"user-agent", b"spooky-test"),
        ];
        for (n, v) in &req.headers {
            headers.push(quiche::h3::Header::new(
                n.to_ascii_lowercase().as_bytes(),
                v.as_bytes(),
            ));
        }
        let body_done = req.body.is_empty();
        Exchange {
            method: req.method,
            headers,
            body: req.body,
            body_sent: 0,
            body_done,
            stream_id: None,
            sink: if hash {
                Sink::Hash(Sha256::new())
            } else {
                Sink::Store(Vec::new())
            },
            len: 0,
            status: None,
            resp_headers: Vec::new(),
            trailers: Vec::new(),
            content_length: None,
            cancel_after: None,
            hook_after: None,
            result: None,
        }
    }

    fn done(&self) -> bool {
        self.result.is_some()
    }

    fn on_body(&mut self, data: &[u8]) {
        match &mut self.sink {
            Sink::Store(v) => v.extend_from_slice(data),
            Sink::Hash(h) => h.update(data),
        }
        self.len += data.len() as u64;
    }

    /// Validates a response whose stream finished cleanly.
    fn finish(&mut self) -> Result<()> {
        let status = self.status.ok_or_else(|| {
            ClientError::Protocol("stream finished without final response headers".into())
        })?;
        let bodiless = self.method.eq_ignore_ascii_case("HEAD")
            || (100..200).contains(&status)
            || status == 204
            || status == 304;
        if let (Some(cl), false) = (self.content_length, bodiless) {
            if cl != self.len {
                return Err(ClientError::Protocol(format!(
                    "content-length {cl} but {} body bytes received before FIN",
                    self.len
                )));
            }
        }
        Ok(())
    }

    fn into_response(self) -> Result<Response> {
        self.result.unwrap_or_else(|| {
            Err(ClientError::Protocol(
                "exchange not completed (internal)".into(),
            ))
        })?;
        let body = match self.sink {
            Sink::Store(v) => v,
            Sink::Hash(_) => Vec::new(),
        };
        Ok(Response {
            status: self.status.unwrap_or(0),
            headers: self.resp_headers,
            body,
            trailers: self.trailers,
        })
    }

    fn into_digest(self) -> Result<DigestResponse> {
        self.result.unwrap_or_else(|| {
            Err(ClientError::Protocol(
                "exchange not completed (internal)".into(),
            ))
        })?;
        let sha256 = match self.sink {
            Sink::Hash(h) => hex::encode(h.finalize()),
            Sink::Store(v) => hex::encode(Sha256::digest(&v)),
        };
        Ok(DigestResponse {
            status: self.status.unwrap_or(0),
            headers: self.resp_headers,
            len: self.len,
            sha256,
            trailers: self.trailers,
        })
    }
}

fn headers_to_strings(list: &[quiche::h3::Header]) -> Vec<(String, String)> {
    list.iter()
        .map(|h| {
            (
                String::from_utf8_lossy(h.name()).into_owned(),
                String::from_utf8_lossy(h.value()).into_owned(),
            )
        })
        .collect()
}

/// Why `drive` returned.
enum Stop {
    AllDone,
    /// The `hook_after` threshold of an exchange was reached.
    Hook,
}

pub struct H3Client {
    /// Overall deadline of every public call.
    pub timeout: Duration,
    socket: UdpSocket,
    /// Sockets of paths abandoned by `migrate`, still read (and written when
    /// quiche sends on their path) so in-flight packets are not lost.
    old_sockets: Vec<UdpSocket>,
    /// Local address as quiche believes it (differs from the socket's after
    /// `rebind`).
    quic_local: SocketAddr,
    server: SocketAddr,
    authority: String,
    conn: quiche::Connection,
    h3: quiche::h3::Connection,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
    body_buf: Vec<u8>,
    goaway_id: Option<u64>,
}

impl H3Client {
    /// Connects with default options; completes the QUIC handshake and waits
    /// for the server's HTTP/3 SETTINGS.
    pub fn connect(server: SocketAddr, authority: &str) -> Result<Self> {
        Self::connect_with(server, authority, ClientOptions::default())
    }

    pub fn connect_with(server: SocketAddr, authority: &str, opts: ClientOptions) -> Result<Self> {
        let timeout = Duration::from_secs(30);
        let deadline = Instant::now() + timeout;

        let mut config = quiche::Config::new(quiche::PROTOCOL_VERSION)?;
        config.verify_peer(false);
        let alpn: Vec<&[u8]> = opts.alpn.iter().map(|a| a.as_slice()).collect();
        config.set_application_protos(&alpn)?;
        config.set_max_idle_timeout(opts.idle_timeout_ms);
        config.set_max_recv_udp_payload_size(RECV_BUF_SIZE);
        config.set_max_send_udp_payload_size(MAX_DATAGRAM_SIZE);
        config.set_initial_max_data(opts.initial_max_data);
        config.set_initial_max_stream_data_bidi_local(opts.initial_max_stream_data);
        config.set_initial_max_stream_data_bidi_remote(opts.initial_max_stream_data);
        config.set_initial_max_stream_data_uni(opts.initial_max_stream_data);
        config.set_initial_max_streams_bidi(1000);
        config.set_initial_max_streams_uni(100);
        config.set_active_connection_id_limit(4);

        let socket = UdpSocket::bind(bind_addr_for(server))?;
        socket.set_nonblocking(true)?;
        let local = socket.local_addr()?;

        let mut scid = [0u8; quiche::MAX_CONN_ID_LEN];
        rand::thread_rng().fill_bytes(&mut scid);
        let scid = quiche::ConnectionId::from_ref(&scid);

        let sni = match &opts.server_name {
            Some(s) => Some(s.clone()),
            None => {
                let host = authority_host(authority);
                if host.is_empty() || host.parse::<IpAddr>().is_ok() {
                    None
                } else {
                    Some(host.to_string())
                }
            }
        };
        let mut conn = quiche::connect(sni.as_deref(), &scid, local, server, &mut config)?;

        // Drive the handshake.
        let mut send_buf = vec![0u8; RECV_BUF_SIZE];
        let mut recv_buf = vec![0u8; RECV_BUF_SIZE];
        loop {
            flush_conn(&mut conn, &socket, &[], &mut send_buf)?;
            if conn.is_closed() || conn.is_draining() {
                return Err(closed_error(&conn));
            }
            if conn.is_established() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "QUIC handshake with {server} not complete after {timeout:?}"
                )));
            }
            wait_and_recv(&mut conn, &socket, local, &[], &mut recv_buf, deadline)?;
        }

        let h3_config = quiche::h3::Config::new()?;
        let h3 = quiche::h3::Connection::with_transport(&mut conn, &h3_config)?;

        let mut client = H3Client {
            timeout,
            socket,
            old_sockets: Vec::new(),
            quic_local: local,
            server,
            authority: authority.to_string(),
            conn,
            h3,
            recv_buf,
            send_buf,
            body_buf: vec![0u8; BODY_CHUNK],
            goaway_id: None,
        };

        // Give the server spare connection IDs so `migrate` can work later.
        client.issue_spare_scids();

        // Wait for the peer's SETTINGS (h3 setup complete).
        loop {
            client.process_h3(&mut [])?;
            client.flush()?;
            client.check_open()?;
            if client.h3.peer_settings_raw().is_some() {
                return Ok(client);
            }
            if Instant::now() >= deadline {
                return Err(ClientError::Timeout(format!(
                    "no HTTP/3 SETTINGS from {server} after {timeout:?}"
                )));
            }
            client.wait(deadline)?;
        }
    }

    /// GET `path`, body stored.
    pub fn get(&mut self, path: &str) -> Result<Response> {
        self.send(Request::get(path))
    }

    /// Sends `req` (body streamed respecting flow control) and returns the
    /// whole response.
    pub fn send(&mut self, req: Request) -> Result<Response> {
        let mut ex = vec![Exchange::new(req, &self.authority, false)];
        let deadline = Instant::now() + self.timeout;
        self.drive_to_end(&mut ex, deadline)?;
        pop_one(ex)?.into_response()
    }

    /// Like `send`, but the response body is hashed as it arrives.
    pub fn send_digest(&mut self, req: Request) -> Result<DigestResponse> {
        let mut ex = vec![Exchange::new(req, &self.authority, true)];
        let deadline = Instant::now() + self.timeout;
        self.drive_to_end(&mut ex, deadline)?;
        pop_one(ex)?.into_digest()
    }

    /// Like `send_digest`, but once `after_bytes` of the response body have
    /// been received, `f(self)` is called once (e.g. `|c| c.rebind()`), then
    /// the exchange continues. An error from `f` aborts the call. If the
    /// response ends before `after_bytes`, `f` is not called.
    pub fn send_digest_with<F>(
        &mut self,
        req: Request,
        after_bytes: u64,
        f: F,
    ) -> Result<DigestResponse>
    where
        F: FnOnce(&mut H3Client) -> Result<()>,
    {
        let mut ex = vec![Exchange::new(req, &self.authority, true)];
        ex[0].hook_after = Some(after_bytes);
        let deadline = Instant::now() + self.timeout;
        let mut f = Some(f);
        loop {
            match self.drive(&mut ex, deadline)? {
                Stop::AllDone => break,
                Stop::Hook => {
                    if let Some(f) = f.take() {
                        if let Err(e) = f(self) {
                            self.abort_exchanges(&mut ex);
                            return Err(e);
                        }
                    }
                }
            }
        }
        pop_one(ex)?.into_digest()
    }

    /// Opens all requests as concurrent streams on this connection (as many
    /// as the peer's MAX_STREAMS allows, more as credit returns) and drives
    /// them together. Results are in request order; the call's deadline
    /// covers the whole batch.
    pub fn send_many(&mut self, reqs: Vec<Request>) -> Vec<Result<Response>> {
        let authority = self.authority.clone();
        let mut ex: Vec<Exchange> = reqs
            .into_iter()
            .map(|r| Exchange::new(r, &authority, false))
            .collect();
        let deadline = Instant::now() + self.timeout;
        if let Err(e) = self.drive_to_end(&mut ex, deadline) {
            // Only reachable on an error not attributable to a single
            // exchange; report it on every unfinished one.
            let msg = e.to_string();
            for x in ex.iter_mut().filter(|x| !x.done()) {
                x.result = Some(Err(ClientError::Protocol(msg.clone())));
            }
        }
        ex.into_iter().map(Exchange::into_response).collect()
    }

    /// GETs `path`, reads at least `after_bytes` of the body, then cancels
    /// the stream (STOP_SENDING + RESET_STREAM with H3_REQUEST_CANCELLED) and
    /// keeps driving the connection ~200 ms so the frames go out. Returns the
    /// number of body bytes read. A response that completes before
    /// `after_bytes` is a `Protocol` error.
    pub fn get_and_cancel(&mut self, path: &str, after_bytes: u64) -> Result<u64> {
        let mut ex = vec![Exchange::new(Request::get(path), &self.authority, true)];
        ex[0].cancel_after = Some(after_bytes);
        let deadline = Instant::now() + self.timeout;
        self.drive_to_end(&mut ex, deadline)?;
        let x = pop_one(ex)?;
        let len = x.len;
        x.result
            .unwrap_or_else(|| Err(ClientError::Protocol("not completed".into())))?;
        self.drive_for(Duration::from_millis(200))?;
        Ok(len)
    }

    /// NAT rebinding: replaces the UDP socket by a new one on another
    /// ephemeral port. quiche is not told (its notion of the local address
    /// stays the same), so the connection and its connection IDs are kept and
    /// the server simply sees packets from a new source port. An ack-eliciting
    /// packet is sent right away from the new port.
    pub fn rebind(&mut self) -> Result<()> {
        self.check_open()?;
        let new = UdpSocket::bind(SocketAddr::new(self.socket.local_addr()?.ip(), 0))?;
        new.set_nonblocking(true)?;
        // Feed whatever already arrived on the old socket.
        self.drain_socket()?;
        self.socket = new;
        self.conn.send_ack_eliciting()?;
        self.flush()
    }

    /// Active client migration (RFC 9000 §9) to a new socket, via
    /// `quiche::Connection::migrate_source`: uses a fresh DCID and makes
    /// quiche validate the new path. Fails with `Quic(OutOfIdentifiers)` if
    /// the server did not provide a spare connection ID (or disabled active
    /// migration, which quiche does not check for us: the server would then
    /// drop the packets).
    pub fn migrate(&mut self) -> Result<()> {
        self.check_open()?;
        let new = UdpSocket::bind(SocketAddr::new(self.socket.local_addr()?.ip(), 0))?;
        new.set_nonblocking(true)?;
        let new_local = new.local_addr()?;
        self.drain_socket()?;
        self.issue_spare_scids();
        // Create the path and ask for its validation (PATH_CHALLENGE), then
        // make it the active one. `migrate_source` alone neither validates
        // nor sends anything: with nothing ack-eliciting pending the server
        // would never hear from the new path.
        self.conn.probe_path(new_local, self.server)?;
        self.conn.migrate_source(new_local)?;
        let old = std::mem::replace(&mut self.socket, new);
        if self.socket_is_quiche_path(&old) {
            self.old_sockets.push(old);
            if self.old_sockets.len() > 4 {
                self.old_sockets.remove(0);
            }
        }
        self.quic_local = new_local;
        self.conn.send_ack_eliciting()?;
        self.flush()
    }

    /// Actual local address of the UDP socket in use.
    pub fn local_addr(&self) -> SocketAddr {
        self.socket.local_addr().unwrap_or(self.quic_local)
    }

    pub fn server_addr(&self) -> SocketAddr {
        self.server
    }

    /// Sends CONNECTION_CLOSE (application, H3_NO_ERROR) and drives until
    /// the connection is closed or 1 s elapsed.
    pub fn close(mut self) -> Result<()> {
        match self.conn.close(true, H3_NO_ERROR, b"") {
            Ok(()) | Err(quiche::Error::Done) => {}
            Err(e) => return Err(e.into()),
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        self.flush()?;
        while !self.conn.is_closed() && Instant::now() < deadline {
            self.wait(deadline)?;
            self.flush()?;
        }
        Ok(())
    }

    pub fn stats(&self) -> quiche::Stats {
        self.conn.stats()
    }

    /// Access to the underlying QUIC connection (for assertions).
    pub fn quic(&self) -> &quiche::Connection {
        &self.conn
    }

    /// GOAWAY id received from the server, if any.
    pub fn goaway_id(&self) -> Option<u64> {
        self.goaway_id
    }

    /// Drives the connection (ACKs, timers, control streams) for `dur`,
    /// discarding any request-stream data that still arrives.
    pub fn drive_for(&mut self, dur: Duration) -> Result<()> {
        let until = Instant::now() + dur;
        loop {
            if self.conn.is_closed() {
                return Ok(());
            }
            self.process_h3(&mut [])?;
            self.flush()?;
            if Instant::now() >= until {
                return Ok(());
            }
            self.wait(until)?;
        }
    }

    /// One non-blocking turn: feeds every datagram already queued, fires
    /// quiche's timer if due, handles HTTP/3 control events and sends what
    /// is ready (ACKs included). For holding many idle connections from one
    /// thread (`perf/src/bin/idle_conns.rs`). `Err` once closed.
    pub fn poll(&mut self) -> Result<()> {
        self.drain_socket()?;
        if let Some(at) = self.conn.timeout_instant() {
            if at <= Instant::now() {
                self.conn.on_timeout();
            }
        }
        self.process_h3(&mut [])?;
        self.flush()?;
        self.check_open()
    }

    // ---- internals -------------------------------------------------------

    fn issue_spare_scids(&mut self) {
        let mut rng = rand::thread_rng();
        let mut n = 0;
        while self.conn.scids_left() > 0 && n < 4 {
            let mut cid = [0u8; quiche::MAX_CONN_ID_LEN];
            rng.fill_bytes(&mut cid);
            let token = u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64());
            if self
                .conn
                .new_scid(&quiche::ConnectionId::from_ref(&cid), token, false)
                .is_err()
            {
                break;
            }
            n += 1;
        }
    }

    /// Whether `sock` is bound to the address quiche uses for its path (false
    /// for a socket that replaced another through `rebind`).
    fn socket_is_quiche_path(&self, sock: &UdpSocket) -> bool {
        sock.local_addr()
            .map(|a| a == self.quic_local)
            .unwrap_or(false)
    }

    /// Error if the connection is closed or closing.
    fn check_open(&self) -> Result<()> {
        if self.conn.is_closed() || self.conn.is_draining() {
            return Err(closed_error(&self.conn));
        }
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        flush_conn(
            &mut self.conn,
            &self.socket,
            &self.old_sockets,
            &mut self.send_buf,
        )
    }

    fn wait(&mut self, deadline: Instant) -> Result<()> {
        wait_and_recv(
            &mut self.conn,
            &self.socket,
            self.quic_local,
            &self.old_sockets,
            &mut self.recv_buf,
            deadline,
        )
    }

    fn drain_socket(&mut self) -> Result<()> {
        recv_ready(
            &mut self.conn,
            &self.socket,
            self.quic_local,
            &mut self.recv_buf,
        )?;
        for s in &self.old_sockets {
            let local = s.local_addr()?;
            recv_ready(&mut self.conn, s, local, &mut self.recv_buf)?;
        }
        Ok(())
    }

    /// Drives until every exchange completed (hooks ignored).
    fn drive_to_end(&mut self, ex: &mut [Exchange], deadline: Instant) -> Result<()> {
        loop {
            if let Stop::AllDone = self.drive(ex, deadline)? {
                return Ok(());
            }
        }
    }

    /// Main loop. Per-exchange failures are stored in `Exchange::result`;
    /// `Err` is returned only for socket-level failures.
    fn drive(&mut self, ex: &mut [Exchange], deadline: Instant) -> Result<Stop> {
        let mut by_stream: HashMap<u64, usize> = ex
            .iter()
            .enumerate()
            .filter_map(|(i, x)| x.stream_id.map(|s| (s, i)))
            .collect();
        loop {
            if self.conn.is_closed() || self.conn.is_draining() {
                for x in ex.iter_mut().filter(|x| !x.done()) {
                    x.result = Some(Err(closed_error(&self.conn)));
                }
                return Ok(Stop::AllDone);
            }

            self.open_streams(ex, &mut by_stream);
            self.send_bodies(ex);

            let hook = match self.process_h3_with(ex, &by_stream) {
                Ok(h) => h,
                Err(e) => {
                    // Connection-level HTTP/3 error: everything pending fails.
                    let code = h3_error_code(&e);
                    let _ = self.conn.close(true, code, b"client h3 error");
                    for x in ex.iter_mut().filter(|x| !x.done()) {
                        x.result = Some(Err(ClientError::H3(e)));
                    }
                    self.flush()?;
                    return Ok(Stop::AllDone);
                }
            };
            self.flush()?;

            if hook.is_some() {
                return Ok(Stop::Hook);
            }
            if ex.iter().all(Exchange::done) {
                return Ok(Stop::AllDone);
            }
            if Instant::now() >= deadline {
                let t = self.timeout;
                for x in ex.iter_mut().filter(|x| !x.done()) {
                    let what = match x.stream_id {
                        None => format!("request not even opened after {t:?} (peer stream limit?)"),
                        Some(s) => format!(
                            "stream {s}: no complete response after {t:?} (status {:?}, {} body bytes)",
                            x.status, x.len
                        ),
                    };
                    x.result = Some(Err(ClientError::Timeout(what)));
                }
                self.abort_exchanges(ex);
                return Ok(Stop::AllDone);
            }
            self.wait(deadline)?;
        }
    }

    /// Cancels the streams of exchanges that are open but not finished
    /// (timeout / aborted), so the connection stays usable.
    fn abort_exchanges(&mut self, ex: &mut [Exchange]) {
        for x in ex.iter_mut() {
            if let Some(s) = x.stream_id {
                if !self.conn.stream_finished(s) {
                    let _ =
                        self.conn
                            .stream_shutdown(s, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
                    let _ =
                        self.conn
                            .stream_shutdown(s, quiche::Shutdown::Write, H3_REQUEST_CANCELLED);
                }
            }
            if x.result.is_none() {
                x.result = Some(Err(ClientError::Protocol("aborted".into())));
            }
        }
        let _ = self.flush();
    }

    fn open_streams(&mut self, ex: &mut [Exchange], by_stream: &mut HashMap<u64, usize>) {
        for (i, x) in ex.iter_mut().enumerate() {
            if x.stream_id.is_some() || x.done() {
                continue;
            }
            if let Some(id) = self.goaway_id {
                x.result = Some(Err(ClientError::Protocol(format!(
                    "server sent GOAWAY (id {id}); request not sent"
                ))));
                continue;
            }
            if self.conn.peer_streams_left_bidi() == 0 {
                return;
            }
            let fin = x.body.is_empty();
            match self.h3.send_request(&mut self.conn, &x.headers, fin) {
                Ok(s) => {
                    x.stream_id = Some(s);
                    by_stream.insert(s, i);
                }
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit)) => return,
                Err(e) => x.result = Some(Err(ClientError::H3(e))),
            }
        }
    }

    fn send_bodies(&mut self, ex: &mut [Exchange]) {
        for x in ex.iter_mut() {
            let Some(s) = x.stream_id else { continue };
            if x.body_done || x.done() {
                continue;
            }
            let total = x.body.len();
            loop {
                let off = x.body_sent;
                let chunk_len = (total - off).min(BODY_CHUNK as u64) as usize;
                let chunk: &[u8] = match &x.body {
                    Body::Empty => &[],
                    Body::Bytes(b) => &b[off as usize..off as usize + chunk_len],
                    Body::Pattern(_) | Body::Stalled(_) => {
                        fill_pattern(off, &mut self.body_buf[..chunk_len]);
                        &self.body_buf[..chunk_len]
                    }
                };
                let stalls = matches!(x.body, Body::Stalled(_));
                let fin = !stalls && off + chunk_len as u64 == total;
                match self.h3.send_body(&mut self.conn, s, chunk, fin) {
                    Ok(n) => {
                        x.body_sent += n as u64;
                        if n == chunk_len && (fin || (stalls && x.body_sent == total)) {
                            // Stalled: everything it will ever send is out.
                            x.body_done = true;
                            break;
                        }
                        if n < chunk_len {
                            break;
                        }
                    }
                    Err(quiche::h3::Error::Done) => break,
                    Err(quiche::h3::Error::TransportError(quiche::Error::StreamStopped(_))) => {
                        // Peer sent STOP_SENDING (e.g. early response): stop
                        // uploading, keep reading the response.
                        x.body_done = true;
                        break;
                    }
                    Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(code))) => {
                        x.result = Some(Err(ClientError::StreamReset { stream_id: s, code }));
                        break;
                    }
                    Err(e) => {
                        x.result = Some(Err(ClientError::H3(e)));
                        break;
                    }
                }
            }
        }
    }

    fn process_h3(&mut self, ex: &mut [Exchange]) -> Result<()> {
        match self.process_h3_with(ex, &HashMap::new()) {
            Ok(_) => Ok(()),
            Err(e) => {
                let _ = self.conn.close(true, h3_error_code(&e), b"client h3 error");
                let _ = self.flush();
                Err(ClientError::H3(e))
            }
        }
    }

    /// Polls HTTP/3 events until `Done`. Returns the index of an exchange
    /// whose hook threshold was crossed.
    fn process_h3_with(
        &mut self,
        ex: &mut [Exchange],
        by_stream: &HashMap<u64, usize>,
    ) -> std::result::Result<Option<usize>, quiche::h3::Error> {
        let mut hook = None;
        loop {
            let (sid, ev) = match self.h3.poll(&mut self.conn) {
                Ok(v) => v,
                Err(quiche::h3::Error::Done) => return Ok(hook),
                Err(e) => return Err(e),
            };
            if let quiche::h3::Event::GoAway = ev {
                self.goaway_id = Some(sid);
                // Requests at or above the GOAWAY id were not (and will not
                // be) processed, unless a response already started.
                for x in ex.iter_mut().filter(|x| !x.done() && x.status.is_none()) {
                    if matches!(x.stream_id, Some(s) if s >= sid) {
                        x.result = Some(Err(ClientError::Protocol(format!(
                            "server sent GOAWAY (id {sid}); request not processed"
                        ))));
                    }
                }
                continue;
            }
            let idx = by_stream.get(&sid).copied().filter(|&i| !ex[i].done());
            let Some(i) = idx else {
                // Unknown / finished stream: discard data so nothing stalls.
                if let quiche::h3::Event::Data = ev {
                    while let Ok(n) = self.h3.recv_body(&mut self.conn, sid, &mut self.recv_buf) {
                        if n == 0 {
                            break;
                        }
                    }
                }
                continue;
            };
            let x = &mut ex[i];
            match ev {
                quiche::h3::Event::Headers { list, .. } => {
                    if x.status.is_none() {
                        let status = list
                            .iter()
                            .find(|h| h.name() == b":status")
                            .and_then(|h| std::str::from_utf8(h.value()).ok())
                            .and_then(|v| v.parse::<u16>().ok());
                        match status {
                            None => {
                                x.result = Some(Err(ClientError::Protocol(
                                    "response without valid :status".into(),
                                )));
                                self.cancel_stream(sid);
                                continue;
                            }
                            // Informational: wait for the final response.
                            Some(s) if (100..200).contains(&s) => continue,
                            Some(s) => {
                                let hdrs: Vec<(String, String)> = headers_to_strings(&list)
                                    .into_iter()
                                    .filter(|(n, _)| !n.starts_with(':'))
                                    .collect();
                                let cl = find_header(&hdrs, "content-length").map(str::trim);
                                match cl.map(str::parse::<u64>) {
                                    Some(Ok(v)) => x.content_length = Some(v),
                                    Some(Err(_)) => {
                                        x.result = Some(Err(ClientError::Protocol(format!(
                                            "invalid content-length {cl:?}"
                                        ))));
                                        self.cancel_stream(sid);
                                        continue;
                                    }
                                    None => {}
                                }
                                x.status = Some(s);
                                x.resp_headers = hdrs;
                                if x.cancel_after == Some(0) {
                                    x.result = Some(Ok(()));
                                    self.cancel_stream(sid);
                                }
                            }
                        }
                    } else {
                        x.trailers = headers_to_strings(&list);
                    }
                }
                quiche::h3::Event::Data => loop {
                    match self.h3.recv_body(&mut self.conn, sid, &mut self.recv_buf) {
                        Ok(n) => {
                            x.on_body(&self.recv_buf[..n]);
                            if matches!(x.cancel_after, Some(c) if x.len >= c) {
                                x.result = Some(Ok(()));
                                let _ = self.conn.stream_shutdown(
                                    sid,
                                    quiche::Shutdown::Read,
                                    H3_REQUEST_CANCELLED,
                                );
                                let _ = self.conn.stream_shutdown(
                                    sid,
                                    quiche::Shutdown::Write,
                                    H3_REQUEST_CANCELLED,
                                );
                                break;
                            }
                            if matches!(x.hook_after, Some(h) if x.len >= h) {
                                x.hook_after = None;
                                hook = Some(i);
                            }
                        }
                        Err(quiche::h3::Error::Done) => break,
                        Err(quiche::h3::Error::TransportError(quiche::Error::StreamReset(
                            code,
                        ))) => {
                            x.result = Some(Err(ClientError::StreamReset {
                                stream_id: sid,
                                code,
                            }));
                            break;
                        }
                        Err(e) => {
                            x.result = Some(Err(ClientError::H3(e)));
                            self.cancel_stream(sid);
                            break;
                        }
                    }
                },
                quiche::h3::Event::Finished => {
                    x.result = Some(if x.cancel_after.is_some() {
                        Err(ClientError::Protocol(format!(
                            "response completed ({} body bytes) before the cancel threshold",
                            x.len
                        )))
                    } else {
                        x.finish()
                    });
                }
                quiche::h3::Event::Reset(code) => {
                    x.result = Some(Err(ClientError::StreamReset {
                        stream_id: sid,
                        code,
                    }));
                    let _ = self.conn.stream_shutdown(
                        sid,
                        quiche::Shutdown::Write,
                        H3_REQUEST_CANCELLED,
                    );
                }
                quiche::h3::Event::PriorityUpdate | quiche::h3::Event::GoAway => {}
            }
        }
    }

    fn cancel_stream(&mut self, sid: u64) {
        let _ = self
            .conn
            .stream_shutdown(sid, quiche::Shutdown::Read, H3_REQUEST_CANCELLED);
        let _ = self
            .conn
            .stream_shutdown(sid, quiche::Shutdown::Write, H3_REQUEST_CANCELLED);
    }
}

fn pop_one(mut ex: Vec<Exchange>) -> Result<Exchange> {
    ex.pop()
        .ok_or_else(|| ClientError::Protocol("no exchange (internal)".into()))
}

/// Wire code for closing the connection after a local HTTP/3 error
/// (`quiche::h3::Error::to_wire` is private).
fn h3_error_code(e: &quiche::h3::Error) -> u64 {
    use quiche::h3::Error as E;
    match e {
        E::InternalError => 0x102,
        E::StreamCreationError => 0x103,
        E::ClosedCriticalStream => 0x104,
        E::FrameUnexpected => 0x105,
        E::FrameError => 0x106,
        E::ExcessiveLoad => 0x107,
        E::IdError => 0x108,
        E::SettingsError => 0x109,
        E::MissingSettings => 0x10a,
        E::MessageError => 0x10e,
        E::QpackDecompressionFailed => 0x200,
        _ => 0x101,
    }
}

fn closed_error(conn: &quiche::Connection) -> ClientError {
    if let Some(e) = conn.peer_error() {
        return ClientError::ConnectionClosed {
            peer: true,
            code: e.error_code,
            reason: String::from_utf8_lossy(&e.reason).into_owned(),
        };
    }
    if let Some(e) = conn.local_error() {
        return ClientError::ConnectionClosed {
            peer: false,
            code: e.error_code,
            reason: String::from_utf8_lossy(&e.reason).into_owned(),
        };
    }
    let reason = if conn.is_timed_out() {
        "idle timeout"
    } else {
        "connection closed"
    };
    ClientError::ConnectionClosed {
        peer: false,
        code: 0,
        reason: reason.into(),
    }
}

/// Sends every packet quiche has ready. A packet whose `SendInfo::from` is
/// the address of one of the `old` (migrated-away) sockets goes out through
/// it; everything else through `socket`, whatever `from` says (after
/// `H3Client::rebind` quiche still believes in the previous address).
fn flush_conn(
    conn: &mut quiche::Connection,
    socket: &UdpSocket,
    old: &[UdpSocket],
    out: &mut [u8],
) -> Result<()> {
    loop {
        let (n, info) = match conn.send(out) {
            Ok(v) => v,
            Err(quiche::Error::Done) => return Ok(()),
            Err(e) => {
                let _ = conn.close(false, 0x1, b"send failed");
                return Err(e.into());
            }
        };
        let sock = old
            .iter()
            .find(|s| s.local_addr().map(|a| a == info.from).unwrap_or(false))
            .unwrap_or(socket);
        match sock.send_to(&out[..n], info.to) {
            Ok(_) => {}
            // Kernel buffer full: treat as loss, QUIC recovers.
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
            // ICMP errors surfacing on the socket are not fatal for UDP.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e.into()),
        }
    }
}

/// Feeds every datagram already queued on `socket` to quiche (non-blocking).
fn recv_ready(
    conn: &mut quiche::Connection,
    socket: &UdpSocket,
    local: SocketAddr,
    buf: &mut [u8],
) -> Result<()> {
    loop {
        match socket.recv_from(buf) {
            Ok((n, from)) => {
                // Errors on individual packets (garbage, undecryptable, ...)
                // are not fatal; closure is checked by the caller.
                let _ = conn.recv(&mut buf[..n], quiche::RecvInfo { from, to: local });
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                return Ok(())
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Waits (at most until the next quiche timer, `deadline`, or `MAX_WAIT`)
/// for datagrams, feeds them all, then fires quiche's timer if due.
fn wait_and_recv(
    conn: &mut quiche::Connection,
    socket: &UdpSocket,
    local: SocketAddr,
    old: &[UdpSocket],
    buf: &mut [u8],
    deadline: Instant,
) -> Result<()> {
    let now = Instant::now();
    let mut wait = deadline.saturating_duration_since(now).min(MAX_WAIT);
    if let Some(t) = conn.timeout() {
        wait = wait.min(t);
    }
    if !wait.is_zero() {
        socket.set_nonblocking(false)?;
        socket.set_read_timeout(Some(wait.max(Duration::from_millis(1))))?;
        let r = socket.recv_from(buf);
        socket.set_nonblocking(true)?;
        match r {
            Ok((n, from)) => {
                let _ = conn.recv(&mut buf[..n], quiche::RecvInfo { from, to: local });
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::TimedOut
                    || e.kind() == io::ErrorKind::ConnectionRefused
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    recv_ready(conn, socket, local, buf)?;
    for s in old {
        let addr = s.local_addr()?;
        recv_ready(conn, s, addr, buf)?;
    }
    if let Some(at) = conn.timeout_instant() {
        if at <= Instant::now() {
            conn.on_timeout();
        }
    }
    Ok(())
}

// ---- hostile-client helpers (tests/e2e_hostile_requests.rs) ---------------

impl H3Client {
    /// Sends `list` verbatim as a request's header section (no body, no
    /// headers added, nothing lowercased) and returns the response.
    pub fn send_header_list(&mut self, list: &[(&[u8], &[u8])]) -> Result<Response> {
        let mut ex = vec![Exchange::new(Request::get("/"), &self.authority, false)];
        ex[0].headers = list
            .iter()
            .map(|(n, v)| quiche::h3::Header::new(n, v))
            .collect();
        let deadline = Instant::now() + self.timeout;
        self.drive_to_end(&mut ex, deadline)?;
        pop_one(ex)?.into_response()
    }

    /// Rapid reset (CVE-2023-44487): opens `n` request streams for `req`
    /// (its headers only), each HEADERS put on the wire and the stream reset
    /// (RESET_STREAM + STOP_SENDING, H3_REQUEST_CANCELLED) in the very next
    /// packet, waiting only for stream credit. Returns the streams opened.
    pub fn open_and_reset(&mut self, req: &Request, n: usize) -> Result<usize> {
        let headers = Exchange::new(req.clone(), &self.authority, false).headers;
        let deadline = Instant::now() + self.timeout;
        let mut opened = 0;
        while opened < n {
            self.check_open()?;
            self.drain_socket()?;
            self.process_h3(&mut [])?;
            let sent = match self.h3.send_request(&mut self.conn, &headers, true) {
                Ok(s) => Some(s),
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit)) => None,
                Err(e) => return Err(ClientError::H3(e)),
            };
            self.flush()?;
            match sent {
                Some(sid) => {
                    self.cancel_stream(sid);
                    self.flush()?;
                    opened += 1;
                }
                None if Instant::now() >= deadline => {
                    return Err(ClientError::Timeout(format!(
                        "no stream credit after {opened} reset streams"
                    )))
                }
                None => self.wait(deadline)?,
            }
        }
        Ok(opened)
    }
}

impl H3Client {
    /// Resets streams opened earlier (e.g. by [`H3Client::open_and_go_silent`]):
    /// RESET_STREAM + STOP_SENDING with H3_REQUEST_CANCELLED, sent at once.
    pub fn cancel_streams(&mut self, ids: &[u64]) -> Result<()> {
        for &sid in ids {
            self.cancel_stream(sid);
        }
        self.flush()
    }

    /// A client that stops reading: opens `n` GETs of `path` as concurrent
    /// streams, sends them, and returns without reading or acknowledging
    /// anything. Until the caller drives the client again (or drops it), the
    /// server sees a peer that went silent: no ACKs, no stream credit, no
    /// packets at all. Returns the stream ids.
    pub fn open_and_go_silent(&mut self, path: &str, n: usize) -> Result<Vec<u64>> {
        let mut ids = Vec::with_capacity(n);
        let deadline = Instant::now() + self.timeout;
        while ids.len() < n {
            let req = Exchange::new(Request::get(path), &self.authority, false);
            match self.h3.send_request(&mut self.conn, &req.headers, true) {
                Ok(id) => ids.push(id),
                Err(quiche::h3::Error::StreamBlocked)
                | Err(quiche::h3::Error::TransportError(quiche::Error::StreamLimit)) => {
                    // Out of stream credit: let the server's MAX_STREAMS in.
                    self.flush()?;
                    if Instant::now() >= deadline {
                        return Err(ClientError::Timeout(format!(
                            "opened only {} of {n} streams",
                            ids.len()
                        )));
                    }
                    self.wait(deadline)?;
                }
                Err(e) => return Err(e.into()),
            }
        }
        self.flush()?;
        Ok(ids)
    }
}
