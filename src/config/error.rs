//! Error types of the configuration layer.
//!
//! Every problem carries the file, the 1-based line and column and the dotted
//! key path, so that an operator can jump straight to the offending line and a
//! `spooky check` run lists all problems at once instead of one per attempt.

use std::fmt;
use std::path::{Path, PathBuf};

use thiserror::Error;

/// One problem found while loading a configuration file.
///
/// Displayed as `file:line:col: key: problem`, the format editors and CI log
/// viewers recognise as a clickable location. `line` and `col` are 1-based;
/// both are 0 (and `key` is `-`) when the problem is not tied to a position,
/// such as a file that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}:{line}:{col}: {key}: {problem}", file.display())]
pub struct ConfigError {
    /// The configuration file the problem was found in.
    pub file: PathBuf,
    /// 1-based line of the key (0 when there is no position).
    pub line: usize,
    /// 1-based column of the key (0 when there is no position).
    pub col: usize,
    /// Dotted key path such as `upstreams[0].backends[1].weight`, or `-`.
    pub key: String,
    /// What is wrong, in words meant for the operator.
    pub problem: String,
}

impl ConfigError {
    /// Builds an error at a known position; used by every stage of loading so
    /// that all errors share one shape.
    pub(crate) fn at(
        file: &Path,
        (line, col): (usize, usize),
        key: impl Into<String>,
        problem: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            line,
            col,
            key: key.into(),
            problem: problem.into(),
        }
    }
}

/// All problems found in one configuration file.
///
/// Loading collects every semantic problem before failing, so callers get the
/// whole list; it is never empty when returned as an error.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{}", DisplayLines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    /// Wraps a single problem, for the stages that stop at the first one
    /// (unreadable file, YAML syntax, type mismatch).
    pub(crate) fn one(error: ConfigError) -> Self {
        ConfigErrors(vec![error])
    }
}

/// Formats errors one per line, without a trailing newline.
struct DisplayLines<'a>(&'a [ConfigError]);

impl fmt::Display for DisplayLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}
