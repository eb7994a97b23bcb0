//! Shared by the image crate's integration tests: seeded pseudo-random numbers and
//! building an image with the library.

#![allow(dead_code)] // each test file uses part of this

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use interpose_image::create::{create, Options, Output};
use interpose_image::format::Codec;

/// Deterministic pseudo-random numbers (xorshift64*).
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: usize) -> usize {
        (self.next() >> 11) as usize % n.max(1)
    }
    pub fn fill(&mut self, b: &mut [u8]) {
        for x in b {
            *x = self.next() as u8;
        }
    }
}

/// Writes `data` to `DIR/NAME.raw` (and `map` to `DIR/NAME.map`) and builds
/// `DIR/NAME.img` from them with chunks of `1 << shift` bytes; returns the image's path.
pub fn create_image(dir: &Path, name: &str, data: &[u8], shift: u32, map: Option<&str>) -> PathBuf {
    create_image_with(dir, name, data, shift, map, Codec::Zstd)
}

/// `create_image` with the given codec.
pub fn create_image_with(
    dir: &Path,
    name: &str,
    data: &[u8],
    shift: u32,
    map: Option<&str>,
    codec: Codec,
) -> PathBuf {
    let src = dir.join(format!("{name}.raw"));
    std::fs::write(&src, data).unwrap();
    let mapfile: Option<PathBuf> = map.map(|m| {
        let p = dir.join(format!("{name}.map"));
        std::fs::write(&p, m).unwrap();
        p
    });
    let out = dir.join(format!("{name}.img"));
    let opts = Options {
        chunk_shift: shift,
        codec,
        threads: 2,
        mapfile,
        ..Options::default()
    };
    create(
        &src,
        Output::Path(&out),
        &opts,
        &|_, _| {},
        &AtomicBool::new(false),
    )
    .unwrap();
    out
}
