//! A read-only NBD server for interpose's block sources, written from the protocol
//! specification (NetworkBlockDevice's doc/proto.md; docs/PROTOCOL.md says what this
//! server does with each part): fixed newstyle handshake, NBD_OPT_GO/INFO/LIST/
//! EXPORT_NAME/ABORT, structured replies (holes as OFFSET_HOLE, bad sectors as
//! ERROR_OFFSET beside the good bytes of the same read), block status for
//! `base:allocation` and `x-interpose:bad`, many connections, systemd socket activation.

pub mod proto;
pub mod server;
mod sys;

pub use server::{Config, Export, Listener, Server};
