//! `deny=RULES`: answer matching operations with an errno instead of performing them.
//!
//! A rule is `GLOB:OPS:ERRNO[:uid=N|uid!=N]`; rules are separated by `;`.
//! - `GLOB` is matched against the path relative to the mount root, without a leading
//!   `/` (`secret/**`, `**/*.key`, `notes.txt`); `*` does not cross `/`, `**` does.
//! - `OPS` is a `,`-separated list of operation names (`unlink`, `open`, ...) or classes:
//!   `all`, `write` (everything that changes the tree, including opens for writing) and
//!   `read` (opens for reading, read, readdir, readlink, getxattr, listxattr).
//! - `ERRNO` is a name such as `EACCES`, `EROFS`, `EPERM` or `ENOENT`. A rule that answers
//!   `lookup` with `ENOENT` hides matching entries: they are also left out of listings.
//! - `uid=N` / `uid!=N` limit the rule to callers with (or without) that uid.
//!
//! The first matching rule decides.
//!
//! Examples: a read-only subtree, `docs/**:write:EROFS`; a hidden file,
//! `secret.txt:all:ENOENT`; keys unreadable for one user, `**/*.key:open:EACCES:uid=1000`.

use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use interpose_core::errno_from_name;

use crate::filter::{Filter, Op, Request, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("deny rule {rule:?}: expected GLOB:OPS:ERRNO[:uid=N]")]
    Shape { rule: String },
    #[error("deny rule {rule:?}: bad glob: {source}")]
    Glob {
        rule: String,
        source: globset::Error,
    },
    #[error("deny rule {rule:?}: unknown operation or class {op:?}")]
    Op { rule: String, op: String },
    #[error("deny rule {rule:?}: unknown errno {errno:?} (use a name like EACCES)")]
    Errno { rule: String, errno: String },
    #[error("deny rule {rule:?}: bad condition {cond:?} (expected uid=N or uid!=N)")]
    Condition { rule: String, cond: String },
    #[error("deny filter needs at least one rule")]
    Empty,
}

#[derive(Clone, Copy, Debug)]
enum OpSet {
    All,
    Write,
    Read,
    One(Op),
}

impl OpSet {
    fn matches(self, req: &Request) -> bool {
        match self {
            OpSet::All => true,
            OpSet::Write => req.mutates(),
            OpSet::Read => match req.op {
                Op::Open => !req.mutates(),
                op => matches!(
                    op,
                    Op::Read
                        | Op::Readdir
                        | Op::Readlink
                        | Op::Getxattr
                        | Op::Listxattr
                        | Op::Opendir
                ),
            },
            OpSet::One(op) => req.op == op,
        }
    }
}

#[derive(Clone, Copy, Debug)]
enum UidCond {
    Any,
    Is(u32),
    IsNot(u32),
}

struct Rule {
    glob: GlobMatcher,
    ops: Vec<OpSet>,
    errno: i32,
    uid: UidCond,
}

impl Rule {
    fn parse(text: &str) -> Result<Rule, RuleError> {
        let shape = || RuleError::Shape {
            rule: text.to_owned(),
        };
        let mut fields = text.split(':');
        let glob = fields.next().filter(|g| !g.is_empty()).ok_or_else(shape)?;
        let ops = fields.next().filter(|g| !g.is_empty()).ok_or_else(shape)?;
        let errno = fields.next().filter(|g| !g.is_empty()).ok_or_else(shape)?;
        let cond = fields.next();
        if fields.next().is_some() {
            return Err(shape());
        }
        let glob = GlobBuilder::new(glob.trim_start_matches('/'))
            .literal_separator(true)
            .build()
            .map_err(|source| RuleError::Glob {
                rule: text.into(),
                source,
            })?
            .compile_matcher();
        let ops = ops
            .split(',')
            .map(|op| match op {
                "all" | "*" => Ok(OpSet::All),
                "write" => Ok(OpSet::Write),
                "read" => Ok(OpSet::Read),
                name => Op::from_name(name)
                    .map(OpSet::One)
                    .ok_or_else(|| RuleError::Op {
                        rule: text.into(),
                        op: name.into(),
                    }),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let errno = errno_from_name(errno).ok_or_else(|| RuleError::Errno {
            rule: text.into(),
            errno: errno.into(),
        })?;
        let uid = match cond {
            None => UidCond::Any,
            Some(c) => {
                let bad = || RuleError::Condition {
                    rule: text.into(),
                    cond: c.into(),
                };
                if let Some(n) = c.strip_prefix("uid!=") {
                    UidCond::IsNot(n.parse().map_err(|_| bad())?)
                } else if let Some(n) = c.strip_prefix("uid=") {
                    UidCond::Is(n.parse().map_err(|_| bad())?)
                } else {
                    return Err(bad());
                }
            }
        };
        Ok(Rule {
            glob,
            ops,
            errno,
            uid,
        })
    }

    fn matches_path(&self, path: &Path) -> bool {
        let rel = path.strip_prefix("/").unwrap_or(path);
        self.glob.is_match(rel)
    }

    fn matches(&self, req: &Request) -> bool {
        let uid_ok = match self.uid {
            UidCond::Any => true,
            UidCond::Is(u) => req.caller.uid == u,
            UidCond::IsNot(u) => req.caller.uid != u,
        };
        uid_ok
            && self.ops.iter().any(|o| o.matches(req))
            && (self.matches_path(&req.path)
                || req
                    .path2
                    .as_deref()
                    .is_some_and(|p| self.matches_path(p) && req.op != Op::Symlink))
    }
}

pub struct Deny {
    rules: Vec<Rule>,
}

impl Deny {
    /// Parses rules; each element may itself hold several rules separated by `;`.
    pub fn parse(rules: &[&str]) -> Result<Deny, RuleError> {
        let rules = rules
            .iter()
            .flat_map(|r| r.split(';'))
            .filter(|r| !r.is_empty())
            .map(Rule::parse)
            .collect::<Result<Vec<_>, _>>()?;
        if rules.is_empty() {
            return Err(RuleError::Empty);
        }
        Ok(Deny { rules })
    }
}

impl Filter for Deny {
    fn name(&self) -> &str {
        "deny"
    }

    fn before(&self, req: &Request) -> Verdict {
        match self.rules.iter().find(|r| r.matches(req)) {
            Some(rule) => Verdict::Deny(rule.errno),
            None => Verdict::Continue,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::filter::Caller;

    fn req(op: Op, path: &str, uid: u32) -> Request {
        Request::new(
            op,
            Path::new(path),
            Caller {
                pid: 1,
                uid,
                gid: uid,
            },
        )
    }

    #[test]
    fn read_only_subtree() {
        let deny = Deny::parse(&["docs/**:write:EROFS"]).unwrap();
        assert_eq!(
            deny.before(&req(Op::Unlink, "/docs/a/b", 0)),
            Verdict::Deny(libc::EROFS)
        );
        assert_eq!(
            deny.before(&req(Op::Mkdir, "/docs/new", 0)),
            Verdict::Deny(libc::EROFS)
        );
        assert_eq!(
            deny.before(&req(Op::Getattr, "/docs/a", 0)),
            Verdict::Continue
        );
        let mut open_ro = req(Op::Open, "/docs/a", 0);
        open_ro.flags = Some(libc::O_RDONLY);
        assert_eq!(deny.before(&open_ro), Verdict::Continue);
        let mut open_rw = req(Op::Open, "/docs/a", 0);
        open_rw.flags = Some(libc::O_RDWR);
        assert_eq!(deny.before(&open_rw), Verdict::Deny(libc::EROFS));
        assert_eq!(
            deny.before(&req(Op::Unlink, "/docsx/a", 0)),
            Verdict::Continue
        );
    }

    #[test]
    fn uid_conditions_and_first_match() {
        let deny = Deny::parse(&["**/*.key:open:EACCES:uid=1000;**:unlink:EPERM:uid!=0"]).unwrap();
        assert_eq!(
            deny.before(&req(Op::Open, "/a/b.key", 1000)),
            Verdict::Deny(libc::EACCES)
        );
        assert_eq!(
            deny.before(&req(Op::Open, "/a/b.key", 0)),
            Verdict::Continue
        );
        assert_eq!(
            deny.before(&req(Op::Unlink, "/x", 5)),
            Verdict::Deny(libc::EPERM)
        );
        assert_eq!(deny.before(&req(Op::Unlink, "/x", 0)), Verdict::Continue);
    }

    #[test]
    fn bad_rules_are_named() {
        for bad in [
            "",
            "a",
            "a:write",
            "a:frobnicate:EPERM",
            "a:write:ENOPE",
            "a:write:EPERM:gid=3",
            "[:write:EPERM",
        ] {
            assert!(Deny::parse(&[bad]).is_err(), "{bad:?} should not parse");
        }
    }
}
