#!/usr/bin/env python3
"""Replays issue 9's table of hostile requests against a vlembed release server
on loopback and prints, per row, the answer, the wall time and the server's
peak RSS growth (VmHWM after the row minus VmRSS before it; the peak is reset
through /proc/PID/clear_refs before each row).

    scripts/hostile-replay.py [--binary target/release/vlembed] [--model DIR]
                              [--mllm-model DIR] [--skip-build]

--model defaults to /tmp/bge-vl-base-random when it exists (a full-size
random BGE-VL-base, see scripts/make_fixtures.py --full), else the fixture
tests/fixtures/clip-tiny: the rows measure body parsing, decoding and
preprocessing, which do not depend on the model's size (the baseline RSS does).
--mllm-model adds the BGE-VL-MLLM long-prompt row.

Only Python's standard library; every input is generated here; the server is
started on 127.0.0.1 and stopped on exit, whatever happens.
"""

import argparse
import base64
import http.client
import json
import os
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.path.join(REPO, "tests", "fixtures")


# ---- inputs ------------------------------------------------------------------

def png_grey(width, height):
    """An 8-bit greyscale PNG, every row a gradient."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    row = bytes([0]) + bytes((x * 7) & 0xFF for x in range(width))
    raw = row * height
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw, 9))
            + chunk(b"IEND", b""))


def jpeg_segments(data):
    """(marker, start, end) of each segment up to and including SOS."""
    i, out = 2, []
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            raise ValueError("not a marker")
        marker = data[i + 1]
        length = struct.unpack(">H", data[i + 2:i + 4])[0]
        out.append((marker, i, i + 2 + length))
        if marker == 0xDA:
            break
        i += 2 + length
    return out


def jpeg_header_only(data, width, height):
    """The JPEG's headers with the frame size replaced, an empty scan, EOI."""
    segs = jpeg_segments(data)
    out = bytearray(data[:segs[-1][2]])
    for marker, start, _ in segs:
        if marker in (0xC0, 0xC1, 0xC2):
            struct.pack_into(">HH", out, start + 5, height, width)
    return bytes(out) + b"\xff\xd9"


def photo():
    demo = "/work/shared/testdata/bge-vl-demo/000000032077.jpg"
    path = demo if os.path.exists(demo) else os.path.join(
        FIXTURES, "images", "baseline_420_640x480.jpg")
    with open(path, "rb") as f:
        return f.read()


def b64(b):
    return base64.b64encode(b).decode()


# ---- server ------------------------------------------------------------------

def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_kb(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def reset_peak(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Server:
    def __init__(self, binary, model, log):
        self.port = free_port()
        env = dict(os.environ, VLEMBED_LOG="warn")
        self.proc = subprocess.Popen(
            [binary, "--model", model, "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited with {self.proc.returncode}")
            try:
                if self.request("GET", "/ready", None, None, timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise SystemExit("the server did not become ready in 300 s")

    def request(self, method, path, body, ctype, timeout=120):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": ctype} if ctype else {}
            c.request(method, path, body=body, headers=headers)
            r = c.getresponse()
            return r.status, r.read()
        finally:
            c.close()

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def run_row(server, name, bodies, path="/embed"):
    """Sends `bodies` (JSON values or bytes) at once; prints one row."""
    pid = server.proc.pid
    reset_ok = reset_peak(pid)
    base = status_kb(pid, "VmRSS")
    encoded = [b if isinstance(b, bytes) else json.dumps(b).encode() for b in bodies]
    results = [None] * len(encoded)

    def send(i):
        try:
            results[i] = server.request("POST", path, encoded[i], "application/json")
        except OSError as e:
            results[i] = (0, str(e).encode())

    start = time.time()
    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(encoded))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.time() - start
    peak = status_kb(pid, "VmHWM") if reset_ok else status_kb(pid, "VmRSS")
    status, body = results[0]
    try:
        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = ""
    size = sum(len(e) for e in encoded)
    statuses = ",".join(sorted({str(r[0]) for r in results}))
    print(f"| {name} | {size / 1e6:.3f} MB | {statuses} | {took:.2f} s | "
          f"{(peak - base) / 1024:+.0f} MB | {message[:110]} |", flush=True)
    if server.proc.poll() is not None:
        raise SystemExit(f"the server died during {name!r}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", default=os.path.join(REPO, "target", "release", "vlembed"))
    ap.add_argument("--model", default=None)
    ap.add_argument("--mllm-model", default=None)
    ap.add_argument("--skip-build", action="store_true")
    args = ap.parse_args()
    if not args.skip_build:
        subprocess.run(["nice", "-n", "10", "cargo", "build", "--release", "--locked"],
                       cwd=REPO, check=True)
    model = args.model or ("/tmp/bge-vl-base-random" if os.path.isdir("/tmp/bge-vl-base-random")
                           else os.path.join(FIXTURES, "clip-tiny"))
    jpg = photo()
    truncated = jpg[:len(jpg) // 2]
    with open(os.path.join(FIXTURES, "images", "baseline_420_640x480.jpg"), "rb") as f:
        header = jpeg_header_only(f.read(), 6324, 6324)  # 625 bytes
    empties = b'{"inputs": [' + b'"",' * ((16 << 20) // 3 - 10) + b'""]}'
    log = open(os.path.join("/tmp", "hostile-replay-server.log"), "w")
    print(f"model: {model}")
    print(f"binary: {args.binary}")
    print("| request | size | status | time | peak RSS growth | message |")
    print("|---|---|---|---|---|---|")
    server = Server(args.binary, model, log)
    try:
        run_row(server, "PNG 32768x1 grey", [{"inputs": [{"image": b64(png_grey(32768, 1))}]}])
        run_row(server, "PNG 1x32768 grey", [{"inputs": [{"image": b64(png_grey(1, 32768))}]}])
        run_row(server, "JPEG header 6324x6324, empty scan", [{"inputs": [{"image": b64(header)}]}])
        run_row(server, "JPEG cut in half", [{"inputs": [{"image": b64(truncated)}]}])
        run_row(server, "the 6324x6324 header JPEG x256 in one request",
                [{"inputs": [{"image": b64(header)}] * 256}])
        run_row(server, '{"inputs":["",...]} of 16 MiB', [empties])
        run_row(server, "the same, 4 at once", [empties] * 4)
        run_row(server, 'one text of 15 MB ("word " x 3,000,000)',
                [{"inputs": ["word " * 3_000_000]}])
        run_row(server, "a 4 MB model name", [{"inputs": "a", "model": "m" * (4 << 20)}])
        run_row(server, "a valid request afterwards", [{"inputs": ["a photo of a cat"]}])
    finally:
        server.stop()
    if args.mllm_model:
        server = Server(args.binary, args.mllm_model, log)
        try:
            run_row(server, "MLLM: a long text, truncate=true",
                    [{"inputs": ["word " * 26_000], "truncate": True}])
        finally:
            server.stop()
    else:
        print("| MLLM: a long text, truncate=true | - | skipped (no --mllm-model) | | | |")


if __name__ == "__main__":
    main()
