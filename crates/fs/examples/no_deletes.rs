//! A custom filter: refuse deletions of `*.log` files and count what was refused.
//!
//! `cargo run -p interpose-fs --example no_deletes -- BACKING MOUNTPOINT`, then in another
//! terminal `rm MOUNTPOINT/x.log` fails with EPERM; Ctrl-C unmounts.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use interpose_fs::filter::{Chain, Filter, Op, Outcome, Request, Scoped, Verdict};
use interpose_fs::{mount, MountConfig, Options};

#[derive(Default)]
struct NoLogDeletes {
    refused: AtomicU64,
}

impl Filter for NoLogDeletes {
    fn name(&self) -> &str {
        "no-log-deletes"
    }

    fn before(&self, req: &Request) -> Verdict {
        let is_log = req.path.extension().is_some_and(|e| e == "log");
        if is_log && matches!(req.op, Op::Unlink | Op::Rename) {
            return Verdict::Deny(libc::EPERM);
        }
        Verdict::Continue
    }

    fn after(&self, req: &Request, outcome: &Outcome) {
        if outcome.result == Err(libc::EPERM) {
            let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
            eprintln!(
                "refused {} of {} by pid {} ({n} so far)",
                req.op.name(),
                req.path.display(),
                req.caller.pid
            );
        }
    }
}

fn main() {
    let mut args = std::env::args_os().skip(1);
    let (Some(backing), Some(mountpoint)) = (args.next(), args.next()) else {
        eprintln!("usage: no_deletes BACKING MOUNTPOINT");
        std::process::exit(2);
    };
    let chain = Chain::new(vec![Scoped::new(Box::new(NoLogDeletes::default()), vec![])]);
    let mounted = mount(MountConfig {
        backing: PathBuf::from(backing),
        mountpoint: PathBuf::from(&mountpoint),
        chain: chain.into(),
        options: Options::default(),
    })
    .expect("mount");
    println!("mounted; Ctrl-C or `interpose fs unmount` to stop");
    mounted.join().expect("session");
}
