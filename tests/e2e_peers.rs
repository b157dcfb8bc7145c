//! Independent peers: Debian's gtlsclient (ngtcp2) as the HTTP/3 client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::Command;

use crate::common::{Backend, Spooky};

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn gtlsclient_fetches_through_spooky_round_robin() {
    if !have("gtlsclient") {
        if std::env::var_os("CI").is_some() {
            panic!("gtlsclient missing in CI: scripts/bootstrap.sh should install ngtcp2-client");
        }
        eprintln!("SKIP: gtlsclient not installed (apt-get install ngtcp2-client)");
        return;
    }
    let a = Backend::start("alpha");
    let b = Backend::start("beta");
    let spooky = Spooky::start(&[&a, &b]);
    let dir = tempfile::tempdir().unwrap();
    let mut seen = Vec::new();
    for _ in 0..4 {
        let out = Command::new("gtlsclient")
            .args(["--exit-on-all-streams-close", "-q"])
            .arg(format!("--download={}", dir.path().display()))
            .arg("127.0.0.1")
            .arg(spooky.addr.port().to_string())
            .arg(format!("https://localhost:{}/id", spooky.addr.port()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "gtlsclient failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let body = std::fs::read_to_string(dir.path().join("id")).unwrap();
        seen.push(body);
    }
    assert!(seen.contains(&"alpha".to_string()), "{seen:?}");
    assert!(seen.contains(&"beta".to_string()), "{seen:?}");
    for pair in seen.windows(2) {
        assert_ne!(pair[0], pair[1], "{seen:?}");
    }
}
