#!/usr/bin/env python3
"""What idle mounts cost the daemon: threads and memory against the number of mounts.

    bench/idle.py [--fixtures DIR] [--images 10] [--steps 1,10,50,100] [--idle-secs 15]
                  [--json OUT]

Builds IMAGES variants of debian-python-v1 (each with one small layer of its own, so that
each is a distinct image with its own manifest and metadata blob), converts them with
`hoist convert` into Debian's docker-registry on a loopback port, then mounts them with
one daemon: mount i is of image i mod IMAGES, in fuse mode when i div IMAGES is even and
in erofs mode when it is odd (100 mounts: 50 fuse, 50 erofs, 10 of each image, 5 in
each mode).

After each step of mounts it waits IDLE_SECS (longer than the fetch workers' idle time),
then reads the daemon's processes (the holder and the server) from /proc: threads, RSS,
and the loop devices attached. At the last step it also reads one small file through
every mount, waits again, and measures once more (what mounts cost after a little use).

Prints a table and writes JSON. Needs root, skopeo, docker-registry and losetup.
"""
import argparse, gzip, hashlib, io, json, os, shutil, subprocess, sys, tarfile, tempfile, time
from pathlib import Path

import images  # bench/images.py: the test images
from registry import start_registry

ROOT = Path(__file__).resolve().parent.parent
HOIST = ROOT / "target/release/hoist"


def sha256(b):
    return hashlib.sha256(b).hexdigest()


def put_blob(layout, data):
    d = sha256(data)
    path = layout / "blobs/sha256" / d
    if not path.exists():
        path.write_bytes(data)
    return f"sha256:{d}", len(data)


def read_blob(layout, digest):
    return (layout / "blobs/sha256" / digest.split(":", 1)[1]).read_bytes()


def make_variants(fixtures, layout, n):
    """IMAGES tags v0..v{n-1} in `layout`: debian-python-v1 plus one layer each."""
    subprocess.run(["skopeo", "copy", "-q", f"oci:{fixtures}:debian-python-v1", f"oci:{layout}:base"],
                   check=True)
    index = json.loads((layout / "index.json").read_text())
    base = next(m for m in index["manifests"]
                if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == "base")
    manifest = json.loads(read_blob(layout, base["digest"]))
    config = json.loads(read_blob(layout, manifest["config"]["digest"]))
    for i in range(n):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w") as t:
            body = f"idle benchmark variant {i}\n".encode()
            info = tarfile.TarInfo("etc/hoist-bench-variant")
            info.size, info.mode, info.mtime = len(body), 0o644, 0
            t.addfile(info, io.BytesIO(body))
        tar = raw.getvalue()
        gz = gzip.compress(tar, mtime=0)
        layer_digest, layer_size = put_blob(layout, gz)
        cfg = json.loads(json.dumps(config))
        cfg["rootfs"]["diff_ids"].append(f"sha256:{sha256(tar)}")
        cfg.setdefault("history", []).append({"created_by": f"idle benchmark variant {i}"})
        cfg_digest, cfg_size = put_blob(layout, json.dumps(cfg).encode())
        m = json.loads(json.dumps(manifest))
        m["config"] = {"mediaType": manifest["config"]["mediaType"], "digest": cfg_digest, "size": cfg_size}
        m["layers"].append({"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                            "digest": layer_digest, "size": layer_size})
        m_digest, m_size = put_blob(layout, json.dumps(m).encode())
        index["manifests"].append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                   "digest": m_digest, "size": m_size,
                                   "annotations": {"org.opencontainers.image.ref.name": f"v{i}"}})
    (layout / "index.json").write_text(json.dumps(index))


def proc_status(pid):
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        k, _, v = line.partition(":")
        out[k] = v.strip()
    return out


def daemon_pids(home):
    """The holder and the server of `home` (processes whose HOIST_HOME is it)."""
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            cmd = (p / "cmdline").read_bytes().split(b"\0")
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmd[1:3] in ([b"daemon", b"run"], [b"daemon", b"serve"]):
            if f"HOIST_HOME={home}".encode() in env:
                pids.append(int(p.name))
    return pids


def measure(home):
    threads = rss = 0
    for pid in daemon_pids(home):
        st = proc_status(pid)
        threads += int(st["Threads"])
        rss += int(st["VmRSS"].split()[0]) * 1024
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    # A FUSE connection's mounts (the served image's and its bind mounts) share the
    # connection's device number, the third field of mountinfo.
    fuse = len({l.split(" ")[2] for l in Path("/proc/self/mountinfo").read_text().splitlines()
                if l.split(" - ")[-1].startswith("fuse") and str(home) in l})
    return {"threads": threads, "rss_mb": round(rss / 1e6, 1),
            "loop_devices": sum(1 for l in loops.splitlines() if str(home) in l),
            "fuse_connections": fuse}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--images", type=int, default=10)
    ap.add_argument("--steps", default="1,10,50,100")
    ap.add_argument("--idle-secs", type=float, default=15.0)
    ap.add_argument("--json", default=str(ROOT / "bench/out/idle.json"))
    args = ap.parse_args()
    fixtures = args.fixtures or images.test_images()
    steps = [int(s) for s in args.steps.split(",")]
    work = Path(tempfile.mkdtemp(prefix="hoist-idle-", dir="/var/tmp"))
    home = work / "home"
    env = dict(os.environ, HOIST_HOME=str(home))
    reg = None
    rows = []
    try:
        layout = work / "src"
        print(f"building {args.images} images ...", flush=True)
        make_variants(fixtures, layout, args.images)
        reg, addr = start_registry(work / "registry")
        refs = []
        for i in range(args.images):
            ref = f"docker://{addr}/idle:v{i}"
            subprocess.run([str(HOIST), "--plain-http", "convert", f"oci:{layout}:v{i}", ref],
                           check=True, env=env, stdout=subprocess.DEVNULL)
            refs.append(ref)
        mounted = []
        for step in steps:
            while len(mounted) < step:
                i = len(mounted)
                mp = work / "mnt" / str(i)
                mp.mkdir(parents=True)
                mode = "fuse" if (i // args.images) % 2 == 0 else "erofs"
                subprocess.run([str(HOIST), "--plain-http", "mount", "--mode", mode,
                                refs[i % args.images], str(mp)],
                               check=True, env=env, stdout=subprocess.DEVNULL)
                mounted.append(mp)
            time.sleep(args.idle_secs)  # the state being measured is "idle for a while"
            row = {"mounts": len(mounted), "after": "mount", **measure(home)}
            rows.append(row)
            print(row, flush=True)
        for mp in mounted:
            (mp / "etc/os-release").read_bytes()
            (mp / "etc/hoist-bench-variant").read_bytes()
        time.sleep(args.idle_secs)
        row = {"mounts": len(mounted), "after": "a read on each", **measure(home)}
        rows.append(row)
    finally:
        subprocess.run([str(HOIST), "daemon", "stop"], env=env, capture_output=True)
        if reg:
            reg.terminate()
            reg.wait()
        shutil.rmtree(work, ignore_errors=True)

    print()
    print(f"{'mounts':>6} {'after':<16} {'threads':>8} {'RSS MB':>8} {'loops':>6} {'FUSE conns':>10}")
    for r in rows:
        print(f"{r['mounts']:>6} {r['after']:<16} {r['threads']:>8} {r['rss_mb']:>8} "
              f"{r['loop_devices']:>6} {r['fuse_connections']:>10}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"images": args.images, "idle_secs": args.idle_secs,
                                           "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
