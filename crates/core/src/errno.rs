//! Symbolic names for errno values, both ways, for logs and rule files.

macro_rules! errno_table {
    ($($name:ident),* $(,)?) => {
        /// The symbolic name of an errno value (`"ENOENT"`), or `None` for an unknown one.
        pub fn errno_name(code: i32) -> Option<&'static str> {
            match code {
                $(libc::$name => Some(stringify!($name)),)*
                _ => None,
            }
        }

        /// The errno value for a symbolic name (`"EACCES"`), case-insensitive, its
        /// aliases (`EWOULDBLOCK`, `ENOTSUP`, `EDEADLOCK`), or a number (`13`).
        pub fn errno_from_name(name: &str) -> Option<i32> {
            let upper = name.to_ascii_uppercase();
            match upper.as_str() {
                $(stringify!($name) => Some(libc::$name),)*
                "EWOULDBLOCK" => Some(libc::EWOULDBLOCK),
                "ENOTSUP" => Some(libc::ENOTSUP),
                "EDEADLOCK" => Some(libc::EDEADLOCK),
                number => number
                    .parse::<i32>()
                    .ok()
                    .filter(|&n| errno_name(n).is_some()),
            }
        }
    };
}

errno_table!(
    EPERM,
    ENOENT,
    ESRCH,
    EINTR,
    EIO,
    ENXIO,
    E2BIG,
    ENOEXEC,
    EBADF,
    ECHILD,
    EAGAIN,
    ENOMEM,
    EACCES,
    EFAULT,
    EBUSY,
    EEXIST,
    EXDEV,
    ENODEV,
    ENOTDIR,
    EISDIR,
    EINVAL,
    ENFILE,
    EMFILE,
    ETXTBSY,
    EFBIG,
    ENOSPC,
    ESPIPE,
    EROFS,
    EMLINK,
    EPIPE,
    ERANGE,
    EDEADLK,
    ENAMETOOLONG,
    ENOLCK,
    ENOSYS,
    ENOTEMPTY,
    ELOOP,
    ENODATA,
    EOVERFLOW,
    EOPNOTSUPP,
    EDQUOT,
    ESTALE,
    ECANCELED,
    ETIMEDOUT,
    ECONNREFUSED,
    ECONNRESET,
    EHOSTUNREACH,
    ENOTCONN,
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for code in [libc::ENOENT, libc::EACCES, libc::EROFS, libc::ENODATA] {
            let name = errno_name(code).unwrap();
            assert_eq!(errno_from_name(name), Some(code));
        }
        assert_eq!(errno_from_name("eacces"), Some(libc::EACCES));
        assert_eq!(errno_from_name("ENOTANERRNO"), None);
        assert_eq!(errno_from_name("EWOULDBLOCK"), Some(libc::EAGAIN));
        assert_eq!(errno_from_name("enotsup"), Some(libc::EOPNOTSUPP));
        assert_eq!(errno_from_name("13"), Some(libc::EACCES));
        assert_eq!(errno_from_name("0"), None);
        assert_eq!(errno_from_name("-1"), None);
        assert_eq!(errno_name(99999), None);
    }
}
