//! The few system calls that rustix does not wrap safely: file handles, raw directory
//! reads with their offsets, per-thread file-system attributes.
//!
//! Every `unsafe` block of the crate lives here.

use std::ffi::{CStr, OsStr};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;

/// An opaque, persistent reference to an inode (see name_to_handle_at(2)).
#[derive(Clone, Debug)]
pub struct FileHandle {
    /// The mount it was taken through: which descriptor reopens it, not part of what it
    /// names (an object reached through two bind mounts of one file system is one).
    pub mount_id: i32,
    handle_type: i32,
    bytes: Box<[u8]>,
}

impl PartialEq for FileHandle {
    fn eq(&self, other: &Self) -> bool {
        (self.handle_type, &self.bytes) == (other.handle_type, &other.bytes)
    }
}

impl Eq for FileHandle {}

const MAX_HANDLE_SZ: usize = 128;

#[repr(C)]
struct RawHandle {
    handle_bytes: u32,
    handle_type: i32,
    f_handle: [u8; MAX_HANDLE_SZ],
}

/// The handle of the object `fd` refers to (an `O_PATH` descriptor is fine).
pub fn name_to_handle(fd: BorrowedFd<'_>) -> io::Result<FileHandle> {
    let mut raw = RawHandle {
        handle_bytes: MAX_HANDLE_SZ as u32,
        handle_type: 0,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    let mut mount_id: libc::c_int = 0;
    // SAFETY: `raw` is a properly sized `struct file_handle` with room for MAX_HANDLE_SZ
    // bytes as announced in handle_bytes; the path is a valid NUL-terminated empty string
    // used with AT_EMPTY_PATH; `mount_id` is a valid out pointer.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_name_to_handle_at,
            fd.as_raw_fd(),
            c"".as_ptr(),
            &mut raw as *mut RawHandle,
            &mut mount_id as *mut libc::c_int,
            libc::AT_EMPTY_PATH,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let len = (raw.handle_bytes as usize).min(MAX_HANDLE_SZ);
    Ok(FileHandle {
        mount_id,
        handle_type: raw.handle_type,
        bytes: raw.f_handle[..len].into(),
    })
}

/// Opens the object behind `handle`, relative to any descriptor on the same file system.
pub fn open_by_handle(
    mount_fd: BorrowedFd<'_>,
    handle: &FileHandle,
    flags: i32,
) -> io::Result<OwnedFd> {
    let mut raw = RawHandle {
        handle_bytes: handle.bytes.len() as u32,
        handle_type: handle.handle_type,
        f_handle: [0; MAX_HANDLE_SZ],
    };
    raw.f_handle[..handle.bytes.len()].copy_from_slice(&handle.bytes);
    // SAFETY: `raw` is a valid `struct file_handle` whose handle_bytes matches the bytes
    // copied in; the kernel only reads it.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_by_handle_at,
            mount_fd.as_raw_fd(),
            &mut raw as *mut RawHandle,
            flags | libc::O_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One entry of a directory as getdents64(2) reports it.
#[derive(Debug)]
pub struct DirEntry {
    pub ino: u64,
    /// The position just after this entry, to seek to for the next one.
    pub next_offset: i64,
    pub d_type: u8,
    pub name: Box<OsStr>,
}

/// Reads a batch of entries from the current position of an open directory.
/// An empty result means the end of the directory.
pub fn read_dir_batch(dir: BorrowedFd<'_>, out: &mut Vec<DirEntry>) -> io::Result<()> {
    let mut buf = [0u64; 4096]; // 32 KiB, 8-byte aligned for linux_dirent64
                                // SAFETY: `buf` is writable for its full byte length, which is what we pass.
    let n = unsafe {
        libc::syscall(
            libc::SYS_getdents64,
            dir.as_raw_fd(),
            buf.as_mut_ptr() as *mut u8,
            std::mem::size_of_val(&buf),
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    let bytes: &[u8] = {
        let len = n as usize;
        // SAFETY: the kernel initialised the first `n` bytes of `buf`.
        unsafe { std::slice::from_raw_parts(buf.as_ptr() as *const u8, len) }
    };
    let mut pos = 0;
    while pos + 19 <= bytes.len() {
        let ino = u64::from_ne_bytes(bytes[pos..pos + 8].try_into().unwrap());
        let off = i64::from_ne_bytes(bytes[pos + 8..pos + 16].try_into().unwrap());
        let reclen = u16::from_ne_bytes(bytes[pos + 16..pos + 18].try_into().unwrap()) as usize;
        let d_type = bytes[pos + 18];
        if reclen == 0 || pos + reclen > bytes.len() {
            break;
        }
        let name_bytes = &bytes[pos + 19..pos + reclen];
        let name = CStr::from_bytes_until_nul(name_bytes)
            .map(|c| c.to_bytes())
            .unwrap_or(name_bytes);
        out.push(DirEntry {
            ino,
            next_offset: off,
            d_type,
            name: OsStr::from_bytes(name).into(),
        });
        pos += reclen;
    }
    Ok(())
}

/// Gives the calling thread its own umask and working directory, so that setting the
/// umask for one request does not affect requests served by other threads.
pub fn unshare_thread_fs() -> io::Result<()> {
    // SAFETY: unshare(CLONE_FS) only affects the calling thread's fs_struct.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets the calling thread's umask (after [`unshare_thread_fs`]).
pub fn set_thread_umask(mask: u32) {
    // SAFETY: umask cannot fail and touches only the (unshared) fs_struct.
    unsafe { libc::umask(mask as libc::mode_t) };
}

/// Sets the calling thread's file-system gid and returns the previous one. New files take
/// their group from it (unless the directory is set-group-id), as if the caller made them.
pub fn set_thread_fsgid(gid: u32) -> u32 {
    // SAFETY: setfsgid is a per-thread syscall on Linux with no memory effects.
    unsafe { libc::setfsgid(gid) as u32 }
}

/// Whether a caller with file-system ids `uid` and `gid` and supplementary `groups` may
/// write the file behind `fd`, by the backing file system's own check (mode bits and
/// ACLs): `faccessat2(AT_EACCESS)` with this thread's ids and groups switched to the
/// caller's for the call, which also drops the daemon's file capabilities for it, and
/// back.
pub fn may_write_as(fd: BorrowedFd<'_>, uid: u32, gid: u32, groups: &[u32]) -> io::Result<bool> {
    use rustix::process::Gid;
    let old_groups = rustix::process::getgroups()?;
    let groups: Vec<Gid> = groups.iter().map(|&g| Gid::from_raw(g)).collect();
    let caps = rustix::thread::capabilities(None)?;
    rustix::thread::set_thread_groups(&groups)?;
    let old_gid = set_thread_fsgid(gid);
    // SAFETY: setfsuid is a per-thread syscall on Linux with no memory effects.
    let old_uid = unsafe { libc::setfsuid(uid) };
    // The change of uid drops the file capabilities only when it leaves uid 0; a thread
    // acting for a caller ([`act_for`]) holds them under the caller's uid.
    let mut without = caps;
    without.effective.remove(fs_caps());
    let res = rustix::thread::set_capabilities(None, without).and_then(|()| {
        rustix::fs::accessat(
            rustix::fs::CWD,
            proc_fd_path(fd),
            rustix::fs::Access::WRITE_OK,
            rustix::fs::AtFlags::EACCESS,
        )
    });
    // SAFETY: as above; back to the thread's own id and capabilities.
    unsafe { libc::setfsuid(old_uid as libc::uid_t) };
    let restored = rustix::thread::set_capabilities(None, caps);
    set_thread_fsgid(old_gid);
    rustix::thread::set_thread_groups(&old_groups)?;
    restored?;
    match res {
        Ok(()) => Ok(true),
        Err(rustix::io::Errno::ACCESS | rustix::io::Errno::PERM | rustix::io::Errno::ROFS) => {
            Ok(false)
        }
        Err(e) => Err(e.into()),
    }
}

/// The daemon's own effective capabilities, if it may act for callers at all (as root
/// with CAP_SETUID; known at the first call of [`act_for`]).
static OWN_EFFECTIVE: std::sync::OnceLock<Option<rustix::thread::CapabilitySet>> =
    std::sync::OnceLock::new();

thread_local! {
    /// The caller this thread acts for now (None: itself, as root).
    static ACTING_FOR: std::cell::Cell<Option<u32>> = const { std::cell::Cell::new(None) };
}

/// The capabilities a change of file-system uid takes away and gives back (the kernel's
/// CAP_FS_MASK).
fn fs_caps() -> rustix::thread::CapabilitySet {
    use rustix::thread::CapabilitySet as C;
    C::CHOWN
        | C::DAC_OVERRIDE
        | C::DAC_READ_SEARCH
        | C::FOWNER
        | C::FSETID
        | C::LINUX_IMMUTABLE
        | C::MAC_OVERRIDE
        | C::MKNOD
}

/// Has the calling thread meet the limits caller `uid` meets on BACKING's file system
/// (ext4's blocks reserved for root, disk quotas): for a caller who is not root, its
/// file-system uid becomes the caller's (ext4 lets uid 0 use the reserve) and
/// CAP_SYS_RESOURCE (which lifts both limits) leaves its effective set, while the other
/// capabilities stay (the kernel has checked the caller's permissions already). For root,
/// the thread is itself again. Per thread, as ids and capabilities are; syscalls are made
/// only when the caller changes. A passthrough registration keeps the credentials of the
/// thread that made it: its writes meet the limits of the caller that opened it first.
pub fn act_for(uid: u32) {
    use rustix::thread::{CapabilitySet, CapabilitySets};
    let own = OWN_EFFECTIVE.get_or_init(|| {
        let caps = rustix::thread::capabilities(None).ok()?;
        let root = rustix::process::geteuid().is_root();
        (root && caps.effective.contains(CapabilitySet::SETUID)).then_some(caps.effective)
    });
    let Some(own) = *own else {
        return;
    };
    let want = (uid != 0).then_some(uid);
    ACTING_FOR.with(|acting| {
        if acting.get() == want {
            return;
        }
        let Ok(caps) = rustix::thread::capabilities(None) else {
            return;
        };
        // SAFETY: setfsuid is a per-thread syscall on Linux with no memory effects.
        unsafe { libc::setfsuid(want.unwrap_or(0)) };
        let mut effective = own;
        if want.is_some() {
            effective.remove(CapabilitySet::SYS_RESOURCE);
        }
        let sets = CapabilitySets {
            effective,
            permitted: caps.permitted,
            inheritable: caps.inheritable,
        };
        match rustix::thread::set_capabilities(None, sets) {
            Ok(()) => acting.set(want),
            Err(e) => {
                tracing::warn!("acting for uid {uid}: {e}");
                // SAFETY: as above; back to the daemon's own id.
                unsafe { libc::setfsuid(0) };
                let own = CapabilitySets {
                    effective: own,
                    ..caps
                };
                let _ = rustix::thread::set_capabilities(None, own);
                acting.set(None);
            }
        }
    });
}

/// The "magic link" through which an `O_PATH` descriptor can be reopened or used by path.
pub fn proc_fd_path(fd: BorrowedFd<'_>) -> std::path::PathBuf {
    format!("/proc/self/fd/{}", fd.as_raw_fd()).into()
}

/// An all-zero `stat`, for directory entries whose attributes the kernel ignores.
pub fn zeroed_stat() -> rustix::fs::Stat {
    // SAFETY: `struct stat` is plain old data for which all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// Hands memory the allocator holds free back to the kernel. After a forget storm frees
/// many small nodes the heap is full of holes that glibc keeps: RSS would stay at its peak.
pub fn return_free_memory() {
    // SAFETY: malloc_trim only rearranges the allocator's free lists; no pointer we hold
    // is affected.
    unsafe { libc::malloc_trim(0) };
}
