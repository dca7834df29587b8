#!/usr/bin/env python3
"""Read amplification benchmark: what `hoist mount --fetch-min` costs a start-up workload.

    sudo bench/fetch_min.py [--fixtures DIR] [--sizes 0,64K,256K,1M,4M] [--mode fuse]
                            [--rate-mbit 100] [--rtt-ms 20] [--json OUT]

Converts debian-python-v1 into a temporary layout, then for each --fetch-min value mounts
it lazily from a fresh HOIST_HOME (empty chunk cache), runs `python3 /app/main.py` in a
chroot of the mount, and reads from `hoist stat --json` what the run fetched: compressed
bytes and ranged reads. A miss fetches the missed chunk plus the following chunks of its
blob up to --fetch-min, so larger values mean fewer requests and more bytes.

The "model" column prices each value on a shaped link: bytes at --rate-mbit plus one
round trip (--rtt-ms) per ranged read. It is a model (it ignores that requests overlap),
meant to rank the values; the cold-start benchmark measures the real thing.
"""
import argparse, json, os, shutil, subprocess, sys, tempfile
from pathlib import Path

import images  # bench/images.py: the test images

ROOT = Path(__file__).resolve().parent.parent
HOIST = ROOT / "target/release/hoist"


def parse_size(s):
    mult = {"K": 1 << 10, "M": 1 << 20}.get(s[-1:].upper(), 1)
    return int(s[:-1] if mult > 1 else s) * mult


def hoist(args, home, **kw):
    env = dict(os.environ, HOIST_HOME=str(home))
    return subprocess.run([str(HOIST), *args], env=env, check=True, **kw)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--sizes", default="0,64K,256K,1M,4M")
    ap.add_argument("--mode", default="fuse", choices=["fuse", "erofs"])
    ap.add_argument("--rate-mbit", type=float, default=100)
    ap.add_argument("--rtt-ms", type=float, default=20)
    ap.add_argument("--json", default=str(ROOT / "bench/out/fetch_min.json"))
    args = ap.parse_args()
    args.fixtures = args.fixtures or images.test_images()
    if os.geteuid() != 0:
        sys.exit("run as root (mounts, chroot)")
    if not HOIST.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "hoist"], cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="hoist-bench-fetchmin-", dir="/var/tmp"))
    rows = []
    try:
        layout = work / "hoist"
        hoist(["convert", f"oci:{args.fixtures}:debian-python-v1", f"oci:{layout}:app"],
              work / "convert-home", stdout=subprocess.DEVNULL)
        mnt = work / "mnt"
        mnt.mkdir()
        for size in args.sizes.split(","):
            home = work / f"home-{size}"
            hoist(["mount", "--mode", args.mode, "--fetch-min", size, f"oci:{layout}:app", str(mnt)],
                  home, stdout=subprocess.DEVNULL)
            try:
                out = subprocess.run(["chroot", str(mnt), "python3", "/app/main.py"],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    sys.exit(f"python3 /app/main.py failed: {out.stderr}")
                stat = json.loads(hoist(["stat", "--json", str(mnt)], home,
                                        capture_output=True, text=True).stdout)
            finally:
                hoist(["umount", str(mnt)], home, stdout=subprocess.DEVNULL)
                hoist(["daemon", "stop"], home, stdout=subprocess.DEVNULL)
            fetched, requests = stat["bytes_fetched"], stat["requests"]
            model = fetched * 8 / (args.rate_mbit * 1e6) + requests * args.rtt_ms / 1e3
            rows.append({"fetch_min": size, "fetch_min_bytes": parse_size(size),
                         "bytes_fetched": fetched, "requests": requests,
                         "chunks_cached": stat["chunks_cached"], "model_secs": round(model, 3)})
    finally:
        shutil.rmtree(work, ignore_errors=True)

    print(f"\npython3 /app/main.py on a lazy {args.mode} mount of debian-python-v1, empty cache; "
          f"model = bytes at {args.rate_mbit:g} Mbit/s + {args.rtt_ms:g} ms per request\n")
    print("| --fetch-min | MB fetched | ranged reads | chunks cached | model s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['fetch_min']} | {r['bytes_fetched'] / 1e6:.1f} | {r['requests']} | "
              f"{r['chunks_cached']} | {r['model_secs']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"mode": args.mode, "rate_mbit": args.rate_mbit,
                                           "rtt_ms": args.rtt_ms, "rows": rows}, indent=2))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
