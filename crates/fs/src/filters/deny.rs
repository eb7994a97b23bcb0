//! `deny=RULES`: answer matching operations with an errno instead of performing them.
//!
//! A rule is `GLOB:OPS:ERRNO[:uid=N|uid!=N]`; rules are separated by `;`.
//! - `GLOB` is matched against the path relative to the mount root, without a leading
//!   `/` (`secret/**`, `**/*.key`, `notes.txt`); `*` does not cross `/`, `**` does. A glob
//!   ending in `/**` also matches the directory itself (`docs/**` covers `docs`).
//! - `OPS` is a `,`-separated list of operation names (`unlink`, `open`, ...) or classes:
//!   `all`, `write` (everything that changes the tree, including opens for writing) and
//!   `read` (opens that allow reading, `O_RDWR` too, read, readdir, readlink, getxattr
//!   but of ACLs, listxattr).
//! - `ERRNO` is a name such as `EACCES`, `EROFS`, `EPERM` or `ENOENT`, or a number. A rule
//!   that answers `lookup` with `ENOENT` hides matching entries: they are also left out
//!   of listings, and nothing can be made under a hidden name (EACCES), which would reach
//!   the object.
//! - `uid=N` / `uid!=N` limit the rule to callers with (or without) that uid.
//!
//! The first matching rule decides. A rule refusing `rename` to a path also refuses
//! renaming a directory above it (the file system asks about every object below a
//! directory that moves). A rule that keeps a caller from reading or seeing paths also
//! refuses that caller renaming or linking what it covers to a name it does not cover
//! (the file, or a directory above it), which would undo it. Names a rule may refuse to
//! look up, stat or read are never cached by the kernel, so that every caller's access is
//! asked again. `access` rules are refused: the kernel answers access(2) itself.
//!
//! Examples: a read-only subtree, `docs/**:write:EROFS`; a hidden file,
//! `secret.txt:all:ENOENT`; keys unreadable for one user, `**/*.key:open:EACCES:uid=1000`.

use std::path::Path;

use globset::{GlobBuilder, GlobMatcher};
use interpose_core::errno_from_name;

use crate::filter::{Filter, Op, Request, Verdict};

#[derive(Debug, thiserror::Error)]
pub enum RuleError {
    #[error("deny rule {rule:?}: expected GLOB:OPS:ERRNO[:uid=N|:uid!=N]")]
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
    #[error("deny rule {rule:?}: access(2) is answered by the kernel from the mode bits and ACLs and never reaches a filter; refuse open, read or write instead")]
    Access { rule: String },
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
                // An open for reading and writing reads too (and with passthrough its
                // reads never reach a filter).
                Op::Open | Op::Create => req
                    .flags
                    .is_some_and(|f| f & libc::O_ACCMODE != libc::O_WRONLY),
                // ACLs are permissions, like the mode bits stat shows: the kernel reads
                // them, as the caller, to check a search of a directory. Refused, a rule
                // on `dir/**` would keep the caller from walking through `dir` at all.
                Op::Getxattr => !req.xattr.as_deref().is_some_and(is_acl),
                op => matches!(
                    op,
                    Op::Read | Op::Readdir | Op::Readlink | Op::Listxattr | Op::Opendir
                ),
            },
            OpSet::One(op) => req.op == op,
        }
    }

    /// Whether the set is about writing and `req` only reads its first path: a copy reads
    /// its source and writes its destination, so copying out of a read-only subtree is
    /// not a change of it (`cp` copies with copy_file_range).
    fn spares_source(self, req: &Request) -> bool {
        matches!(self, OpSet::Write) && req.op == Op::CopyFileRange
    }

    /// Whether the set keeps callers from reading or seeing something, so that moving or
    /// linking the object to a name the rule does not cover would undo it.
    fn guards_content(self) -> bool {
        match self {
            OpSet::All | OpSet::Read => true,
            OpSet::Write => false,
            OpSet::One(op) => matches!(
                op,
                Op::Open
                    | Op::Read
                    | Op::Readdir
                    | Op::Opendir
                    | Op::Readlink
                    | Op::Getxattr
                    | Op::Listxattr
                    | Op::Lookup
                    | Op::Getattr
            ),
        }
    }

    /// Whether the kernel answers some requests of this set from its caches (names,
    /// attributes, symlink targets) unless told not to cache.
    fn cacheable(self) -> bool {
        match self {
            OpSet::All | OpSet::Read => true,
            OpSet::Write => false,
            OpSet::One(op) => matches!(op, Op::Lookup | Op::Getattr | Op::Readlink),
        }
    }
}

/// Whether `name` is one of the extended attributes that hold POSIX ACLs.
fn is_acl(name: &std::ffi::OsStr) -> bool {
    matches!(
        name.as_encoded_bytes(),
        b"system.posix_acl_access" | b"system.posix_acl_default"
    )
}

#[derive(Clone, Copy, Debug)]
enum UidCond {
    Any,
    Is(u32),
    IsNot(u32),
}

struct Rule {
    /// The glob as given, without a leading `/`.
    text: String,
    glob: GlobMatcher,
    /// For a glob ending in `/**`, the directory itself.
    top: Option<GlobMatcher>,
    ops: Vec<OpSet>,
    errno: i32,
    uid: UidCond,
}

fn compile(glob: &str, rule: &str) -> Result<GlobMatcher, RuleError> {
    Ok(GlobBuilder::new(glob)
        .literal_separator(true)
        .build()
        .map_err(|source| RuleError::Glob {
            rule: rule.into(),
            source,
        })?
        .compile_matcher())
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
        let glob_text = glob.trim_start_matches('/').to_owned();
        let top = match glob_text.strip_suffix("/**") {
            Some(dir) if !dir.is_empty() => Some(compile(dir, text)?),
            _ => None,
        };
        let glob = compile(&glob_text, text)?;
        let ops = ops
            .split(',')
            .map(|op| match op {
                "all" | "*" => Ok(OpSet::All),
                "write" => Ok(OpSet::Write),
                "read" => Ok(OpSet::Read),
                // The mount lets the kernel check permissions (default_permissions), so
                // access(2) never reaches a filter: such a rule would never apply.
                "access" => Err(RuleError::Access { rule: text.into() }),
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
            text: glob_text,
            glob,
            top,
            ops,
            errno,
            uid,
        })
    }

    fn matches_path(&self, path: &Path) -> bool {
        let rel = path.strip_prefix("/").unwrap_or(path);
        self.glob.is_match(rel) || self.top.as_ref().is_some_and(|t| t.is_match(rel))
    }

    fn uid_ok(&self, req: &Request) -> bool {
        match self.uid {
            UidCond::Any => true,
            UidCond::Is(u) => req.caller.uid == u,
            UidCond::IsNot(u) => req.caller.uid != u,
        }
    }

    fn matches(&self, req: &Request) -> bool {
        self.uid_ok(req)
            && self.ops.iter().any(|o| {
                o.matches(req)
                    && (self.matches_path(&req.path) && !o.spares_source(req)
                        || req
                            .path2
                            .as_deref()
                            .is_some_and(|p| self.matches_path(p) && req.op != Op::Symlink))
            })
    }

    /// Whether moving or linking `from` to `to` would take an object this rule keeps the
    /// caller from reading or seeing out of its reach.
    fn escapes(&self, req: &Request, from: &Path, to: &Path) -> bool {
        self.uid_ok(req)
            && self.ops.iter().any(|o| o.guards_content())
            && self.matches_path(from)
            && !self.matches_path(to)
    }

    /// Whether the rule hides `path` from this caller (answers its lookup with ENOENT).
    fn hides(&self, req: &Request, path: &Path) -> bool {
        self.errno == libc::ENOENT
            && self.uid_ok(req)
            && self.matches_path(path)
            && self.ops.iter().any(|o| {
                let lookup = Request::new(Op::Lookup, path, req.caller);
                o.matches(&lookup)
            })
    }

    /// Whether some path strictly below the directory `dir` could match the glob: the
    /// glob's leading components, up to its first `**`, agree with `dir`'s.
    fn may_match_below(&self, dir: &Path) -> bool {
        let rel = dir.strip_prefix("/").unwrap_or(dir);
        if self.text.contains('{') {
            return true; // alternatives may hold a `/`: cannot split it safely
        }
        let glob: Vec<&str> = self.text.split('/').collect();
        let mut depth = 0;
        for comp in rel.components() {
            let Some(&g) = glob.get(depth) else {
                return false;
            };
            if g == "**" {
                return true;
            }
            let name = comp.as_os_str();
            let agrees = if g.contains(['*', '?', '[']) {
                compile(g, "").is_ok_and(|m| m.is_match(name))
            } else {
                name == g
            };
            if !agrees {
                return false;
            }
            depth += 1;
        }
        glob.len() > depth
    }
}

/// Operations that make a new name at the request's first path.
fn makes_name_at_path(op: Op) -> bool {
    matches!(op, Op::Create | Op::Mknod | Op::Mkdir | Op::Symlink)
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
        if let Some(rule) = self.rules.iter().find(|r| r.matches(req)) {
            return Verdict::Deny(rule.errno);
        }
        // A caller kept from reading an object must not read it under another name: a
        // rename or link out of the rule's paths is refused as the rule refuses (for a
        // directory, the file system asks about each object below it, `guards_below`).
        if let (Op::Rename | Op::Link, Some(to)) = (req.op, req.path2.as_deref()) {
            let exchange = req.is_exchange();
            let from = req.path.as_path();
            let rule = self
                .rules
                .iter()
                .find(|r| r.escapes(req, from, to) || (exchange && r.escapes(req, to, from)));
            if let Some(rule) = rule {
                return Verdict::Deny(rule.errno);
            }
        }
        // A hidden name still names its object in the backing directory: making something
        // under it would open, replace or reveal that object.
        let new_name = match req.op {
            op if makes_name_at_path(op) => Some(req.path.as_path()),
            Op::Link | Op::Rename => req.path2.as_deref(),
            _ => None,
        };
        if let Some(name) = new_name {
            if self.rules.iter().any(|r| r.hides(req, name)) {
                return Verdict::Deny(libc::EACCES);
            }
        }
        Verdict::Continue
    }

    fn varies_by_caller(&self, path: &Path) -> bool {
        self.rules
            .iter()
            .any(|r| r.ops.iter().any(|o| o.cacheable()) && r.matches_path(path))
    }

    fn may_vary_by_caller(&self) -> bool {
        self.rules
            .iter()
            .any(|r| r.ops.iter().any(|o| o.cacheable()))
    }

    fn before_leaving(&self, req: &Request, from: &Path) -> Verdict {
        // Out of the filter's subtrees no rule applies: moving there escapes them all.
        let rule = self.rules.iter().find(|r| {
            r.uid_ok(req) && r.ops.iter().any(|o| o.guards_content()) && r.matches_path(from)
        });
        rule.map_or(Verdict::Continue, |r| Verdict::Deny(r.errno))
    }

    fn guards_below(&self, dir: &Path, req: &Request) -> bool {
        self.rules.iter().any(|r| {
            r.uid_ok(req)
                && r.ops.iter().any(|o| o.matches(req) || o.guards_content())
                && r.may_match_below(dir)
        })
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
        let mut copy_out = req(Op::CopyFileRange, "/docs/a", 0);
        copy_out.path2 = Some("/pub/a".into());
        assert_eq!(deny.before(&copy_out), Verdict::Continue);
        let mut copy_in = req(Op::CopyFileRange, "/pub/a", 0);
        copy_in.path2 = Some("/docs/a".into());
        assert_eq!(deny.before(&copy_in), Verdict::Deny(libc::EROFS));
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
    fn a_subtree_rule_covers_the_directory_and_renames_above_it() {
        let deny = Deny::parse(&["proj/docs/**:write:EROFS"]).unwrap();
        // The directory itself: chmod, rename, rmdir.
        assert_eq!(
            deny.before(&req(Op::Setattr, "/proj/docs", 0)),
            Verdict::Deny(libc::EROFS)
        );
        assert_eq!(
            deny.before(&req(Op::Rmdir, "/proj/docs", 0)),
            Verdict::Deny(libc::EROFS)
        );
        assert_eq!(
            deny.before(&req(Op::Setattr, "/proj/docs2", 0)),
            Verdict::Continue
        );
        // Directories whose renames move protected paths: the file system asks about
        // what is below them.
        let mut rename = req(Op::Rename, "/proj", 0);
        rename.path2 = Some("/p2".into());
        assert!(deny.guards_below(Path::new("/proj"), &rename));
        assert!(deny.guards_below(Path::new("/"), &rename));
        assert!(!deny.guards_below(Path::new("/other"), &rename));
        assert!(!deny.guards_below(Path::new("/proj/docs/x/y"), &req(Op::Getattr, "/", 0)));
        let any_key = Deny::parse(&["**/*.key:write:EROFS"]).unwrap();
        assert!(any_key.guards_below(Path::new("/a/b"), &rename));
        let star = Deny::parse(&["*/cfg/*.conf:write:EROFS"]).unwrap();
        assert!(star.guards_below(Path::new("/app"), &rename));
        assert!(star.guards_below(Path::new("/app/cfg"), &rename));
        assert!(!star.guards_below(Path::new("/app/data"), &rename));
        assert!(!star.guards_below(Path::new("/app/cfg/x.conf"), &rename));
    }

    #[test]
    fn a_read_rule_covers_opens_for_reading_and_writing() {
        let deny = Deny::parse(&["secret/**:read:EACCES"]).unwrap();
        for (flags, verdict) in [
            (libc::O_RDONLY, Verdict::Deny(libc::EACCES)),
            (libc::O_RDWR, Verdict::Deny(libc::EACCES)),
            (libc::O_WRONLY, Verdict::Continue),
        ] {
            let mut open = req(Op::Open, "/secret/k", 0);
            open.flags = Some(flags);
            assert_eq!(deny.before(&open), verdict, "flags {flags:#o}");
        }
        assert!(deny.varies_by_caller(Path::new("/secret/k")));
        assert!(!deny.varies_by_caller(Path::new("/public")));
        let write_only = Deny::parse(&["docs/**:write:EROFS"]).unwrap();
        assert!(!write_only.may_vary_by_caller());
    }

    #[test]
    fn nothing_is_made_under_a_hidden_name() {
        let deny = Deny::parse(&["secret.txt:lookup:ENOENT:uid=1000"]).unwrap();
        assert_eq!(
            deny.before(&req(Op::Lookup, "/secret.txt", 1000)),
            Verdict::Deny(libc::ENOENT)
        );
        for op in [Op::Create, Op::Mknod, Op::Mkdir, Op::Symlink] {
            assert_eq!(
                deny.before(&req(op, "/secret.txt", 1000)),
                Verdict::Deny(libc::EACCES),
                "{op:?}"
            );
            assert_eq!(deny.before(&req(op, "/secret.txt", 0)), Verdict::Continue);
        }
        let mut rename = req(Op::Rename, "/x", 1000);
        rename.path2 = Some("/secret.txt".into());
        assert_eq!(deny.before(&rename), Verdict::Deny(libc::EACCES));
        assert!(deny.varies_by_caller(Path::new("/secret.txt")));
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
