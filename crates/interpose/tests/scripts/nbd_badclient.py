#!/usr/bin/env python3
"""Misbehaving NBD clients against a running `interpose blk serve`, written from the NBD
protocol (NetworkBlockDevice doc/proto.md) with raw sockets: no libnbd in the clients
that misbehave. After every case a well-behaved client (libnbd's Python binding, a real
client written elsewhere) connects and checks that reads still return the right bytes.

    nbd_badclient.py SOCKET RAW GOOD BIG FUZZ_CONNECTIONS [CASE...]

SOCKET  the server's Unix socket
RAW     a file whose bytes the export GOOD serves (GOOD has no bad sectors)
GOOD    name of that export
BIG     name of an export of at least 40 MiB (for reads longer than the maximum block
        size and for 32 MiB replies the client does not read)
FUZZ_CONNECTIONS  how many connections `random_garbage` makes
CASE    run only these cases (default: all but those that stop the server, which run
        only when named: they need NBD_SERVER_PID)

Every case runs even when an earlier one failed. Standard output: one line per case
(`ok NAME` or `FAIL NAME: why`), then `dropped N`: how many connections of the cases
run broke the protocol so that the server had to hang up on them (the caller checks
the server warned about at least that many; clients that merely vanish are not
counted). Exit status 0 if every case passed, 1 if not.
"""

import os
import random
import socket
import struct
import sys
import time
import traceback

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME, OPT_ABORT, OPT_LIST, OPT_STARTTLS = 1, 2, 3, 5
OPT_INFO, OPT_GO, OPT_STRUCTURED_REPLY = 6, 7, 8
OPT_LIST_META_CONTEXT, OPT_SET_META_CONTEXT = 9, 10

REP_ACK, REP_SERVER, REP_INFO, REP_META_CONTEXT = 1, 2, 3, 4
REP_ERR = 1 << 31
REP_ERR_UNSUP = REP_ERR + 1
REP_ERR_POLICY = REP_ERR + 2
REP_ERR_INVALID = REP_ERR + 3
REP_ERR_UNKNOWN = REP_ERR + 6
REP_ERR_TOO_BIG = REP_ERR + 9
INFO_EXPORT = 0

TFLAG_HAS_FLAGS, TFLAG_READ_ONLY = 1, 2

CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM = 0, 1, 2, 3, 4
CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 5, 6, 7
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE, CMD_FLAG_DF, CMD_FLAG_REQ_ONE = 1, 1 << 1, 1 << 2, 1 << 3

REPLY_FLAG_DONE = 1
REPLY_TYPE_NONE, REPLY_TYPE_OFFSET_DATA, REPLY_TYPE_OFFSET_HOLE = 0, 1, 2
REPLY_TYPE_BLOCK_STATUS = 5
REPLY_TYPE_ERROR, REPLY_TYPE_ERROR_OFFSET = (1 << 15) + 1, (1 << 15) + 2

EPERM, EIO, EINVAL = 1, 5, 22

TIMEOUT = 10.0

SOCKET, RAW_PATH, GOOD, BIG = sys.argv[1:5]
FUZZ = int(sys.argv[5])
ONLY = set(sys.argv[6:])
RAW = open(RAW_PATH, "rb").read()


class Closed(Exception):
    """The server closed the connection."""


def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(TIMEOUT)
    s.connect(SOCKET)
    return s


def rx(s, n):
    b = bytearray()
    while len(b) < n:
        try:
            c = s.recv(min(n - len(b), 1 << 20))
        except ConnectionResetError:
            c = b""
        if not c:
            raise Closed(f"connection closed after {len(b)} of {n} bytes")
        b += c
    return bytes(b)


def send(s, data):
    """Sends what the server takes; a server that hung up is not an error here."""
    try:
        s.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass


def expect_closed(s, what):
    """The server must hang up (soon); whatever it sends first is returned."""
    got = bytearray()
    deadline = time.monotonic() + TIMEOUT
    while True:
        try:
            c = s.recv(65536)
        except ConnectionResetError:
            c = b""
        except socket.timeout:
            c = None
        if not c:
            if c is None or time.monotonic() > deadline:
                raise AssertionError(f"{what}: the server kept the connection open")
            return bytes(got)
        got += c


def greeting(s):
    magic, opt, flags = struct.unpack(">QQH", rx(s, 18))
    assert magic == NBDMAGIC and opt == IHAVEOPT, f"greeting {magic:#x} {opt:#x}"
    assert flags & FLAG_FIXED_NEWSTYLE, f"handshake flags {flags:#x}: not fixed newstyle"
    return flags


def hello(s, client_flags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
    greeting(s)
    send(s, struct.pack(">I", client_flags))


def option(s, opt, data=b""):
    send(s, struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)


def reply(s, opt):
    magic, ropt, typ, n = struct.unpack(">QIII", rx(s, 20))
    assert magic == OPT_REPLY_MAGIC, f"option reply magic {magic:#x}"
    assert ropt == opt, f"reply to option {ropt}, expected {opt}"
    return typ, rx(s, n)


def replies(s, opt):
    """All replies to one option, up to its final one (ACK or an error)."""
    out = []
    while True:
        typ, data = reply(s, opt)
        out.append((typ, data))
        if typ == REP_ACK or typ & REP_ERR:
            return out


def final(s, opt):
    return replies(s, opt)[-1][0]


def name_data(name, infos=()):
    n = name.encode()
    return struct.pack(">I", len(n)) + n + struct.pack(">H", len(infos)) + b"".join(
        struct.pack(">H", i) for i in infos
    )


def meta_data(name, queries):
    n = name.encode()
    d = struct.pack(">I", len(n)) + n + struct.pack(">I", len(queries))
    for q in queries:
        d += struct.pack(">I", len(q)) + q.encode()
    return d


def go(s, name, structured=True):
    """NBD_OPT_GO (after STRUCTURED_REPLY if asked): the export's size and flags."""
    if structured:
        option(s, OPT_STRUCTURED_REPLY)
        assert final(s, OPT_STRUCTURED_REPLY) == REP_ACK, "STRUCTURED_REPLY refused"
    option(s, OPT_GO, name_data(name))
    size = tflags = None
    for typ, data in replies(s, OPT_GO):
        if typ == REP_INFO and struct.unpack(">H", data[:2])[0] == INFO_EXPORT:
            assert len(data) == 12, f"NBD_INFO_EXPORT of {len(data)} bytes"
            size, tflags = struct.unpack(">QH", data[2:12])
        elif typ not in (REP_INFO, REP_ACK):
            raise AssertionError(f"NBD_OPT_GO {name!r}: reply {typ:#x} {data!r}")
    assert size is not None, "NBD_OPT_GO succeeded without NBD_INFO_EXPORT"
    return size, tflags


def session(name=None, structured=True):
    s = connect()
    hello(s)
    go(s, name or GOOD, structured)
    return s


def request(s, typ, offset, length, flags=0, cookie=1, payload=b""):
    send(s, struct.pack(">IHHQQI", REQUEST_MAGIC, flags, typ, cookie, offset, length) + payload)


def simple_reply(s, cookie, length):
    """(error, data) of a simple reply; data is read only on success."""
    magic, err, c = struct.unpack(">IIQ", rx(s, 16))
    assert magic == SIMPLE_REPLY_MAGIC, f"simple reply magic {magic:#x}"
    assert c == cookie, f"cookie {c}, expected {cookie}"
    return err, (rx(s, length) if err == 0 else b"")


def structured_reply(s, cookie):
    """The chunks of one structured reply: [(type, payload)], up to the DONE flag."""
    chunks = []
    while True:
        magic, flags, typ, c, n = struct.unpack(">IHHQI", rx(s, 20))
        assert magic == STRUCTURED_REPLY_MAGIC, f"structured reply magic {magic:#x}"
        assert c == cookie, f"cookie {c}, expected {cookie}"
        chunks.append((typ, rx(s, n)))
        if flags & REPLY_FLAG_DONE:
            return chunks


def error_of(chunks):
    """The error number of the first error chunk, or 0."""
    for typ, p in chunks:
        if typ & 0x8000:
            return struct.unpack(">I", p[:4])[0]
    return 0


def data_of(chunks, offset, length):
    buf = bytearray(length)
    covered = 0
    for typ, p in chunks:
        if typ == REPLY_TYPE_OFFSET_DATA:
            o = struct.unpack(">Q", p[:8])[0]
            buf[o - offset : o - offset + len(p) - 8] = p[8:]
            covered += len(p) - 8
        elif typ == REPLY_TYPE_OFFSET_HOLE:
            covered += struct.unpack(">QI", p)[1]
    assert covered == length, f"chunks cover {covered} of {length} bytes"
    return bytes(buf)


def check_read(s, structured, offset=4096, length=8192, cookie=77):
    """A read on an open session returns the right bytes: the session is in step."""
    request(s, CMD_READ, offset, length, cookie=cookie)
    if structured:
        chunks = structured_reply(s, cookie)
        assert error_of(chunks) == 0, f"read failed: {chunks}"
        got = data_of(chunks, offset, length)
    else:
        err, got = simple_reply(s, cookie, length)
        assert err == 0, f"read failed with {err}"
    assert got == RAW[offset : offset + length], "read returned wrong bytes"


def expect_error(s, structured, typ, offset, length, want, flags=0, payload=b"", what=""):
    cookie = random.getrandbits(63)
    request(s, typ, offset, length, flags, cookie, payload)
    if structured:
        err = error_of(structured_reply(s, cookie))
    else:
        err, _ = simple_reply(s, cookie, 0)
    assert err == want, f"{what or (typ, offset, length, flags)}: error {err}, expected {want}"


# --- The well-behaved client -------------------------------------------------------

_good_rng = random.Random(5)


def good_client():
    """libnbd connects, and random reads of the bad-free export match RAW."""
    import nbd

    h = nbd.NBD()
    h.set_export_name(GOOD)
    h.connect_unix(SOCKET)
    for _ in range(3):
        n = _good_rng.choice([512, 4096, 65536])
        off = _good_rng.randrange(0, len(RAW) - n + 1, 512)
        got = h.pread(n, off)
        assert got == RAW[off : off + n], f"good client: wrong bytes at {off}+{n}"
    h.shutdown()


# --- The cases ---------------------------------------------------------------------

CASES = []
DROPPED = 0


def case(dropped=0, stops_server=False):
    """Registers a case; `dropped` is how many of its connections the server must drop.
    A case that stops the server runs only when named."""

    def register(f):
        CASES.append((f.__name__, f, dropped, stops_server))
        return f

    return register


@case(dropped=1)
def garbage_instead_of_client_flags():
    s = connect()
    greeting(s)
    send(s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    expect_closed(s, "HTTP request as client flags")


@case(dropped=1)
def unknown_client_flags():
    s = connect()
    hello(s, FLAG_FIXED_NEWSTYLE | (1 << 5))
    option(s, OPT_GO, name_data(GOOD))
    got = expect_closed(s, "unknown client flag bit 5")
    assert not got, f"the server answered an option after unknown client flags: {got!r}"


@case()
def plain_newstyle_client_with_export_name():
    # No client flags at all: NBD_OPT_EXPORT_NAME, then the 124 zero bytes.
    s = connect()
    hello(s, 0)
    option(s, OPT_EXPORT_NAME, GOOD.encode())
    size, tflags = struct.unpack(">QH", rx(s, 10))
    assert size == len(RAW), f"size {size}"
    assert tflags & TFLAG_HAS_FLAGS and tflags & TFLAG_READ_ONLY, f"flags {tflags:#x}"
    assert rx(s, 124) == bytes(124), "no 124 zero bytes without NBD_FLAG_C_NO_ZEROES"
    check_read(s, structured=False)


@case()
def export_name_with_no_zeroes():
    s = connect()
    hello(s)
    option(s, OPT_EXPORT_NAME, GOOD.encode())
    size, _ = struct.unpack(">QH", rx(s, 10))
    assert size == len(RAW)
    check_read(s, structured=False)  # fails if the 124 zeroes came anyway
    # The empty name is the default export.
    s = connect()
    hello(s)
    option(s, OPT_EXPORT_NAME, b"")
    size, tflags = struct.unpack(">QH", rx(s, 10))
    assert size > 0 and tflags & TFLAG_HAS_FLAGS, (size, tflags)


@case()
def go_sends_no_padding_even_without_no_zeroes():
    # proto.md, NBD_OPT_GO: "The server MUST NOT send any zero padding bytes after the
    # NBD_REP_ACK data, whether or not the client negotiated NBD_FLAG_C_NO_ZEROES."
    s = connect()
    hello(s, FLAG_FIXED_NEWSTYLE)
    go(s, GOOD)
    check_read(s, structured=True)


@case(dropped=1)
def wrong_option_magic():
    s = connect()
    hello(s)
    send(s, struct.pack(">QII", IHAVEOPT ^ 1, OPT_GO, 0))
    got = expect_closed(s, "option with a wrong magic")
    assert not got, f"the server answered an option with a wrong magic: {got!r}"


@case()
def option_with_a_huge_length():
    # The server reads past an option it will not keep in memory; this client sends 4 KiB
    # of the 4 GiB it announced and stops sending: the server must hang up, answering
    # nothing but (possibly) an error.
    s = connect()
    hello(s)
    send(s, struct.pack(">QII", IHAVEOPT, OPT_GO, 0xFFFFFFF0) + b"\0" * 4096)
    s.shutdown(socket.SHUT_WR)
    got = expect_closed(s, "option of 0xFFFFFFF0 bytes")
    if got:
        _, _, typ, _ = struct.unpack(">QIII", got[:20])
        assert typ & REP_ERR, f"option of 0xFFFFFFF0 bytes answered with {typ:#x}"


@case()
def options_too_long_to_keep_are_read_past_and_refused():
    # proto.md: an option the server does not implement gets NBD_REP_ERR_UNSUP and the
    # next one is parsed; one it implements but will not take that long, ERR_TOO_BIG.
    s = connect()
    hello(s)
    option(s, 999, b"\xab" * 100_000)
    assert final(s, 999) == REP_ERR_UNSUP, "unknown option of 100,000 bytes"
    infos = struct.pack(">H", 40_000) + struct.pack(">H", 77) * 40_000
    option(s, OPT_INFO, name_data(GOOD)[:-2] + infos)
    assert final(s, OPT_INFO) == REP_ERR_TOO_BIG, "NBD_OPT_INFO of 40,000 info requests"
    option(s, OPT_LIST)
    assert replies(s, OPT_LIST)[-1][0] == REP_ACK, "NBD_OPT_LIST afterwards"
    go(s, GOOD)
    check_read(s, structured=True)


@case(dropped=1)
def a_handshake_that_drips_is_cut_at_its_deadline():
    # One byte now and then must not keep a connection in the handshake for ever (the
    # server under test has a 3-second handshake deadline).
    s = connect()
    hello(s)
    started = time.monotonic()
    head = struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)
    for b in head[:-1]:
        try:
            s.sendall(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            break
        time.sleep(0.5)  # the dripping client's own pace, not synchronisation
    got = expect_closed(s, "a dripping handshake")
    assert not got, f"the server answered a dripping client: {got!r}"
    took = time.monotonic() - started
    assert took < 9, f"the dripping client was cut after {took:.1f} s"


@case(stops_server=True)
def in_flight_reads_are_answered_when_the_server_stops():
    # proto.md: "On a server shutdown, the server SHOULD wait for inflight requests to be
    # serviced prior to initiating a hard disconnect." 40 reads of 1 MiB in flight; the
    # server is stopped (SIGTERM) after the first reply, when the rest cannot all have
    # left (the socket holds far less): every reply must still arrive whole.
    n = min(1 << 20, len(RAW))
    s = session(GOOD)
    for cookie in range(1, 41):
        request(s, CMD_READ, 0, n, cookie=cookie)
    pending = {c: [] for c in range(1, 41)}  # replies come in any order
    while pending:
        magic, flags, typ, c, length = struct.unpack(">IHHQI", rx(s, 20))
        assert magic == STRUCTURED_REPLY_MAGIC and c in pending, f"chunk of cookie {c}"
        pending[c].append((typ, rx(s, length)))
        if flags & REPLY_FLAG_DONE:
            chunks = pending.pop(c)
            assert error_of(chunks) == 0, f"read {c}: {chunks}"
            assert data_of(chunks, 0, n) == RAW[:n], f"read {c}: wrong bytes"
            if len(pending) == 39:
                os.kill(int(os.environ["NBD_SERVER_PID"]), 15)
    expect_closed(s, "after the server answered what was in flight")


@case()
def half_an_option_then_close():
    s = connect()
    hello(s)
    send(s, struct.pack(">QI", IHAVEOPT, OPT_GO)[:10])
    s.close()
    s = connect()
    hello(s)
    send(s, struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0" * 50)
    s.close()


@case()
def unknown_options_get_unsup_and_the_handshake_goes_on():
    s = connect()
    hello(s)
    for opt, data in [
        (0, b""),
        (4, b"x" * 10),  # NBD_OPT_PEEK_EXPORT: withdrawn
        (0x1234, b"\0" * 300),
        (0x7FFFFFFF, b""),
        (0xFFFFFFFF, b"abc"),
    ]:
        option(s, opt, data)
        typ, _ = reply(s, opt)
        assert typ == REP_ERR_UNSUP, f"option {opt:#x}: reply {typ:#x}, not NBD_REP_ERR_UNSUP"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def starttls_is_refused_and_the_handshake_goes_on():
    s = connect()
    hello(s)
    option(s, OPT_STARTTLS)
    typ = final(s, OPT_STARTTLS)
    assert typ in (REP_ERR_UNSUP, REP_ERR_POLICY), f"STARTTLS: reply {typ:#x}"
    option(s, OPT_STARTTLS, b"data")
    typ = final(s, OPT_STARTTLS)
    assert typ & REP_ERR, f"STARTTLS with data: reply {typ:#x}"
    go(s, GOOD)
    check_read(s, structured=True)


@case(dropped=1)
def export_name_of_an_unknown_export():
    s = connect()
    hello(s)
    option(s, OPT_EXPORT_NAME, b"no-such-export")
    got = expect_closed(s, "NBD_OPT_EXPORT_NAME of an unknown export")
    assert not got, f"the server answered NBD_OPT_EXPORT_NAME of an unknown export: {got!r}"


@case()
def go_to_an_unknown_export_errs_and_the_handshake_goes_on():
    s = connect()
    hello(s)
    option(s, OPT_GO, name_data("no-such-export"))
    typ = final(s, OPT_GO)
    assert typ == REP_ERR_UNKNOWN, f"GO to an unknown export: reply {typ:#x}"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def go_with_a_malformed_payload_gets_err_invalid():
    s = connect()
    hello(s)
    n = GOOD.encode()
    for what, data in [
        ("name longer than the payload", struct.pack(">I", 100) + n + struct.pack(">H", 0)),
        ("no information count", struct.pack(">I", len(n)) + n),
        ("3 information requests, 1 sent", struct.pack(">I", len(n)) + n + struct.pack(">HH", 3, 0)),
        ("trailing bytes", name_data(GOOD) + b"zz"),
        ("empty payload", b""),
        ("name length 0xFFFFFFFF", struct.pack(">IH", 0xFFFFFFFF, 0)),
    ]:
        for opt in (OPT_INFO, OPT_GO):
            option(s, opt, data)
            r = replies(s, opt)
            assert r[-1][0] == REP_ERR_INVALID, f"{opt} with {what}: replies {r}"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def info_then_go():
    s = connect()
    hello(s)
    option(s, OPT_INFO, name_data(GOOD, [0, 1, 2, 3]))
    r = replies(s, OPT_INFO)
    assert r[-1][0] == REP_ACK, f"INFO: {r}"
    infos = {struct.unpack(">H", d[:2])[0]: d[2:] for t, d in r if t == REP_INFO}
    assert 0 in infos and struct.unpack(">QH", infos[0])[0] == len(RAW), f"INFO: {infos}"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def list_with_data_gets_err_invalid_and_list_works():
    s = connect()
    hello(s)
    option(s, OPT_LIST, b"\0\0\0\0")
    typ = final(s, OPT_LIST)
    assert typ == REP_ERR_INVALID, f"LIST with data: reply {typ:#x}"
    option(s, OPT_LIST)
    r = replies(s, OPT_LIST)
    assert r[-1][0] == REP_ACK, f"LIST: {r}"
    names = []
    for typ, d in r[:-1]:
        assert typ == REP_SERVER, f"LIST: reply {typ:#x}"
        n = struct.unpack(">I", d[:4])[0]
        names.append(d[4 : 4 + n].decode())
    assert GOOD in names and BIG in names, f"LIST: {names}"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def set_meta_context_before_structured_replies_gets_err_invalid():
    s = connect()
    hello(s)
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["base:allocation"]))
    r = replies(s, OPT_SET_META_CONTEXT)
    assert r == [(REP_ERR_INVALID, r[-1][1])], f"SET_META_CONTEXT first: {r}"
    option(s, OPT_STRUCTURED_REPLY)
    assert final(s, OPT_STRUCTURED_REPLY) == REP_ACK
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["base:allocation"]))
    r = replies(s, OPT_SET_META_CONTEXT)
    assert [t for t, _ in r] == [REP_META_CONTEXT, REP_ACK], f"SET_META_CONTEXT: {r}"
    ctx = struct.unpack(">I", r[0][1][:4])[0]
    assert r[0][1][4:] == b"base:allocation", r
    go(s, GOOD, structured=False)  # already negotiated
    request(s, CMD_BLOCK_STATUS, 0, 65536, cookie=9)
    chunks = structured_reply(s, 9)
    assert error_of(chunks) == 0, chunks
    st = [p for t, p in chunks if t == REPLY_TYPE_BLOCK_STATUS]
    assert len(st) == 1 and struct.unpack(">I", st[0][:4])[0] == ctx, chunks
    check_read(s, structured=True)


@case()
def set_meta_context_selects_exact_names_and_block_status_answers_each_once():
    s = connect()
    hello(s)
    option(s, OPT_STRUCTURED_REPLY, b"x")
    assert final(s, OPT_STRUCTURED_REPLY) == REP_ERR_INVALID, "STRUCTURED_REPLY with data"
    option(s, OPT_STRUCTURED_REPLY)
    assert final(s, OPT_STRUCTURED_REPLY) == REP_ACK
    # proto.md: "`base:` - the server MUST ignore this form during
    # NBD_OPT_SET_META_CONTEXT"; unknown leaf names and namespaces are ignored too.
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["base:", "base:nope", "x-foo:bar", "x-interpose:"]))
    r = replies(s, OPT_SET_META_CONTEXT)
    assert [t for t, _ in r] == [REP_ACK], f"SET_META_CONTEXT of no real context: {r}"
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["x-interpose:bad", "base:allocation"]))
    r = replies(s, OPT_SET_META_CONTEXT)
    assert [t for t, _ in r] == [REP_META_CONTEXT, REP_META_CONTEXT, REP_ACK], r
    ids = {struct.unpack(">I", d[:4])[0]: d[4:].decode() for t, d in r[:-1]}
    assert len(ids) == 2 and set(ids.values()) == {"x-interpose:bad", "base:allocation"}, ids
    go(s, GOOD, structured=False)
    request(s, CMD_BLOCK_STATUS, 65536, 1 << 20, cookie=4)
    chunks = structured_reply(s, 4)
    got = sorted(struct.unpack(">I", p[:4])[0] for t, p in chunks if t == REPLY_TYPE_BLOCK_STATUS)
    assert got == sorted(ids), f"block status chunks for contexts {got}, negotiated {ids}"
    for t, p in chunks:
        if t == REPLY_TYPE_BLOCK_STATUS:
            assert (len(p) - 4) % 8 == 0 and len(p) > 4, p
            total = sum(struct.unpack(">I", p[i : i + 4])[0] for i in range(4, len(p), 8))
            assert 0 < total, p
    check_read(s, True)


@case()
def a_failed_set_meta_context_still_replaces_the_contexts():
    # proto.md, NBD_OPT_SET_META_CONTEXT: "Issuing this command replaces all
    # previously-set metadata contexts (including when this command fails)"; and
    # "Servers SHOULD reply with NBD_EINVAL to clients sending NBD_CMD_BLOCK_STATUS
    # without selecting at least one metadata context."
    s = connect()
    hello(s)
    option(s, OPT_STRUCTURED_REPLY)
    assert final(s, OPT_STRUCTURED_REPLY) == REP_ACK
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["base:allocation"]))
    assert [t for t, _ in replies(s, OPT_SET_META_CONTEXT)] == [REP_META_CONTEXT, REP_ACK]
    option(s, OPT_SET_META_CONTEXT, meta_data(GOOD, ["base:allocation"])[:-3])  # truncated
    assert final(s, OPT_SET_META_CONTEXT) == REP_ERR_INVALID, "truncated SET_META_CONTEXT"
    go(s, GOOD, structured=False)
    expect_error(s, True, CMD_BLOCK_STATUS, 0, 4096, EINVAL, what="block status after a failed SET_META_CONTEXT")
    check_read(s, True)


@case()
def list_meta_context_by_namespace():
    s = connect()
    hello(s)
    option(s, OPT_STRUCTURED_REPLY)
    assert final(s, OPT_STRUCTURED_REPLY) == REP_ACK
    for queries, want in [
        ([], {"base:allocation", "x-interpose:bad"}),
        (["base:"], {"base:allocation"}),
        (["x-unknown:thing"], set()),
    ]:
        option(s, OPT_LIST_META_CONTEXT, meta_data(GOOD, queries))
        r = replies(s, OPT_LIST_META_CONTEXT)
        assert r[-1][0] == REP_ACK, f"LIST_META_CONTEXT {queries}: {r}"
        got = {d[4:].decode() for t, d in r[:-1]}
        assert got == want, f"LIST_META_CONTEXT {queries}: {got}, expected {want}"
        # proto.md: the context ID of a LIST reply is reserved and SHOULD be zero.
        ids = [d[:4] for t, d in r[:-1]]
        assert all(i == b"\0\0\0\0" for i in ids), f"LIST_META_CONTEXT ids {ids}"
    go(s, GOOD)
    check_read(s, structured=True)


@case()
def abort_is_acknowledged():
    s = connect()
    hello(s)
    option(s, OPT_ABORT)
    typ, _ = reply(s, OPT_ABORT)
    assert typ == REP_ACK, f"ABORT: reply {typ:#x}"
    expect_closed(s, "after NBD_OPT_ABORT")


@case()
def abort_with_data_too_long_to_keep_is_acknowledged():
    # proto.md, NBD_OPT_ABORT: the server "MUST reply with NBD_REP_ACK" and "SHOULD ignore
    # any data sent by the client" (it used to answer 64 KiB or more with ERR_TOO_BIG).
    s = connect()
    hello(s)
    option(s, OPT_ABORT, bytes(70_000))
    typ, _ = reply(s, OPT_ABORT)
    assert typ == REP_ACK, f"ABORT with 70,000 bytes of data: reply {typ:#x}"
    expect_closed(s, "after NBD_OPT_ABORT with data")


@case(dropped=1)
def export_name_too_long_to_keep_closes_without_a_reply():
    # NBD_OPT_EXPORT_NAME has no option reply: a server that will not take it "MUST
    # terminate the session". An option reply here (it used to send ERR_TOO_BIG) reads
    # as an export size and flags to the client.
    s = connect()
    hello(s)
    option(s, OPT_EXPORT_NAME, b"a" * 70_000)
    got = expect_closed(s, "NBD_OPT_EXPORT_NAME of 70,000 bytes")
    assert not got, f"bytes after an EXPORT_NAME the server would not take: {bytes(got[:20]).hex()}"


@case(dropped=1)
def a_handshake_whose_replies_are_not_read_is_cut_at_its_deadline():
    # A client that sends options and never reads the replies must not hold the
    # connection past the handshake deadline (3 s for the server under test): the
    # server's writes end by it too (they used to wait for ever).
    s = connect()
    hello(s)
    s.settimeout(0.5)
    lst = struct.pack(">QII", IHAVEOPT, OPT_LIST, 0)
    sent = 0
    try:
        while sent < 200_000:
            s.sendall(lst)
            sent += 1
    except socket.timeout:
        pass  # the server stopped reading: its replies fill both socket buffers
    assert sent < 200_000, "the server read 200,000 options without its replies being read"
    time.sleep(5)  # this client's behaviour (reading nothing past the deadline), not a wait for an event
    # The server must have given up on its write and closed: a send now fails at once.
    # (A server still blocked writing its reply leaves the send waiting.)
    s.settimeout(2)
    try:
        s.sendall(lst)
        raise AssertionError("the connection is still open 5 s after the handshake deadline")
    except socket.timeout:
        raise AssertionError("the server still holds the connection 5 s after the deadline") from None
    except (BrokenPipeError, ConnectionResetError):
        pass


@case(dropped=1)
def request_with_a_wrong_magic():
    s = session()
    send(s, struct.pack(">IHHQQI", REQUEST_MAGIC ^ 0x100, 0, CMD_READ, 1, 0, 512))
    got = expect_closed(s, "request with a wrong magic")
    assert not got, f"the server answered a request with a wrong magic: {got!r}"


@case()
def read_of_length_0xffffffff_gets_einval():
    for structured in (True, False):
        s = session(structured=structured)
        expect_error(s, structured, CMD_READ, 0, 0xFFFFFFFF, EINVAL, what="read of 0xFFFFFFFF bytes")
        check_read(s, structured)


@case()
def reads_past_the_end_get_einval():
    size = len(RAW)
    for structured in (True, False):
        s = session(structured=structured)
        for off, n in [(size, 512), (size - 512, 1024), (1 << 40, 512), ((1 << 64) - 512, 1024)]:
            expect_error(s, structured, CMD_READ, off, n, EINVAL, what=f"read {off}+{n}")
            expect_error(s, structured, CMD_CACHE, off, n, EINVAL, what=f"cache {off}+{n}")
        check_read(s, structured)


@case()
def a_read_longer_than_the_maximum_block_size_gets_einval():
    s = session(BIG)
    expect_error(s, True, CMD_READ, 0, (32 << 20) + 512, EINVAL, what="read of 32 MiB + 512")
    request(s, CMD_READ, 0, 4096, cookie=3)
    assert error_of(structured_reply(s, 3)) == 0


@case()
def a_cache_longer_than_the_maximum_block_size_gets_einval():
    s = session(BIG)
    expect_error(s, True, CMD_CACHE, 0, (32 << 20) + 512, EINVAL, what="cache of 32 MiB + 512")
    request(s, CMD_READ, 0, 4096, cookie=3)
    assert error_of(structured_reply(s, 3)) == 0


@case()
def unknown_commands_get_einval():
    for structured in (True, False):
        s = session(structured=structured)
        for typ in (8, 42, 0xFFFF):
            expect_error(s, structured, typ, 0, 512, EINVAL, what=f"command {typ}")
        check_read(s, structured)


@case()
def unknown_command_flags_get_einval():
    for structured in (True, False):
        s = session(structured=structured)
        for flag in (1 << 7, 1 << 12, 1 << 15):
            expect_error(s, structured, CMD_READ, 0, 512, EINVAL, flags=flag, what=f"read with flag {flag:#x}")
        check_read(s, structured)
    s = session(structured=False)
    expect_error(s, False, CMD_READ, 0, 512, EINVAL, flags=CMD_FLAG_DF, what="DF without structured replies")
    check_read(s, False)


@case()
def flags_of_other_commands_get_einval():
    # proto.md, Error values: "It also SHOULD return NBD_EINVAL if it receives a request
    # with a flag not explicitly documented as applicable to the given request."
    # NBD_CMD_CACHE: "if it advertised the command, the server MUST reject any command
    # flags it does not recognize". FUA is valid only "provided NBD_FLAG_SEND_FUA has
    # been negotiated", and this server does not advertise it.
    s = session()
    wrong = []
    for typ, cname, flag, fname in [
        (CMD_READ, "NBD_CMD_READ", CMD_FLAG_REQ_ONE, "NBD_CMD_FLAG_REQ_ONE"),
        (CMD_READ, "NBD_CMD_READ", CMD_FLAG_FUA, "NBD_CMD_FLAG_FUA (SEND_FUA not advertised)"),
        (CMD_READ, "NBD_CMD_READ", CMD_FLAG_NO_HOLE, "NBD_CMD_FLAG_NO_HOLE"),
        (CMD_CACHE, "NBD_CMD_CACHE", CMD_FLAG_DF, "NBD_CMD_FLAG_DF"),
        (CMD_CACHE, "NBD_CMD_CACHE", CMD_FLAG_REQ_ONE, "NBD_CMD_FLAG_REQ_ONE"),
        (CMD_FLUSH, "NBD_CMD_FLUSH", CMD_FLAG_DF, "NBD_CMD_FLAG_DF"),
    ]:
        off, n = (0, 0) if typ == CMD_FLUSH else (0, 512)
        try:
            expect_error(s, True, typ, off, n, EINVAL, flags=flag, what=f"{cname} with {fname}")
        except AssertionError as e:
            wrong.append(str(e))
    check_read(s, True)
    assert not wrong, "; ".join(wrong)


@case()
def writes_get_eperm_and_the_session_stays_in_step():
    for structured in (True, False):
        s = session(structured=structured)
        expect_error(s, structured, CMD_WRITE, 0, 4096, EPERM, payload=os.urandom(4096), what="write")
        check_read(s, structured)
        expect_error(s, structured, CMD_WRITE, 4096, 1 << 20, EPERM, payload=bytes(1 << 20), what="1 MiB write")
        expect_error(s, structured, CMD_TRIM, 0, 4096, EPERM, what="trim")
        expect_error(s, structured, CMD_WRITE_ZEROES, 0, 4096, EPERM, what="write zeroes")
        check_read(s, structured, offset=0, length=65536)


@case()
def writing_commands_with_invalid_flags_get_einval():
    # Error values: EINVAL for "a flag not explicitly documented as applicable"; FAST_ZERO
    # without NBD_FLAG_SEND_FAST_ZERO "SHOULD fail with NBD_EINVAL". Valid flags get
    # EPERM, as any write to a read-only export (they all used to get EPERM).
    for structured in (True, False):
        s = session(structured=structured)
        for typ, flag, errno, what in [
            (CMD_WRITE, 1 << 15, EINVAL, "write with flag 0x8000"),
            (CMD_WRITE, CMD_FLAG_DF, EINVAL, "write with DF"),
            (CMD_TRIM, CMD_FLAG_REQ_ONE, EINVAL, "trim with REQ_ONE"),
            (CMD_WRITE_ZEROES, 1 << 4, EINVAL, "write zeroes with FAST_ZERO"),
            (CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, EPERM, "write zeroes with NO_HOLE"),
            (CMD_WRITE, CMD_FLAG_FUA, EPERM, "write with FUA"),
        ]:
            payload = bytes(4096) if typ == CMD_WRITE else b""
            expect_error(s, structured, typ, 0, 4096, errno, flags=flag, payload=payload, what=what)
        check_read(s, structured)


@case()
def block_status_without_contexts_gets_einval():
    s = session()
    expect_error(s, True, CMD_BLOCK_STATUS, 0, 4096, EINVAL, what="block status without contexts")
    check_read(s, True)


@case()
def zero_lengths_do_not_disconnect():
    # proto.md: for a length of 0 "the behavior of a server on such a request is
    # unspecified although the server SHOULD NOT disconnect".
    for structured in (True, False):
        s = session(structured=structured)
        request(s, CMD_READ, 4096, 0, cookie=8)
        if structured:
            structured_reply(s, 8)
        else:
            simple_reply(s, 8, 0)
        expect_error(s, structured, CMD_WRITE, 0, 0, EPERM, what="write of 0 bytes")
        check_read(s, structured)


@case()
def disc_closes_the_connection():
    s = session()
    check_read(s, True)
    request(s, CMD_DISC, 0, 0)
    got = expect_closed(s, "after NBD_CMD_DISC")
    assert not got, f"a reply to NBD_CMD_DISC: {got!r}"


@case(dropped=1)
def a_write_announcing_4_gib():
    s = session()
    request(s, CMD_WRITE, 0, 0xFFFFFFFF, payload=b"\0" * 65536)
    s.shutdown(socket.SHUT_WR)
    expect_closed(s, "write of 0xFFFFFFFF bytes")


@case()
def half_a_request_then_close():
    s = session()
    send(s, struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:14])
    s.close()
    s = session()
    request(s, CMD_WRITE, 0, 4096, payload=b"\0" * 100)
    s.close()


@case()
def closing_in_the_middle_of_a_32_mib_reply():
    for structured in (True, False):
        s = session(BIG, structured=structured)
        # The export is sparse: with structured replies only DF (one content chunk)
        # makes the reply 32 MiB instead of a hole chunk.
        request(s, CMD_READ, 0, 32 << 20, flags=CMD_FLAG_DF if structured else 0, cookie=5)
        rx(s, 4096)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # with RST: the server's writes fail at once


@case()
def random_garbage():
    rng = random.Random(20250601)
    for i in range(FUZZ):
        kind = rng.randrange(5)
        s = connect()
        try:
            if kind == 0:  # garbage right after the greeting
                greeting(s)
                send(s, rng.randbytes(rng.randrange(1, 200)))
            elif kind == 1:  # valid flags, then garbage options
                hello(s)
                send(s, rng.randbytes(rng.randrange(1, 300)))
            elif kind == 2:  # options with the right magic and random fields
                hello(s)
                for _ in range(rng.randrange(1, 6)):
                    opt = rng.choice([0, 1, 2, 3, 5, 6, 7, 8, 9, 10, 11, rng.getrandbits(32)])
                    data = rng.randbytes(rng.randrange(0, 64))
                    n = rng.choice([len(data), len(data), rng.getrandbits(32), rng.randrange(0, 80)])
                    send(s, struct.pack(">QII", IHAVEOPT, opt, n) + data)
            elif kind == 3:  # a session, then garbage requests
                hello(s)
                go(s, GOOD, structured=rng.random() < 0.5)
                send(s, rng.randbytes(rng.randrange(1, 200)))
            else:  # a session, then requests with the right magic and random fields
                hello(s)
                go(s, rng.choice([GOOD, BIG]), structured=rng.random() < 0.5)
                for _ in range(rng.randrange(1, 8)):
                    typ = rng.choice([0, 0, 1, 3, 4, 5, 6, 7, 9, rng.getrandbits(16)])
                    flags = rng.choice([0, 0, rng.getrandbits(16)])
                    off = rng.choice([0, rng.randrange(0, len(RAW)), rng.getrandbits(64)])
                    n = rng.choice([512, rng.randrange(0, 1 << 16), rng.getrandbits(32)])
                    payload = rng.randbytes(rng.randrange(0, 600)) if typ == 1 else b""
                    request(s, typ, off, n, flags, rng.getrandbits(64), payload)
            s.shutdown(socket.SHUT_WR)
            # Whatever the server makes of it, it must end the connection (it read EOF).
            deadline = time.monotonic() + TIMEOUT
            while True:
                try:
                    c = s.recv(1 << 20)
                except ConnectionResetError:
                    break
                except socket.timeout:
                    raise AssertionError(f"fuzz connection {i} (kind {kind}): not closed")
                if not c:
                    break
                assert time.monotonic() < deadline, f"fuzz connection {i}: not closed"
        except (Closed, BrokenPipeError, ConnectionResetError):
            pass
        finally:
            s.close()
        if i % 50 == 49:
            good_client()


def main():
    global DROPPED
    failed = 0
    unknown = ONLY - {name for name, _, _, _ in CASES}
    assert not unknown, f"no such cases: {unknown}"
    for name, f, dropped, stops_server in CASES:
        if (ONLY or stops_server) and name not in ONLY:
            continue
        try:
            f()
            if not stops_server:
                good_client()
            print(f"ok {name}", flush=True)
        except Exception as e:  # one case's failure must not hide the others'
            failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
            traceback.print_exc(file=sys.stderr)
            try:
                good_client()
            except Exception as e2:
                print(f"FAIL {name}: afterwards the well-behaved client failed: {e2}", flush=True)
        DROPPED += dropped
    print(f"dropped {DROPPED}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
