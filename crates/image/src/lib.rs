//! interpose's image format: compressed, checksummed disk images that remember which
//! bytes could not be read (bad extents from a GNU ddrescue mapfile).
//!
//! - [`format`]: the on-disk layout (docs/FORMAT.md);
//! - [`create`](mod@create): builds an image from a file or block device in one sequential
//!   pass, compressing on every core;
//! - [`Image`]: opens an image and reads any range, thread-safe, through a bounded cache
//!   of decompressed chunks; reads tell exactly which bytes are bad;
//! - [`source`]: the [`BlockSource`] trait the block-device service serves, implemented by
//!   [`Image`] and by [`RawSource`] (a raw file plus an optional mapfile);
//! - [`mapfile`]: the GNU ddrescue mapfile parser.
//!
//! ```no_run
//! use interpose_image::Image;
//! # fn main() -> interpose_image::Result<()> {
//! let img = Image::open_with_cache("disk.img".as_ref(), 256 << 20)?;
//! let mut buf = vec![0u8; 4096];
//! let outcome = img.read_at(&mut buf, 1 << 20)?;
//! for bad in &outcome.bad {
//!     eprintln!("{}..{} is {}", bad.offset, bad.end(), bad.state.name());
//! }
//! # Ok(())
//! # }
//! ```

pub mod create;
pub mod error;
pub mod extract;
pub mod format;
pub mod mapfile;
mod reader;
pub mod source;

pub use error::{Error, Result};
pub use format::{BadExtent, ExtentState};
pub use reader::{ChunkStats, Image, VerifyReport};
pub use source::{BlockSource, RawSource, ReadOutcome};
