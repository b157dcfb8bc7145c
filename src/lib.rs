//! spooky: an HTTP/3 load balancer. QUIC and TLS 1.3 terminate in `quiche`;
//! each request stream becomes an HTTP/2 request on a pooled connection to a
//! backend chosen by policy.
//!
//! Layers, from the wire up: `spooky_uring` (datagram I/O drivers) →
//! [`edge`] (QUIC + HTTP/3, sans-IO) → [`router`] (envelopes, header mapping,
//! routes) → [`balancer`] (policies) → [`upstream`] (h2 pools, the request
//! task) — driven by [`runtime`], configured by [`config`], observed through
//! [`telemetry`] and [`control`].

pub mod balancer;
pub mod config;
pub mod control;
pub mod demo_backend;
pub mod edge;
pub mod router;
pub mod runtime;
pub mod source;
pub mod telemetry;
pub mod upstream;
