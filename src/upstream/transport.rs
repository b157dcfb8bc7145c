//! How a worker opens its backend connections: the one place that knows
//! whether upstream TCP runs on tokio or on the worker's io_uring.
//!
//! The h2 pools and the health checks hold a [`Connector`] and get an
//! [`UpstreamStream`] from it; everything above (h2, the proxy) is one code
//! path for both transports. The choice is made once per worker
//! ([`Connector::for_worker`], from `io.upstream_io` and whether the
//! worker's datagram driver has a ring) and never changes while it runs.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

use spooky_uring::tcp::{RingHandle, UringTcpStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::config::UpstreamIo;

/// What `io.upstream_io: auto` means on the io_uring driver: the transport
/// that measured faster there (`make perf-io`, docs/perf.md). On the 2-core
/// development VM the two are within noise of each other, with tokio ahead
/// by a hair: ring/tokio small-GET req/s 0.98× and requests per CPU-second
/// 0.99× (medians of 9 runs), bulk MiB/s 1.03× but CPU per GiB 1.06× (the
/// ring adapter copies once more per direction), while the ring needs
/// 0.4–0.5× the syscalls per request. Revisit on hosts where syscalls cost
/// more.
pub const AUTO_ON_URING: UpstreamIo = UpstreamIo::Tokio;

/// A connected backend stream on either transport.
#[derive(Debug)]
pub enum UpstreamStream {
    /// tokio's `TcpStream`: epoll readiness, read/write syscalls.
    Tokio(TcpStream),
    /// io_uring operations on the worker's ring.
    Ring(UringTcpStream),
}

/// Opens backend connections on the worker's chosen transport. Cheap to
/// clone; `!Send` when it holds a ring.
#[derive(Debug, Clone, Default)]
pub enum Connector {
    #[default]
    Tokio,
    Ring(RingHandle),
}

impl Connector {
    /// The transport for a worker: `setting` resolved against the ring the
    /// worker's datagram driver offers (`None` on epoll, where `ring`
    /// falls back to tokio; the config warns about that combination).
    pub fn for_worker(setting: UpstreamIo, ring: Option<RingHandle>) -> Self {
        let setting = match setting {
            UpstreamIo::Auto => AUTO_ON_URING,
            other => other,
        };
        match (setting, ring) {
            (UpstreamIo::Ring, Some(ring)) => Connector::Ring(ring),
            _ => Connector::Tokio,
        }
    }

    /// `ring` or `tokio`, for logs and metrics.
    pub fn name(&self) -> &'static str {
        match self {
            Connector::Tokio => "tokio",
            Connector::Ring(_) => "ring",
        }
    }

    /// The ring, when this worker's upstream TCP runs on it.
    pub fn ring(&self) -> Option<&RingHandle> {
        match self {
            Connector::Tokio => None,
            Connector::Ring(r) => Some(r),
        }
    }

    /// Connects to `addr` with `TCP_NODELAY` (h2 frames are small and
    /// latency-bound). The caller bounds it with its connect timeout.
    pub async fn connect(&self, addr: SocketAddr) -> io::Result<UpstreamStream> {
        match self {
            Connector::Tokio => {
                let tcp = TcpStream::connect(addr).await?;
                tcp.set_nodelay(true)?;
                Ok(UpstreamStream::Tokio(tcp))
            }
            Connector::Ring(ring) => Ok(UpstreamStream::Ring(
                UringTcpStream::connect(ring, addr).await?,
            )),
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tokio(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Ring(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tokio(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Ring(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tokio(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Ring(s) => Pin::new(s).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Tokio(s) => s.is_write_vectored(),
            UpstreamStream::Ring(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tokio(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Ring(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tokio(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Ring(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_workers_always_use_tokio() {
        for setting in [UpstreamIo::Auto, UpstreamIo::Ring, UpstreamIo::Tokio] {
            assert_eq!(Connector::for_worker(setting, None).name(), "tokio");
        }
    }
}
