//! Errors of the image library: each names what is wrong and where.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What was being done; the I/O error is the source (printed after it by anyhow).
    #[error("{context}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("not an interpose image (no IPOSEIMG magic)")]
    NotAnImage,
    #[error("unsupported image: {0}")]
    Unsupported(String),
    #[error("corrupt image: {0}")]
    Corrupt(String),
    #[error("truncated image: {0}")]
    Truncated(String),
    #[error("incomplete image: it was never finished (no sealed header or trailer); was its creation interrupted?")]
    Incomplete,
    #[error("chunk {chunk} (bytes {start}..{end}) is damaged: {what}")]
    Chunk {
        chunk: u64,
        start: u64,
        end: u64,
        what: String,
    },
    #[error("read of {len} bytes at {offset} is outside the image ({size} bytes)")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("{}:{line}: {message}", path.display())]
    Mapfile {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("interrupted")]
    Interrupted,
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
