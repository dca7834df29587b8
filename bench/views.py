#!/usr/bin/env python3
"""What verifying views costs a daemon started over a warm cache (erofs and fuse modes).

    sudo bench/views.py [--fixtures DIR] [--runs 3] [--seq-mib 256] [--rand-mib 128]
                        [--modes erofs,fuse] [--keep] [--json OUT]

A view (cache/views/) is a file the kernel reads directly: a blob's address space (erofs
mode, behind a loop device) or a file of several chunks (fuse mode, by passthrough). A
daemon hands the kernel only views it built itself or has hashed: one started over a
warm cache (after a crash, a reboot, `hoist daemon stop`) serves the image through its
own path (chunk files, verified) while a background thread hashes the views it finds,
then moves each blob's loop device (erofs) or each file's next open (fuse) to its view.

The image is bench/mount.py's: debian-python-v1 plus bench/seq.bin and bench/rand.bin of
random data. Each mode is mounted from a fresh HOIST_HOME with `--prefetch all` until
every chunk is cached and every view built. Then, each run: unmount, `hoist daemon
stop`, drop the page cache, mount again with `--prefetch none` (a new daemon), and
  tar, verifying  tar -cf - -C MNT . | wc -c  started at once after the mount: every
                  file read while the views are being verified (s, from the mount)
  verify s        from the mount until `hoist stat` counts every view verified (erofs:
                  a thread starts at mount; fuse: a view is verified at the first open
                  of its file, which the tar makes)
  verify MB/s     the views' allocated bytes / verify s (holes are checked, not read)
  tar, verified   the same after every view is verified, page cache dropped (s): the
                  ratio of the two is what verification costs a reader meanwhile
The table gives medians over the runs; JSON keeps every run. Needs root, umoci.
"""
import argparse, json, os, statistics, subprocess, sys, tempfile, time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import images  # noqa: E402  (bench/images.py: the test images)
import mount as M  # noqa: E402  (bench/mount.py: image, mount and stat helpers)


def view_files(home):
    views = home / "cache" / "views"
    files = [p for p in views.iterdir() if p.is_file() and not p.name.startswith(".")]
    return len(files), sum(p.stat().st_blocks * 512 for p in files)  # allocated: holes are not read


def tar_s(mnt):
    start = time.perf_counter()
    M.sh(f"tar -cf - -C {mnt} . | wc -c")
    return time.perf_counter() - start


def wait_verified(mnt, env, n, timeout):
    start = time.perf_counter()
    while True:
        st = M.hoist_stat(mnt, env)
        if st["views_verified"] + st["views_damaged"] >= n:
            return st
        if time.perf_counter() - start > timeout:
            sys.exit(f"{mnt}: {st['views_verified']} of {n} views verified after {timeout} s")
        time.sleep(0.05)


def run_mode(mode, hlayout, work, runs, timeout):
    home = work / f"home-{mode}"
    env = M.hoist_env(home)
    mnt = work / f"mnt-{mode}"
    first = M.mount(mode, hlayout, mnt, env, timeout)
    n, nbytes = view_files(home)
    print(f"{mode}: {n} views, {nbytes / 1e6:.1f} MB, after a prefetch of {first['prefetch_s']:.1f} s")
    out = {"views": n, "view_bytes": nbytes, "runs": []}
    for _ in range(runs):
        M.sh([str(M.HOIST), "umount", str(mnt)], env=env)
        M.sh([str(M.HOIST), "daemon", "stop"], env=env)
        M.drop_caches()
        start = time.perf_counter()
        M.sh([str(M.HOIST), "mount", f"oci:{hlayout}:bench", str(mnt), "--mode", mode, "--prefetch", "none"], env=env)
        mounted = time.perf_counter()
        # The reader and the verification run together; the stat polls time the latter.
        tar = subprocess.Popen(["bash", "-c", f"set -o pipefail; tar -cf - -C {mnt} . | wc -c"],
                               stdout=subprocess.DEVNULL)
        st = wait_verified(mnt, env, n, timeout)
        verified_at = time.perf_counter()
        if tar.wait(timeout=timeout) != 0:
            sys.exit(f"{mode}: tar of {mnt} failed")
        verifying = time.perf_counter() - mounted
        if st["views_damaged"]:
            sys.exit(f"{mode}: {st['views_damaged']} views found damaged in an untouched cache")
        M.drop_caches()
        verified = tar_s(mnt)
        run = {"mount_s": mounted - start, "verify_s": verified_at - mounted,
               "tar_verifying_s": verifying, "tar_verified_s": verified,
               "fetched_bytes": st["bytes_fetched"]}
        if run["fetched_bytes"]:
            sys.exit(f"{mode}: fetched {run['fetched_bytes']} bytes over a fully cached image")
        out["runs"].append(run)
        print(f"  {mode}: " + ", ".join(f"{k} {v:.2f}" for k, v in run.items() if k.endswith("_s")))
    med = lambda k: statistics.median(r[k] for r in out["runs"])  # noqa: E731
    out["median"] = {k: med(k) for k in ("mount_s", "verify_s", "tar_verifying_s", "tar_verified_s")}
    out["median"]["verify_mb_s"] = nbytes / 1e6 / out["median"]["verify_s"]
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--seq-mib", type=int, default=256)
    ap.add_argument("--rand-mib", type=int, default=128)
    ap.add_argument("--modes", default="erofs,fuse")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for a prefetch or a verification")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=str(M.ROOT / "bench/out/views.json"))
    args = ap.parse_args()
    args.fixtures = args.fixtures or images.test_images()
    if os.geteuid() != 0:
        sys.exit("needs root (mounts, drop_caches)")
    work = Path(tempfile.mkdtemp(prefix="hoist-views-", dir="/var/tmp"))
    modes = args.modes.split(",")
    mounts = [(work / f"mnt-{m}", M.hoist_env(work / f"home-{m}")) for m in modes]
    try:
        _, hlayout = M.build_image(Path(args.fixtures), work, args.seq_mib, args.rand_mib, True)
        results = {m: run_mode(m, hlayout, work, args.runs, args.timeout) for m in modes}
    finally:
        M.cleanup(mounts, work, args.keep)
    print("\n| mode | views | view MB | mount s | verify s | verify MB/s | tar, verifying s | tar, verified s | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for m, r in results.items():
        d = r["median"]
        print(f"| {m} | {r['views']} | {r['view_bytes'] / 1e6:.1f} | {d['mount_s']:.2f} | {d['verify_s']:.2f} | "
              f"{d['verify_mb_s']:.0f} | {d['tar_verifying_s']:.2f} | {d['tar_verified_s']:.2f} | "
              f"{d['tar_verifying_s'] / d['tar_verified_s']:.2f} |")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"kernel": os.uname().release, "modes": results}, indent=1))
    print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
