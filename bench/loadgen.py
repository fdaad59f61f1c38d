"""C-speed traffic for the benchmarks: blocking sockets, large buffers, no per-byte Python.

Run as a separate process (``python -m bench.loadgen ...``) so the generator never competes with
the code under test for the GIL:

* ``sink --fd N``: accept one connection on the inherited listening socket, count bytes until EOF,
  print ``bytes seconds`` (first accept to EOF).
* ``source --port P --bytes N``: connect to 127.0.0.1:P, send N bytes, shut down, wait for EOF.
* ``origin --fd N``: a threaded server for the SOCKS benchmark. A client sends an 8-byte
  big-endian length L and gets L bytes back, then EOF; ``L == HOLD`` sends one byte and then
  keeps the connection open until the client closes it.
"""

from __future__ import annotations

import argparse
import selectors
import socket
import struct
import sys
import threading
import time

CHUNK = 4 << 20
HOLD = (1 << 64) - 1
_PAYLOAD = memoryview(bytes(range(256)) * (CHUNK // 256))


def send_bytes(sock: socket.socket, total: int) -> None:
    while total > 0:
        n = min(total, CHUNK)
        sock.sendall(_PAYLOAD[:n])
        total -= n


def drain(sock: socket.socket) -> int:
    """Receive until EOF into one reused buffer; return the byte count."""
    buf = bytearray(CHUNK)
    total = 0
    while n := sock.recv_into(buf):
        total += n
    return total


def run_sink(fd: int) -> None:
    listener = socket.socket(fileno=fd)
    conn, _ = listener.accept()
    start = time.perf_counter()
    total = drain(conn)
    elapsed = time.perf_counter() - start
    conn.close()
    listener.close()
    print(total, elapsed, flush=True)


def run_source(port: int, total: int) -> None:
    sock = socket.create_connection(("127.0.0.1", port))
    send_bytes(sock, total)
    sock.shutdown(socket.SHUT_WR)
    drain(sock)
    sock.close()


def _bulk_reply(conn: socket.socket, length: int) -> None:
    try:
        conn.setblocking(True)
        send_bytes(conn, length)
        conn.shutdown(socket.SHUT_WR)
        drain(conn)
    except OSError:
        pass
    finally:
        conn.close()


def run_origin(fd: int) -> None:
    """One epoll loop for accepts, requests, small replies and held connections; a thread only
    for bulk replies. Cheaper per connection than a thread per request."""
    listener = socket.socket(fileno=fd)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, None)
    pending: dict[socket.socket, bytes] = {}
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            sock = key.fileobj
            assert isinstance(sock, socket.socket)
            if sock is listener:
                for _ in range(64):
                    try:
                        conn, _ = listener.accept()
                    except BlockingIOError:
                        break
                    conn.setblocking(False)
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    pending[conn] = b""
                    sel.register(conn, selectors.EVENT_READ, "request")
                continue
            try:
                data = sock.recv(65536)
            except OSError:
                data = b""
            if key.data == "hold" or not data:
                if not data:
                    sel.unregister(sock)
                    pending.pop(sock, None)
                    sock.close()
                continue
            header = pending[sock] + data
            if len(header) < 8:
                pending[sock] = header
                continue
            del pending[sock]
            (length,) = struct.unpack("!Q", header[:8])
            if length == HOLD:
                sock.send(b"R")
                sel.modify(sock, selectors.EVENT_READ, "hold")
            elif length <= 65536:
                sock.send(_PAYLOAD[:length])
                sock.shutdown(socket.SHUT_WR)
                sel.modify(sock, selectors.EVENT_READ, "hold")  # close at the client's EOF
            else:
                sel.unregister(sock)
                threading.Thread(target=_bulk_reply, args=(sock, length), daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sink = sub.add_parser("sink")
    sink.add_argument("--fd", type=int, required=True)
    source = sub.add_parser("source")
    source.add_argument("--port", type=int, required=True)
    source.add_argument("--bytes", type=int, required=True)
    origin = sub.add_parser("origin")
    origin.add_argument("--fd", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "sink":
        run_sink(args.fd)
    elif args.cmd == "source":
        run_source(args.port, args.bytes)
    else:
        run_origin(args.fd)


if __name__ == "__main__":
    sys.exit(main())
