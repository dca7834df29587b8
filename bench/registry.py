#!/usr/bin/env python3
"""Registry-to-registry conversion benchmark: hoist convert vs skopeo copy.

    bench/registry.py [--fixtures DIR] [--runs N] [--json OUT]

Starts two instances of Debian's docker-registry on free loopback ports, a source and a
destination (as in copying from a public registry to a private one: no cross-repository
mount can short-cut the copy), pushes debian-python-v1 and -v2 (the original OCI images)
to the source with skopeo, and puts a byte-counting TCP relay in front of each: S for the
source, D for the destination. Each run starts from a fresh HOIST_HOME and writes to
fresh repositories:

  hoist v1             hoist convert docker://S/src:v1 docker://D/hoist:v1
  hoist v2 after v1    hoist convert of v2 right after (incremental: unchanged lower layers
                       are taken from the conversion cache)
  hoist v2 full        hoist convert --no-cache of v2 (what v2 costs without the cache)
  skopeo v1            skopeo copy docker://S/src:v1 docker://D/copy:v1
  skopeo v2 after v1   skopeo copy of v2 into the same repository (shared layers skipped)

and prints wall time (median of N runs) and bytes moved in each direction (from the
registry to the client = down, client to registry = up) as a table and as JSON.
"""
import argparse, json, os, shutil, socket, statistics, subprocess, sys, tempfile, threading, time
from pathlib import Path

import images  # bench/images.py: the test images

ROOT = Path(__file__).resolve().parent.parent
HOIST = ROOT / "target/release/hoist"


class CountingRelay:
    """A TCP relay that counts bytes each way."""

    def __init__(self, upstream):
        self.upstream = upstream
        self.down = 0
        self.up = 0
        self.lock = threading.Lock()
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.addr = "127.0.0.1:%d" % self.sock.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def reset(self):
        with self.lock:
            self.down = self.up = 0

    def _pump(self, src, dst, direction):
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
                with self.lock:
                    if direction == "up":
                        self.up += len(data)
                    else:
                        self.down += len(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _accept(self):
        host, port = self.upstream.split(":")
        while True:
            client, _ = self.sock.accept()
            server = socket.create_connection((host, int(port)))
            threading.Thread(target=self._pump, args=(client, server, "up"), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, "down"), daemon=True).start()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start_registry(tmp):
    tmp.mkdir(parents=True, exist_ok=True)
    port = free_port()
    config = tmp / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {tmp}/data\n"
        f"http:\n  addr: 127.0.0.1:{port}\n"
    )
    proc = subprocess.Popen(["docker-registry", "serve", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /v2/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                if s.recv(12).startswith(b"HTTP/1.1"):
                    return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.05)
    sys.exit("docker-registry did not start")


def timed(cmd, env=None):
    start = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return wall, out.stdout


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench/out/registry.json"))
    args = ap.parse_args()
    args.fixtures = args.fixtures or images.test_images()
    fixtures = Path(args.fixtures)
    for tool in ("docker-registry", "skopeo"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed (apt-get install {tool})")
    if not HOIST.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "hoist"], cwd=ROOT, check=True)

    tmp = Path(tempfile.mkdtemp(prefix="hoist-bench-registry-", dir="/var/tmp"))
    reg, addr = start_registry(tmp / "source")
    dst_reg = None
    try:
        for tag in ("debian-python-v1", "debian-python-v2"):
            timed(["skopeo", "copy", "-q", "--dest-tls-verify=false",
                   f"oci:{fixtures}:{tag}", f"docker://{addr}/src/app:{tag}"])
        src_relay = CountingRelay(addr)
        S = src_relay.addr
        relays = {}
        results = {}

        def measure(name, cmd, env=None):
            dst_relay = relays["dst"]
            src_relay.reset()
            dst_relay.reset()
            wall, out = timed(cmd, env)
            row = {"seconds": wall,
                   "down": src_relay.down + dst_relay.down,
                   "up": src_relay.up + dst_relay.up}
            results.setdefault(name, []).append(row)
            return out

        for run in range(args.runs):
            # A fresh destination per run: nothing there to skip or mount from.
            if dst_reg:
                dst_reg.terminate()
                dst_reg.wait()
            dst_reg, dst_addr = start_registry(tmp / f"destination-{run}")
            relays["dst"] = CountingRelay(dst_addr)
            D = relays["dst"].addr
            home = tmp / f"home-{run}"
            env = dict(os.environ, HOIST_HOME=str(home))
            h = [str(HOIST), "--plain-http", "convert", "--json"]
            measure("hoist v1", h + [f"docker://{S}/src/app:debian-python-v1",
                                    f"docker://{D}/hoist{run}/app:debian-python-v1"], env)
            out = measure("hoist v2 after v1", h + [f"docker://{S}/src/app:debian-python-v2",
                                                   f"docker://{D}/hoist{run}/app:debian-python-v2"], env)
            results.setdefault("reused layers", []).append(json.loads(out)["reused_layers"])
            measure("hoist v2 full", h + ["--no-cache", f"docker://{S}/src/app:debian-python-v2",
                                          f"docker://{D}/full{run}/app:debian-python-v2"], env)
            s = ["skopeo", "copy", "--src-tls-verify=false", "--dest-tls-verify=false"]
            measure("skopeo v1", s + [f"docker://{S}/src/app:debian-python-v1",
                                      f"docker://{D}/copy{run}/app:debian-python-v1"])
            measure("skopeo v2 after v1", s + [f"docker://{S}/src/app:debian-python-v2",
                                               f"docker://{D}/copy{run}/app:debian-python-v2"])
    finally:
        for p in (reg, dst_reg):
            if p:
                p.terminate()
                p.wait()
        shutil.rmtree(tmp, ignore_errors=True)

    summary = {}
    print(f"registry-to-registry, debian-python, {args.runs} runs (median wall time; bytes are per run)")
    print(f"{'method':<22}{'seconds':>9}{'down MB':>10}{'up MB':>9}")
    for name, rows in results.items():
        if name == "reused layers":
            continue
        med = statistics.median(x["seconds"] for x in rows)
        down = statistics.median(x["down"] for x in rows)
        up = statistics.median(x["up"] for x in rows)
        summary[name] = {"seconds": med, "down_bytes": down, "up_bytes": up,
                         "runs": [x["seconds"] for x in rows]}
        print(f"{name:<22}{med:>9.2f}{down / 1e6:>10.1f}{up / 1e6:>9.1f}")
    summary["reused_layers_v2"] = results["reused layers"]
    inc, full = summary["hoist v2 after v1"], summary["hoist v2 full"]
    print(f"v2 after v1: {inc['seconds'] / full['seconds']:.2f}x the time of a full conversion, "
          f"{inc['down_bytes'] / full['down_bytes']:.2f}x the bytes down, "
          f"{results['reused layers'][0]} layer(s) reused")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(summary, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
