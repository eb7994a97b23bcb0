//! GNU ddrescue mapfiles: parsing, checking, and the bad extents they describe.
//!
//! A mapfile (`info ddrescue`, "Mapfile structure") is text: comments, a status line
//! `current_pos current_status [current_pass]`, then one `pos size status` line per
//! block, the blocks contiguous from position 0:
//!
//! ```text
//! # Mapfile. Created by GNU ddrescue version 1.27
//! # current_pos  current_status  current_pass
//! 0x00120000     ?               1
//! #      pos        size  status
//! 0x00000000  0x00117000  +
//! 0x00117000  0x00000200  -
//! ```
//!
//! What is accepted follows ddrescue 1.27's own reader (`Mapfile::read_mapfile`), minus
//! its sloppiness (it uses `sscanf`, so it ignores anything after the fields):
//!
//! - `#` at the start of a line or after whitespace starts a comment that runs to the
//!   end of the line (ddrescuelog `-A` writes such comments after the fields); a `#`
//!   glued to a field is not a comment, and so is an error;
//! - whitespace is C's `isspace` set, so CRLF line endings and tabs are fine; blank
//!   lines are skipped; lines are numbered from 1 by `\n`;
//! - numbers are C integer constants like `strtoull` base 0 reads them: decimal,
//!   hexadecimal (`0x`/`0X`) or octal (a leading `0`), with no sign, no trailing
//!   garbage, and at most 2^63 - 1 (ddrescue keeps positions in a `long long`; a block
//!   may end at 2^63 - 1, which is where ddrescue ends the last block when it does not
//!   know the input's size);
//! - `current_status` is any ASCII letter or punctuation character (ddrescue 1.27
//!   writes one of `? * / - F G +`; newer versions may add others); `current_pass` is
//!   optional (old versions left it out), decimal and at least 1;
//! - block statuses are `?` `*` `/` `-` `+`; a block has a size above 0, except the
//!   single `0 0 ?` block ddrescue writes for an empty input;
//! - the blocks start at 0 and each starts where the one before ends (ddrescue accepts
//!   a first block elsewhere but never writes one).
//!
//! Comments may hold any bytes ([`read`] accepts non-UTF-8 there: ddrescue copies its
//! command line, file names and all, into a comment); outside comments a mapfile is
//! ASCII.

use std::fmt::Write as _;
use std::io::Read as _;
use std::os::unix::fs::{FileTypeExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::format::{BadExtent, ExtentState};

/// Larger files are refused: a mapfile has one short line per block, so 64 MiB is
/// millions of blocks.
pub const MAX_MAPFILE_LEN: u64 = 64 << 20;

/// The largest position or size ddrescue can write (it uses `long long`).
const MAX_POS: u64 = i64::MAX as u64;

/// The status of a block of a ddrescue mapfile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BlockStatus {
    /// `?`: not read yet.
    NonTried,
    /// `*`: failed, not trimmed yet.
    NonTrimmed,
    /// `/`: failed, not scraped yet.
    NonScraped,
    /// `-`: failed, bad sector(s).
    BadSector,
    /// `+`: read.
    Finished,
}

impl BlockStatus {
    pub fn from_char(c: char) -> Option<BlockStatus> {
        Some(match c {
            '?' => BlockStatus::NonTried,
            '*' => BlockStatus::NonTrimmed,
            '/' => BlockStatus::NonScraped,
            '-' => BlockStatus::BadSector,
            '+' => BlockStatus::Finished,
            _ => return None,
        })
    }

    pub fn as_char(self) -> char {
        match self {
            BlockStatus::NonTried => '?',
            BlockStatus::NonTrimmed => '*',
            BlockStatus::NonScraped => '/',
            BlockStatus::BadSector => '-',
            BlockStatus::Finished => '+',
        }
    }

    /// None for Finished; Untried for NonTried; Bad for the three failed kinds.
    pub fn extent_state(self) -> Option<ExtentState> {
        match self {
            BlockStatus::Finished => None,
            BlockStatus::NonTried => Some(ExtentState::Untried),
            BlockStatus::NonTrimmed | BlockStatus::NonScraped | BlockStatus::BadSector => {
                Some(ExtentState::Bad)
            }
        }
    }
}

/// One data block line: `size` bytes at `pos` with `status`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapBlock {
    pub pos: u64,
    pub size: u64,
    pub status: BlockStatus,
}

/// A parsed mapfile. Only [`parse`] and [`read`] make one: it remembers which file and
/// lines it came from to name them in the errors of [`Mapfile::bad_extents`]. Two
/// mapfiles are equal when their status lines and blocks are, wherever they came from.
#[derive(Clone, Debug)]
pub struct Mapfile {
    pub current_pos: u64,
    pub current_status: char,
    pub current_pass: Option<u32>,
    pub blocks: Vec<MapBlock>,
    origin: Origin,
}

/// Where a mapfile was read from: its path and the line of each block.
#[derive(Clone, Debug, Default)]
struct Origin {
    path: PathBuf,
    lines: Vec<usize>,
}

impl PartialEq for Mapfile {
    fn eq(&self, other: &Mapfile) -> bool {
        self.current_pos == other.current_pos
            && self.current_status == other.current_status
            && self.current_pass == other.current_pass
            && self.blocks == other.blocks
    }
}

impl Eq for Mapfile {}

/// C's `isspace` in the C locale (what ddrescue skips).
fn is_space(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\n' | '\x0b' | '\x0c' | '\r')
}

/// Where the comment of a line starts (its length if none): the first `#` at the
/// start of the line or right after whitespace.
fn comment_start(line: &[u8]) -> usize {
    (0..line.len())
        .find(|&i| line[i] == b'#' && (i == 0 || is_space(line[i - 1] as char)))
        .unwrap_or(line.len())
}

/// A field as shown in an error message: escaped and cut short.
fn show(s: &str) -> String {
    const MAX: usize = 40;
    let mut out = String::new();
    for c in s.chars() {
        if out.len() >= MAX {
            out.push('…');
            break;
        }
        let _ = write!(out, "{}", c.escape_debug());
    }
    out
}

/// Parses a position or size: a C integer constant (decimal, 0x hex, 0 octal), no
/// sign, at most 2^63 - 1.
fn parse_number(tok: &str, what: &str) -> std::result::Result<u64, String> {
    let bad = |why: &str| format!("bad {what} `{}`: {why}", show(tok));
    if tok.starts_with(['+', '-']) {
        return Err(bad("a sign is not allowed"));
    }
    let hex = tok.strip_prefix("0x").or(tok.strip_prefix("0X"));
    let (digits, radix, kind) = if let Some(h) = hex {
        (h, 16, "hexadecimal")
    } else if tok.len() > 1 && tok.starts_with('0') {
        (&tok[1..], 8, "octal (it starts with 0)")
    } else {
        (tok, 10, "")
    };
    if digits.is_empty() || !digits.chars().all(|c| c.is_digit(radix)) {
        return Err(bad(&if kind.is_empty() {
            "not a number (ddrescue writes 0x and hexadecimal digits)".to_owned()
        } else {
            format!("not a {kind} number")
        }));
    }
    match u64::from_str_radix(digits, radix) {
        Ok(n) if n <= MAX_POS => Ok(n),
        _ => Err(bad("too large (ddrescue's limit is 2^63 - 1)")),
    }
}

/// Parses mapfile text; `path` only names the file in errors.
pub fn parse(text: &str, path: &Path) -> Result<Mapfile> {
    let err = |line: usize, message: String| Error::Mapfile {
        path: path.to_path_buf(),
        line,
        message,
    };
    let mut status: Option<(u64, char, Option<u32>)> = None;
    let mut blocks: Vec<MapBlock> = Vec::new();
    let mut lines: Vec<usize> = Vec::new();
    // Where the previous block ends.
    let mut end = 0u64;
    for (i, raw) in text.split('\n').enumerate() {
        let line = i + 1;
        if line == 1 && raw.starts_with('\u{feff}') {
            return Err(err(
                line,
                "the file starts with a Unicode byte-order mark; a ddrescue mapfile is plain \
                 ASCII text"
                    .into(),
            ));
        }
        let content = &raw[..comment_start(raw.as_bytes())];
        // Up to 4 fields (a 4th only to say there is too much).
        let mut fields = [""; 4];
        let mut n = 0;
        for f in content.split(is_space).filter(|f| !f.is_empty()) {
            if n < fields.len() {
                fields[n] = f;
            }
            n += 1;
        }
        if n == 0 {
            continue;
        }
        if status.is_none() {
            status = Some(parse_status_line(&fields, n).map_err(|m| err(line, m))?);
            continue;
        }
        if n < 3 {
            return Err(err(
                line,
                format!(
                    "incomplete block line `{}`: expected `pos size status`",
                    show(content.trim_matches(is_space))
                ),
            ));
        }
        if n > 3 {
            return Err(err(
                line,
                format!("unexpected `{}` after the block's status", show(fields[3])),
            ));
        }
        let pos = parse_number(fields[0], "block position").map_err(|m| err(line, m))?;
        let size = parse_number(fields[1], "block size").map_err(|m| err(line, m))?;
        let st = single_char(fields[2])
            .and_then(BlockStatus::from_char)
            .ok_or_else(|| {
                err(
                    line,
                    format!(
                        "unknown block status `{}` (expected one of ? * / - +)",
                        show(fields[2])
                    ),
                )
            })?;
        if size == 0 && pos != 0 {
            return Err(err(
                line,
                format!(
                    "block at {pos:#x} has size 0 (ddrescue writes a zero-size block only at \
                     position 0, for an empty input)"
                ),
            ));
        }
        let block_end = pos
            .checked_add(size)
            .filter(|&e| e <= MAX_POS)
            .ok_or_else(|| {
                err(
                    line,
                    format!(
                        "block at {pos:#x} of size {size:#x} ends past 2^63 - 1, the \
                         largest position ddrescue handles"
                    ),
                )
            })?;
        if pos != end {
            let message = if blocks.is_empty() {
                format!("the first block starts at {pos:#x}, not at 0")
            } else if pos < end {
                format!("block at {pos:#x} overlaps the previous block, which ends at {end:#x}")
            } else {
                format!(
                    "block at {pos:#x} leaves a gap after the previous block, which ends at {end:#x}"
                )
            };
            return Err(err(line, message));
        }
        end = block_end;
        blocks.push(MapBlock {
            pos,
            size,
            status: st,
        });
        lines.push(line);
    }
    let Some((current_pos, current_status, current_pass)) = status else {
        return Err(err(
            text.lines().count().max(1),
            "no status line: the file is empty or only comments, so it is not a ddrescue \
             mapfile (or it was cut short)"
                .into(),
        ));
    };
    Ok(Mapfile {
        current_pos,
        current_status,
        current_pass,
        blocks,
        origin: Origin {
            path: path.to_path_buf(),
            lines,
        },
    })
}

fn single_char(s: &str) -> Option<char> {
    let mut cs = s.chars();
    let c = cs.next()?;
    cs.next().is_none().then_some(c)
}

/// Parses the status line's `n` fields (the first up to 4 of them in `f`).
fn parse_status_line(
    f: &[&str; 4],
    n: usize,
) -> std::result::Result<(u64, char, Option<u32>), String> {
    const WANT: &str = "`current_pos current_status [current_pass]`";
    // A block line where the status line should be: say that rather than which
    // field is wrong.
    if n == 3
        && parse_number(f[0], "").is_ok()
        && parse_number(f[1], "").is_ok()
        && single_char(f[2]).and_then(BlockStatus::from_char).is_some()
    {
        return Err(format!(
            "the status line {WANT} is missing: the first non-comment line must be it, but \
             this is a block line `pos size status`"
        ));
    }
    if n < 2 {
        return Err(format!(
            "incomplete status line `{}`: expected {WANT}",
            show(f[0])
        ));
    }
    if n > 3 {
        return Err(format!(
            "unexpected `{}` after the status line's current_pass",
            show(f[3])
        ));
    }
    let pos = parse_number(f[0], "current_pos in the status line")?;
    let status = single_char(f[1])
        .filter(|c| c.is_ascii_graphic() && !c.is_ascii_digit())
        .ok_or_else(|| {
            format!(
                "bad current_status `{}` in the status line {WANT}: expected one character \
                 such as ? * / - F G +",
                show(f[1])
            )
        })?;
    let pass = if n == 3 {
        let p = f[2];
        match p.parse::<u32>() {
            Ok(v) if p.bytes().all(|b| b.is_ascii_digit()) && v >= 1 && v <= i32::MAX as u32 => {
                Some(v)
            }
            _ => {
                return Err(format!(
                    "bad current_pass `{}` in the status line: expected a decimal number from 1",
                    show(p)
                ))
            }
        }
    } else {
        None
    };
    Ok((pos, status, pass))
}

/// Reads and parses a mapfile (I/O errors as Error::Io with the path in the context;
/// refuse files over 64 MiB; non-UTF-8 is a Mapfile error naming the line, except in
/// comments, where ddrescue itself writes file names as they are).
pub fn read(path: &Path) -> Result<Mapfile> {
    let context = || format!("reading mapfile {}", path.display());
    // A named pipe is opened without waiting for a writer: nobody writing to it would hang
    // the command where its signal handlers (which only ask it to stop) cannot end it.
    // Opened, it blocks as any pipe does; with no writer it reads as empty.
    let fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(if fifo { libc::O_NONBLOCK } else { 0 })
        .open(path)
        .map_err(|e| Error::io(context(), e))?;
    if fifo {
        rustix::fs::fcntl_getfl(&file)
            .and_then(|fl| rustix::fs::fcntl_setfl(&file, fl - rustix::fs::OFlags::NONBLOCK))
            .map_err(|e| Error::io(context(), e.into()))?;
    }
    let known = file.metadata().map(|m| m.len()).unwrap_or(0);
    if known > MAX_MAPFILE_LEN {
        return Err(too_big(path, format!("{known} bytes")));
    }
    let mut bytes = Vec::with_capacity(known as usize);
    // The length may have been 0 (a pipe) or grown since: read at most one byte more
    // than allowed.
    file.take(MAX_MAPFILE_LEN + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(context(), e))?;
    if bytes.len() as u64 > MAX_MAPFILE_LEN {
        return Err(too_big(path, format!("over {MAX_MAPFILE_LEN} bytes")));
    }
    if fifo && bytes.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: a named pipe that nothing was written to (no writer when it was opened?)",
            path.display()
        )));
    }
    parse_bytes(&bytes, path)
}

fn too_big(path: &Path, len: String) -> Error {
    Error::Invalid(format!(
        "{}: {len} is over the {} MiB limit for a mapfile; is it a ddrescue mapfile?",
        path.display(),
        MAX_MAPFILE_LEN >> 20
    ))
}

/// Parses the bytes of a mapfile: UTF-8 outside comments, anything in them.
fn parse_bytes(bytes: &[u8], path: &Path) -> Result<Mapfile> {
    match std::str::from_utf8(bytes) {
        Ok(text) => parse(text, path),
        Err(_) => {
            for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
                let content = &line[..comment_start(line)];
                if let Err(e) = std::str::from_utf8(content) {
                    let at = e.valid_up_to();
                    return Err(Error::Mapfile {
                        path: path.to_path_buf(),
                        line: i + 1,
                        message: format!(
                            "not valid UTF-8 text (byte {:#04x} in column {}); outside \
                             comments a ddrescue mapfile is ASCII",
                            content[at],
                            at + 1
                        ),
                    });
                }
            }
            // Only comments hold invalid bytes; they are dropped anyway.
            parse(&String::from_utf8_lossy(bytes), path)
        }
    }
}

/// The largest disk a mapfile may say it describes, past the copy's own size: 1 PiB, well
/// past any disk, and a bound on the chunk table an image of it needs.
const MAX_DISK: u64 = 1 << 50;

impl Mapfile {
    /// An error about block `i`, naming its line.
    fn block_error(&self, i: usize, message: String) -> Error {
        Error::Mapfile {
            path: self.origin.path.clone(),
            line: self.origin.lines.get(i).copied().unwrap_or(0),
            message,
        }
    }

    /// The size of the rescued disk and its bad and untried ranges, for a copy of
    /// `file_size` bytes. GNU ddrescue does not write the sectors it could not read, and a
    /// rescue cut short (or limited with `-s`) has not written the rest, so the copy can be
    /// shorter than the disk; its mapfile's blocks still reach the disk's end, unless
    /// ddrescue did not know it (its last block then ends at 2^63 - 1). The disk is as
    /// long as the blocks reach when that is known and past the copy's end; its bytes past
    /// the copy then read as zeros and must be in blocks not rescued, else the mapfile is
    /// not this copy's.
    pub fn extents_for(&self, file_size: u64) -> Result<(u64, Vec<BadExtent>)> {
        let end = self
            .blocks
            .last()
            .map_or(0, |l| l.pos.saturating_add(l.size));
        let size = if end > file_size && end < MAX_POS {
            end
        } else {
            file_size
        };
        if size > file_size {
            let err = |i, message| self.block_error(i, message);
            let last = self.blocks.len() - 1;
            if size > MAX_DISK {
                return Err(err(
                    last,
                    format!("the mapfile describes a disk of {size} bytes; more than this program takes ({MAX_DISK})"),
                ));
            }
            let rescued_past = self.blocks.iter().enumerate().find(|(_, b)| {
                b.status == BlockStatus::Finished && b.pos.saturating_add(b.size) > file_size
            });
            if let Some((i, b)) = rescued_past {
                return Err(err(
                    i,
                    format!(
                        "block at {:#x} of size {:#x} is rescued (+) but the copy ends at \
                         {file_size} bytes ({file_size:#x}); is it the mapfile of another file?",
                        b.pos, b.size
                    ),
                ));
            }
        }
        Ok((size, self.bad_extents(size)?))
    }

    /// The bad and untried byte ranges for a source of `size` bytes, sorted, disjoint,
    /// adjacent ranges of the same ExtentState merged. Bytes the mapfile does not cover
    /// (its blocks end before `size`) are Untried. A mapfile whose blocks reach past
    /// `size` is an error (Error::Mapfile naming the line of the first block past the
    /// end, message saying both sizes) — except, as in ddrescue, a last block that is
    /// not finished, which is cut at `size` (dropped if it starts there): ddrescue ends
    /// its last block at 2^63 - 1 when it does not know the input's size, and an
    /// interrupted rescue leaves the output file shorter than the untried rest.
    pub fn bad_extents(&self, size: u64) -> Result<Vec<BadExtent>> {
        let err = |i, message| self.block_error(i, message);
        let mut out: Vec<BadExtent> = Vec::new();
        let mut push = |offset: u64, end: u64, state: ExtentState| {
            if end <= offset {
                return;
            }
            match out.last_mut() {
                Some(last) if last.state == state && last.end() == offset => {
                    last.length = end - last.offset
                }
                _ => out.push(BadExtent {
                    offset,
                    length: end - offset,
                    state,
                }),
            }
        };
        // The fields are public, so check again what parse checked.
        let mut covered = 0u64;
        for (i, b) in self.blocks.iter().enumerate() {
            if b.pos != covered {
                return Err(err(
                    i,
                    format!(
                        "block at {:#x} does not start where the previous block ends ({covered:#x})",
                        b.pos
                    ),
                ));
            }
            let end = b.pos.checked_add(b.size).ok_or_else(|| {
                err(
                    i,
                    format!("block at {:#x} of size {:#x} overflows", b.pos, b.size),
                )
            })?;
            covered = end;
            let last = i + 1 == self.blocks.len();
            let end = if end <= size {
                end
            } else if last && b.status != BlockStatus::Finished && b.pos <= size {
                size
            } else {
                let mapfile_end = self
                    .blocks
                    .last()
                    .map_or(end, |l| l.pos.saturating_add(l.size));
                return Err(err(
                    i,
                    format!(
                        "block at {:#x} of size {:#x} ({}) reaches past the end of the source: \
                         the source is {size} bytes ({size:#x}) but the mapfile covers {} \
                         bytes ({:#x}); is it the mapfile of another file?",
                        b.pos,
                        b.size,
                        b.status.as_char(),
                        mapfile_end,
                        mapfile_end
                    ),
                ));
            };
            if let Some(state) = b.status.extent_state() {
                push(b.pos, end, state);
            }
        }
        push(covered.min(size), size, ExtentState::Untried);
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // Real mapfiles written by GNU ddrescue 1.27 (Debian gddrescue 1.27-1), with
    // `-H` (test mode) simulating bad sectors on a 1 MiB input.

    /// `ddrescue -q x.img y.img map1` of a good 1 MiB file.
    const REAL_FINISHED: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q x.img y.img map1\n\
# Start time:   2026-11-29 09:18:48\n\
# Current time: 2026-11-29 09:18:48\n\
# Finished\n\
# current_pos  current_status  current_pass\n\
0x000F0000     +               1\n\
#      pos        size  status\n\
0x00000000  0x00100000  +\n\
";

    /// `-n` (no scraping): `-` `/` `-` side by side.
    const REAL_NON_SCRAPED: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q -n -H testmap in.img o3 m3\n\
# Start time:   2026-11-29 09:19:14\n\
# Current time: 2026-11-29 09:19:14\n\
# Finished\n\
# current_pos  current_status  current_pass\n\
0x00023600     +               1\n\
#      pos        size  status\n\
0x00000000  0x00020000  +\n\
0x00020000  0x00000200  -\n\
0x00020200  0x00003200  /\n\
0x00023400  0x00000200  -\n\
0x00023600  0x000DCA00  +\n\
";

    /// Stopped by `-X 1` while trimming.
    const REAL_INTERRUPTED: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q -X 1 -H testmap in.img o4 m4\n\
# Start time:   2026-11-29 09:19:16\n\
# Current time: 2026-11-29 09:19:16\n\
# Trimming failed blocks... (forwards)\n\
# current_pos  current_status  current_pass\n\
0x00020000     *               1\n\
#      pos        size  status\n\
0x00000000  0x00020000  +\n\
0x00020000  0x00000200  -\n\
0x00020200  0x0000FE00  *\n\
0x00030000  0x000D0000  +\n\
";

    /// Only the first copying pass: a skipped (`?`) area after a non-trimmed one.
    const REAL_SKIPPED: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q --cpass=1 -n -N -K 0x10000 -H testmap2 in.img o5 m5\n\
# Start time:   2026-11-29 09:19:19\n\
# Current time: 2026-11-29 09:19:19\n\
# Finished\n\
# current_pos  current_status  current_pass\n\
0x000F0000     +               1\n\
#      pos        size  status\n\
0x00000000  0x00020000  +\n\
0x00020000  0x00010000  *\n\
0x00030000  0x00010000  ?\n\
0x00040000  0x000C0000  +\n\
";

    /// `ddrescuelog -A` of the one above: comments after the fields.
    const REAL_ANNOTATED: &str = "\
# Mapfile. Created by GNU ddrescuelog version 1.27\n\
# Command line: ddrescuelog -A m5\n\
# Start time:   2026-11-29 09:20:14\n\
# current_pos  current_status  current_pass\n\
0x000F0000     +               1\t#  983040 B\n\
#      pos        size  status\n\
0x00000000  0x00020000  +\t#         0 B    131072  \n\
0x00020000  0x00010000  *\t#    131072 B     65536  \n\
0x00030000  0x00010000  ?\t#    196608 B     65536  \n\
0x00040000  0x000C0000  +\t#    262144 B    786432  \n\
";

    /// An empty input: ddrescue's one zero-size block.
    const REAL_EMPTY_INPUT: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q empty.img e.out mapE\n\
# Start time:   2026-11-29 09:18:48\n\
# Current time: 2026-11-29 09:18:48\n\
# Finished\n\
# current_pos  current_status  current_pass\n\
0x00000000     +               1\n\
#      pos        size  status\n\
0x00000000  0x00000000  ?\n\
";

    /// An input of unknown size (/dev/zero), interrupted: the last block runs to
    /// 2^63 - 1. The output file was 0x161F0000 bytes.
    const REAL_UNKNOWN_SIZE: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27\n\
# Command line: ddrescue -q /dev/zero z.out mapZ\n\
# Start time:   2026-11-29 09:18:54\n\
# Current time: 2026-11-29 09:18:55\n\
# Copying non-tried blocks... Pass 1 (forwards)\n\
# current_pos  current_status  current_pass\n\
0x161F0000     ?               1\n\
#      pos        size  status\n\
0x00000000  0x161F0000  +\n\
0x161F0000  0x7FFFFFFFE9E0FFFF  ?\n\
";

    /// The example of `info ddrescue`.
    const INFO_EXAMPLE: &str = "\
# Mapfile. Created by GNU ddrescue version 1.27
# Command line: ddrescue -d -c18 /dev/fd0 fdimage mapfile
# Start time:   2015-07-21 09:37:44
# Current time: 2015-07-21 09:38:19
# Copying non-tried blocks... Pass 1 (forwards)
# current_pos  current_status  current_pass
0x00120000     ?               1
#      pos        size  status
0x00000000  0x00117000  +
0x00117000  0x00000200  -
0x00117200  0x00001000  /
0x00118200  0x00007E00  *
0x00120000  0x00048000  ?
";

    fn p(text: &str) -> Result<Mapfile> {
        parse(text, Path::new("test.map"))
    }

    fn blk(pos: u64, size: u64, c: char) -> MapBlock {
        MapBlock {
            pos,
            size,
            status: BlockStatus::from_char(c).unwrap(),
        }
    }

    fn ext(offset: u64, length: u64, state: ExtentState) -> BadExtent {
        BadExtent {
            offset,
            length,
            state,
        }
    }

    /// The line and message of a Mapfile error, anything else fails the test.
    fn line_err(r: Result<impl std::fmt::Debug>) -> (usize, String) {
        match r {
            Err(Error::Mapfile {
                path,
                line,
                message,
            }) => {
                assert_eq!(path, Path::new("test.map"));
                (line, message)
            }
            other => panic!("expected a mapfile error, got {other:?}"),
        }
    }

    fn assert_err(text: &str, want_line: usize, want: &[&str]) {
        let (line, msg) = line_err(p(text));
        assert_eq!(line, want_line, "wrong line for {msg:?} in {text:?}");
        for w in want {
            assert!(msg.contains(w), "{msg:?} lacks {w:?} (text {text:?})");
        }
    }

    const B: ExtentState = ExtentState::Bad;
    const U: ExtentState = ExtentState::Untried;

    #[test]
    fn status_chars_round_trip() {
        for c in ['?', '*', '/', '-', '+'] {
            assert_eq!(BlockStatus::from_char(c).unwrap().as_char(), c);
        }
        for c in ['F', 'G', '#', ' ', '0', 'x', 'é'] {
            assert_eq!(BlockStatus::from_char(c), None);
        }
        assert_eq!(BlockStatus::Finished.extent_state(), None);
        assert_eq!(BlockStatus::NonTried.extent_state(), Some(U));
        for s in [
            BlockStatus::NonTrimmed,
            BlockStatus::NonScraped,
            BlockStatus::BadSector,
        ] {
            assert_eq!(s.extent_state(), Some(B));
        }
    }

    #[test]
    fn real_finished_mapfile() {
        let m = p(REAL_FINISHED).unwrap();
        assert_eq!(m.current_pos, 0xF0000);
        assert_eq!(m.current_status, '+');
        assert_eq!(m.current_pass, Some(1));
        assert_eq!(m.blocks, vec![blk(0, 0x100000, '+')]);
        assert_eq!(m.bad_extents(0x100000).unwrap(), vec![]);
        // A longer source: the rest is untried.
        assert_eq!(
            m.bad_extents(0x100200).unwrap(),
            vec![ext(0x100000, 0x200, U)]
        );
        // A shorter one: the rescued data would be missing.
        let (line, msg) = line_err(m.bad_extents(0xFFE00));
        assert_eq!(line, 9);
        assert!(msg.contains("1048064 bytes (0xffe00)"), "{msg}");
        assert!(msg.contains("covers 1048576 bytes (0x100000)"), "{msg}");
    }

    /// GNU ddrescue does not write sectors it could not read: a rescue whose last 64 KiB
    /// failed leaves a copy 64 KiB short of the disk, and the disk keeps its size and its
    /// bad tail. A tail the mapfile says was rescued cannot be missing from the copy; a
    /// last block to 2^63 - 1 (size unknown) ends with the copy.
    #[test]
    fn a_copy_shorter_than_the_disk_keeps_the_disks_size_and_bad_tail() {
        let m = p("0 +\n0x0 0x3F0000 +\n0x3F0000 0x10000 -\n").unwrap();
        assert_eq!(
            m.extents_for(0x3F0000).unwrap(),
            (0x400000, vec![ext(0x3F0000, 0x10000, B)])
        );
        let m = p("0 +\n0x0 0x280000 +\n0x280000 0x180000 ?\n").unwrap();
        let (line, msg) = line_err(m.extents_for(0x200000));
        assert_eq!(line, 2);
        assert!(
            msg.contains("is rescued (+) but the copy ends at 2097152"),
            "{msg}"
        );
        assert_eq!(
            m.extents_for(0x280000).unwrap(),
            (0x400000, vec![ext(0x280000, 0x180000, U)])
        );
        let m = p("0 ?\n0 0x7FFFFFFFFFFFFFFF ?\n").unwrap();
        assert_eq!(
            m.extents_for(0x1000).unwrap(),
            (0x1000, vec![ext(0, 0x1000, U)])
        );
    }

    #[test]
    fn real_bad_kinds_merge_into_one_bad_extent() {
        let m = p(REAL_NON_SCRAPED).unwrap();
        assert_eq!(m.blocks.len(), 5);
        assert_eq!(m.blocks[2], blk(0x20200, 0x3200, '/'));
        assert_eq!(
            m.bad_extents(0x100000).unwrap(),
            vec![ext(0x20000, 0x3600, B)]
        );
        let m = p(REAL_INTERRUPTED).unwrap();
        assert_eq!(m.current_status, '*');
        assert_eq!(
            m.bad_extents(0x100000).unwrap(),
            vec![ext(0x20000, 0x10000, B)]
        );
    }

    #[test]
    fn real_untried_stays_separate_and_annotations_are_comments() {
        let m = p(REAL_SKIPPED).unwrap();
        let want = vec![ext(0x20000, 0x10000, B), ext(0x30000, 0x10000, U)];
        assert_eq!(m.bad_extents(0x100000).unwrap(), want);
        let a = p(REAL_ANNOTATED).unwrap();
        assert_eq!(a, m);
        assert_eq!(a.bad_extents(0x100000).unwrap(), want);
        // Lines of errors are those of the annotated file.
        let (line, _) = line_err(a.bad_extents(0x80000));
        assert_eq!(line, 10);
    }

    #[test]
    fn real_empty_input() {
        let m = p(REAL_EMPTY_INPUT).unwrap();
        assert_eq!(m.blocks, vec![blk(0, 0, '?')]);
        assert_eq!(m.bad_extents(0).unwrap(), vec![]);
        assert_eq!(m.bad_extents(1024).unwrap(), vec![ext(0, 1024, U)]);
    }

    #[test]
    fn real_unknown_size_last_block_is_cut_at_the_source_end() {
        let m = p(REAL_UNKNOWN_SIZE).unwrap();
        assert_eq!(m.blocks[1].pos + m.blocks[1].size, i64::MAX as u64);
        assert_eq!(m.bad_extents(0x161F0000).unwrap(), vec![]);
        assert_eq!(
            m.bad_extents(0x16200000).unwrap(),
            vec![ext(0x161F0000, 0x10000, U)]
        );
        // The finished block still must fit.
        let (line, _) = line_err(m.bad_extents(0x1000));
        assert_eq!(line, 9);
    }

    #[test]
    fn info_example() {
        let m = p(INFO_EXAMPLE).unwrap();
        assert_eq!(m.current_pos, 0x120000);
        assert_eq!(m.current_status, '?');
        assert_eq!(
            m.bad_extents(0x168000).unwrap(),
            vec![ext(0x117000, 0x9000, B), ext(0x120000, 0x48000, U)]
        );
        // The last block is untried: cut at a shorter source, or dropped if it starts
        // right there; a source ending inside an earlier block is an error.
        assert_eq!(
            m.bad_extents(0x130000).unwrap(),
            vec![ext(0x117000, 0x9000, B), ext(0x120000, 0x10000, U)]
        );
        assert_eq!(
            m.bad_extents(0x120000).unwrap(),
            vec![ext(0x117000, 0x9000, B)]
        );
        let (line, msg) = line_err(m.bad_extents(0x11FFFF));
        assert_eq!(line, 12);
        assert!(
            msg.contains("0x11ffff") && msg.contains("0x168000"),
            "{msg}"
        );
    }

    #[test]
    fn last_finished_or_later_blocks_past_the_end_are_errors() {
        let m = p("0 + 1\n0 0x100 ?\n0x100 0x100 ?\n").unwrap();
        // Only the last block may be cut.
        let (line, _) = line_err(m.bad_extents(0x80));
        assert_eq!(line, 2);
        assert_eq!(m.bad_extents(0x100).unwrap(), vec![ext(0, 0x100, U)]);
        assert_eq!(m.bad_extents(0x180).unwrap(), vec![ext(0, 0x180, U)]);
    }

    #[test]
    fn no_blocks_means_all_untried() {
        let m = p("# x\n0x0 ? 1\n").unwrap();
        assert!(m.blocks.is_empty());
        assert_eq!(m.bad_extents(4096).unwrap(), vec![ext(0, 4096, U)]);
        assert_eq!(m.bad_extents(0).unwrap(), vec![]);
    }

    #[test]
    fn decimal_octal_and_hex_numbers() {
        let m = p("1000 / 3\n0 256 +\n0400 0x100 -\n512 01000 *\n0X400 00 ?\n").unwrap_err();
        // A zero-size block away from 0 is refused (it is written 00, octal 0).
        assert!(m.to_string().contains("size 0"), "{m}");
        let m = p("1000 / 3\n0 256 +\n0400 0x100 -\n512 01000 *\n0X400 0xA ?\n").unwrap();
        assert_eq!(m.current_pos, 1000);
        assert_eq!(m.current_status, '/');
        assert_eq!(m.current_pass, Some(3));
        assert_eq!(
            m.blocks,
            vec![
                blk(0, 256, '+'),
                blk(256, 256, '-'),
                blk(512, 512, '*'),
                blk(1024, 10, '?')
            ]
        );
        assert_eq!(
            m.bad_extents(1034).unwrap(),
            vec![ext(256, 768, B), ext(1024, 10, U)]
        );
        let m = p("0x7FFFFFFFFFFFFFFF G\n0 0x7fffffffffffffff +\n").unwrap();
        assert_eq!(m.current_pos, i64::MAX as u64);
        assert_eq!(m.current_pass, None);
        assert_eq!(m.current_status, 'G');
    }

    #[test]
    fn whitespace_crlf_and_comments() {
        let want = p("0 + 1\n0 0x100 +\n0x100 0x100 -\n").unwrap();
        for text in [
            "0 + 1\r\n0 0x100 +\r\n0x100 0x100 -\r\n",
            "  0\t+ 1  \n\n \t \n0 0x100 +   \n\t0x100\x0b0x100\x0c-",
            "#a\n0 + 1 # c\n# 1 2 3\n0 0x100 +\t#x#y\n0x100 0x100 - #\n#",
            "0 + 01\n0 0x100 +\n   # indented comment\n0x100 0x100 -\n",
        ] {
            assert_eq!(p(text).unwrap(), want, "{text:?}");
        }
    }

    #[test]
    fn missing_status_line() {
        assert_err("", 1, &["no status line"]);
        assert_err("# Mapfile\n# nothing\n", 2, &["no status line"]);
        assert_err("\n\n\n", 3, &["no status line"]);
        assert_err(
            "# comment\n0x0 0x100 +\n0x100 0x100 -\n",
            2,
            &["status line", "missing", "block line"],
        );
    }

    #[test]
    fn bad_status_lines() {
        assert_err("#\n0\n", 2, &["incomplete status line"]);
        assert_err("0 + 1 2\n", 1, &["unexpected `2`"]);
        assert_err("0 + 0\n", 1, &["current_pass `0`"]);
        assert_err("0 + 0x2\n", 1, &["current_pass `0x2`"]);
        assert_err("0 + +2\n", 1, &["current_pass `+2`"]);
        assert_err("0 + 2147483648\n", 1, &["current_pass"]);
        assert_err("0 +# 1\n", 1, &["current_status `+#`"]);
        assert_err("0 5 1\n", 1, &["current_status `5`"]);
        assert_err("0 é 1\n", 1, &["current_status `é`"]);
        assert_err("0 ++ 1\n", 1, &["current_status `++`"]);
        assert_err("-1 + 1\n", 1, &["current_pos", "sign"]);
        assert_err("x + 1\n", 1, &["current_pos", "`x`"]);
        assert_err("\u{feff}# Mapfile\n0 + 1\n", 1, &["byte-order mark"]);
        // Any other character is a status of some newer ddrescue.
        assert_eq!(p("0 F 1\n").unwrap().current_status, 'F');
        assert_eq!(p("0 Z\n").unwrap().current_status, 'Z');
    }

    #[test]
    fn malformed_numbers() {
        let at = |field: &str| format!("0 + 1\n# blocks\n0 {field} +\n");
        for (field, why) in [
            ("+5", "sign"),
            ("-0", "sign"),
            ("0x", "hexadecimal"),
            ("0xg", "hexadecimal"),
            ("08", "octal"),
            ("1a", "decimal"),
            ("0x100junk", "hexadecimal"),
            ("12\u{0}", "decimal"),
            ("0x8000000000000000", "too large"),
            ("9223372036854775808", "too large"),
            ("99999999999999999999999", "too large"),
            ("0xFFFFFFFFFFFFFFFFF", "too large"),
            ("01777777777777777777777", "too large"),
        ] {
            assert_err(&at(field), 3, &["block size", why]);
        }
        assert_err("0 + 1\n0x 0x100 +\n", 2, &["block position"]);
        assert_err("0 + 1\n0 0x100 +#x\n", 2, &["unknown block status `+#x`"]);
        assert_err("0 + 1\n0 0x100 +x\n", 2, &["unknown block status"]);
    }

    #[test]
    fn bad_block_lines() {
        assert_err(
            "0 + 1\n0 0x100 +\n0x100 0x100 F\n",
            3,
            &["unknown block status `F`"],
        );
        assert_err(
            "0 + 1\n0 0x100 +\n\n0x100 0x100\n",
            4,
            &["incomplete block line"],
        );
        assert_err("0 + 1\n0 0x100 + 1\n", 2, &["unexpected `1`"]);
        assert_err("0 + 1\n0\n", 2, &["incomplete block line `0`"]);
    }

    #[test]
    fn zero_size_blocks() {
        assert_err(
            "0 + 1\n0 0x100 +\n0x100 0 -\n0x100 0x100 -\n",
            3,
            &["block at 0x100 has size 0"],
        );
        // ddrescue's own `0 0 ?` may even be followed by blocks (ddrescue reads that).
        let m = p("0 + 1\n0 0 ?\n0 0x100 +\n").unwrap();
        assert_eq!(m.bad_extents(0x100).unwrap(), vec![]);
    }

    #[test]
    fn blocks_start_at_0_and_are_contiguous() {
        assert_err(
            "0 + 1\n0x100 0x100 +\n",
            2,
            &["first block starts at 0x100, not at 0"],
        );
        assert_err(
            "# h\n0 + 1\n# h\n0 0x10000 +\n0x10000 0x10000 -\n0x10000 0x10000 +\n",
            6,
            &["block at 0x10000 overlaps the previous block, which ends at 0x20000"],
        );
        assert_err(
            "0 + 1\n0 0x100 +\n0x200 0x100 -\n",
            3,
            &["block at 0x200 leaves a gap after the previous block, which ends at 0x100"],
        );
    }

    #[test]
    fn positions_past_2_63_are_refused() {
        assert_err(
            "0 + 1\n0 0x7000000000000000 +\n0x7000000000000000 0x7000000000000000 ?\n",
            3,
            &["ends past 2^63 - 1"],
        );
        assert_err(
            "0 + 1\n0 0x7FFFFFFFFFFFFFFF +\n0x7FFFFFFFFFFFFFFF 1 ?\n",
            3,
            &["ends past 2^63 - 1"],
        );
    }

    #[test]
    fn mutated_blocks_are_checked_again() {
        let mut m = p(INFO_EXAMPLE).unwrap();
        m.blocks.push(blk(u64::MAX, 2, '-'));
        assert!(m.bad_extents(u64::MAX).is_err());
        m.blocks.pop();
        m.blocks[1].size += 1;
        let (line, _) = line_err(m.bad_extents(0x168000));
        assert_eq!(line, 11);
        m.blocks.clear();
        m.blocks.push(blk(0, u64::MAX, '-'));
        m.blocks.push(blk(u64::MAX, 1, '-'));
        assert!(m.bad_extents(u64::MAX).is_err());
    }

    #[test]
    fn read_files() {
        let dir = std::env::temp_dir().join(format!("mapfile-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("map");
        // A non-UTF-8 file name in the command line comment, as ddrescue writes it.
        let mut bytes = REAL_SKIPPED.as_bytes().to_vec();
        bytes.splice(30..30, b"caf\xe9 ".iter().copied());
        std::fs::write(&f, &bytes).unwrap();
        assert_eq!(read(&f).unwrap(), p(REAL_SKIPPED).unwrap());
        // Outside comments it is an error naming the line.
        std::fs::write(&f, b"# \xff\n0 + 1\n0 0x1\xff0 +\n").unwrap();
        match read(&f) {
            Err(Error::Mapfile {
                path,
                line,
                message,
            }) => {
                assert_eq!(path, f);
                assert_eq!(line, 3);
                assert!(
                    message.contains("UTF-8") && message.contains("0xff"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
        // Errors of bad_extents name the file.
        std::fs::write(&f, REAL_FINISHED).unwrap();
        match read(&f).unwrap().bad_extents(10) {
            Err(e @ Error::Mapfile { .. }) => {
                assert!(
                    e.to_string().starts_with(&format!("{}:9: ", f.display())),
                    "{e}"
                )
            }
            other => panic!("{other:?}"),
        }
        // Too big.
        let big = std::fs::File::create(&f).unwrap();
        big.set_len(MAX_MAPFILE_LEN + 1).unwrap();
        drop(big);
        let e = read(&f).unwrap_err();
        assert!(
            matches!(e, Error::Invalid(_)) && e.to_string().contains("64 MiB"),
            "{e}"
        );
        // Missing.
        let missing = dir.join("nope");
        match read(&missing) {
            Err(Error::Io { context, source }) => {
                assert!(context.contains("nope"), "{context}");
                assert_eq!(source.kind(), std::io::ErrorKind::NotFound);
            }
            other => panic!("{other:?}"),
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// Checks what bad_extents promises.
    fn check_extents(m: &Mapfile, size: u64) {
        let Ok(x) = m.bad_extents(size) else {
            return;
        };
        let mut prev: Option<BadExtent> = None;
        for e in &x {
            assert!(e.length > 0 && e.end() <= size, "{e:?} of {size}");
            if let Some(p) = prev {
                assert!(p.end() <= e.offset);
                assert!(
                    p.end() != e.offset || p.state != e.state,
                    "unmerged {p:?} {e:?}"
                );
            }
            prev = Some(*e);
        }
    }

    #[test]
    fn mutations_never_panic() {
        // xorshift64*, fixed seed.
        let mut s = 0x9E37_79B9_7F4A_7C15u64;
        let mut rnd = move |n: usize| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as usize % n.max(1)
        };
        let seeds = [
            REAL_ANNOTATED,
            INFO_EXAMPLE,
            REAL_UNKNOWN_SIZE,
            REAL_EMPTY_INPUT,
        ];
        let alphabet = b"0123456789abcdefxX#?*/-+FG \t\r\n\x0b\xff\xe9\x00";
        let path = Path::new("fuzz.map");
        let mut ok = 0;
        for _ in 0..20_000 {
            let mut b = seeds[rnd(seeds.len())].as_bytes().to_vec();
            for _ in 0..1 + rnd(4) {
                let at = rnd(b.len() + 1);
                match rnd(6) {
                    0 if at < b.len() => b[at] ^= 1 << rnd(8),
                    1 if at < b.len() => b[at] = alphabet[rnd(alphabet.len())],
                    2 => b.truncate(at),
                    3 => b.insert(at, alphabet[rnd(alphabet.len())]),
                    4 if at < b.len() => {
                        b.remove(at);
                    }
                    _ => {
                        // Duplicate a slice (lines get repeated or spliced).
                        let from = rnd(b.len());
                        let to = (from + rnd(40)).min(b.len());
                        let piece = b[from..to].to_vec();
                        b.splice(at..at, piece);
                    }
                }
            }
            let results = [
                parse_bytes(&b, path),
                parse(&String::from_utf8_lossy(&b), path),
            ];
            for r in results {
                match r {
                    Ok(m) => {
                        ok += 1;
                        let end = m.blocks.last().map_or(0, |l| l.pos + l.size);
                        for size in [0, 1, end / 2, end, end.saturating_add(4096), u64::MAX] {
                            check_extents(&m, size);
                        }
                    }
                    Err(Error::Mapfile { line, message, .. }) => {
                        assert!(line >= 1 && line <= b.len() + 1, "line {line}");
                        assert!(message.len() < 400, "{message}");
                    }
                    Err(e) => panic!("unexpected error {e}"),
                }
            }
        }
        // The mutations left a fair share valid.
        assert!(ok > 2_000, "only {ok} valid");
    }
}
