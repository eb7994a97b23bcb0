//! What the model-based isolation tests share (isolation_model.rs, isolation_crash.rs):
//! the seed, the test's own random choices, and the directories of one run with the
//! model script (scripts/iso_model.py) that builds, replays and compares trees.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::{test_root, Mount};

pub fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/scripts")
        .join(name)
}

/// `INTERPOSE_ISO_SEED`, or one from the clock (printed by the tests, so a failure can be
/// repeated).
pub fn seed() -> u64 {
    crate::common::seed_from_env("INTERPOSE_ISO_SEED")
}

/// SplitMix64: the test's own choices (what to commit up to, when to kill) from the seed.
pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }
}

/// The directories of one model run: `backing/` (what is mounted) and `reference/` (a
/// plain directory that always holds what the mount must show), both the model's
/// initial tree, `mnt/`, `store/`, the log of operations and BACKING's manifest from
/// before anything ran.
pub struct ModelDirs {
    pub seed: u64,
    _tmp: tempfile::TempDir,
    pub root: PathBuf,
    pub backing: PathBuf,
    pub reference: PathBuf,
    pub mnt: PathBuf,
    pub store: PathBuf,
    pub oplog: PathBuf,
    pub manifest: PathBuf,
    /// The subtree a `--isolate-path` mount isolates (INTERPOSE_ISO_BORDER for the model
    /// script), None for a mount that isolates everything.
    pub border: Option<&'static str>,
    /// The INTERPOSE_ISO_SEED that repeats this run (tests add an offset of their own to
    /// it to make `seed`).
    pub env_seed: u64,
}

impl ModelDirs {
    /// Fresh directories under a temporary one named `prefix...` (interpose-test-*, so
    /// scripts/test.sh notices a mount left behind).
    pub fn new(prefix: &str, seed: u64) -> ModelDirs {
        let tmp = tempfile::Builder::new()
            .prefix(prefix)
            .tempdir_in(test_root())
            .unwrap();
        let root = tmp.path().to_path_buf();
        let d = ModelDirs {
            seed,
            backing: root.join("backing"),
            reference: root.join("reference"),
            mnt: root.join("mnt"),
            store: root.join("store"),
            oplog: root.join("oplog.jsonl"),
            manifest: root.join("backing-manifest.json"),
            border: None,
            env_seed: seed,
            root,
            _tmp: tmp,
        };
        std::fs::create_dir(&d.mnt).unwrap();
        d.model(&["build".as_ref(), d.backing.as_os_str()]);
        d.model(&["build".as_ref(), d.reference.as_os_str()]);
        d.model(&[
            "manifest".as_ref(),
            d.backing.as_os_str(),
            d.manifest.as_os_str(),
        ]);
        d
    }

    /// Runs a script of tests/scripts; a failure fails the test with its message and the
    /// seed. Its stdout.
    pub fn python(&self, name: &str, args: &[&OsStr]) -> String {
        let mut cmd = Command::new("python3");
        cmd.arg(script(name)).args(args);
        if let Some(b) = self.border {
            cmd.env("INTERPOSE_ISO_BORDER", b);
        }
        let out = cmd.output().expect("python3");
        assert!(
            out.status.success(),
            "seed {} (INTERPOSE_ISO_SEED={} repeats it): {name} {args:?} failed ({}):\n{}{}",
            self.seed,
            self.env_seed,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout),
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs iso_model.py.
    pub fn model(&self, args: &[&OsStr]) -> String {
        self.python("iso_model.py", args)
    }

    /// `interpose fs mount BACKING MNT --isolate STORE EXTRA...`.
    pub fn mount_with(&self, extra: &[&str]) -> Mount {
        let mut args = vec!["--isolate", self.store.to_str().unwrap()];
        args.extend_from_slice(extra);
        Mount::start(&self.backing, &self.mnt, &args)
    }

    pub fn mount(&self) -> Mount {
        self.mount_with(&[])
    }

    /// BACKING still matches the manifest taken before anything ran.
    pub fn assert_backing_untouched(&self, when: &str) {
        let out = Command::new("python3")
            .arg(script("iso_model.py"))
            .arg("same-manifest")
            .arg(&self.backing)
            .arg(&self.manifest)
            .output()
            .expect("python3");
        assert!(
            out.status.success(),
            "seed {}: BACKING changed {when}, before any commit:\n{}",
            self.seed,
            String::from_utf8_lossy(&out.stderr)
        );
    }
}
