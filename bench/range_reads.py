#!/usr/bin/env python3
"""What one ranged read costs the registry: CPU per request against read size.

    bench/range_reads.py [--blob-mib 32] [--json OUT]

Starts Debian's docker-registry (filesystem storage, logging off, as bench/coldstart.py
runs it) on a free loopback port, pushes one blob of --blob-mib MiB of random bytes, and
sends ranged GETs of that blob on one keep-alive connection: for each size, N reads at
offsets spread over the blob. The registry's CPU time (user + system, from
/proc/PID/stat) and the wall time are read before and after each size, and printed per
request and per MiB, as a table and as JSON.

Why: a lazy mount fetches an image as ranged reads, and a start-up trace's chunks lie
in many runs when a blob keeps layer order. If the registry's cost follows the number of
requests rather than the bytes, fewer, longer reads are cheaper for it (docs/
architecture.md, "Blobs in trace order").
"""
import argparse, hashlib, http.client, json, os, socket, subprocess, sys, tempfile, time
from pathlib import Path

SIZES = [(4 << 10, 200), (64 << 10, 200), (256 << 10, 100), (1 << 20, 50), (4 << 20, 20), (16 << 20, 5)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_registry(d, port):
    config = d / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {d}/data\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    log = open(d / "registry.log", "w")
    proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                            stdin=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
            c.request("GET", "/v2/")
            c.getresponse().read()
            return proc
        except OSError:
            if proc.poll() is not None:
                break
            time.sleep(0.1)
    proc.kill()
    sys.exit(f"docker-registry did not start:\n{(d / 'registry.log').read_text()}")


def push(port, data):
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    c.request("POST", "/v2/bench/blobs/uploads/")
    r = c.getresponse()
    r.read()
    loc = r.getheader("Location")
    if r.status != 202 or not loc:
        sys.exit(f"starting the upload: HTTP {r.status}")
    c.request("PUT", loc + ("&" if "?" in loc else "?") + "digest=" + digest, body=data,
              headers={"Content-Type": "application/octet-stream"})
    r = c.getresponse()
    r.read()
    if r.status != 201:
        sys.exit(f"uploading the blob: HTTP {r.status}")
    return digest


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blob-mib", type=int, default=32)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    blob = args.blob_mib << 20
    if blob <= SIZES[-1][0]:
        sys.exit(f"--blob-mib must be more than {SIZES[-1][0] >> 20} (the largest read)")
    with tempfile.TemporaryDirectory(prefix="hoist-range-reads-") as tmp:
        d = Path(tmp)
        port = free_port()
        proc = start_registry(d, port)
        try:
            digest = push(port, os.urandom(blob))
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            rows = []
            for size, n in SIZES:
                cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                for i in range(n):
                    off = (i * 7919 * 4096) % (blob - size)
                    c.request("GET", f"/v2/bench/blobs/{digest}",
                              headers={"Range": f"bytes={off}-{off + size - 1}"})
                    r = c.getresponse()
                    got = r.read()
                    if r.status != 206 or len(got) != size:
                        sys.exit(f"read of {size} bytes at {off}: HTTP {r.status}, {len(got)} bytes")
                wall, cpu = time.perf_counter() - t0, cpu_seconds(proc.pid) - cpu0
                rows.append({"size": size, "reads": n, "cpu_ms_per_read": cpu / n * 1e3,
                             "wall_ms_per_read": wall / n * 1e3,
                             "cpu_ms_per_mib": cpu / (n * size / (1 << 20)) * 1e3})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    version = subprocess.run(["docker-registry", "--version"], capture_output=True, text=True).stdout.strip()
    print(f"ranged reads of a {args.blob_mib} MiB blob from {version} on 127.0.0.1, one keep-alive "
          "connection; the registry's CPU (user + system) per read\n")
    print("| read size | reads | registry CPU ms / read | wall ms / read | registry CPU ms / MiB |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        size = f"{r['size'] >> 20} MiB" if r["size"] >= 1 << 20 else f"{r['size'] >> 10} KiB"
        print(f"| {size} | {r['reads']} | {r['cpu_ms_per_read']:.2f} | {r['wall_ms_per_read']:.2f} "
              f"| {r['cpu_ms_per_mib']:.2f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"registry": version, "blob_bytes": blob, "rows": rows}, f, indent=2)
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
