//! Config loading from arbitrary bytes: `config::parse_str` (YAML syntax,
//! types, key locations, semantic validation) must answer every input with
//! a config or located errors, never a panic.
//!
//! Properties checked beyond "no panic":
//! * every error renders (`Display`) as `file:line:col: key: problem`;
//! * a config that loads prints (`to_yaml`) to text that loads again into
//!   an equal config, as `spooky check` and `GET /config` promise.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use spooky::config;

/// The file name errors are reported against (and relative paths resolve to).
const FILE: &str = "/fuzz/config.yaml";

fuzz_target!(|data: &[u8]| {
    // The loader reads text; non-UTF-8 bytes are rejected before parsing
    // (`std::fs::read_to_string`), so only text reaches `parse_str`.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let file = Path::new(FILE);
    match config::parse_str(text, file) {
        Ok(cfg) => {
            let _ = cfg.warnings();
            let _ = cfg.not_yet_active();
            let printed = cfg.to_yaml();
            match config::parse_str(&printed, file) {
                Ok(again) => assert_eq!(again, cfg, "to_yaml round trip changed the config"),
                Err(errs) => panic!("the printed config does not load:\n{printed}\n{errs}"),
            }
        }
        Err(errs) => {
            assert!(!errs.0.is_empty(), "an error result with no errors");
            let shown = errs.to_string();
            assert!(shown.contains(FILE), "error without its file: {shown}");
        }
    }
});
