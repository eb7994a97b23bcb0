//! The mount table of this process (`/proc/self/mountinfo`), read as bytes: a mount point's
//! name need not be UTF-8, and one such name anywhere must not hide every other mount.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// One line of mountinfo.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mount {
    /// The mounted file system's device number, "MAJOR:MINOR".
    pub dev: String,
    /// The directory of that file system mounted here (not `/` for a bind mount).
    pub root: PathBuf,
    pub mount_point: PathBuf,
    /// The mount's own options ("rw,nosuid,relatime").
    pub options: String,
    /// The file system type ("ext4", "fuse.interpose").
    pub fs_type: String,
    /// What was mounted (a device, or the name a FUSE daemon gave).
    pub source: OsString,
    /// The file system's options ("rw,user_id=0,allow_other").
    pub super_options: String,
}

/// Every mount, in the order of mountinfo (a later mount on a point is on top).
pub fn mounts() -> io::Result<Vec<Mount>> {
    let info = std::fs::read("/proc/self/mountinfo")?;
    Ok(parse(&info))
}

/// The mounts of a mountinfo text; malformed lines are left out.
pub fn parse(info: &[u8]) -> Vec<Mount> {
    info.split(|&b| b == b'\n').filter_map(parse_line).collect()
}

// Fields: id parent major:minor root mountpoint options [optional...] - type source superopts
fn parse_line(line: &[u8]) -> Option<Mount> {
    let mut fields = line.split(|&b| b == b' ');
    let dev = fields.nth(2)?;
    let root = fields.next()?;
    let mount_point = fields.next()?;
    let options = fields.next()?;
    let mut rest = fields.skip_while(|f| *f != b"-");
    rest.next()?;
    let fs_type = rest.next()?;
    let source = rest.next().unwrap_or_default();
    let super_options = rest.next().unwrap_or_default();
    Some(Mount {
        dev: String::from_utf8_lossy(dev).into_owned(),
        root: unescape(root).into(),
        mount_point: unescape(mount_point).into(),
        options: String::from_utf8_lossy(options).into_owned(),
        fs_type: unescape(fs_type).to_string_lossy().into_owned(),
        source: unescape(source),
        super_options: unescape(super_options).to_string_lossy().into_owned(),
    })
}

/// mountinfo writes space, tab, newline and backslash as `\OOO` (octal).
fn unescape(field: &[u8]) -> OsString {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        let octal = field
            .get(i + 1..i + 4)
            .filter(|o| o.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|o| o.iter().fold(0u32, |n, c| n * 8 + u32::from(c - b'0')))
            .and_then(|n| u8::try_from(n).ok());
        match octal {
            Some(byte) if field[i] == b'\\' => {
                out.push(byte);
                i += 4;
            }
            _ => {
                out.push(field[i]);
                i += 1;
            }
        }
    }
    OsString::from_vec(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    #[test]
    fn paths_are_unescaped() {
        assert_eq!(
            unescape(br"/a\040b\134c\011\999\777\04"),
            OsString::from("/a b\\c\t\\999\\777\\04")
        );
    }

    #[test]
    fn a_name_that_is_not_utf8_hides_no_other_mount() {
        let info = b"36 35 98:0 /mnt1 /mnt/nu\xfdl rw,noatime master:1 - ext3 /dev/root rw\n\
                     51 27 0:46 / /tmp/m\\040n rw,nosuid shared:2 - fuse.interpose /tmp/bk rw\n\
                     garbage\n";
        let mounts = parse(info);
        assert_eq!(mounts.len(), 2, "{mounts:?}");
        assert_eq!(
            mounts[0].mount_point.as_os_str().as_bytes(),
            b"/mnt/nu\xfdl"
        );
        assert_eq!(mounts[0].root, PathBuf::from("/mnt1"));
        assert_eq!(mounts[0].fs_type, "ext3");
        assert_eq!(mounts[1].dev, "0:46");
        assert_eq!(mounts[1].mount_point, PathBuf::from("/tmp/m n"));
        assert_eq!(mounts[1].fs_type, "fuse.interpose");
        assert_eq!(mounts[1].source, OsString::from("/tmp/bk"));
        assert_eq!(mounts[1].options, "rw,nosuid");
        assert_eq!(mounts[1].super_options, "rw");
    }
}
