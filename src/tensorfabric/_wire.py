"""The wire format shared by every socket-based transport.

A frame is a fixed 48-byte header, an extension of ``ext_len`` bytes (key, segment table,
error text, handshake fields) and a payload of ``payload_len`` bytes that is received straight
into its destination. All integers are little-endian.
"""

from __future__ import annotations

import enum
import struct

import numpy as np

MAGIC = 0x7446  # "Ft"
HEADER = struct.Struct("<HBBIQQQQII")  # magic type flags ext_len op region payload imm chunk nchunks
HEADER_SIZE = HEADER.size
assert HEADER_SIZE == 48

MAX_EXT = 1 << 20  # a segment table of 64k pages, with room
MAX_PAYLOAD = 256 << 20  # largest single frame payload accepted
MAX_SEGMENTS = 1 << 16
MAX_MESSAGE = 64 << 20  # largest send/recv message

#: what a queued message costs against the receiver's inbox bound beyond its bytes (so that a
#: flood of empty messages is bounded too)
MESSAGE_OVERHEAD = 256


def charge(nbytes: int) -> int:
    """A message's cost against the inbox bound."""
    return nbytes + MESSAGE_OVERHEAD


SEG_DTYPE = np.dtype([("offset", "<u8"), ("length", "<u8")])
#: what every WRITE / SHM_DONE / READ_REQ ext starts with: the region key and the end (one past
#: the highest byte) of the whole op, so the owner refuses an op that reaches past its region
#: before its first chunk lands, whichever chunk arrives first
OP_HEAD = struct.Struct("<16sQ")


class Op(enum.IntEnum):
    WRITE = 1  # ext: OP_HEAD + segment table; payload: the segments' bytes, concatenated
    IMM = 2  # immediate only (barrier); imm in header
    ACK = 3  # reply to WRITE/IMM/SEND/SHM_DONE chunk; flags = Status; ext = error text
    READ_REQ = 4  # ext: OP_HEAD + one segment
    READ_RESP = 5  # payload: the bytes read; flags = Status; ext = error text
    SEND = 6  # two-sided message; imm = tag; payload = data
    SHM_OPEN = 7  # ext: key; region = region id; imm = wanted access
    SHM_OPEN_RESP = 8  # flags = Status; ext = grant (ticket, size, socket name) or error text
    SHM_DONE = 9  # data already copied through shared memory; ext: OP_HEAD + segment table
    PING = 10
    PONG = 11
    SHM_REVOKE = 12  # owner -> peer: region (in header) is unregistered; drop its mapping
    SHM_REVOKED = 13  # peer -> owner: the mapping is gone (op id of the SHM_REVOKE)
    ACKS = 14  # several OK ACKs in one frame (links that agreed on it); ext: ACK_ENTRY each


class Status(enum.IntEnum):
    OK = 0
    NO_REGION = 1
    BAD_KEY = 2
    OUT_OF_BOUNDS = 3
    NOT_PERMITTED = 4
    INBOX_FULL = 5
    ERROR = 6


#: one acknowledgement in an ACKS frame: the op id and the chunk it acknowledges (status OK)
ACK_ENTRY = struct.Struct("<QI")

FLAG_IMM = 0x80  # WRITE / SHM_DONE: the imm field is an immediate to count on completion


def pack_header(
    op: int,
    flags: int = 0,
    ext_len: int = 0,
    op_id: int = 0,
    region: int = 0,
    payload_len: int = 0,
    imm: int = 0,
    chunk: int = 0,
    nchunks: int = 1,
) -> bytes:
    return HEADER.pack(MAGIC, op, flags, ext_len, op_id, region, payload_len, imm, chunk, nchunks)


def segments_table(offsets: np.ndarray, lengths: np.ndarray) -> bytes:
    table = np.empty(len(offsets), dtype=SEG_DTYPE)
    table["offset"] = offsets
    table["length"] = lengths
    return table.tobytes()
