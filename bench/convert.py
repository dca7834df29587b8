#!/usr/bin/env python3
"""Conversion benchmark: hoist convert vs the gzip decompression bound, and dedup sizes.

    bench/convert.py [--fixtures DIR] [--runs N] [--json OUT]

Times, in one run on this machine (medians of N runs, each in a fresh output layout):
  gzip -dc          each gzip layer of the image, one after another (the bound the issue sets)
  gzip -dc parallel the same layers decompressed concurrently (both cores)
  hoist zstd/lz4    `hoist convert` of the whole image
and reports peak RSS (ru_maxrss of the process). Then, for every image of the fixtures, the
converted size (data blobs and metadata blob) with small files in frames (the default) and
without (`--frame-size 0`, the layout of format version 1) against the source's gzip layers.
Then converts debian-python-v2 with and without `--chunk-dict` v1 and reports what is stored
for v1+v2 in each case vs the OCI layers.
Every hoist command runs with a HOIST_HOME of its own under the scratch directory (each timed
conversion a fresh one, so none reuses another's conversion cache); /var/lib/hoist is never
touched.
"""
import argparse, json, os, resource, shutil, statistics, subprocess, sys, tempfile, time
from pathlib import Path

import images  # bench/images.py: the test images

ROOT = Path(__file__).resolve().parent.parent
HOIST = ROOT / "target/release/hoist"


def run(cmd, stdout=subprocess.DEVNULL, env=None):
    """Runs cmd; returns (wall seconds, peak RSS KiB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=stdout, stderr=subprocess.PIPE, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    err = proc.stderr.read().decode()
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{cmd} failed: {err}")
    return wall, usage.ru_maxrss


def run_many(cmds):
    """Runs commands concurrently; returns (wall seconds, max peak RSS KiB)."""
    start = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL) for c in cmds]
    rss = 0
    for p in procs:
        _, status, usage = os.wait4(p.pid, 0)
        rss = max(rss, usage.ru_maxrss)
        if os.waitstatus_to_exitcode(status) != 0:
            sys.exit(f"{p.args} failed")
    return time.perf_counter() - start, rss


def manifest(layout, tag):
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
    sys.exit(f"no tag {tag} in {layout}")


def tags(layout):
    """The tagged images of a layout, sorted."""
    index = json.loads((layout / "index.json").read_text())
    return sorted(m["annotations"]["org.opencontainers.image.ref.name"] for m in index["manifests"]
                  if "org.opencontainers.image.ref.name" in m.get("annotations", {}))


def layer_sizes(layout, tags):
    """Distinct layer blobs of the tags: {digest: size}."""
    out = {}
    for t in tags:
        for l in manifest(layout, t)["layers"]:
            out[l["digest"]] = l["size"]
    return out


def median_runs(n, fn):
    results = [fn() for _ in range(n)]
    return statistics.median(r[0] for r in results), max(r[1] for r in results)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--image", default="debian-python-v1")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--json", default=str(ROOT / "bench/out/convert.json"))
    args = ap.parse_args()
    args.fixtures = args.fixtures or images.test_images()
    fixtures = Path(args.fixtures)
    if not HOIST.exists():
        subprocess.run(["cargo", "build", "--release", "-p", "hoist"], cwd=ROOT, check=True)
    work = Path(tempfile.mkdtemp(prefix="hoist-bench-", dir="/var/tmp"))

    def home_env(name):
        """The environment of a hoist command: HOIST_HOME in the scratch directory."""
        return dict(os.environ, HOIST_HOME=str(work / name))

    try:
        layers = [fixtures / "blobs/sha256" / l["digest"][7:] for l in manifest(fixtures, args.image)["layers"]]
        rows = {}
        def sequential():
            each = [run(["gzip", "-dc", str(l)]) for l in layers]
            return sum(w for w, _ in each), max(r for _, r in each)

        rows["gzip -dc (sequential)"] = median_runs(args.runs, sequential)
        rows["gzip -dc (parallel)"] = median_runs(args.runs, lambda: run_many([["gzip", "-dc", str(l)] for l in layers]))
        counter = [0]

        def convert(extra):
            counter[0] += 1
            dst = work / f"conv{counter[0]}"
            home = f"home-conv{counter[0]}"
            r = run([str(HOIST), "convert", f"oci:{fixtures}:{args.image}", f"oci:{dst}:x", *extra],
                    env=home_env(home))
            shutil.rmtree(dst)
            shutil.rmtree(work / home, ignore_errors=True)
            return r

        for c in ["zstd", "lz4", "none"]:
            rows[f"hoist convert --compressor {c}"] = median_runs(args.runs, lambda c=c: convert(["--compressor", c]))
        bound = rows["gzip -dc (sequential)"][0]
        print(f"\nConversion of {args.image} ({len(layers)} gzip layers, {sum(l.stat().st_size for l in layers)/1e6:.1f} MB), "
              f"median of {args.runs} runs, {os.cpu_count()} cores")
        print(f"{'method':<34} {'wall s':>8} {'x gzip -dc':>11} {'peak RSS MiB':>13}")
        for name, (wall, rss) in rows.items():
            print(f"{name:<34} {wall:8.2f} {wall/bound:11.2f} {rss/1024:13.1f}")

        # Sizes: each image as gzip layers, and converted with and without frames.
        sizes = {}
        print(f"\nConverted size (bytes; data = data blobs, meta = metadata blob)")
        print(f"{'image':<22} {'frames':<8} {'data':>13} {'meta':>12} {'total':>13} {'x gzip':>7}")
        for tag in tags(fixtures):
            gz = sum(l["size"] for l in manifest(fixtures, tag)["layers"])
            print(f"{tag:<22} {'(gzip)':<8} {gz:13,d} {'':>12} {gz:13,d} {1:7.3f}")
            sizes[tag] = {"gzip_bytes": gz}
            for label, extra in [("off", ["--frame-size", "0"]), ("256K", [])]:
                dst = work / f"size-{tag}-{label}"
                subprocess.run([str(HOIST), "convert", *extra, f"oci:{fixtures}:{tag}", f"oci:{dst}:x"],
                               check=True, stdout=subprocess.DEVNULL, env=home_env(f"home-size-{label}"))
                layers_out = manifest(dst, "x")["layers"]
                meta = sum(l["size"] for l in layers_out if "meta" in l["mediaType"])
                data = sum(l["size"] for l in layers_out if "blob" in l["mediaType"])
                print(f"{'':<22} {label:<8} {data:13,d} {meta:12,d} {data + meta:13,d} {(data + meta) / gz:7.3f}")
                sizes[tag][f"frames_{label}"] = {"data_bytes": data, "meta_bytes": meta}
                shutil.rmtree(dst)

        # Dedup: v1 + v2 stored as OCI layers, as hoist without and with --chunk-dict.
        out = work / "dedup"
        v1, v2 = "debian-python-v1", "debian-python-v2"
        for tag, extra in [(v1, []), (v2, []), (v2, ["--chunk-dict", f"oci:{out}:{v1}"])]:
            name = tag + ("-dict" if extra else "")
            subprocess.run([str(HOIST), "convert", *extra, f"oci:{fixtures}:{tag}", f"oci:{out}:{name}"],
                           check=True, stdout=subprocess.DEVNULL, env=home_env("home-dedup"))
        oci_total = sum(layer_sizes(fixtures, [v1, v2]).values())
        plain_total = sum(layer_sizes(out, [v1, v2]).values())
        dict_total = sum(layer_sizes(out, [v1, v2 + "-dict"]).values())
        v2_alone = sum(l["size"] for l in manifest(out, v2)["layers"])
        v2_new = sum(layer_sizes(out, [v1, v2 + "-dict"]).values()) - sum(layer_sizes(out, [v1]).values())
        inspect = json.loads(subprocess.run([str(HOIST), "inspect", "--json", f"oci:{out}:{v2}-dict"],
                                            check=True, capture_output=True, env=home_env("home-dedup")).stdout)
        print(f"\nStorage for {v1} + {v2} (distinct blobs, bytes)")
        print(f"{'form':<44} {'bytes':>14} {'x OCI':>7}")
        for name, v in [("OCI gzip layers (shared base counted once)", oci_total),
                        ("hoist, v2 converted alone", plain_total),
                        ("hoist, v2 with --chunk-dict v1", dict_total)]:
            print(f"{name:<44} {v:14,d} {v/oci_total:7.3f}")
        print(f"v2 adds {v2_new:,d} bytes with --chunk-dict (vs {v2_alone:,d} alone); "
              f"inspect: {inspect['reused_chunk_bytes']:,d} bytes of chunk data reused, not stored again")
        result = {
            "image": args.image, "runs": args.runs, "cores": os.cpu_count(),
            "convert": {k: {"wall_s": w, "peak_rss_kib": r, "x_gzip": w / bound} for k, (w, r) in rows.items()},
            "sizes": sizes,
            "dedup": {"oci_bytes": oci_total, "hoist_bytes": plain_total, "hoist_dict_bytes": dict_total,
                      "v2_new_bytes_with_dict": v2_new, "v2_bytes_alone": v2_alone,
                      "reused_chunk_bytes": inspect["reused_chunk_bytes"]},
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(f"\nJSON: {args.json}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
