//! End-to-end tests: one binary (one link) with a module per area.
//! Every test runs real processes over real sockets.

mod common;

mod e2e_access_log;
mod e2e_admission;
mod e2e_config;
mod e2e_control;
mod e2e_failures;
mod e2e_hostile_requests;
mod e2e_peers;
mod e2e_policies;
mod e2e_pool;
mod e2e_probes;
mod e2e_proxy;
mod e2e_request_path;
mod e2e_silent_clients;
mod e2e_upstream_io;
mod e2e_worker_failure;
mod e2e_workers;
