//! `spooky check`: each class of bad config names file:line:col and key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use crate::common::{spooky_check, write_certs};

const GOOD: &str = r#"listen:
  address: "127.0.0.1:8443"
  tls: { cert: cert.pem, key: key.pem }
upstreams:
  - name: app
    backends:
      - { address: "127.0.0.1:9001" }
"#;

fn check(yaml: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    write_certs(dir.path());
    let r = spooky_check(dir.path(), yaml);
    drop(dir);
    r
}

#[test]
fn good_config_prints_effective_config_and_inactive_keys() {
    let (code, out, err) = check(GOOD);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("max_streams_bidi: 256"), "{out}");
    assert!(out.contains("max_connections_per_backend: 16"), "{out}");
    // idle_ms closes idle pool connections: no longer listed as inactive.
    assert!(
        !out.contains("idle backend connections are not closed"),
        "{out}"
    );
}

fn assert_error(yaml: &str, line: usize, key: &str) {
    let (code, _out, err) = check(yaml);
    assert_ne!(code, 0, "expected failure for:\n{yaml}");
    let want = format!("check.yaml:{line}:");
    let hit = err.lines().any(|l| l.contains(&want) && l.contains(key));
    assert!(hit, "expected `{want}..{key}` in:\n{err}");
}

#[test]
fn unknown_key() {
    assert_error(&format!("{GOOD}bogus: 1\n"), 8, "bogus");
    assert_error(&GOOD.replace("  tls:", "  tlz: 1\n  tls:"), 3, "tlz");
}

#[test]
fn bad_address() {
    assert_error(
        &GOOD.replace("127.0.0.1:9001", "not-an-address"),
        7,
        "address",
    );
}

#[test]
fn zero_weight() {
    assert_error(
        &GOOD.replace("\"127.0.0.1:9001\" }", "\"127.0.0.1:9001\", weight: 0 }"),
        7,
        "weight",
    );
}

#[test]
fn unknown_policy() {
    assert_error(
        &GOOD.replace("    backends:", "    policy: fastest\n    backends:"),
        6,
        "policy",
    );
}

#[test]
fn empty_backends() {
    let yaml = "listen:\n  tls: { cert: cert.pem, key: key.pem }\nupstreams:\n  - name: app\n    backends: []\n";
    assert_error(yaml, 5, "backends");
}

#[test]
fn duplicate_upstream_names() {
    let yaml =
        format!("{GOOD}  - name: app\n    backends:\n      - {{ address: \"127.0.0.1:9002\" }}\n");
    assert_error(&yaml, 8, "name");
}

#[test]
fn route_to_missing_upstream() {
    let yaml = format!("{GOOD}routes:\n  - {{ path_prefix: \"/\", upstream: nope }}\n");
    assert_error(&yaml, 9, "upstream");
}

#[test]
fn missing_cert_file() {
    assert_error(
        &GOOD.replace("cert: cert.pem", "cert: missing.pem"),
        3,
        "cert",
    );
}

#[test]
fn yaml_syntax_error() {
    let (code, _, err) = check("listen: [\n");
    assert_ne!(code, 0);
    assert!(err.contains("check.yaml:"), "{err}");
}

#[test]
fn shipped_config_yaml_is_valid() {
    // The repository's config.yaml must pass once certs exist next to it.
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("certs")).unwrap();
    let certs = dir.path().join("certs");
    write_certs(&certs);
    let text =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.yaml")).unwrap();
    let (code, _out, err) = spooky_check(dir.path(), &text);
    assert_eq!(code, 0, "{err}");
}
