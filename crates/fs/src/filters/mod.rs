//! Built-in filters and the `--filter SPEC` syntax that selects them.
//!
//! A spec is `KIND=ARG` followed by `;`-separated options:
//!
//! - `audit=FILE` (`-` for standard error), option `io=off` to leave file data to the
//!   kernel passthrough (reads and writes then are not logged one by one);
//! - `deny=RULE[;RULE...]` (see [`deny`]);
//! - any filter takes `under=SUBTREE` (repeatable) to apply only below those directories.

pub mod audit;
pub mod deny;

use std::path::{Path, PathBuf};

use crate::filter::{Filter, Scoped};

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("filter spec {0:?} has no kind (expected KIND=ARG, e.g. audit=/tmp/audit.jsonl)")]
    NoKind(String),
    #[error("unknown filter kind {0:?} (known: audit, deny)")]
    UnknownKind(String),
    #[error("unknown option {option:?} for the {kind} filter")]
    UnknownOption { kind: String, option: String },
    #[error("bad value {value:?} for option {option}")]
    BadValue { option: String, value: String },
    #[error("the audit filter needs a log file: audit=FILE, or audit=- for standard error")]
    NoAuditLog,
    #[error("under={0:?}: expected a directory inside BACKING (relative to it, no `..`)")]
    BadSubtree(String),
    #[error(transparent)]
    Deny(#[from] deny::RuleError),
    #[error(transparent)]
    Audit(#[from] interpose_core::audit::AuditError),
}

/// The log file an `audit=` spec writes to (None for another kind, or `-`).
pub fn audit_file(spec: &str) -> Option<PathBuf> {
    let rest = spec.strip_prefix("audit=")?;
    rest.split(';')
        .find(|p| !p.is_empty() && !p.starts_with("under=") && !p.starts_with("io="))
        .filter(|p| *p != "-")
        .map(PathBuf::from)
}

/// The paths a spec names inside the mount, as written: each
/// `deny` rule's glob and each `under=` subtree. For a mount-time check that they name
/// something (see `glob_anchor`).
pub fn spec_paths(spec: &str) -> Vec<String> {
    let Some((kind, rest)) = spec.split_once('=') else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for part in rest.split(';').filter(|p| !p.is_empty()) {
        if let Some(path) = part.strip_prefix("under=") {
            paths.push(path.to_owned());
        } else if kind == "deny" && !part.starts_with("io=") {
            let glob = part.split(':').next().unwrap_or("");
            paths.push(glob.to_owned());
        }
    }
    paths
}

/// The leading components of a glob that hold no wildcard: what must exist for the glob
/// to match anything (`secret/keys` for `secret/keys/**/*.pem`; empty for `**/*.key`).
pub fn glob_anchor(glob: &str) -> PathBuf {
    glob.trim_start_matches('/')
        .split('/')
        .take_while(|c| !c.is_empty() && !c.contains(['*', '?', '[', '{', '\\']))
        .collect()
}

/// Parses one `--filter` argument into a scoped filter.
pub fn parse_spec(spec: &str) -> Result<Scoped, SpecError> {
    let (kind, rest) = spec
        .split_once('=')
        .ok_or_else(|| SpecError::NoKind(spec.to_owned()))?;
    let mut under = Vec::new();
    let mut io = true;
    let mut parts: Vec<&str> = Vec::new();
    for part in rest.split(';') {
        if let Some(path) = part.strip_prefix("under=") {
            let climbs = Path::new(path)
                .components()
                .any(|c| c == std::path::Component::ParentDir);
            if path.trim_matches('/').is_empty() || climbs {
                return Err(SpecError::BadSubtree(path.into()));
            }
            under.push(PathBuf::from(path));
        } else if let Some(value) = part.strip_prefix("io=") {
            io = match value {
                "on" | "true" | "yes" => true,
                "off" | "false" | "no" => false,
                _ => {
                    return Err(SpecError::BadValue {
                        option: "io".into(),
                        value: value.into(),
                    })
                }
            };
        } else if !part.is_empty() {
            parts.push(part);
        }
    }
    let filter: Box<dyn Filter> = match kind {
        "audit" => {
            let target = match parts[..] {
                [target] => target,
                [] => return Err(SpecError::NoAuditLog),
                [_, extra, ..] => {
                    return Err(SpecError::UnknownOption {
                        kind: kind.into(),
                        option: extra.into(),
                    })
                }
            };
            Box::new(audit::Audit::open(target, io)?)
        }
        "deny" => Box::new(deny::Deny::parse(&parts)?),
        _ => return Err(SpecError::UnknownKind(kind.to_owned())),
    };
    Ok(Scoped::new(filter, under))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spec_names_its_globs_and_subtrees() {
        assert_eq!(
            spec_paths("deny=/secret/**:read:EACCES;*.key:all:ENOENT;under=/home/a"),
            ["/secret/**", "*.key", "/home/a"]
        );
        assert_eq!(spec_paths("audit=/tmp/a.jsonl;io=off;under=src"), ["src"]);
        assert!(spec_paths("audit=-").is_empty());
    }

    #[test]
    fn specs_without_a_log_or_with_a_subtree_outside_are_refused() {
        let err = |spec: &str| {
            parse_spec(spec)
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default()
        };
        assert!(
            err("audit=").contains("needs a log file"),
            "{}",
            err("audit=")
        );
        assert!(err("audit=;io=off").contains("needs a log file"));
        assert!(err("audit=-;extra").contains("unknown option \"extra\""));
        for under in ["under=", "under=/", "under=../x", "under=a/../../b"] {
            let e = err(&format!("deny=x:all:EACCES;{under}"));
            assert!(
                e.contains("expected a directory inside BACKING"),
                "{under}: {e}"
            );
        }
        assert!(parse_spec("deny=x:all:EACCES;under=/a/b").is_ok());
    }

    #[test]
    fn a_glob_is_anchored_at_its_literal_components() {
        assert_eq!(
            glob_anchor("secret/keys/**/*.pem"),
            Path::new("secret/keys")
        );
        assert_eq!(glob_anchor("/srv/data/x"), Path::new("srv/data/x"));
        assert_eq!(glob_anchor("**/*.key"), Path::new(""));
        assert_eq!(glob_anchor("d[0-9]/x"), Path::new(""));
    }
}
