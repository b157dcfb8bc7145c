//! Debug-only fault injection: makes one worker fail on purpose so the
//! tests can watch what the process does about it (`io.on_worker_failure`,
//! `/ready`, the exit status).
//!
//! Set `SPOOKY_FAULT_INJECT` to `panic_worker:<id>:after_ms=<n>` (the
//! worker panics) or `error_worker:<id>:after_ms=<n>` (its loop returns an
//! error), `n` milliseconds after worker `<id>` started. Only debug builds
//! (`cfg(debug_assertions)`) read the variable; a release build has no
//! hook at all: [`for_worker`] is a constant `None` there.

use std::time::Duration;

/// The environment variable the hook reads.
pub const ENV: &str = "SPOOKY_FAULT_INJECT";

/// How the worker fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// `panic!` inside the worker loop.
    Panic,
    /// The worker loop returns `RuntimeError::FaultInjected`.
    Error,
}

/// One planned failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub kind: FaultKind,
    pub worker: usize,
    /// Time from the worker's start to the failure.
    pub after: Duration,
}

/// Parses a `SPOOKY_FAULT_INJECT` value; `None` when it is not one of the
/// two forms (so a typo injects nothing rather than something else).
pub fn parse(spec: &str) -> Option<Fault> {
    let mut parts = spec.trim().split(':');
    let kind = match parts.next()? {
        "panic_worker" => FaultKind::Panic,
        "error_worker" => FaultKind::Error,
        _ => return None,
    };
    let worker = parts.next()?.parse().ok()?;
    let ms = parts.next()?.strip_prefix("after_ms=")?.parse().ok()?;
    if parts.next().is_some() {
        return None;
    }
    Some(Fault {
        kind,
        worker,
        after: Duration::from_millis(ms),
    })
}

/// The fault planned for worker `id`, if any (debug builds only).
#[cfg(debug_assertions)]
pub fn for_worker(id: usize) -> Option<Fault> {
    let spec = std::env::var(ENV).ok()?;
    let fault = parse(&spec);
    if fault.is_none() {
        tracing::warn!(value = %spec, "{ENV}: not understood; no fault injected");
    }
    fault.filter(|f| f.worker == id)
}

/// Release builds carry no fault hook.
#[cfg(not(debug_assertions))]
pub fn for_worker(_id: usize) -> Option<Fault> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_forms() {
        assert_eq!(
            parse("panic_worker:0:after_ms=500"),
            Some(Fault {
                kind: FaultKind::Panic,
                worker: 0,
                after: Duration::from_millis(500)
            })
        );
        assert_eq!(
            parse("error_worker:3:after_ms=0"),
            Some(Fault {
                kind: FaultKind::Error,
                worker: 3,
                after: Duration::ZERO
            })
        );
    }

    #[test]
    fn rejects_anything_else() {
        for bad in [
            "",
            "panic_worker",
            "panic_worker:0",
            "panic_worker:x:after_ms=5",
            "panic_worker:0:after=5",
            "panic_worker:0:after_ms=-1",
            "panic_worker:0:after_ms=5:extra",
            "kill_worker:0:after_ms=5",
        ] {
            assert_eq!(parse(bad), None, "{bad:?}");
        }
    }
}
