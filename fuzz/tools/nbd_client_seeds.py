#!/usr/bin/env python3
"""Writes seeds for the nbd_client fuzz target (fuzz/seeds/nbd_client/).

Each seed is what a server sends to qcow's NBD client: the handshake the
client expects (its options in its order: EXTENDED_HEADERS, then
STRUCTURED_REPLY when that was refused, SET_META_CONTEXT, GO), then
qemu-nbd's real reply to the first request the harness makes, recorded by
playing that request against qemu-nbd in the same mode, then one byte
that makes the harness make that request first (its value modulo 3:
0 reads, 1 block status, 2 a write and a flush).

Usage: python3 fuzz/tools/nbd_client_seeds.py OUT_DIR   (needs qemu-img,
qemu-io and qemu-nbd).
"""

import os
import socket
import struct
import subprocess
import sys
import tempfile
import time

NBD_MAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
REPLY_MAGIC = 0x0003E889045565A9
OPT_GO, OPT_STRUCTURED, OPT_SET_META, OPT_EXTENDED = 7, 8, 10, 11
REP_ACK, REP_INFO, REP_META = 1, 3, 4
REP_ERR_UNSUP = (1 << 31) + 1
CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_BLOCK_STATUS = 0, 1, 3, 7


def option_reply(option, kind, data=b""):
    return struct.pack(">QIII", REPLY_MAGIC, option, kind, len(data)) + data


def handshake(size, extended, context_id):
    """The server's side of the handshake the client expects."""
    out = struct.pack(">QQH", NBD_MAGIC, IHAVEOPT, 3)
    if extended:
        out += option_reply(OPT_EXTENDED, REP_ACK)
    else:
        out += option_reply(OPT_EXTENDED, REP_ERR_UNSUP)
        out += option_reply(OPT_STRUCTURED, REP_ACK)
    out += option_reply(OPT_SET_META, REP_META, struct.pack(">I", context_id) + b"base:allocation")
    out += option_reply(OPT_SET_META, REP_ACK)
    export = struct.pack(">HQH", 0, size, 1 | 4 | 8 | 32 | 64)
    out += option_reply(OPT_GO, REP_INFO, export)
    out += option_reply(OPT_GO, REP_ACK)
    return out


def recv_exact(sock, n):
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError("server closed")
        data += more
    return data


def send_option(sock, option, data=b""):
    sock.sendall(struct.pack(">QII", IHAVEOPT, option, len(data)) + data)


def read_option_replies(sock):
    """Reads option replies up to the final one (ACK or an error); returns
    the id of a metadata context the replies named."""
    context_id = None
    while True:
        _, _, kind, length = struct.unpack(">QIII", recv_exact(sock, 20))
        data = recv_exact(sock, length)
        if kind == REP_META:
            context_id = struct.unpack(">I", data[:4])[0]
        if kind == REP_ACK or kind & (1 << 31):
            return context_id


def record(socket_path, extended, requests):
    """Plays a client in the given mode; returns the server's replies to
    `requests` (kind, offset, length, payload), read until quiet, and the
    id qemu-nbd gave base:allocation."""
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(socket_path)
    recv_exact(sock, 18)
    sock.sendall(struct.pack(">I", 1 | 2))
    send_option(sock, OPT_EXTENDED if extended else OPT_STRUCTURED)
    read_option_replies(sock)
    query = struct.pack(">I", 0) + struct.pack(">I", 1)
    query += struct.pack(">I", len(b"base:allocation")) + b"base:allocation"
    send_option(sock, OPT_SET_META, query)
    context_id = read_option_replies(sock)
    send_option(sock, OPT_GO, struct.pack(">IH", 0, 0))
    read_option_replies(sock)
    for cookie, (kind, offset, length, payload) in enumerate(requests, start=1):
        if extended:
            header = struct.pack(">IHHQQQ", 0x21E41C71, 0, kind, cookie, offset, length)
        else:
            header = struct.pack(">IHHQQI", 0x25609513, 0, kind, cookie, offset, length)
        sock.sendall(header + payload)
    sock.settimeout(0.5)
    replies = b""
    try:
        while True:
            more = sock.recv(1 << 16)
            if not more:
                break
            replies += more
    except socket.timeout:
        pass
    sock.close()
    return replies, context_id


def main():
    out_dir = sys.argv[1]
    size = 4 << 20
    with tempfile.TemporaryDirectory() as work:
        image = os.path.join(work, "disk.qcow2")
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", image, str(size)], check=True)
        # Data, a hole, zeros: reads and block status of every kind.
        subprocess.run(
            ["qemu-io", "-c", "write -P 7 0 1k", "-c", "write -z 8k 4k", image],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        path = os.path.join(work, "s")
        server = subprocess.Popen(["qemu-nbd", "-t", "-f", "qcow2", "-k", path, image])
        try:
            while not os.path.exists(path):
                time.sleep(0.02)
            firsts = {
                "read": (0, [(CMD_READ, 0, 4096, b"")]),
                "status": (1, [(CMD_BLOCK_STATUS, 0, 1 << 20, b"")]),
                "write": (2, [(CMD_WRITE, 0, 512, bytes(512)), (CMD_FLUSH, 0, 0, b"")]),
            }
            for extended in (False, True):
                for name, (selector, requests) in firsts.items():
                    replies, context_id = record(path, extended, requests)
                    form = "extended" if extended else "compact"
                    seed = handshake(size, extended, context_id) + replies + bytes([selector])
                    with open(os.path.join(out_dir, f"{form}-{name}-first"), "wb") as f:
                        f.write(seed)
        finally:
            server.kill()
            server.wait()


if __name__ == "__main__":
    main()
