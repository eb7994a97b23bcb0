//! Parts shared by every interpose layer: who is calling ([`Caller`]), the audit record
//! and the sink that writes it ([`audit`]), errno names ([`errno_name`]) and the mount
//! table ([`mountinfo`]).
//!
//! Each layer keeps its own request types; only what is truly common lives here.

pub mod audit;
mod caller;
mod errno;
pub mod mountinfo;

pub use caller::{being_killed, Caller, ExeCache, ProcessCache};
pub use errno::{errno_from_name, errno_name};
