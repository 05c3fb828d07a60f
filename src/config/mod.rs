//! Configuration: YAML → raw serde model → validated typed [`Config`].
//!
//! Every problem is a [`ConfigError`] naming the file, the key path
//! (`routes[0].rate_limits[1]`) and what is wrong; nothing here panics and no
//! secret value is ever part of a message.

mod model;
mod raw;
mod validate;

use std::fmt;
use std::path::{Path, PathBuf};

pub use model::*;

/// A configuration problem: where (file, key path) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file being read.
    pub file: PathBuf,
    /// The key path, e.g. `routes[0].rate_limits[1]` (empty for whole-file problems).
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(
                f,
                "{}: {}: {}",
                self.file.display(),
                self.path,
                self.message
            )
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where `${NAME}` values come from (the process environment, or a map in tests).
pub trait EnvSource {
    /// The value of variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
}

impl<F: Fn(&str) -> Option<String>> EnvSource for F {
    fn var(&self, name: &str) -> Option<String> {
        self(name)
    }
}

impl Config {
    /// Reads, parses and validates the file at `path` using the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, &ProcessEnv)
    }

    /// Like [`Config::load`] with an explicit environment.
    pub fn load_with_env(path: &Path, env: &dyn EnvSource) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: path.to_path_buf(),
            path: String::new(),
            message: format!("cannot read the file: {e}"),
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Self::from_yaml(&text, path, &base, env)
    }

    /// Parses and validates YAML text. `file` names it in messages; relative
    /// paths inside resolve against `base_dir`.
    pub fn from_yaml(
        text: &str,
        file: &Path,
        base_dir: &Path,
        env: &dyn EnvSource,
    ) -> Result<Config, ConfigError> {
        let raw = validate::parse(text, file)?;
        validate::Validator::new(file, base_dir, env).config(raw)
    }
}

/// Parses a duration like `250ms`, `30s`, `5m`, `1h` (a bare number is seconds).
pub fn parse_duration(s: &str) -> Option<std::time::Duration> {
    validate::parse_duration(s)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
