//! Small pieces every interpose FUSE front end needs (the filter file system and the
//! isolated view): name checks, reply helpers, fuser's time decoding undone, and the mode
//! a write leaves behind.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{Errno, ReplyEmpty, ReplyXattr};

/// A single name component the kernel may send: not empty, `.`, `..` or with a `/`.
pub fn check_name(name: &OsStr) -> Result<(), i32> {
    let b = name.as_bytes();
    if b.is_empty() || b == b"." || b == b".." || b.contains(&b'/') {
        return Err(libc::EINVAL);
    }
    Ok(())
}

pub fn reply_empty(reply: ReplyEmpty, res: Result<(), i32>) {
    match res {
        Ok(()) => reply.ok(),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

/// Answers getxattr/listxattr: the size when asked for it, ERANGE when it does not fit.
pub fn reply_xattr(reply: ReplyXattr, size: u32, res: Result<Vec<u8>, i32>) {
    match res {
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(Errno::from_i32(libc::ERANGE)),
        Ok(v) => reply.data(&v),
        Err(e) => reply.error(Errno::from_i32(e)),
    }
}

/// A listxattr answer (names, each ending in NUL) as the caller `req` may see it: the
/// kernel keeps `trusted.*` xattrs from callers without CAP_SYS_ADMIN, but a file system
/// lists names itself, and the daemon, which has it, sees them all. Root stands for
/// CAP_SYS_ADMIN (FUSE does not say what the caller holds).
pub fn listed_for(req: &fuser::Request, names: Vec<u8>) -> Vec<u8> {
    if req.uid() == 0 {
        return names;
    }
    names
        .split_inclusive(|&b| b == 0)
        .filter(|name| !name.starts_with(b"trusted."))
        .flatten()
        .copied()
        .collect()
}

/// (seconds, nanoseconds) since the epoch as a SystemTime, before 1970 too.
pub fn system_time(secs: i64, nsec: u32) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::new(secs as u64, nsec)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(nsec as u64)
    }
}

/// The kernel's (seconds, nanoseconds) of a time a setattr carries. fuser 0.18 decodes
/// (sec < 0, nsec) as epoch - (|sec| + nsec) rather than epoch - |sec| + nsec; this undoes
/// exactly that.
pub fn kernel_time(t: SystemTime) -> (i64, u32) {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
        Err(e) => (
            -(e.duration().as_secs() as i64),
            e.duration().subsec_nanos(),
        ),
    }
}

/// Permission bits after a chown as root: set-user-ID goes, and set-group-ID when the
/// group may execute.
pub fn without_setid(perm: u32) -> u32 {
    let mut m = perm & !libc::S_ISUID;
    if m & libc::S_IXGRP != 0 {
        m &= !libc::S_ISGID;
    }
    m
}

/// Permission bits after a write, truncation or chown by the caller of `req` without
/// CAP_FSETID, as the kernel's VFS drops them (setattr_should_drop_sgid): set-user-ID
/// goes; set-group-ID too when the group may execute, or when the caller is not in the
/// file's group `file_gid`. With FUSE_HANDLE_KILLPRIV_V2 that is the daemon's to do, and
/// the daemon, with CAP_FSETID itself, must decide for the caller.
pub fn without_setid_for(perm: u32, file_gid: u32, req: &fuser::Request) -> u32 {
    let mut m = without_setid(perm);
    if m & libc::S_ISGID != 0 && !in_group(req, file_gid) {
        m &= !libc::S_ISGID;
    }
    m
}

/// The permission bits after the caller of `req` set an access ACL, if that drops
/// set-group-ID: for a caller outside the file's group `file_gid`, as the kernel's
/// posix_acl_update_mode does.
pub fn acl_drops_setgid(mode: u32, file_gid: u32, req: &fuser::Request) -> Option<u32> {
    (mode & libc::S_ISGID != 0 && !in_group(req, file_gid))
        .then_some(mode & 0o7777 & !libc::S_ISGID)
}

/// Whether the caller of `req` is in group `gid` as the kernel's in_group_p sees it: its
/// file-system gid or a supplementary group of its process. Root counts as in every
/// group (it may keep set-group-ID anyway); a caller gone, as in no other group.
pub fn in_group(req: &fuser::Request, gid: u32) -> bool {
    req.uid() == 0
        || req.gid() == gid
        || supplementary_groups(req.pid()).is_some_and(|g| g.contains(&gid))
}

/// The supplementary groups of process (or thread) `pid`, from `/proc/PID/status`.
pub fn supplementary_groups(pid: u32) -> Option<Vec<u32>> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("Groups:"))?;
    Some(
        line.split_whitespace()
            .filter_map(|g| g.parse().ok())
            .collect(),
    )
}
