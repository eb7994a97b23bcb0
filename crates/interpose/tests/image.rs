//! `interpose image` with the real binary and real tools:
//!
//! - round trips raw -> image -> extract for sizes that are not multiples of the chunk
//!   or sector size, empty, all-zero, random and text sources, across chunk sizes and
//!   levels, to a file and streamed to standard output; a real ext4 file system
//!   (mke2fs -d), also read from a loop device, whose files read back with debugfs
//!   from the extracted image;
//! - GNU ddrescue against a source that really fails reads (nbdkit's eval plugin
//!   failing chosen ranges with EIO, exposed as a file by nbdfuse): the image records
//!   exactly the failed ranges, and the untried tail of an interrupted rescue;
//! - `verify` catches a flipped bit in every region (header, compressed and raw chunk
//!   data, index, bad-extent table, metadata, trailer);
//! - an interrupted create (SIGINT, SIGKILL) and a full disk leave nothing that opens
//!   as an image; a malformed mapfile is refused with its line number;
//! - an independent reader written from docs/FORMAT.md alone (scripts/img_reader.py)
//!   accepts every kind of image interpose writes and reads the same bytes and extents.

mod common;
mod support;
use common::*;
use support::*;

use std::fs::{self, File};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use interpose_image::format::{self, Header, HEADER_SIZE};
use serde_json::Value;

fn dir() -> tempfile::TempDir {
    plain_dir("interpose-test-image-")
}

fn image(args: &[&str]) -> std::process::Output {
    output(Command::new(bin()).arg("image").args(args))
}

/// `interpose image ARGS` must succeed; its stdout.
fn image_ok(args: &[&str]) -> String {
    let out = image(args);
    assert!(
        out.status.success(),
        "interpose image {args:?} failed:\n{}",
        describe(&out)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// `interpose image ARGS` must fail; its stderr.
fn image_fails(args: &[&str]) -> String {
    let out = image(args);
    assert!(
        !out.status.success(),
        "interpose image {args:?} succeeded but must not:\n{}",
        describe(&out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn info(img: &Path) -> Value {
    serde_json::from_str(&image_ok(&["info", s(img), "--json"])).unwrap()
}

fn random(len: usize, seed: u64) -> Vec<u8> {
    random_bytes(len, seed)
}

fn text(len: usize) -> Vec<u8> {
    text_lines(len, 0)
}

/// create, verify, info, extract: the raw bytes come back.
fn round_trip(d: &Path, name: &str, raw: &[u8], extra: &[&str]) -> Value {
    let src = d.join(format!("{name}.raw"));
    let img = d.join(format!("{name}.img"));
    let back = d.join(format!("{name}.back"));
    fs::write(&src, raw).unwrap();
    let mut args = vec!["create", s(&src), "-o", s(&img)];
    args.extend_from_slice(extra);
    image_ok(&args);
    image_ok(&["verify", s(&img)]);
    image_ok(&["extract", s(&img), "-o", s(&back)]);
    let got = fs::read(&back).unwrap();
    assert!(
        got == raw,
        "{name} {extra:?}: extract differs from the source ({} vs {} bytes)",
        got.len(),
        raw.len()
    );
    let v = info(&img);
    assert_eq!(v["virtual_size"], raw.len() as u64, "{name}");
    assert_eq!(v["bad_bytes"], 0, "{name}");
    // The metadata's hash is BLAKE3 of the bytes (b3sum agrees when installed).
    assert_eq!(
        v["metadata"]["blake3"],
        blake3::hash(raw).to_hex().as_str(),
        "{name}"
    );
    v
}

#[test]
fn round_trips_across_sizes_contents_chunk_sizes_codecs_and_levels() {
    let t = dir();
    let d = t.path();
    let sizes = [0usize, 1, 511, 4095, 4097, 65_537, (1 << 20) + 3, 3 << 20];
    let chunk_sizes = ["4K", "64K", "1M"];
    // Codec and level pairs, taken in turn: zstd's fast, default, high and negative
    // levels; LZ4's fast mode and high-compression levels.
    let levels = [
        ("zstd", "1"),
        ("lz4", "1"),
        ("zstd", "3"),
        ("lz4", "9"),
        ("zstd", "19"),
        ("lz4", "2"),
        ("zstd", "-5"),
        ("lz4", "12"),
    ];
    let mut k = 0;
    for (ci, chunk) in chunk_sizes.iter().enumerate() {
        for (si, &size) in sizes.iter().enumerate() {
            for (kind, raw) in [
                ("zero", vec![0u8; size]),
                ("random", random(size, si as u64 + 1)),
                ("text", text(size)),
            ] {
                let (codec, level) = levels[k % levels.len()];
                k += 1;
                let name = format!("{kind}-{size}-{chunk}-{ci}-{codec}");
                let args = ["--chunk-size", chunk, "--codec", codec, "--level", level];
                let v = round_trip(d, &name, &raw, &args);
                assert_eq!(v["codec"], codec, "{name}");
                let chunks = &v["chunks"];
                let total = chunks["total"].as_u64().unwrap();
                let cs = v["chunk_size"].as_u64().unwrap();
                assert_eq!(total, (size as u64).div_ceil(cs), "{name}");
                match kind {
                    "zero" => assert_eq!(chunks["zero"], total, "{name}: all-zero chunks"),
                    "random" if size > 0 => {
                        assert_eq!(chunks["compressed"], 0, "{name}: random compressed?");
                        assert_eq!(chunks["raw"], total, "{name}: random stored raw")
                    }
                    // Stored chunk bytes, not the file: header, trailer and metadata
                    // are a kilobyte and more.
                    "text" if size >= 4096 => assert!(
                        chunks["stored_bytes"].as_u64().unwrap() < size as u64 / 2,
                        "{name}: text did not compress: {v}"
                    ),
                    _ => {}
                }
            }
        }
    }
}

#[test]
fn streamed_to_stdout_the_image_is_the_same_and_reads_back() {
    let t = dir();
    let d = t.path();
    let mut raw = text(300_000);
    raw.extend(random(200_000, 9));
    raw.extend(vec![0u8; 150_001]);
    let src = d.join("src.raw");
    fs::write(&src, &raw).unwrap();
    let img = d.join("streamed.img");
    let status = Command::new(bin())
        .args([
            "image",
            "create",
            s(&src),
            "-o",
            "-",
            "--meta",
            "case=stream",
        ])
        .stdout(fs::File::create(&img).unwrap())
        .status()
        .unwrap();
    assert!(status.success());
    // Streamed: the header at 0 is not sealed; the trailer is.
    let bytes = fs::read(&img).unwrap();
    let head = Header::decode(&bytes[..HEADER_SIZE]).unwrap();
    assert!(!head.sealed(), "a streamed image cannot rewrite its header");
    let tail = Header::decode(&bytes[bytes.len() - HEADER_SIZE..]).unwrap();
    assert!(tail.sealed());
    assert_eq!(head.uuid, tail.uuid);
    image_ok(&["verify", s(&img)]);
    let v = info(&img);
    assert_eq!(v["metadata"]["user"]["case"], "stream");
    let out = Command::new(bin())
        .args(["image", "extract", s(&img), "-o", "-"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(out.stdout == raw, "extract to stdout differs");
    // Cut short, it is an incomplete image, not a smaller valid one.
    let cut = d.join("cut.img");
    fs::write(&cut, &bytes[..bytes.len() - 100]).unwrap();
    let err = image_fails(&["info", s(&cut)]);
    assert!(
        err.contains("incomplete") || err.contains("truncated"),
        "{err}"
    );
}

/// A tree with text, random data, zeros, a sparse file, a symlink and a hard link.
fn fill_tree(root: &Path) {
    fs::create_dir_all(root.join("docs/deep/er")).unwrap();
    for i in 0..40 {
        fs::write(root.join(format!("docs/t{i}.txt")), text(3000 + i * 997)).unwrap();
    }
    fs::write(root.join("docs/deep/er/random.bin"), random(3 << 20, 77)).unwrap();
    fs::write(root.join("zeros.bin"), vec![0u8; 1 << 20]).unwrap();
    let sparse = fs::File::create(root.join("sparse.bin")).unwrap();
    sparse.write_all_at(b"middle", 5 << 20).unwrap();
    std::os::unix::fs::symlink("docs/t1.txt", root.join("link")).unwrap();
    fs::hard_link(root.join("docs/t2.txt"), root.join("hard")).unwrap();
}

#[test]
fn a_real_ext4_file_system_round_trips_and_its_files_read_back() {
    let t = dir();
    let d = t.path();
    let tree = d.join("tree");
    fill_tree(&tree);
    let raw = d.join("fs.raw");
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-d"])
        .arg(&tree)
        .arg(&raw)
        .arg("24M"));
    let raw_bytes = fs::read(&raw).unwrap();

    // From a block device: a read-only loop device over the file system image.
    let loopdev = LoopDevice::attach(&raw);
    let from_dev = d.join("from-dev.img");
    image_ok(&["create", s(&loopdev.0), "-o", s(&from_dev)]);
    drop(loopdev);
    let v = info(&from_dev);
    assert_eq!(v["virtual_size"], raw_bytes.len() as u64);
    let back = d.join("from-dev.back");
    image_ok(&["extract", s(&from_dev), "-o", s(&back)]);
    assert!(
        fs::read(&back).unwrap() == raw_bytes,
        "the image of /dev/loopN differs"
    );

    for (chunk, codec, level) in [
        ("4K", "zstd", "1"),
        ("64K", "zstd", "3"),
        ("1M", "zstd", "9"),
        ("64K", "lz4", "1"),
        ("4K", "lz4", "9"),
    ] {
        let img = d.join(format!("fs-{chunk}-{codec}.img"));
        let back = d.join(format!("fs-{chunk}-{codec}.back"));
        image_ok(&[
            "create",
            s(&raw),
            "-o",
            s(&img),
            "--chunk-size",
            chunk,
            "--codec",
            codec,
            "--level",
            level,
            "--meta",
            "fs=ext4",
        ]);
        image_ok(&["verify", s(&img)]);
        image_ok(&["extract", s(&img), "-o", s(&back)]);
        assert!(
            fs::read(&back).unwrap() == raw_bytes,
            "{chunk}: extract differs"
        );
        let v = info(&img);
        assert!(
            v["chunks"]["zero"].as_u64().unwrap() > 0,
            "an ext4 image has empty space: {v}"
        );
        assert!(v["file_size"].as_u64().unwrap() < raw_bytes.len() as u64 / 2);
        // The file system inside is intact and its files are the originals.
        run(Command::new("e2fsck").args(["-f", "-n"]).arg(&back));
        for f in [
            "docs/t7.txt",
            "docs/deep/er/random.bin",
            "hard",
            "sparse.bin",
        ] {
            let out = output(
                Command::new("debugfs")
                    .arg("-R")
                    .arg(format!("cat /{f}"))
                    .arg(&back),
            );
            assert!(
                out.stdout == fs::read(tree.join(f)).unwrap(),
                "{chunk}: /{f} read from the extracted file system differs"
            );
        }
    }
}

/// A read-only loop device over a file, detached on drop.
struct LoopDevice(PathBuf);

impl LoopDevice {
    fn attach(file: &Path) -> LoopDevice {
        let out = run(Command::new("losetup")
            .args(["--find", "--show", "--read-only"])
            .arg(file));
        LoopDevice(PathBuf::from(out.trim()))
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.0).status();
    }
}

/// nbdfuse serving, as a file, an nbdkit eval plugin that reads `src` and fails with EIO
/// every request touching one of `bad` (byte ranges).
fn failing_source(d: &Path, src: &Path, bad: &[(u64, u64)]) -> NbdFuse {
    let size = fs::metadata(src).unwrap().len();
    let ranges: Vec<String> = bad.iter().map(|(a, b)| format!("{a}-{b}")).collect();
    let pread = format!(
        "off=$4; cnt=$3; for r in {}; do s=${{r%-*}}; e=${{r#*-}}; \
         if [ $off -lt $e ] && [ $((off+cnt)) -gt $s ]; then \
         echo 'EIO injected bad sector' >&2; exit 1; fi; done; \
         exec dd if={} iflag=skip_bytes,count_bytes skip=$off count=$cnt status=none",
        ranges.join(" "),
        src.display()
    );
    NbdFuse::start(
        &d.join("nbdfuse"),
        [
            "--command".to_owned(),
            "nbdkit".to_owned(),
            "-s".to_owned(),
            "--exit-with-parent".to_owned(),
            "eval".to_owned(),
            format!("get_size=echo {size}"),
            format!("pread={pread}"),
        ],
    )
}

fn extents_of(v: &Value) -> Vec<(u64, u64, String)> {
    v["bad_extents"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["offset"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["state"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[test]
fn ddrescue_of_a_source_that_fails_reads_is_recorded_exactly() {
    let t = dir();
    let d = t.path();
    let size = 6u64 << 20;
    let mut orig = text(2 << 20);
    orig.extend(random(3 << 20, 5));
    orig.extend(vec![0u8; 1 << 20]);
    let src = d.join("disk.raw");
    fs::write(&src, &orig).unwrap();
    // Page-aligned, as the kernel's page cache under nbdfuse reads whole pages: one
    // range inside a chunk, one across a 64 KiB chunk boundary, one a whole chunk.
    let bad = [
        (1 << 20, (1 << 20) + 8192),
        ((3 << 20) - 4096, (3 << 20) + 4096),
        (4 << 20, (4 << 20) + 65536),
    ];
    let failing = failing_source(d, &src, &bad);
    // It really fails: a read across a bad range is EIO, one beside it is fine.
    let f = fs::File::open(failing.file()).unwrap();
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, 1 << 20).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    f.read_exact_at(&mut buf, (1 << 20) - 4096).unwrap();
    drop(f);

    let rescued = d.join("rescued.raw");
    let map = d.join("rescued.map");
    run(Command::new("ddrescue")
        .args(["-q", "-b", "512"])
        .arg(failing.file())
        .arg(&rescued)
        .arg(&map));
    // A second rescue stopped early: the rest is untried.
    let partial = d.join("partial.raw");
    let partial_map = d.join("partial.map");
    run(Command::new("ddrescue")
        .args(["-q", "-b", "512", "--size=5M"])
        .arg(failing.file())
        .arg(&partial)
        .arg(&partial_map));
    drop(failing);

    // ddrescue found exactly the injected ranges.
    let img = d.join("rescued.img");
    image_ok(&[
        "create",
        s(&rescued),
        "-o",
        s(&img),
        "--mapfile",
        s(&map),
        "--source-name",
        "failing disk",
    ]);
    image_ok(&["verify", s(&img)]);
    let v = info(&img);
    let want: Vec<(u64, u64, String)> = bad
        .iter()
        .map(|&(a, b)| (a, b - a, "bad".to_owned()))
        .collect();
    assert_eq!(extents_of(&v), want, "recorded extents:\n{v:#}");
    assert_eq!(v["bad_bytes"], 8192 + 8192 + 65536);
    assert_eq!(v["metadata"]["source"], "failing disk");
    let chunks = &v["chunks"];
    assert_eq!(chunks["bad"], 4, "chunks with bad bytes: {chunks}");
    assert_eq!(chunks["all_bad"], 1, "wholly bad chunks: {chunks}");

    // Extract with the pattern: bad bytes are the pattern (stderr lists them), every
    // other byte is the original.
    let back = d.join("rescued.back");
    let out = image(&["extract", s(&img), "-o", s(&back), "--bad-fill", "pattern"]);
    assert!(out.status.success(), "{}", describe(&out));
    let listed = String::from_utf8_lossy(&out.stderr);
    for (a, b) in bad {
        assert!(
            listed.contains(&format!("bad {a}..{b} ")),
            "extract did not list {a}..{b}:\n{listed}"
        );
    }
    let got = fs::read(&back).unwrap();
    assert_eq!(got.len() as u64, size);
    for (i, (&g, &o)) in got.iter().zip(&orig).enumerate() {
        let i = i as u64;
        let is_bad = bad.iter().any(|&(a, b)| (a..b).contains(&i));
        let want = if is_bad {
            interpose_image::extract::PATTERN[(i % 16) as usize]
        } else {
            o
        };
        assert_eq!(g, want, "byte {i} (bad: {is_bad})");
    }

    // The rescue stopped at 5 MB (ddrescue's M is 10^6): bad ranges before, untried from
    // there to the end of the disk, which the mapfile knows though the copy stops short.
    let img = d.join("partial.img");
    image_ok(&[
        "create",
        s(&partial),
        "-o",
        s(&img),
        "--mapfile",
        s(&partial_map),
    ]);
    image_ok(&["verify", s(&img)]);
    let v = info(&img);
    let mut want: Vec<(u64, u64, String)> = bad
        .iter()
        .filter(|&&(_, b)| b <= 5_000_000)
        .map(|&(a, b)| (a, b - a, "bad".to_owned()))
        .collect();
    want.push((5_000_000, size - 5_000_000, "untried".to_owned()));
    assert!(fs::metadata(&partial).unwrap().len() <= 5_000_000);
    assert_eq!(extents_of(&v), want, "{v:#}");
    assert_eq!(v["virtual_size"], size, "{v:#}");
}

#[test]
fn verify_catches_a_flipped_bit_in_every_region() {
    let t = dir();
    let d = t.path();
    // Compressed, raw and zero chunks, and a bad extent.
    let mut raw = text(200_000);
    raw.extend(random(150_000, 3));
    raw.extend(vec![0u8; 140_000]);
    let src = d.join("src.raw");
    fs::write(&src, &raw).unwrap();
    let map = d.join("map");
    fs::write(
        &map,
        "# Mapfile. Created by GNU ddrescue version 1.27\n0x00000000     +               1\n\
         0x00000000  0x00001000  +\n0x00001000  0x00000200  -\n0x00001200  0x00076810  +\n",
    )
    .unwrap();
    for codec in ["zstd", "lz4"] {
        flipped_bits_caught(d, &src, &map, codec);
    }
}

fn flipped_bits_caught(d: &Path, src: &Path, map: &Path, codec: &str) {
    let good = d.join(format!("good-{codec}.img"));
    image_ok(&[
        "create",
        s(src),
        "-o",
        s(&good),
        "--mapfile",
        s(map),
        "--codec",
        codec,
    ]);
    image_ok(&["verify", s(&good)]);
    let bytes = fs::read(&good).unwrap();
    let h = Header::decode(&bytes[..HEADER_SIZE]).unwrap();
    let img = interpose_image::Image::open(&good).unwrap();
    let first_of = |kind: format::Kind| {
        (0..h.chunk_count)
            .map(|i| img.entry(i).unwrap())
            .find(|e| e.kind == kind)
            .unwrap_or_else(|| panic!("no {kind:?} chunk"))
    };
    let compressed = first_of(format::Kind::Compressed);
    let raw_chunk = first_of(format::Kind::Raw);
    let zero_entry = (0..h.chunk_count)
        .find(|&i| img.entry(i).unwrap().kind == format::Kind::Zero)
        .expect("a zero chunk");
    let regions: Vec<(&str, u64, &[&str])> = vec![
        ("header", 40, &["header"]),
        ("compressed chunk data", compressed.offset + 10, &["chunk"]),
        ("raw chunk data", raw_chunk.offset + 1000, &["chunk"]),
        ("chunk index", h.index.offset + 3, &["index"]),
        (
            "index entry of a zero chunk",
            h.index.offset + zero_entry * 16 + 9,
            &["index"],
        ),
        ("bad-extent table", h.extents.offset + 2, &["bad-extent"]),
        ("metadata", h.meta.offset + 5, &["metadata"]),
        ("trailer", bytes.len() as u64 - 100, &["trailer"]),
    ];
    for (name, at, words) in regions {
        for bit in [0u8, 5] {
            let mut b = bytes.clone();
            b[at as usize] ^= 1 << bit;
            let p = d.join("flipped.img");
            fs::write(&p, &b).unwrap();
            let err = image_fails(&["verify", s(&p)]);
            assert!(
                words.iter().any(|w| err.contains(w)),
                "{codec}: a flipped bit {bit} in the {name} (offset {at}): verify said:\n{err}"
            );
        }
    }
}

/// The files in `d` whose names start with `prefix`.
fn files_starting(d: &Path, prefix: &str) -> Vec<String> {
    fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

#[test]
fn an_interrupted_create_leaves_nothing_that_opens_as_an_image() {
    let t = dir();
    let d = t.path();
    // Large and sparse: long enough to interrupt, nothing to store.
    let src = d.join("big.raw");
    let f = fs::File::create(&src).unwrap();
    f.set_len(64 << 30).unwrap();
    f.write_all_at(b"some data", 1 << 20).unwrap();
    drop(f);
    for sig in [libc::SIGINT, libc::SIGKILL] {
        let out = d.join("out.img");
        let mut child = Command::new(bin())
            .args([
                "image",
                "create",
                s(&src),
                "-o",
                s(&out),
                "--chunk-size",
                "1M",
            ])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The partial file appears once the signal handlers are in place and the build
        // is under way.
        let started = Instant::now();
        while files_starting(d, ".out.img.partial-").is_empty() {
            if child.try_wait().unwrap().is_some() {
                panic!("create ended too soon");
            }
            assert!(started.elapsed() < Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(&child, sig);
        let status = child.wait().unwrap();
        assert!(!status.success());
        let err = stderr_of(&mut child);
        assert!(!out.exists(), "signal {sig}: {} exists", out.display());
        let left = files_starting(d, ".out.img.partial-");
        if sig == libc::SIGINT {
            assert!(err.contains("interrupted"), "{err}");
            assert!(left.is_empty(), "SIGINT left {left:?}");
        } else {
            // A killed build cannot clean up: what it leaves is not an image.
            for p in &left {
                let e = image_fails(&["info", s(&d.join(p))]);
                assert!(
                    ["incomplete", "not an interpose image", "truncated"]
                        .iter()
                        .any(|w| e.contains(w)),
                    "{p}: {e}"
                );
                fs::remove_file(d.join(p)).unwrap();
            }
        }
    }
}

#[test]
fn a_full_disk_gives_a_clear_error_and_no_partial_image() {
    let t = dir();
    let d = t.path();
    let small = d.join("small");
    fs::create_dir(&small).unwrap();
    let _tmpfs = Tmpfs::mount(&small, 1);
    let src = d.join("random.raw");
    fs::write(&src, random(4 << 20, 11)).unwrap();
    let out = small.join("out.img");
    let err = image_fails(&["create", s(&src), "-o", s(&out)]);
    assert!(err.contains("No space left on device"), "{err}");
    assert_eq!(
        fs::read_dir(&small).unwrap().count(),
        0,
        "something was left on the full file system"
    );
}

/// `image info IMG | head -1` on an image with thousands of bad extents: the reader goes
/// away long before the list ends, and info ends quietly (it used to panic).
#[test]
fn info_whose_reader_stops_early_ends_quietly() {
    let t = dir();
    let d = t.path();
    let raw = d.join("raw");
    fs::File::create(&raw).unwrap().set_len(64 << 20).unwrap();
    let mut map = String::from("# Mapfile. Created by GNU ddrescue version 1.27\n0x0 ? 1\n");
    for i in 0..5000u64 {
        map += &format!(
            "{:#x} 0x200 +\n{:#x} 0x200 -\n",
            i * 0x400,
            i * 0x400 + 0x200
        );
    }
    map += &format!("{:#x} {:#x} +\n", 5000 * 0x400, (64 << 20) - 5000 * 0x400);
    fs::write(d.join("map"), map).unwrap();
    let img = d.join("x.img");
    image_ok(&[
        "create",
        s(&raw),
        "--mapfile",
        s(&d.join("map")),
        "-o",
        s(&img),
    ]);
    let (first, status, err) =
        first_line_then_close(Command::new(bin()).args(["image", "info", s(&img)]));
    assert!(first.starts_with("image:"), "{first}");
    assert!(status.success() && err.is_empty(), "{status}: {err}");
}

/// Metadata is text from whoever made the image: `info` escapes its control characters,
/// so that an image cannot send escape sequences to a terminal or fake a line of output.
#[test]
fn info_escapes_control_characters_of_the_metadata() {
    let t = dir();
    let d = t.path();
    let raw = d.join("raw");
    fs::write(&raw, text(70_000)).unwrap();
    let img = d.join("x.img");
    image_ok(&[
        "create",
        s(&raw),
        "-o",
        s(&img),
        "--source-name",
        "\x1b[31mred\r\nFAKE: line",
        "--meta",
        "k=\x1b]0;title\x07",
    ]);
    let out = image_ok(&["info", s(&img)]);
    assert!(
        !out.contains('\x1b') && !out.contains('\x07') && !out.contains('\r'),
        "{out:?}"
    );
    assert!(!out.lines().any(|l| l.starts_with("FAKE")), "{out}");
    assert!(
        out.contains(r"source:       \u{1b}[31mred\r\nFAKE: line"),
        "{out}"
    );
    // The JSON keeps the strings exact (JSON escapes them itself).
    assert_eq!(
        info(&img)["metadata"]["source"],
        "\x1b[31mred\r\nFAKE: line"
    );
}

#[test]
fn bad_arguments_and_malformed_mapfiles_are_refused_clearly() {
    let t = dir();
    let d = t.path();
    let src = d.join("src.raw");
    fs::write(&src, text(100_000)).unwrap();
    let out = d.join("out.img");
    let map = d.join("bad.map");
    fs::write(
        &map,
        "# Mapfile\n0x00000000     +               1\n0x00000000  0x00010000  +\n\
         0x00010000  0x00001000  x\n",
    )
    .unwrap();
    let err = image_fails(&["create", s(&src), "-o", s(&out), "--mapfile", s(&map)]);
    assert!(err.contains("bad.map:4"), "the line number: {err}");
    fs::write(
        &map,
        "0x00000000     +\n0x00000000  0x00010000  +\n0x00020000  0x00010000  -\n",
    )
    .unwrap();
    let err = image_fails(&["create", s(&src), "-o", s(&out), "--mapfile", s(&map)]);
    assert!(err.contains("bad.map:3"), "the line number: {err}");
    for (args, want) in [
        (vec!["--chunk-size", "3K"], "power of two"),
        (vec!["--chunk-size", "2M"], "power of two"),
        (vec!["--level", "99"], "level"),
        (
            vec!["--codec", "lz4", "--level", "13"],
            "outside lz4's 1..=12",
        ),
        (
            vec!["--codec", "lz4", "--level", "0"],
            "outside lz4's 1..=12",
        ),
        (vec!["--codec", "gzip"], "zstd"),
        (vec!["--meta", "novalue"], "KEY=VALUE"),
    ] {
        let mut a = vec!["create", s(&src), "-o", s(&out)];
        a.extend(args.iter());
        let err = image_fails(&a);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!out.exists());
    // A named pipe nobody writes to, as mapfile or source: a clear error at once, not a
    // wait that Ctrl-C could not end (the command's handlers only ask it to stop).
    let fifo = d.join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    for (args, want) in [
        (
            vec![s(&src), "--mapfile", s(&fifo)],
            "a named pipe that nothing was written to",
        ),
        (vec![s(&fifo)], "not a regular file or a block device"),
    ] {
        let out = Command::new("timeout")
            .args(["-k", "5", "20", bin(), "image", "create", "-o", s(&out)])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1) && err.contains(want),
            "{args:?}: {}",
            describe(&out)
        );
    }
    // A mapfile of a few bytes describing a disk of 2^50 bytes: refused at once for the
    // chunk index it would need in memory (it used to grow that for hours, or abort).
    let huge = d.join("huge.map");
    fs::write(
        &huge,
        "# Mapfile\n0x0 +\n0x00000000 0x1 +\n0x00000001 0x3FFFFFFFFFFFF ?\n",
    )
    .unwrap();
    fs::write(d.join("one.raw"), b"x").unwrap();
    let out_huge = Command::new("timeout")
        .args(["-k", "5", "20", bin(), "image", "create"])
        .args([s(&d.join("one.raw")), "-o", s(&out), "--mapfile", s(&huge)])
        .output()
        .unwrap();
    assert!(
        out_huge.status.code() == Some(1)
            && String::from_utf8_lossy(&out_huge.stderr).contains("needs a chunk index of"),
        "{}",
        describe(&out_huge)
    );
    assert!(!out.exists());
    // A mapfile from a pipe with a writer (as `<(cmd)` gives) is read.
    let good = "# Mapfile\n0x00000000     +\n0x00000000  0x000186A0  +\n";
    let out_ok = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "printf '{}' | \"$0\" image create \"$1\" -o \"$2\" --mapfile /dev/stdin",
            good.replace('\n', "\\n")
        ))
        .args([bin(), s(&src), s(&out)])
        .output()
        .unwrap();
    assert!(out_ok.status.success(), "{}", describe(&out_ok));
    fs::remove_file(&out).unwrap();
    let err = image_fails(&["info", s(&src)]);
    assert!(err.contains("not an interpose image"), "{err}");
    let err = image_fails(&["verify", s(&d.join("missing.img"))]);
    assert!(err.contains("No such file"), "{err}");
}

#[test]
fn an_independent_reader_written_from_the_spec_agrees() {
    let t = dir();
    let d = t.path();
    let mut raw = text(300_000);
    raw.extend(random(200_000, 21));
    raw.extend(vec![0u8; 200_000]);
    raw.extend(text(77_777));
    let src = d.join("src.raw");
    fs::write(&src, &raw).unwrap();
    let map = d.join("map");
    // Bad sectors (one across a 4 KiB boundary), a non-tried area, and a mapfile that
    // ends early (the rest untried).
    fs::write(
        &map,
        "0x00000000     +               1\n0x00000000  0x00000E00  +\n0x00000E00  0x00000400  -\n\
         0x00001200  0x0001EE00  +\n0x00020000  0x00008000  ?\n0x00028000  0x00080000  +\n",
    )
    .unwrap();
    let empty = d.join("empty.raw");
    fs::write(&empty, b"").unwrap();
    let cases: Vec<(&str, Vec<&str>)> = vec![
        ("default", vec![s(&src)]),
        ("4k", vec![s(&src), "--chunk-size", "4K", "--level", "1"]),
        ("1m", vec![s(&src), "--chunk-size", "1M", "--level", "9"]),
        ("lz4", vec![s(&src), "--codec", "lz4"]),
        (
            "lz4-hc-4k-mapfile",
            vec![
                s(&src),
                "--codec",
                "lz4",
                "--level",
                "9",
                "--chunk-size",
                "4K",
                "--mapfile",
                s(&map),
            ],
        ),
        (
            "mapfile",
            vec![s(&src), "--mapfile", s(&map), "--meta", "k=v"],
        ),
        ("empty", vec![s(&empty)]),
    ];
    let reader = script("img_reader.py");
    for (name, args) in cases {
        let img = d.join(format!("{name}.img"));
        let mut a = vec!["create"];
        a.extend(args.iter());
        a.extend(["-o", s(&img)]);
        image_ok(&a);
        let py = |args: &[&str]| {
            let out = output(Command::new(python()).arg(&reader).args(args));
            assert!(
                out.status.success(),
                "{name}: img_reader.py {args:?}:\n{}",
                describe(&out)
            );
            out.stdout
        };
        py(&["check", s(&img)]);
        let ours = d.join(format!("{name}.ours"));
        let theirs = d.join(format!("{name}.theirs"));
        image_ok(&["extract", s(&img), "-o", s(&ours)]);
        py(&["extract", s(&img), s(&theirs)]);
        assert!(
            fs::read(&ours).unwrap() == fs::read(&theirs).unwrap(),
            "{name}: the two readers extract different bytes"
        );
        let theirs: Vec<(u64, u64, String)> = String::from_utf8(py(&["extents", s(&img)]))
            .unwrap()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                (
                    v["offset"].as_u64().unwrap(),
                    v["length"].as_u64().unwrap(),
                    v["state"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(theirs, extents_of(&info(&img)), "{name}: bad extents");
        // And a damaged copy is refused by both.
        let mut b = fs::read(&img).unwrap();
        if b.len() > 2000 {
            b[700] ^= 0x10;
            let bad = d.join(format!("{name}.bad"));
            fs::write(&bad, &b).unwrap();
            let out = output(Command::new(python()).arg(&reader).args(["check", s(&bad)]));
            assert!(
                !out.status.success(),
                "{name}: img_reader accepted a flipped bit"
            );
            image_fails(&["verify", s(&bad)]);
        }
    }
}

/// A raw loop device over a file in `dir`, detached when dropped.
struct LoopDev(String);

impl LoopDev {
    fn new(file: &Path) -> LoopDev {
        let dev = run(Command::new("losetup").args(["-f", "--show"]).arg(file));
        LoopDev(dev.trim().to_owned())
    }
    /// Flush requests the device has completed (field 16 of /sys/block/loopN/stat).
    fn flushes(&self) -> u64 {
        let name = self.0.trim_start_matches("/dev/");
        let stat = fs::read_to_string(format!("/sys/block/{name}/stat")).unwrap();
        stat.split_whitespace().nth(15).unwrap().parse().unwrap()
    }
}

impl Drop for LoopDev {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

/// Outputs that would destroy something, or leave a wrong thing under the name, are
/// refused or written through: the image or the source as output, a device node, a FIFO
/// or a symlink renamed over, a source whose size is unknown, an interrupted or cut-short
/// extract, a disk restored to a device without a sync.
#[test]
fn outputs_are_never_the_input_never_half_written_and_devices_are_synced() {
    let t = dir();
    let d = t.path();
    let raw = d.join("disk.raw");
    let data = random(8 << 20, 11);
    fs::write(&raw, &data).unwrap();
    let map = d.join("disk.map");
    fs::write(&map, "0 +\n0 0x800000 +\n").unwrap();
    let img = d.join("disk.img");
    image_ok(&["create", s(&raw), "-o", s(&img)]);
    let img_bytes = fs::read(&img).unwrap();
    let refused = |args: &[&str], says: &str| {
        let out = image(args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(says),
            "{args:?}: {}",
            describe(&out)
        );
    };

    refused(&["extract", s(&img), "-o", s(&img)], "is the image");
    refused(&["create", s(&raw), "-o", s(&raw)], "is the source");
    refused(
        &["create", s(&raw), "--mapfile", s(&map), "-o", s(&map)],
        "is the mapfile",
    );
    let fifo = d.join("fifo");
    run(Command::new("mkfifo").arg(&fifo));
    let link = d.join("link");
    std::os::unix::fs::symlink(&raw, &link).unwrap();
    for node in [&fifo, &link] {
        refused(&["create", s(&raw), "-o", s(node)], "not a regular file");
    }
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    refused(
        &["create", "/dev/zero", "-o", s(&d.join("z.img"))],
        "not a regular file or a block device",
    );
    assert_eq!(fs::read(&img).unwrap(), img_bytes, "the image changed");
    assert_eq!(fs::read(&raw).unwrap(), data, "the source changed");

    // Interrupted once it writes (its temporary file exists): the old file stays whole.
    // strace sends the SIGINT as the extract makes its third write, so the extract can
    // neither end before it nor be caught before its temporary file exists.
    let old = d.join("old.raw");
    fs::write(&old, b"the old contents").unwrap();
    let big = d.join("big.img");
    let big_raw = d.join("big.raw");
    fs::write(&big_raw, random(32 << 20, 12)).unwrap();
    image_ok(&["create", s(&big_raw), "-o", s(&big), "--codec", "lz4"]);
    let out = Command::new("strace")
        .args(["-f", "-qq", "-o", "/dev/null", "--trace=pwrite64"])
        .args(["--inject=pwrite64:signal=INT:when=3", "--", bin()])
        .args(["image", "extract", s(&big), "-o", s(&old)])
        .output()
        .unwrap();
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("interrupted"),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(&old).unwrap(), b"the old contents");
    let partial = fs::read_dir(d).unwrap().filter_map(|e| e.ok()).any(|e| {
        e.file_name()
            .to_string_lossy()
            .starts_with(".old.raw.partial-")
    });
    assert!(!partial, "the temporary file was left behind");

    // A reader that stops early: the extract (and a create to stdout) fails.
    for args in [
        vec!["extract", s(&img), "-o", "-"],
        vec!["create", s(&raw), "-o", "-"],
    ] {
        let mut child = Command::new(bin())
            .arg("image")
            .args(&args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut first = [0u8; 10];
        child.stdout.take().unwrap().read_exact(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(!out.status.success(), "{args:?} cut short exited 0");
    }

    // Restored to a block device: synced before it says done.
    let dev_file = d.join("dev.raw");
    File::create(&dev_file).unwrap().set_len(8 << 20).unwrap();
    let dev = LoopDev::new(&dev_file);
    let before = dev.flushes();
    image_ok(&["extract", s(&img), "-o", &dev.0]);
    assert!(dev.flushes() > before, "no flush reached {}", dev.0);
    assert_eq!(fs::read(&dev_file).unwrap(), data);
}

/// A sparse source: its holes are not read and an extract to a file leaves the zero
/// chunks as holes, with the same bytes as the source everywhere, also where bad extents
/// and holes overlap.
#[test]
fn a_sparse_disk_stays_sparse_and_exact_with_bad_extents_across_holes() {
    use std::os::unix::fs::MetadataExt;
    let t = dir();
    let d = t.path();
    let raw = d.join("sparse.raw");
    let f = File::create(&raw).unwrap();
    f.set_len(1 << 30).unwrap();
    let data = random(3 << 20, 21);
    for (i, at) in [1u64 << 20, 9 << 20, 700 << 20].iter().enumerate() {
        f.write_all_at(&data[i << 20..(i + 1) << 20], *at).unwrap();
    }
    drop(f);
    // Bad: one range in a hole, one across the edge of data and hole.
    let map = d.join("sparse.map");
    fs::write(
        &map,
        "0 +\n0 0x1800000 +\n0x1800000 0x10000 -\n0x1810000 0x2A4E0000 +\n\
         0x2BCF0000 0x20000 -\n0x2BD10000 0x142F0000 +\n",
    )
    .unwrap();
    let img = d.join("sparse.img");
    image_ok(&["create", s(&raw), "-o", s(&img), "--mapfile", s(&map)]);
    image_ok(&["verify", s(&img)]);
    let back = d.join("sparse.back");
    image_ok(&["extract", s(&img), "-o", s(&back)]);
    let md = fs::metadata(&back).unwrap();
    assert_eq!(md.len(), 1 << 30);
    assert!(
        md.blocks() * 512 < 8 << 20,
        "the extract allocated {} bytes",
        md.blocks() * 512
    );
    let mut want = fs::read(&raw).unwrap();
    for (o, l) in [(0x1800000usize, 0x10000usize), (0x2BCF0000, 0x20000)] {
        want[o..o + l].fill(0);
    }
    let got = fs::read(&back).unwrap();
    if let Some(i) = (0..want.len())
        .step_by(4096)
        .find(|&i| want[i..i + 4096] != got[i..i + 4096])
    {
        panic!("the extract differs in the block at {i:#x}");
    }
}

/// An output that replaces an existing file keeps that file's mode and owner, as writing
/// it in place would.
#[test]
fn a_replaced_output_keeps_its_mode_and_owner() {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let t = dir();
    let d = t.path();
    let raw = d.join("disk.raw");
    fs::write(&raw, random(1 << 20, 31)).unwrap();
    let img = d.join("disk.img");
    let back = d.join("disk.back");
    for out in [&img, &back] {
        fs::write(out, b"old").unwrap();
        fs::set_permissions(out, fs::Permissions::from_mode(0o600)).unwrap();
        std::os::unix::fs::chown(out, Some(NOBODY), Some(NOBODY)).unwrap();
    }
    image_ok(&["create", s(&raw), "-o", s(&img)]);
    image_ok(&["extract", s(&img), "-o", s(&back)]);
    assert_eq!(fs::read(&back).unwrap(), fs::read(&raw).unwrap());
    for out in [&img, &back] {
        let md = fs::metadata(out).unwrap();
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o600, NOBODY, NOBODY),
            "{out:?}"
        );
    }
}

/// extract writes through a symlink to a pipe (`-o /dev/stdout`, `-o >(cmd)`), makes the
/// file a dangling symlink names, and refuses an existing output its caller may not
/// write (it would otherwise replace it).
#[test]
fn extract_follows_links_to_pipes_and_keeps_read_only_outputs() {
    use std::os::unix::fs::PermissionsExt;
    let t = dir();
    let d = t.path();
    make_traversable(d);
    fs::set_permissions(d, fs::Permissions::from_mode(0o777)).unwrap();
    let raw = d.join("disk.raw");
    let data = random(1 << 20, 41);
    fs::write(&raw, &data).unwrap();
    let img = d.join("disk.img");
    image_ok(&["create", s(&raw), "-o", s(&img)]);
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();

    let out = output(
        Command::new(bin())
            .args(["image", "extract", s(&img), "-o", "/dev/stdout"])
            .stdout(Stdio::piped()),
    );
    assert!(out.status.success(), "{}", describe(&out));
    assert!(out.stdout == data, "-o /dev/stdout: wrong bytes");

    let link = d.join("link");
    std::os::unix::fs::symlink("made.raw", &link).unwrap();
    image_ok(&["extract", s(&img), "-o", s(&link)]);
    assert_eq!(fs::read(d.join("made.raw")).unwrap(), data);
    assert!(fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());

    let ro = d.join("ro.raw");
    fs::write(&ro, b"keep me").unwrap();
    std::os::unix::fs::chown(&ro, Some(NOBODY), Some(NOBODY)).unwrap();
    fs::set_permissions(&ro, fs::Permissions::from_mode(0o444)).unwrap();
    let out = output(as_user(NOBODY, NOBODY, &[]).args([
        bin(),
        "image",
        "extract",
        s(&img),
        "-o",
        s(&ro),
    ]));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not writable"),
        "{}",
        describe(&out)
    );
    assert_eq!(fs::read(&ro).unwrap(), b"keep me");
}

/// The first SIGTERM asks `create` to stop; one that cannot (it waits for a writer that
/// never finishes its mapfile) ends at the second, at once, with 128 + the signal.
#[test]
fn a_second_signal_ends_a_create_that_cannot_stop() {
    let t = dir();
    let d = t.path();
    let src = d.join("src.raw");
    fs::write(&src, text(100_000)).unwrap();
    let fifo = d.join("map");
    run(Command::new("mkfifo").arg(&fifo));
    // A writer that holds the pipe open and writes nothing, open before `create` starts
    // (a writer still on its way finds `create` gone: with none, the pipe read as empty).
    // Opened read-write, which on Linux never waits; close-on-exec, so `create` does not
    // hold it.
    let _writer = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&fifo)
        .unwrap();
    // Killed when the test ends.
    let mut procs = Reaper::default();
    let create = procs.add(
        Command::new(bin())
            .args(["image", "create", s(&src), "-o", s(&d.join("out.img"))])
            .arg("--mapfile")
            .arg(&fifo)
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let pid = procs.0[create].id();
    let proc_file =
        |name: &str| fs::read_to_string(format!("/proc/{pid}/{name}")).unwrap_or_default();
    let wait_for = |what: &str, done: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !done() {
            assert!(Instant::now() < deadline, "create never {what}");
            std::thread::sleep(Duration::from_millis(10));
        }
    };
    wait_for("waited in its read of the pipe", &|| {
        proc_file("wchan").ends_with("pipe_read")
    });
    signal(&procs.0[create], libc::SIGTERM);
    // Taken (no longer pending) and back in its read.
    wait_for("took the first signal", &|| {
        proc_file("status")
            .lines()
            .any(|l| l.starts_with("ShdPnd:") && l.trim_end().ends_with("0000000000000000"))
            && proc_file("wchan").ends_with("pipe_read")
    });
    assert!(
        procs.0[create].try_wait().unwrap().is_none(),
        "the first signal ended it"
    );
    signal(&procs.0[create], libc::SIGTERM);
    let status = wait_timeout(&mut procs.0[create], Duration::from_secs(20))
        .expect("create did not end at the second signal");
    assert_eq!(status.code(), Some(128 + libc::SIGTERM), "{status}");
    assert!(!d.join("out.img").exists());
}
