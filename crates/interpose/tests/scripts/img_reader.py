#!/usr/bin/env python3
"""An independent reader of interpose disk images, written from docs/FORMAT.md
(format version 1.1) alone: it shares no code with the Rust implementation.

    img_reader.py check IMAGE        validate everything FORMAT.md says a reader checks
    img_reader.py extract IMAGE OUT  write the raw bytes (bad and untried bytes as zeros;
                                     OUT `-` is standard output)
    img_reader.py extents IMAGE      the bad extents, one JSON object a line:
                                     {"offset":..,"length":..,"state":"bad"|"untried"}
    img_reader.py info IMAGE         one JSON object: virtual_size, chunk_size, chunk
                                     counts by kind, bad extents, metadata, ...

Exit status: 0 done (for `check`: the image is valid); 1 the image is not valid, with a
message on standard error naming the problem; 2 a usage error or a missing tool.

Needs Python 3.11's standard library and:
- for zstd images: the `zstandard` module (Debian 12 package python3-zstandard); if this
  interpreter cannot import it, the copy Debian installs for its own CPython 3.11 is
  tried, then the `zstd` command (Debian package zstd), one process per chunk;
- for BLAKE3: the `b3sum` command (Debian package b3sum; Debian 12 has no Python
  binding). Without it `check` skips the whole-image hash and says so on its output.
CRC32C and LZ4 blocks (FORMAT.md §8.2) are decoded here, in pure Python.
"""

import bisect
import json
import os
import shutil
import struct
import subprocess
import sys
import threading

# --- Constants of FORMAT.md --------------------------------------------------------

MAGIC = b"IPOSEIMG"
VERSION_MAJOR = 1
HEADER_SIZE = 512
DATA_OFFSET = 512
ENTRY_SIZE = 16
EXTENT_SIZE = 24
MIN_CHUNK_SHIFT, MAX_CHUNK_SHIFT = 12, 20
MAX_META_LEN = 16 << 20
MAX_OFFSET = (1 << 48) - 1
FLAG_SEALED = 1
INCOMPAT_LZ4 = 1
INCOMPAT_KNOWN = INCOMPAT_LZ4
CODEC_ZSTD, CODEC_LZ4 = 1, 2
CODEC_NAMES = {CODEC_ZSTD: "zstd", CODEC_LZ4: "lz4"}
KIND_ZERO, KIND_RAW, KIND_COMPRESSED = 0, 1, 2
KIND_NAMES = {KIND_ZERO: "zero", KIND_RAW: "raw", KIND_COMPRESSED: "compressed"}
CHUNK_PARTLY_BAD, CHUNK_ALL_BAD = 1, 2
STATE_NAMES = {1: "bad", 2: "untried"}

ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 << 10


class Problem(Exception):
    """The image is not valid: `kind` is one of FORMAT.md's error classes."""

    def __init__(self, kind, message=""):
        super().__init__(f"{kind}: {message}" if message else kind)


def not_an_image():
    return Problem("not an interpose image", "no IPOSEIMG magic")


def corrupt(msg):
    return Problem("corrupt image", msg)


def truncated(msg):
    return Problem("truncated image", msg)


def unsupported(msg):
    return Problem("unsupported image", msg)


def incomplete():
    return Problem("incomplete image",
                   "it was never finished (neither the header nor the trailer is sealed)")


class Missing(Exception):
    """A tool this reader needs is not installed."""


# --- CRC32C (Castagnoli, reflected, init and final XOR 0xFFFFFFFF) ----------------

def _crc_tables():
    t0 = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        t0.append(c)
    # Slicing by 8: table k gives the CRC of a byte followed by k zero bytes.
    tables = [t0]
    for _ in range(7):
        prev = tables[-1]
        tables.append([(prev[n] >> 8) ^ t0[prev[n] & 0xFF] for n in range(256)])
    return tables


_T = _crc_tables()


def crc32c(data, crc=0):
    t0, t1, t2, t3, t4, t5, t6, t7 = _T
    crc ^= 0xFFFFFFFF
    mv = memoryview(data).cast("B")
    n8 = len(mv) // 8 * 8
    if n8:
        for (a, b) in struct.iter_unpack("<II", mv[:n8]):
            a ^= crc
            crc = (t7[a & 0xFF] ^ t6[(a >> 8) & 0xFF] ^ t5[(a >> 16) & 0xFF] ^ t4[a >> 24]
                   ^ t3[b & 0xFF] ^ t2[(b >> 8) & 0xFF] ^ t1[(b >> 16) & 0xFF] ^ t0[b >> 24])
    for x in mv[n8:]:
        crc = t0[(crc ^ x) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


assert crc32c(b"123456789") == 0xE3069283, "CRC32C self-test"
assert crc32c(bytes(32)) == 0x8A9136AA, "CRC32C self-test"


# --- zstd ----------------------------------------------------------------------------

def zstd_frame_check(buf, chunk_len):
    """Checks that `buf` is exactly one zstd frame as FORMAT.md requires (RFC 8878:
    not skippable, no dictionary, a content size if any equal to the chunk length, no
    bytes after it) and that its raw and RLE blocks do not already exceed the chunk.
    Returns None or raises ValueError naming the problem."""
    n = len(buf)
    pos = 0

    def need(k, what):
        if pos + k > n:
            raise ValueError(f"zstd frame cut short in its {what}")

    need(4, "magic")
    magic = int.from_bytes(buf[0:4], "little")
    if 0x184D2A50 <= magic <= 0x184D2A5F:
        raise ValueError("a zstd skippable frame where a zstd frame must be")
    if magic != ZSTD_MAGIC:
        raise ValueError(f"no zstd frame magic (found {magic:#010x})")
    pos = 4
    need(1, "frame header")
    fhd = buf[pos]
    pos += 1
    fcs_flag, single, reserved, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 3) & 1, fhd & 3
    has_checksum = (fhd >> 2) & 1
    if reserved:
        raise ValueError("zstd frame header has its reserved bit set")
    if not single:
        need(1, "window descriptor")
        pos += 1
    did_size = (0, 1, 2, 4)[did_flag]
    need(did_size, "dictionary ID")
    did = int.from_bytes(buf[pos:pos + did_size], "little")
    pos += did_size
    if did:
        raise ValueError(f"zstd frame needs dictionary {did}")
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    need(fcs_size, "content size")
    if fcs_size:
        fcs = int.from_bytes(buf[pos:pos + fcs_size], "little") + (256 if fcs_size == 2 else 0)
        pos += fcs_size
        if fcs != chunk_len:
            raise ValueError(f"zstd frame content size {fcs}, the chunk has {chunk_len}")
    floor = 0  # bytes the raw and RLE blocks regenerate: a lower bound of the output
    while True:
        need(3, "block header")
        bh = int.from_bytes(buf[pos:pos + 3], "little")
        pos += 3
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise ValueError("zstd block of the reserved type 3")
        if bsize > ZSTD_BLOCK_MAX:
            raise ValueError(f"zstd block of {bsize} bytes (over 128 KiB)")
        if btype == 1:  # RLE: one byte stored, bsize regenerated
            need(1, "RLE block")
            pos += 1
            floor += bsize
        else:
            need(bsize, "block")
            pos += bsize
            if btype == 0:
                floor += bsize
        if floor > chunk_len:
            raise ValueError(f"zstd frame decompresses to over {chunk_len} bytes")
        if last:
            break
    if has_checksum:
        need(4, "content checksum")
        pos += 4
    if pos != n:
        raise ValueError(f"{n - pos} bytes after the zstd frame (one frame per chunk)")


# --- LZ4 ------------------------------------------------------------------------------

def lz4_block_decode(src, out_len):
    """Decodes one LZ4 block (FORMAT.md §8.2) that must produce exactly `out_len` bytes
    from exactly all of `src`, with every rule of §8.2 checked; ValueError names what is
    wrong."""
    out = bytearray()
    n = len(src)
    ip = 0

    def length(base, what):
        nonlocal ip
        if base != 15:
            return base
        while True:
            if ip >= n:
                raise ValueError(f"LZ4 block ends inside a {what} length")
            b = src[ip]
            ip += 1
            base += b
            if b != 255:
                return base

    while True:
        if ip >= n:
            raise ValueError("LZ4 block ends before a sequence's token")
        token = src[ip]
        ip += 1
        lit = length(token >> 4, "literal")
        if ip + lit > n:
            raise ValueError("LZ4 block ends inside literals")
        if len(out) + lit > out_len:
            raise ValueError(f"LZ4 block decodes past the chunk's {out_len} bytes")
        out += src[ip:ip + lit]
        ip += lit
        if ip == n:
            break  # the last sequence: literals only
        if ip + 2 > n:
            raise ValueError("LZ4 block ends inside a match offset")
        offset = src[ip] | src[ip + 1] << 8
        ip += 2
        if offset == 0 or offset > len(out):
            raise ValueError(f"LZ4 match offset {offset} with {len(out)} bytes decoded")
        mlen = length(token & 15, "match") + 4
        if len(out) + mlen > out_len:
            raise ValueError(f"LZ4 block decodes past the chunk's {out_len} bytes")
        # The end rules: a match starts 12 or more bytes, and ends 5 or more bytes,
        # before the end of the chunk.
        if len(out) + 12 > out_len or len(out) + mlen + 5 > out_len:
            raise ValueError(f"LZ4 match of {mlen} bytes at {len(out)} too near the "
                             f"chunk's end ({out_len})")
        start = len(out) - offset
        if offset >= mlen:
            out += out[start:start + mlen]
        else:  # overlapping: the copied bytes repeat with period `offset`
            pattern = bytes(out[start:])
            out += (pattern * (mlen // offset + 1))[:mlen]
    if len(out) != out_len:
        raise ValueError(f"decompressed to {len(out)} bytes, the chunk has {out_len}")
    return bytes(out)


def _import_zstandard():
    try:
        import zstandard
        return zstandard
    except ImportError:
        pass
    # Debian 12's python3-zstandard is built for its CPython 3.11; another 3.11 (pyenv,
    # a venv without system packages) can load it too.
    d = "/usr/lib/python3/dist-packages"
    if sys.version_info[:2] == (3, 11) and os.path.isdir(os.path.join(d, "zstandard")):
        sys.path.append(d)
        try:
            import zstandard
            return zstandard
        except ImportError:
            return None
        finally:
            sys.path.remove(d)
    return None


class ZstdModule:
    def __init__(self, mod):
        self.mod = mod
        self.name = "python3-zstandard"
        self.dctx = mod.ZstdDecompressor()

    def decompress(self, frame, chunk_len):
        # One shot into a buffer of the chunk's length: the frame was checked to carry
        # no other content size, so nothing larger is ever allocated.
        try:
            return self.dctx.decompress(frame, max_output_size=chunk_len)
        except self.mod.ZstdError as e:
            raise ValueError(f"zstd: {e}") from None


class ZstdCommand:
    def __init__(self, path):
        self.path = path
        self.name = "zstd command"

    def decompress(self, frame, chunk_len):
        p = subprocess.Popen([self.path, "-d", "-q", "-c"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)

        def feed():
            try:
                p.stdin.write(frame)
                p.stdin.close()
            except BrokenPipeError:
                pass

        t = threading.Thread(target=feed)
        t.start()
        out = bytearray()
        while len(out) <= chunk_len:  # read at most one byte more than the chunk
            b = p.stdout.read(chunk_len + 1 - len(out))
            if not b:
                break
            out += b
        if len(out) > chunk_len:
            p.kill()
        p.stdout.close()
        err = p.stderr.read().decode(errors="replace").strip()
        p.wait()
        t.join()
        if len(out) > chunk_len:
            raise ValueError(f"zstd: decompresses to over {chunk_len} bytes")
        if p.returncode != 0:
            raise ValueError(f"zstd: {err or 'exit status %d' % p.returncode}")
        return bytes(out)


def zstd_backend():
    mod = _import_zstandard()
    if mod is not None:
        return ZstdModule(mod)
    path = shutil.which("zstd")
    if path:
        return ZstdCommand(path)
    raise Missing("no zstd decoder: install python3-zstandard (or zstd)")


# --- BLAKE3 (through b3sum) -----------------------------------------------------------

class B3sum:
    def __init__(self, path):
        self.p = subprocess.Popen([path, "--no-names"], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def update(self, data):
        self.p.stdin.write(data)

    def hexdigest(self):
        out, err = self.p.communicate()
        if self.p.returncode != 0:
            raise Missing(f"b3sum failed: {err.decode(errors='replace').strip()}")
        return out.split()[0].decode()

    def abandon(self):
        self.p.kill()
        self.p.communicate()


# --- The image -----------------------------------------------------------------------

class Section:
    def __init__(self, b, at):
        self.offset, self.length, self.crc = struct.unpack_from("<QQI", b, at)

    @property
    def end(self):
        return self.offset + self.length


class Header:
    pass


def decode_header(b):
    """A header (or trailer) on its own: magic, major version, CRC, then the fields."""
    if b[0:8] != MAGIC:
        raise not_an_image()
    major, minor = struct.unpack_from("<HH", b, 8)
    if major != VERSION_MAJOR:
        raise unsupported(f"format version {major}.{minor} (this reader knows {VERSION_MAJOR}.x)")
    stored = struct.unpack_from("<I", b, 508)[0]
    computed = crc32c(b[:508])
    if stored != computed:
        raise corrupt(f"header checksum mismatch (stored {stored:08x}, computed {computed:08x})")
    h = Header()
    h.minor = minor
    (header_size, h.incompat, h.compat, h.virtual_size, h.chunk_shift, h.codec) = \
        struct.unpack_from("<IQQQII", b, 12)
    if header_size != HEADER_SIZE:
        raise corrupt(f"header size {header_size} is not 512")
    if h.incompat & ~INCOMPAT_KNOWN:
        raise unsupported(f"incompatible features {h.incompat & ~INCOMPAT_KNOWN:#x}")
    if not MIN_CHUNK_SHIFT <= h.chunk_shift <= MAX_CHUNK_SHIFT:
        raise corrupt(f"chunk size 2^{h.chunk_shift} outside 4 KiB..1 MiB")
    if h.codec not in CODEC_NAMES:
        raise unsupported(f"codec {h.codec}")
    if bool(h.incompat & INCOMPAT_LZ4) != (h.codec == CODEC_LZ4):
        raise corrupt(f"codec {h.codec} with incompatible features {h.incompat:#x}")
    h.uuid = bytes(b[48:64])
    h.chunk_count, h.flags = struct.unpack_from("<QI", b, 64)
    h.chunk_size = 1 << h.chunk_shift
    want = -(-h.virtual_size // h.chunk_size)
    if h.chunk_count != want:
        raise corrupt(f"chunk count {h.chunk_count} does not match the size "
                      f"{h.virtual_size} (want {want})")
    data_offset, h.data_len = struct.unpack_from("<QQ", b, 80)
    if data_offset != DATA_OFFSET:
        raise corrupt(f"data offset {data_offset} is not 512")
    h.index, h.extents, h.meta = Section(b, 96), Section(b, 120), Section(b, 144)
    h.blake3 = bytes(b[168:200])
    h.bad_bytes = struct.unpack_from("<Q", b, 200)[0]
    h.sealed = bool(h.flags & FLAG_SEALED)
    return h


class Image:
    def __init__(self, path):
        self.path = path
        self.f = open(path, "rb")
        self.file_len = os.fstat(self.f.fileno()).st_size
        self.h = self._header()
        self._layout()
        index = self._section(self.h.index, "chunk index")
        self.extents = self._extents(self._section(self.h.extents, "bad-extent table"))
        self.extent_ends = [o + n for (o, n, _) in self.extents]
        total = sum(length for (_, length, _) in self.extents)
        if total != self.h.bad_bytes:
            raise corrupt(f"the bad extents cover {total} bytes, the header says "
                          f"{self.h.bad_bytes}")
        self.meta = self._metadata(self._section(self.h.meta, "metadata"))
        self.entries = self._entries(index)

    def close(self):
        self.f.close()

    def pread(self, n, at):
        self.f.seek(at)
        b = self.f.read(n)
        if len(b) != n:
            raise truncated(f"{n} bytes at {at}: the file ends first")
        return b

    def _header(self):
        n = self.file_len
        if n < HEADER_SIZE:
            if self.pread(min(n, 8), 0) != MAGIC:
                raise not_an_image()
            raise truncated(f"the header: the file has {n} bytes")
        head = self.pread(HEADER_SIZE, 0)
        h = decode_header(head)
        if n < 2 * HEADER_SIZE:
            if h.sealed:
                raise truncated("no room for the trailer")
            raise incomplete()
        tail = self.pread(HEADER_SIZE, n - HEADER_SIZE)
        if h.sealed:
            if tail != head:
                try:
                    decode_header(tail)
                except Problem as e:
                    if tail[0:8] != MAGIC:
                        # Where the header says the file ends (§13.1, step 4).
                        want = h.meta.offset + h.meta.length + HEADER_SIZE
                        if n < want:
                            raise truncated("the trailer is missing: the file was cut short") from None
                        if n > want:
                            raise corrupt("no trailer at the end: something was appended") from None
                        raise corrupt("the trailer is damaged") from None
                    raise corrupt(f"the trailer: {e}") from None
                raise corrupt("the trailer differs from the header")
            return h
        # An unsealed header at 0: the image was streamed; the trailer is the header.
        if tail[0:8] != MAGIC:
            raise incomplete()
        try:
            t = decode_header(tail)
        except Problem as e:
            raise corrupt(f"the trailer: {e}") from None
        shape = lambda x: (x.uuid, x.virtual_size, x.chunk_shift, x.codec)
        if not t.sealed or shape(t) != shape(h):
            raise corrupt("the trailer does not belong to this image's header")
        return t

    def _layout(self):
        h, n = self.h, self.file_len
        if h.index.length != h.chunk_count * ENTRY_SIZE:
            raise corrupt(f"index length {h.index.length} is not {h.chunk_count} chunks x 16")
        if h.extents.length % EXTENT_SIZE:
            raise corrupt(f"bad-extent table length {h.extents.length} is not a multiple of 24")
        if h.meta.length > MAX_META_LEN:
            raise corrupt(f"metadata length {h.meta.length} over the limit {MAX_META_LEN}")
        at = DATA_OFFSET
        for name, start, length in (("chunk data", DATA_OFFSET, h.data_len),
                                    ("chunk index", h.index.offset, h.index.length),
                                    ("bad-extent table", h.extents.offset, h.extents.length),
                                    ("metadata", h.meta.offset, h.meta.length)):
            if start != at:
                raise corrupt(f"{name} at offset {start}, expected {at} "
                              "(sections overlap or leave gaps)")
            at = start + length
            if at > n:
                raise truncated(f"{name} ({length} bytes at {start}) runs past the end of "
                                f"the file ({n} bytes)")
        want = at + HEADER_SIZE
        if n < want:
            raise truncated(f"the trailer: file is {n} bytes, the header says {want}")
        if n > want:
            raise corrupt(f"{n - want} bytes after the trailer (file is {n} bytes, "
                          f"the header says {want})")
        if h.data_len > MAX_OFFSET:
            raise corrupt("chunk data region over 2^48 bytes")

    def _section(self, s, name):
        b = self.pread(s.length, s.offset)
        c = crc32c(b)
        if c != s.crc:
            raise corrupt(f"{name} checksum mismatch (stored {s.crc:08x}, computed {c:08x})")
        return b

    def _extents(self, b):
        out = []
        prev_end = 0
        for i, (offset, length, state, reserved) in enumerate(struct.iter_unpack("<QQII", b)):
            if state not in STATE_NAMES:
                raise corrupt(f"bad extent {i}: unknown state {state}")
            if reserved:
                raise corrupt(f"bad extent {i}: reserved field set")
            if length == 0 or offset + length > self.h.virtual_size:
                raise corrupt(f"bad extent {i} ({length} bytes at {offset}) empty or outside "
                              f"the image ({self.h.virtual_size} bytes)")
            if out and offset < prev_end:
                raise corrupt(f"bad extent {i} at {offset} overlaps or precedes the one "
                              f"before (ending at {prev_end})")
            out.append((offset, length, STATE_NAMES[state]))
            prev_end = offset + length
        return out

    def _metadata(self, b):
        class Obj(dict):
            """A JSON object that remembers its duplicate member names (the last wins)."""
            dups = ()

        def pairs(kv):
            d = Obj()
            dups = set()
            for k, v in kv:
                if k in d:
                    dups.add(k)
                d[k] = v
            d.dups = dups
            return d

        def no_constant(name):  # Python's json takes NaN and Infinity; JSON does not
            raise ValueError(f"{name} is not JSON")

        def strings_ok(v):
            if isinstance(v, str):
                v.encode("utf-8")  # refuses unpaired surrogates (\ud800)
            elif isinstance(v, dict):
                for k, x in v.items():
                    strings_ok(k)
                    strings_ok(x)
            elif isinstance(v, list):
                for x in v:
                    strings_ok(x)

        try:
            m = json.loads(b.decode("utf-8"), object_pairs_hook=pairs,
                           parse_constant=no_constant)
            strings_ok(m)
        except (UnicodeError, ValueError, RecursionError) as e:
            raise corrupt(f"metadata is not valid: {e}") from None
        if not isinstance(m, dict):
            raise corrupt("metadata is not valid: not a JSON object")
        dup = sorted(m.dups & {"source", "created", "tool", "blake3", "user"})
        if dup:
            raise corrupt(f"metadata is not valid: duplicate key `{dup[0]}`")
        for k in ("source", "created", "tool", "blake3"):
            if not isinstance(m.get(k), str):
                raise corrupt(f"metadata is not valid: `{k}` missing or not a string")
        user = m.get("user", {})
        if not isinstance(user, dict) or not all(isinstance(v, str) for v in user.values()):
            raise corrupt("metadata is not valid: `user` is not an object of strings")
        return m

    def chunk_len(self, i):
        return min(self.h.chunk_size, self.h.virtual_size - (i << self.h.chunk_shift))

    def _entries(self, b):
        h = self.h
        end = DATA_OFFSET + h.data_len
        entries = []
        prev_end = DATA_OFFSET
        for i, (word, length, crc) in enumerate(struct.iter_unpack("<QII", b)):
            offset, kind, flags = word & MAX_OFFSET, (word >> 48) & 0xFF, word >> 56
            if kind not in KIND_NAMES:
                raise corrupt(f"chunk {i}: unknown kind {kind}")
            if flags & ~(CHUNK_PARTLY_BAD | CHUNK_ALL_BAD):
                raise corrupt(f"chunk {i}: unknown flags {flags:#x}")
            clen = self.chunk_len(i)
            if kind == KIND_ZERO:
                if length or offset:
                    raise corrupt(f"chunk {i}: zero chunk with data ({length} bytes at {offset})")
            else:
                if kind == KIND_RAW and length != clen:
                    raise corrupt(f"chunk {i}: raw chunk of {length} bytes, the chunk has {clen}")
                if kind == KIND_COMPRESSED and not 0 < length <= clen:
                    raise corrupt(f"chunk {i}: compressed length {length} impossible for a "
                                  f"{clen}-byte chunk")
                if offset < DATA_OFFSET or offset + length > end:
                    raise corrupt(f"chunk {i}: data at {offset}..{offset + length} outside the "
                                  f"chunk data region {DATA_OFFSET}..{end}")
                if offset < prev_end:
                    raise corrupt(f"chunk {i}: data at {offset} overlaps or precedes the "
                                  f"previous chunk's (ending at {prev_end})")
                prev_end = offset + length
            entries.append((offset, length, crc, kind, flags))
        return entries

    def bad_in(self, start, length):
        """The extents meeting start..start+length, clipped to it, as (offset, length)."""
        end = start + length
        out = []
        # The extents are sorted and disjoint, so their ends ascend too.
        k = bisect.bisect_right(self.extent_ends, start)
        for (o, n, _) in self.extents[k:]:
            if o >= end:
                break
            a, b = max(o, start), min(o + n, end)
            out.append((a, b - a))
        return out

    def chunk(self, i, zstd):
        """Chunk i's bytes, decoded and checked against its CRC (bad bytes not zeroed)."""
        offset, length, crc, kind, _ = self.entries[i]
        clen = self.chunk_len(i)
        if kind == KIND_ZERO:
            return bytes(clen)
        stored = self.pread(length, offset)
        if kind == KIND_RAW:
            data = stored
        else:
            try:
                if self.h.codec == CODEC_LZ4:
                    data = lz4_block_decode(stored, clen)
                else:
                    zstd_frame_check(stored, clen)
                    data = zstd.decompress(stored, clen)
            except ValueError as e:
                raise self.damaged(i, str(e)) from None
            if len(data) != clen:
                raise self.damaged(i, f"decompressed to {len(data)} bytes, the chunk has {clen}")
        c = crc32c(data)
        if c != crc:
            raise self.damaged(i, f"checksum mismatch (stored {crc:08x}, computed {c:08x})")
        return data

    def damaged(self, i, what):
        start = i << self.h.chunk_shift
        return Problem("damaged chunk",
                       f"chunk {i} (bytes {start}..{start + self.chunk_len(i)}): {what}")

    def readable_chunks(self, zstd):
        """Yields (chunk start, chunk bytes with bad bytes zeroed, clipped bad extents)."""
        for i in range(self.h.chunk_count):
            start = i << self.h.chunk_shift
            data = self.chunk(i, zstd)
            bad = self.bad_in(start, len(data))
            if bad:
                data = bytearray(data)
                for (o, n) in bad:
                    data[o - start:o - start + n] = bytes(n)
            yield start, data, bad

    def check_flags(self, i, bad):
        clen = self.chunk_len(i)
        n = sum(length for (_, length) in bad)
        want = 0 if not bad else (CHUNK_PARTLY_BAD | CHUNK_ALL_BAD if n == clen else CHUNK_PARTLY_BAD)
        flags = self.entries[i][4]
        if flags != want:
            raise self.damaged(i, f"bad-sector flags {flags:#x} disagree with the bad extents "
                                  f"(want {want:#x})")


# --- Commands --------------------------------------------------------------------------

def decoder_for(img):
    """The zstd backend for a zstd image; LZ4 needs none."""
    return zstd_backend() if img.h.codec == CODEC_ZSTD else None


def cmd_check(path):
    img = Image(path)
    zstd = decoder_for(img)
    h = img.h
    b3 = shutil.which("b3sum")
    hasher = B3sum(b3) if b3 else None
    try:
        for i, (start, data, bad) in enumerate(img.readable_chunks(zstd)):
            img.check_flags(i, bad)
            if hasher:
                at = start
                for (o, n) in bad:
                    hasher.update(data[at - start:o - start])
                    at = o + n
                hasher.update(data[at - start:])
    except BaseException:
        if hasher:
            hasher.abandon()
        raise
    header_hex = h.blake3.hex()
    if img.meta["blake3"] != header_hex:
        raise corrupt(f"the metadata's blake3 {img.meta['blake3']} differs from the "
                      f"header's {header_hex}")
    if hasher:
        got = hasher.hexdigest()
        if got != header_hex:
            raise corrupt(f"hash mismatch: the readable data hashes to {got}, "
                          f"the image says {header_hex}")
        note = f"blake3 {got} checked with b3sum"
    else:
        note = "blake3 NOT checked: b3sum is not installed (Debian package b3sum)"
    print(f"{path}: valid ({h.chunk_count} chunks, {len(img.extents)} bad extents; "
          f"{f'zstd by {zstd.name}' if zstd else 'lz4'}; {note})")


def cmd_extract(path, out):
    img = Image(path)
    zstd = decoder_for(img)
    to_stdout = out == "-"
    f = sys.stdout.buffer if to_stdout else open(out, "wb")
    ok = False
    try:
        for (_, data, _) in img.readable_chunks(zstd):
            f.write(data)
        f.flush()
        ok = True
    finally:
        if not to_stdout:
            f.close()
            if not ok:
                os.unlink(out)


def cmd_extents(path):
    img = Image(path)
    for (offset, length, state) in img.extents:
        print(json.dumps({"offset": offset, "length": length, "state": state},
                         separators=(",", ":")))


def cmd_info(path):
    img = Image(path)
    h = img.h
    counts = {"total": h.chunk_count, "zero": 0, "raw": 0, "compressed": 0, "bad": 0,
              "all_bad": 0, "stored_bytes": 0}
    for (_, length, _, kind, flags) in img.entries:
        counts[KIND_NAMES[kind]] += 1
        counts["bad"] += bool(flags)
        counts["all_bad"] += bool(flags & CHUNK_ALL_BAD)
        counts["stored_bytes"] += length
    u = h.uuid.hex()
    print(json.dumps({
        "format_version": f"{VERSION_MAJOR}.{h.minor}",
        "codec": CODEC_NAMES[h.codec],
        "chunk_size": h.chunk_size,
        "virtual_size": h.virtual_size,
        "file_size": img.file_len,
        "uuid": f"{u[0:8]}-{u[8:12]}-{u[12:16]}-{u[16:20]}-{u[20:32]}",
        "chunks": counts,
        "bad_bytes": h.bad_bytes,
        "bad_extents": [{"offset": o, "length": n, "state": s} for (o, n, s) in img.extents],
        "metadata": img.meta,
    }, indent=2))


USAGE = """usage: img_reader.py check IMAGE
       img_reader.py extract IMAGE OUT
       img_reader.py extents IMAGE
       img_reader.py info IMAGE"""


def main(argv):
    commands = {"check": (cmd_check, 1), "extract": (cmd_extract, 2),
                "extents": (cmd_extents, 1), "info": (cmd_info, 1)}
    if len(argv) < 2 or argv[1] not in commands or len(argv) - 2 != commands[argv[1]][1]:
        print(USAGE, file=sys.stderr)
        return 2
    fn, _ = commands[argv[1]]
    image = argv[2]
    try:
        fn(*argv[2:])
    except Problem as e:
        print(f"{image}: {e}", file=sys.stderr)
        return 1
    except Missing as e:
        print(f"img_reader.py: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{image}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
