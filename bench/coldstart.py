#!/usr/bin/env python3
"""Cold-start benchmark: time to a ready container on a node that has never seen the image,
over an emulated WAN link: a full pull (skopeo + umoci + runc) vs `hoist run`.

    sudo bench/coldstart.py [--fixtures DIR] [--runs N] [--rate-mbit 100] [--rtt-ms 20]
                            [--workloads main,readmost] [--hoist-modes erofs,fuse]
                            [--methods full-pull,hoist-lazy,hoist-trace,hoist-all,bound]
                            [--trace WORKLOAD=FILE] [--hoist PATH] [--scratch DIR] [--keep]
                            [--json OUT]

The link. A network namespace `hoistbench` joined to the host by a veth pair (host hb0
10.213.0.1/24, namespace hb1 10.213.0.2/24) runs Debian's docker-registry (distribution 2.8)
on 10.213.0.2:5000. The images are pushed over the unshaped link: debian-python-v1 as is
(gzip layers, `skopeo copy` from the fixture layout) as python:v1, and `hoist convert` of it
as python:hoist; for each workload `hoist record` writes a trace of what the workload reads,
and a conversion with `--prefetch-trace` is pushed as python:hoist-trace-WORKLOAD. Then both
ends of the veth are shaped with tbf to --rate-mbit: burst max(64 KiB, 1 ms of the rate)
(veth hands tbf GSO packets of up to 64 KiB, which a smaller bucket would have to split),
queue limit --queue-ms of the rate plus the burst (default: one RTT, a bandwidth-delay
product of buffer). The TCP connections over the veth use --congestion (default cubic, set
on both ends' routes; `default` keeps the kernel's, BBR on the test machine). Their TCP sees
the veth's sub-millisecond RTT, not the relay's delay, and BBR paced on that overflowed
tbf's queue: with BBR, a lazy start of python (about ten connections) had 1,300-5,000 of
the ~11,600 packets to the client dropped per run, and small answers whose packets were
lost came 0.2-0.8 s late (TCP's retransmission timeout is at least 0.2 s), where a full
pull (a few connections) lost 0.1-2%. With cubic both lose under 5% (lazy: 25-1,441
packets; full pull: 29-198 of 53,000), closer to what a real link with a bandwidth-delay
product of buffer drops. Each run records the packets tbf dropped. tc netem is not
available, so the delay comes from a TCP relay (this script in its hidden --relay mode, an asyncio process) on 127.0.0.1:PORT
in front of the registry: each direction stamps every buffer it reads with now + RTT/2 and
writes it at that time, so latency is added without limiting throughput (a direction stops
reading only when max(4 MiB, 4 RTT of the rate) is queued in it). A connection's first
bytes from the client are held one extra RTT after the accept: the TCP handshake, which the
loopback connect does not pay. TCP itself sees the sub-millisecond RTT of the veth, so slow
start over the long RTT is not emulated (optimistic for every method, most for those that
open many connections). Every client (skopeo, hoist) talks to 127.0.0.1:PORT, so every byte
crosses the relay and the shaped veth. At startup the RTT (/v2/ requests on a keep-alive
connection) and the throughput (one layer blob of about 20 MB) are measured through the
relay and printed. The bytes a run moves over the link are the rx + tx deltas of hb0
(Ethernet frames: headers included, about 4% over the payload).

Methods, each run from empty local state (fresh scratch directories, fresh HOIST_HOME) with
the page cache dropped first (sync; echo 3 >/proc/sys/vm/drop_caches):
  full-pull     skopeo copy docker://127.0.0.1:PORT/python:v1 oci:DIR:v1 (pull), umoci unpack
                (unpack), runc run of the bundle with process.args = the workload, no
                terminal, a writable root; umoci's env, cwd and user (run). pull/mount = pull
                + unpack.
  hoist-lazy    hoist run --plain-http --rm --prefetch none --mode M --stats-json F
                docker://127.0.0.1:PORT/python:hoist -- ARGV
  hoist-trace   the same on python:hoist-trace-WORKLOAD with --prefetch trace
  hoist-all     the same on python:hoist-trace-WORKLOAD with --prefetch all (trace first,
                then everything)
  cri-overlayfs containerd (the system's binary, its own config, root, state and socket in the
                run's scratch directory) driven through CRI as kubelet drives it
                (target/release/examples/cri): PullImage of python:v1 with containerd's
                overlayfs snapshotter (a full pull: every layer downloaded and unpacked),
                RunPodSandbox (host network), CreateContainer + StartContainer of the
                workload; ready = the first log line equal to the warm run's. The sandbox
                (pause) image, a static busybox that sleeps, is pulled before the clock starts,
                as a node has it. pull/mount = PullImage; run = ready - pull/mount.
  cri-hoist     the same through `hoist snapshotter` (mode M, --prefetch trace) on
                python:hoist-trace-WORKLOAD: containerd downloads the manifest and config,
                the snapshotter mounts the image lazily, fetching the trace first.
  bound         computed, not run: (meta_bytes + the compressed size of the distinct chunks
                in the workload's trace) * 8 / rate + K * RTT + warm run, with K = 4
                (--bound-rtts) round trips no method can avoid (TCP connect, manifest,
                metadata blob, the data requests issued in parallel) and warm run = the
                median time to the first output line of the workload under runc on a
                umoci-unpacked rootfs on local disk with a warm page cache (measured at
                setup, --runs times after one warm-up run).
Each hoist method runs once per mode in --hoist-modes (rows `hoist-lazy (erofs)`, ...; the
traces are recorded in --record-mode, fuse by default: a fuse mount sees the reads of files,
while EROFS also reads ahead through the blob devices); pull/mount is the `mount_secs` hoist writes to
--stats-json (its start to a mounted rootfs), run = ready - mount. After each hoist run
`hoist daemon stop`, its daemon.log is kept in SCRATCH/logs and the home is removed.
skopeo, told --src-tls-verify=false, first tries HTTPS and falls back to HTTP: one more
connection and round trip than a plain-HTTP client (as TLS would cost on a real registry).

Workloads (--workloads): `main` = python3 /app/main.py (prints one JSON line when done),
`readmost` = sh -c 'tar -cf - /usr /app 2>/dev/null | wc -c' (reads ~180 MB of the 193 MB
tree, prints one line at the end; not /etc, where hoist run and runc differ: hosts,
resolv.conf). Ready = when the container's stdout shows the first line the warm run printed
(or its first line, if that never comes: then a warning); the exit time is recorded too.
The runs are interleaved (each of the N rounds runs every workload x method once) and the
medians are reported.

The containerd rows' targets (issue 16): cri-hoist >= 4x faster than cri-overlayfs to a
ready container, and within 1.3x of hoist-trace on the same image and mode.

The table shows, per method and workload, pull/mount s, run s, ready s, full-pull ready /
method ready ("x", > 1 = faster than a full pull) and MB moved over the link, the bound
row, and `hoist-trace vs bound` (hoist-trace ready / bound). The JSON (bench/out/
coldstart.json, or --json) holds every run's raw numbers, the settings (rate, RTT,
measured RTT and throughput, tbf parameters), the kernel, the warm runs and the bound's
components. --trace WORKLOAD=FILE uses a trace file instead of `hoist record` (the bound is
computed from it, and it is still converted into the trace image).

Needs root, skopeo, umoci, runc, docker-registry, ip and tc. Scratch state lives in
--scratch (default /var/tmp/hoist-coldstart), wiped at the start (leftovers of a crashed
run: namespace, links, registry, relay, containers, daemons, mounts, are cleaned up first)
and at the end unless --keep. The fixture layout is only read.
"""
import argparse, asyncio, http.client, json, os, platform, shutil, signal, socket, statistics, subprocess, sys
import re, threading, time
from pathlib import Path

import images  # bench/images.py: the test images

ROOT = Path(__file__).resolve().parent.parent
HOIST = ROOT / "target/release/hoist"
BASE_TAG = "debian-python-v1"

NETNS, HOST_IF, NS_IF = "hoistbench", "hb0", "hb1"
HOST_IP, NS_IP, REG_PORT = "10.213.0.1", "10.213.0.2", 5000
REGISTRY = f"{NS_IP}:{REG_PORT}"  # direct, unshaped until the link is shaped: setup only
REPO = "python"
CID_PREFIX = "hoistbench-"
MARKER = ".hoist-coldstart"  # marks a scratch directory this script may wipe

WORKLOADS = {
    "main": ["python3", "/app/main.py"],
    "readmost": ["sh", "-c", "tar -cf - /usr /app 2>/dev/null | wc -c"],
}
METHODS = ["full-pull", "hoist-lazy", "hoist-trace", "hoist-all", "cri-overlayfs", "cri-hoist", "bound"]
CRI_METHODS = {"cri-overlayfs": "overlayfs", "cri-hoist": "hoist"}
CRI = ROOT / "target/release/examples/cri"
PAUSE = "pause:1"
HOIST_METHODS = {"hoist-lazy": ("lazy", "none"), "hoist-trace": ("trace", "trace"), "hoist-all": ("trace", "all")}

CHILDREN = set()  # Popen objects in their own sessions, killed on the way out
_cid = 0


class RunError(Exception):
    pass


# ---------------------------------------------------------------- the relay (--relay mode)

async def _delay_pipe(reader, writer, delay, not_before, limit, counts, key):
    """Copies reader to writer, each buffer written delay seconds after it was read (not
    before not_before + delay); EOF is passed on (write_eof) once the data before it is out."""
    loop = asyncio.get_running_loop()
    queue, space, queued = asyncio.Queue(), asyncio.Event(), [0]

    async def pump_in():
        while True:
            data = await reader.read(1 << 16)
            queue.put_nowait((max(loop.time(), not_before) + delay, data))
            if not data:
                return
            queued[0] += len(data)
            counts[key] += len(data)
            while queued[0] > limit:
                space.clear()
                await space.wait()

    async def pump_out():
        while True:
            due, data = await queue.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                if writer.can_write_eof():
                    writer.write_eof()
                return
            writer.write(data)
            queued[0] -= len(data)
            space.set()
            await writer.drain()

    tasks = [asyncio.create_task(pump_in()), asyncio.create_task(pump_out())]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


async def _relay(upstream, delay, connect_delay, limit, log):
    host, port = upstream.rsplit(":", 1)
    loop = asyncio.get_running_loop()

    async def handle(creader, cwriter):
        accepted = loop.time()
        log.write(f"open {time.time():.6f}\n")
        log.flush()
        try:
            ureader, uwriter = await asyncio.open_connection(host, int(port), limit=1 << 20)
        except OSError as e:
            log.write(f"upstream connect failed: {e}\n")
            cwriter.transport.abort()
            return
        for w in (cwriter, uwriter):
            w.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        counts = {"up": 0, "down": 0}
        up = asyncio.create_task(_delay_pipe(creader, uwriter, delay, accepted + connect_delay, limit, counts, "up"))
        down = asyncio.create_task(_delay_pipe(ureader, cwriter, delay, 0, limit, counts, "down"))
        done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        failed = [t.exception() for t in done if not t.cancelled() and t.exception()]
        for t in pending:
            t.cancel()
        for w in (cwriter, uwriter):
            if failed:
                w.transport.abort()
            else:
                w.close()
        log.write(f"close {time.time():.6f} up {counts['up']} down {counts['down']}"
                  f"{' error ' + repr(failed[0]) if failed else ''}\n")
        log.flush()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, limit=1 << 20, backlog=256)
    print(server.sockets[0].getsockname()[1], flush=True)
    async with server:
        await server.serve_forever()


def relay_main(args):
    try:
        os.nice(-10)  # fewer late wake-ups on a busy machine
    except OSError:
        pass
    with open(args.relay_log, "a") as log:
        asyncio.run(_relay(args.relay, args.relay_delay_ms / 2000, args.relay_delay_ms / 1000, args.relay_limit, log))


# ---------------------------------------------------------------- helpers

def sh(cmd, env=None, check=True):
    """Runs cmd (a list); exits with its stderr on failure unless check is false."""
    out = subprocess.run(cmd, env=env, text=True, capture_output=True)
    if check and out.returncode != 0:
        sys.exit(f"{cmd} failed ({out.returncode}):\n{out.stderr}")
    return out


def attempt(cmd, env=None, timeout=None):
    """Runs cmd; returns (seconds, stdout); raises RunError with its stderr on failure."""
    start = time.perf_counter()
    try:
        out = subprocess.run(cmd, env=env, text=True, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise RunError(f"{Path(cmd[0]).name} {cmd[1]}: timed out after {timeout} s")
    except OSError as e:
        raise RunError(f"{cmd[0]}: {e}")
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RunError(f"{Path(cmd[0]).name} {cmd[1]} failed ({out.returncode}): {why(out.stderr.splitlines())}")
    return wall, out.stdout


def why(lines):
    """The telling part of an error output: its lines that mention an error, else its last lines."""
    lines = [re.sub(r"\x1b\[[0-9;]*m", "", l).strip() for l in lines if l.strip()]
    errors = [l for l in lines if "error" in l.lower()]
    return "; ".join((errors or lines)[-3:])


def drop_caches():
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def hoist_env(home):
    return dict(os.environ, HOIST_HOME=str(home))


def new_cid():
    global _cid
    _cid += 1
    return f"{CID_PREFIX}{os.getpid()}-{_cid}"


def kill_child(proc, sig=signal.SIGKILL):
    """Kills a child started in its own session, and its process group."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    CHILDREN.discard(proc)


def run_ready(cmd, env, timeout, expect=None):
    """Runs cmd with its stdout piped: seconds to ready and to its exit, exit code, first
    line and stderr tail. Ready = the first stdout line equal to expect (when one is), else
    the first stdout line: output of the tool before the container's does not count. A
    timeout kills its process group."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    CHILDREN.add(proc)
    lines, err = [], []  # (seconds, line)

    def read_out():
        for line in proc.stdout:
            lines.append((time.perf_counter() - start, line.decode(errors="replace").rstrip("\n")))

    readers = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)]
    for t in readers:
        t.start()
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    end = time.perf_counter()
    if rc is None:
        kill_child(proc)
    CHILDREN.discard(proc)
    for t in readers:  # a background process (a daemon) may hold the pipes open: do not wait for it
        t.join(timeout=1)
    stderr = (err[0] if err else b"").decode(errors="replace").strip().splitlines()
    matching = [t for t, l in lines if l == expect]
    ready = matching[0] if matching else lines[0][0] if lines else None
    return {"ready_s": ready, "exit_s": end - start, "rc": rc, "first_line": lines[0][1] if lines else None,
            "output_ok": bool(matching) if expect is not None else None, "stdout_lines": len(lines),
            "stderr_tail": stderr[-5:], "error": why(stderr)}


def link_bytes():
    base = Path("/sys/class/net") / HOST_IF / "statistics"
    return int((base / "rx_bytes").read_text()), int((base / "tx_bytes").read_text())


def tbf_drops():
    """Packets sent and dropped by the tbf qdiscs, both directions: {dev: (sent, dropped)}."""
    out = {}
    for dev, pre in ((HOST_IF, []), (NS_IF, ["ip", "netns", "exec", NETNS])):
        text = sh(pre + ["tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout
        m = re.search(r"Sent \d+ bytes (\d+) pkt \(dropped (\d+)", text)
        out[dev] = (int(m[1]), int(m[2])) if m else (0, 0)
    return out


def mount_points():
    """From mountinfo: os.path.ismount misses bind mounts within one file system."""
    with open("/proc/self/mountinfo") as f:
        return {l.split()[4].encode().decode("unicode_escape") for l in f}


def unmount_under(path):
    prefix = os.path.realpath(path) + "/"
    for m in sorted((m for m in mount_points() if m.startswith(prefix)), key=len, reverse=True):
        sh(["umount", "-l", m], check=False)


def stop_home(home, log=None):
    """Stops a HOIST_HOME's daemon, unmounts what is left under it, keeps its daemon.log as
    log (if given) and removes it."""
    if HOIST.exists():
        sh([str(HOIST), "daemon", "stop"], env=hoist_env(home), check=False)
    unmount_under(home)
    if log and (home / "daemon.log").exists():
        log.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(home / "daemon.log", log)
    if not any(m.startswith(os.path.realpath(home) + "/") for m in mount_points()):
        shutil.rmtree(home, ignore_errors=True)


def manifest(layout, tag):
    index = json.loads((layout / "index.json").read_text())
    for m in index["manifests"]:
        if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return json.loads((layout / "blobs/sha256" / m["digest"][7:]).read_text())
    sys.exit(f"no tag {tag} in {layout}")


# ---------------------------------------------------------------- network, registry, relay

def netns_exists():
    return any(l.split()[0] == NETNS for l in sh(["ip", "netns", "list"]).stdout.splitlines() if l.strip())


def teardown_network():
    if netns_exists():  # anything still in the namespace is a registry of ours
        for pid in sh(["ip", "netns", "pids", NETNS], check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
    if Path("/sys/class/net", HOST_IF).exists():
        sh(["ip", "link", "del", HOST_IF], check=False)  # takes hb1 with it
    if netns_exists():
        sh(["ip", "netns", "del", NETNS], check=False)
    deadline = time.time() + 10
    while Path("/sys/class/net", HOST_IF).exists() and time.time() < deadline:
        time.sleep(0.1)


def setup_network():
    ns = ["ip", "-n", NETNS]
    sh(["ip", "netns", "add", NETNS])
    sh(["ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NS_IF, "netns", NETNS])
    sh(["ip", "addr", "add", f"{HOST_IP}/24", "dev", HOST_IF])
    sh(["ip", "link", "set", HOST_IF, "up"])
    sh(ns + ["addr", "add", f"{NS_IP}/24", "dev", NS_IF])
    sh(ns + ["link", "set", NS_IF, "up"])
    sh(ns + ["link", "set", "lo", "up"])


CONGESTION = "cubic"


def congestion_control(name):
    """The TCP congestion control --congestion names (`default`: the kernel's); exits, before
    anything is set up, if the kernel does not offer it."""
    base = Path("/proc/sys/net/ipv4")
    if name == "default":
        return (base / "tcp_congestion_control").read_text().strip()
    available = (base / "tcp_available_congestion_control").read_text().split()
    if name not in available:
        sys.exit(f"--congestion {name}: the kernel offers {', '.join(available)} (or default)")
    return name


def shape(rate_mbit, queue_ms, congestion=CONGESTION):
    """tbf on both ends of the veth (hb0 shapes host -> registry, hb1 registry -> host), and
    `congestion` (see congestion_control) for the TCP connections over it, on both ends'
    routes."""
    rate = rate_mbit * 1e6 / 8  # bytes/s
    burst = max(64 * 1024, int(rate * 0.001))
    limit = int(rate * queue_ms / 1000) + burst
    spec = ["tbf", "rate", f"{int(rate_mbit * 1e6)}bit", "burst", str(burst), "limit", str(limit)]
    sh(["tc", "qdisc", "replace", "dev", HOST_IF, "root", *spec])
    sh(["ip", "netns", "exec", NETNS, "tc", "qdisc", "replace", "dev", NS_IF, "root", *spec])
    subnet = HOST_IP.rsplit(".", 1)[0] + ".0/24"
    for pre, dev, src in (([], HOST_IF, HOST_IP), (["ip", "netns", "exec", NETNS], NS_IF, NS_IP)):
        sh(pre + ["ip", "route", "replace", subnet, "dev", dev, "proto", "kernel", "scope", "link",
                  "src", src, "congctl", congestion])
    return {"rate_mbit": rate_mbit, "burst_bytes": burst, "limit_bytes": limit, "queue_ms": queue_ms,
            "congestion": congestion, "qdisc": sh(["tc", "qdisc", "show", "dev", HOST_IF]).stdout.strip()}


def http_ok(addr, timeout=1):
    host, port = addr.rsplit(":", 1)
    try:
        conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
        conn.request("GET", "/v2/")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except (OSError, http.client.HTTPException):
        return False


def start_registry(scratch):
    d = scratch / "registry"
    d.mkdir()
    config = d / "config.yml"
    config.write_text(
        "version: 0.1\nlog:\n  level: error\n  accesslog:\n    disabled: true\n"
        f"storage:\n  filesystem:\n    rootdirectory: {d}/data\n  delete:\n    enabled: true\n"
        f"http:\n  addr: {REGISTRY}\n"
    )
    with open(d / "registry.log", "w") as log:
        proc = subprocess.Popen(["ip", "netns", "exec", NETNS, "docker-registry", "serve", str(config)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True)
    CHILDREN.add(proc)
    deadline = time.time() + 30
    while time.time() < deadline:
        if http_ok(REGISTRY):
            return proc
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    sys.exit(f"docker-registry did not start:\n{(d / 'registry.log').read_text()}")


def start_relay(scratch, rtt_ms, rate_mbit):
    limit = max(4 << 20, int(4 * rtt_ms / 1000 * rate_mbit * 1e6 / 8))
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--relay", REGISTRY,
                             "--relay-delay-ms", str(rtt_ms), "--relay-limit", str(limit),
                             "--relay-log", str(scratch / "relay.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=open(scratch / "relay.err", "w"), start_new_session=True, text=True)
    CHILDREN.add(proc)
    (scratch / "relay.pid").write_text(str(proc.pid))
    line = proc.stdout.readline()
    if not line.strip().isdigit():
        sys.exit(f"the relay did not start:\n{(scratch / 'relay.err').read_text()}")
    return proc, int(line), limit


def relay_opens(scratch):
    try:
        return sum(1 for l in open(scratch / "relay.log") if l.startswith("open "))
    except FileNotFoundError:
        return 0


def measure_link(port, blob_digest, blob_size, rate_mbit, rtt_ms):
    """RTT of /v2/ requests through the relay on a keep-alive connection, and one blob's download."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    t = time.perf_counter()
    conn.request("GET", "/v2/")
    conn.getresponse().read()
    first = time.perf_counter() - t
    rtts = []
    for _ in range(5):
        t = time.perf_counter()
        conn.request("GET", "/v2/")
        conn.getresponse().read()
        rtts.append(time.perf_counter() - t)
    conn.close()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t = time.perf_counter()
    conn.request("GET", f"/v2/{REPO}/blobs/{blob_digest}")
    resp = conn.getresponse()
    got = 0
    while chunk := resp.read(1 << 20):
        got += len(chunk)
    secs = time.perf_counter() - t
    conn.close()
    if resp.status != 200 or got != blob_size:
        sys.exit(f"blob download through the relay: status {resp.status}, {got} of {blob_size} bytes")
    ideal = blob_size * 8 / (rate_mbit * 1e6) + 2 * rtt_ms / 1000
    return {"first_request_ms": first * 1000, "rtt_ms": statistics.median(rtts) * 1000,
            "rtts_ms": [r * 1000 for r in rtts],
            "blob": {"digest": blob_digest, "bytes": blob_size, "seconds": secs, "mbit_s": got * 8 / secs / 1e6,
                     "ideal_seconds": ideal}}


# ---------------------------------------------------------------- setup: images, traces, warm runs

def runc_config(bundle, argv):
    path = bundle / "config.json"
    c = json.loads(path.read_text())
    c["process"]["args"] = argv
    c["process"]["terminal"] = False
    c.setdefault("root", {})["readonly"] = False
    path.write_text(json.dumps(c, indent=1))


def runc_run(bundle, timeout, expect=None):
    cid = new_cid()
    try:
        return run_ready(["runc", "run", "--bundle", str(bundle), cid], None, timeout, expect)
    finally:
        sh(["runc", "delete", "-f", cid], check=False)


def warm_runs(fixtures, scratch, workloads, runs, timeout):
    """The workloads under runc on a umoci-unpacked rootfs with a warm page cache."""
    d = scratch / "warm"
    layout, bundle = d / "layout", d / "bundle"
    d.mkdir()
    sh(["skopeo", "copy", "-q", f"oci:{fixtures}:{BASE_TAG}", f"oci:{layout}:v1"])
    sh(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)])
    out = {}
    for wl in workloads:
        runc_config(bundle, WORKLOADS[wl])
        rs = [runc_run(bundle, timeout) for _ in range(runs + 1)][1:]
        bad = [r for r in rs if r["rc"] != 0 or r["ready_s"] is None]
        if bad:
            sys.exit(f"warm run of {wl} failed: {bad[0]}")
        out[wl] = {"ready_s": statistics.median(r["ready_s"] for r in rs),
                   "exit_s": statistics.median(r["exit_s"] for r in rs),
                   "first_line": rs[0]["first_line"], "runs": rs}
    shutil.rmtree(d)
    return out


def convert(src, dst, home, extra=()):
    try:
        wall, _ = attempt([str(HOIST), "convert", src, dst, "--plain-http", *extra], env=hoist_env(home))
        return wall, None
    except RunError as e:
        return None, str(e)


def make_traces(fixtures, scratch, workloads, given, mode, timeout):
    """Per workload: a trace (hoist record in mode, or --trace) and the image converted with it."""
    out = {}
    for wl in workloads:
        info = out[wl] = {"image": f"{REPO}:hoist-trace-{wl}", "error": None, "convert_error": None}
        if wl in given:
            path = Path(given[wl])
            info["source"] = "given"
        else:
            path = scratch / f"trace-{wl}.json"
            info["source"] = "hoist record"
            home = scratch / "homes" / f"record-{wl}"
            print(f"recording a trace of {wl}", flush=True)
            try:
                attempt([str(HOIST), "record", "--plain-http", "--mode", mode, f"docker://{REGISTRY}/{REPO}:hoist",
                         "--trace-out", str(path), "--", *WORKLOADS[wl]], env=hoist_env(home), timeout=timeout)
            except RunError as e:
                info["error"] = f"record: {e}"
            finally:
                stop_home(home, scratch / "logs" / f"record-{wl}.log")
        info["path"] = str(path)
        if info["error"] is None:
            try:
                info["trace"] = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                info["error"] = f"trace {path}: {e}"
        if info["error"] is None:
            print(f"converting with the {wl} trace", flush=True)
            secs, err = convert(f"oci:{fixtures}:{BASE_TAG}", f"docker://{REGISTRY}/{info['image']}",
                                scratch / "homes" / "convert", ["--prefetch-trace", str(path)])
            info["convert_s"], info["convert_error"] = secs, err
    return out


def bound_from_trace(trace, rate_mbit, rtt_s, warm_run_s, k):
    """The bound: what any method must move over the link, plus K round trips, plus the
    workload's own run time on local disk with a warm cache."""
    distinct = {}
    for c in trace["chunks"]:
        distinct[c.get("digest") or (c["blob"], c["index"])] = c["size"]
    chunk_bytes = sum(distinct.values())
    total = trace["meta_bytes"] + chunk_bytes
    transfer = total * 8 / (rate_mbit * 1e6)
    return {"meta_bytes": trace["meta_bytes"], "chunk_bytes": chunk_bytes, "distinct_chunks": len(distinct),
            "trace_chunks": len(trace["chunks"]), "files": len(trace.get("files", [])), "bytes": total,
            "rate_mbit": rate_mbit, "transfer_s": transfer, "round_trips": k, "rtt_s": rtt_s,
            "latency_s": k * rtt_s, "warm_run_s": warm_run_s, "bound_s": transfer + k * rtt_s + warm_run_s}


# ---------------------------------------------------------------- the timed runs

def run_full_pull(port, d, argv, expect, timeout):
    layout, bundle = d / "layout", d / "bundle"
    pull, _ = attempt(["skopeo", "copy", "-q", "--src-tls-verify=false", f"docker://127.0.0.1:{port}/{REPO}:v1",
                       f"oci:{layout}:v1"], timeout=timeout)
    unpack, _ = attempt(["umoci", "unpack", "--image", f"{layout}:v1", str(bundle)], timeout=timeout)
    runc_config(bundle, argv)
    r = runc_run(bundle, timeout, expect)
    if r["rc"] != 0 or r["ready_s"] is None:
        raise RunError(f"runc run: exit {r['rc']}, {r['stdout_lines']} lines: {r['error']}")
    return {"pull_s": pull, "unpack_s": unpack, "pull_mount_s": pull + unpack, "run_s": r["ready_s"],
            "ready_s": pull + unpack + r["ready_s"], "exit_s": pull + unpack + r["exit_s"],
            "container_exit_s": r["exit_s"], "first_line": r["first_line"], "output_ok": r["output_ok"]}


def run_hoist(port, d, image, prefetch, mode, argv, expect, timeout, log):
    home, stats = d / "home", d / "stats.json"
    cmd = [str(HOIST), "run", "--plain-http", "--rm", "--prefetch", prefetch, "--mode", mode,
           "--stats-json", str(stats), f"docker://127.0.0.1:{port}/{image}", "--", *argv]
    try:
        r = run_ready(cmd, hoist_env(home), timeout, expect)
    finally:
        stop_home(home, log)
    if r["rc"] != 0 or r["ready_s"] is None:
        daemon = why(log.read_text(errors="replace").splitlines()) if log.exists() else ""
        raise RunError(f"hoist run: exit {r['rc']}, {r['stdout_lines']} lines: {r['error']}"
                       + (f" (daemon.log: {daemon})" if daemon else ""))
    out = {"ready_s": r["ready_s"], "exit_s": r["exit_s"], "first_line": r["first_line"],
           "output_ok": r["output_ok"], "stderr_tail": r["stderr_tail"]}
    try:
        st = json.loads(stats.read_text())
        out.update(pull_mount_s=st["mount_secs"], run_s=r["ready_s"] - st["mount_secs"], stats=st)
    except (OSError, ValueError, KeyError) as e:
        out.update(pull_mount_s=None, run_s=None, stats_error=str(e))
    return out


def containerd_config(d, port, snapshotter):
    """containerd's config for one run: everything under d; the registry over plain HTTP
    through the relay (certs.d), restrict_oom_score_adj as on an unprivileged host."""
    certs = d / "certs.d" / f"127.0.0.1:{port}"
    certs.mkdir(parents=True)
    (certs / "hosts.toml").write_text(
        f'server = "http://127.0.0.1:{port}"\n[host."http://127.0.0.1:{port}"]\n'
        f'  capabilities = ["pull", "resolve"]\n')
    config = d / "containerd.toml"
    config.write_text(f"""version = 2
root = "{d}/containerd/root"
state = "{d}/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[proxy_plugins.hoist]
  type = "snapshot"
  address = "{d}/snapshotter.sock"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "127.0.0.1:{port}/{PAUSE}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{d}/cni/bin"
    conf_dir = "{d}/cni/conf"
""")
    return config


def wait_socket(sock, what, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if sock.exists() and subprocess.run([str(CRI), "version", str(sock)], capture_output=True).returncode == 0:
            return
        time.sleep(0.05)
    raise RunError(f"{what} did not answer on {sock} within {timeout} s")


def run_cri(port, d, method, image, mode, argv, expect, timeout, log):
    """One containerd run: the snapshotter (cri-hoist) and containerd started, the pause
    image pulled, caches dropped; then the timed CRI pull + pod + container."""
    snapshotter = CRI_METHODS[method]
    config = containerd_config(d, port, snapshotter)
    home, procs = d / "home", []
    try:
        if snapshotter == "hoist":
            p = subprocess.Popen([str(HOIST), "--hosts-dir", str(d / "certs.d"), "snapshotter", "--socket",
                                  str(d / "snapshotter.sock"), "--mode", mode, "--prefetch", "trace"],
                                 env=hoist_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                 stderr=open(d / "snapshotter.log", "w"), start_new_session=True)
            CHILDREN.add(p)
            procs.append(p)
            deadline = time.monotonic() + 30
            while not (d / "snapshotter.sock").exists():
                if time.monotonic() > deadline or p.poll() is not None:
                    raise RunError(f"hoist snapshotter did not start: {why((d / 'snapshotter.log').read_text().splitlines())}")
                time.sleep(0.02)
        p = subprocess.Popen(["containerd", "--config", str(config)], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=open(d / "containerd.log", "w"), start_new_session=True)
        CHILDREN.add(p)
        procs.append(p)
        wait_socket(d / "containerd.sock", "containerd")
        attempt([str(CRI), "pull", str(d / "containerd.sock"), f"127.0.0.1:{port}/{PAUSE}"], timeout=timeout)
        drop_caches()
        logs = d / "logs"
        logs.mkdir()
        _, out = attempt([str(CRI), "start", str(d / "containerd.sock"), f"127.0.0.1:{port}/{image}", str(logs),
                          expect, str(timeout), "--", *argv], timeout=timeout + 60)
        r = json.loads(out)
        if r["ready_s"] is None:
            raise RunError(f"{method}: no output line {expect!r} (first: {r['first_line']!r})")
        r.update(pull_mount_s=r["pull_s"], run_s=r["ready_s"] - r["pull_s"])
        return r
    finally:
        for p in reversed(procs):
            kill_child(p, signal.SIGTERM)
        # Shims of containers the client could not remove.
        sh(["pkill", "-KILL", "-f", f"{d}/containerd"], check=False)
        stop_home(home, log)


def push_pause(fixtures, scratch):
    """An image holding only tiny-v1's static busybox, whose entrypoint sleeps: the pod
    sandbox of the containerd rows. Pushed as pause:1."""
    import gzip, hashlib, io, tarfile
    layout = scratch / "pause-layout"
    blobs = layout / "blobs/sha256"
    blobs.mkdir(parents=True)
    src = manifest(fixtures, "tiny-v1")
    busybox = None
    for l in src["layers"]:
        with tarfile.open(fixtures / "blobs/sha256" / l["digest"].split(":")[1]) as t:
            for m in t.getmembers():
                if m.name.lstrip("./") == "bin/busybox" and m.isfile():
                    busybox = (m, t.extractfile(m).read())
    if busybox is None:
        sys.exit("no bin/busybox in tiny-v1")

    def put(data):
        h = hashlib.sha256(data).hexdigest()
        (blobs / h).write_bytes(data)
        return {"digest": f"sha256:{h}", "size": len(data)}

    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        info = busybox[0]
        info.name = "bin/busybox"
        t.addfile(info, io.BytesIO(busybox[1]))
    layer = raw.getvalue()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    layer_desc = put(gzip.compress(layer))
    config = put(json.dumps({"architecture": "amd64", "os": "linux",
                             "config": {"Entrypoint": ["/bin/busybox", "sleep", "2147483647"]},
                             "rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode())
    man = put(json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "config": {"mediaType": "application/vnd.oci.image.config.v1+json", **config},
                          "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", **layer_desc}]}
                         ).encode())
    (layout / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (layout / "index.json").write_text(json.dumps({"schemaVersion": 2, "manifests": [
        {"mediaType": "application/vnd.oci.image.manifest.v1+json", **man,
         "annotations": {"org.opencontainers.image.ref.name": "1"}}]}))
    sh(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{layout}:1", f"docker://{REGISTRY}/{PAUSE}"])


def one_run(row, wl, ctx):
    """One timed run of a row on a workload, from empty local state; adds link bytes and connections."""
    method, mode = row
    d = ctx["scratch"] / "run"
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    drop_caches()
    rx0, tx0 = link_bytes()
    drops0 = tbf_drops()
    conns0 = relay_opens(ctx["scratch"])
    expect = ctx["warm"][wl]["first_line"]
    try:
        if method == "full-pull":
            r = run_full_pull(ctx["port"], d, WORKLOADS[wl], expect, ctx["timeout"])
        elif method in CRI_METHODS:
            image = f"{REPO}:v1" if method == "cri-overlayfs" else ctx["traces"][wl]["image"]
            ctx["n"] = ctx.get("n", 0) + 1
            log = ctx["scratch"] / "logs" / f"{ctx['n']:03d}-{method}-{mode}-{wl}.log"
            r = run_cri(ctx["port"], d, method, image, mode, WORKLOADS[wl], expect, ctx["timeout"], log)
        else:
            kind, prefetch = HOIST_METHODS[method]
            image = f"{REPO}:hoist" if kind == "lazy" else ctx["traces"][wl]["image"]
            ctx["n"] = ctx.get("n", 0) + 1
            log = ctx["scratch"] / "logs" / f"{ctx['n']:03d}-{method}-{mode}-{wl}.log"
            r = run_hoist(ctx["port"], d, image, prefetch, mode, WORKLOADS[wl], expect, ctx["timeout"], log)
            r["daemon_log"] = str(log)
    finally:
        unmount_under(d)
        shutil.rmtree(d, ignore_errors=True)
    rx1, tx1 = link_bytes()
    drops1 = tbf_drops()
    r.update(link_rx_bytes=rx1 - rx0, link_tx_bytes=tx1 - tx0, link_mb=(rx1 - rx0 + tx1 - tx0) / 1e6,
             connections=relay_opens(ctx["scratch"]) - conns0,
             tbf_packets={dev: drops1[dev][0] - drops0[dev][0] for dev in drops1},
             tbf_dropped={dev: drops1[dev][1] - drops0[dev][1] for dev in drops1})
    if not r["output_ok"]:
        print(f"  WARNING: no output line {expect!r}; the first was {r['first_line']!r}", file=sys.stderr)
    return r


def row_name(row):
    method, mode = row
    return method if mode is None else f"{method} ({mode})"


def setup_error(row, wl, ctx):
    """Why a row cannot run on a workload at all, or None."""
    method, _ = row
    if method in ("full-pull", "cri-overlayfs"):
        return None
    if method == "cri-hoist":
        if ctx["hoist_error"]:
            return ctx["hoist_error"]
        t = ctx["traces"][wl]
        return t["error"] or t["convert_error"]
    if ctx["hoist_error"]:
        return ctx["hoist_error"]
    if HOIST_METHODS[method][0] == "trace":
        t = ctx["traces"][wl]
        return t["error"] or t["convert_error"]
    return None


# ---------------------------------------------------------------- cleanup

def clean_scratch(scratch, keep):
    """Stops daemons, unmounts, deletes leftover containers; removes scratch unless keep
    (and only if nothing is left mounted in it)."""
    homes = sorted((scratch / "homes").glob("*")) if (scratch / "homes").exists() else []
    for home in homes:
        stop_home(home)
    for home in scratch.glob("run/home"):
        stop_home(home)
    unmount_under(scratch)
    listing = sh(["runc", "list", "-q"], check=False).stdout.split()
    for cid in listing:
        if cid.startswith(CID_PREFIX):
            sh(["runc", "delete", "-f", cid], check=False)
    left = [m for m in mount_points() if m.startswith(os.path.realpath(scratch) + "/")]
    if left:
        print(f"still mounted: {left}; leaving {scratch}", file=sys.stderr)
    elif keep:
        print(f"kept {scratch}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def kill_relay(pidfile):
    """Kills the relay a crashed earlier run left, if its pid file names one that runs."""
    if pidfile.exists():
        pid = pidfile.read_text().strip()
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"--relay" in cmdline and any(a.endswith(b"coldstart.py") for a in cmdline):
                os.kill(int(pid), signal.SIGKILL)
        except (OSError, ValueError):
            pass


def clean_leftovers(scratch):
    """What a crashed earlier run may have left: the relay, the namespace (and the registry in
    it), links, daemons, mounts, containers and the scratch directory."""
    kill_relay(scratch / "relay.pid")
    teardown_network()
    if scratch.exists():
        if any(scratch.iterdir()) and not (scratch / MARKER).exists():
            sys.exit(f"{scratch} is not empty and was not made by this script: choose another --scratch")
        clean_scratch(scratch, keep=False)
        if scratch.exists():
            sys.exit(f"could not clear {scratch}")


# ---------------------------------------------------------------- report

def error_cell(err):
    err = " ".join(err.replace("|", "/").split())
    return "error: " + (err if len(err) <= 60 else err[:57] + "...")


def cell(v, digits=2):
    return "-" if v is None else f"{v:.{digits}f}"


def median_of(runs, key):
    vals = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(vals) if vals else None


def report(results, bounds, rows, workloads):
    head = ["method"] + [f"{wl} {c}" for wl in workloads for c in ("pull/mount s", "run s", "ready s", "x", "MB")]
    print("\n| " + " | ".join(head) + " |")
    print("|---|" + "---:|" * (len(head) - 1))
    for row in rows:
        name = row_name(row)
        cells = [name]
        for wl in workloads:
            r = results[name][wl]
            if r.get("median") is None:
                err = r.get("error") or "not run"
                cells += [error_cell(err), "", "", "", ""]
                continue
            m = r["median"]
            cells += [cell(m["pull_mount_s"]), cell(m["run_s"]), cell(m["ready_s"]),
                      cell(r.get("ratio")), cell(m["link_mb"], 1)]
        print("| " + " | ".join(cells) + " |")
    if bounds is not None:
        cells = ["bound"]
        for wl in workloads:
            b = bounds.get(wl, {})
            if "bound_s" not in b:
                cells += [error_cell(b.get("error", "not computed")), "", "", "", ""]
                continue
            cells += [cell(b["transfer_s"] + b["latency_s"]), cell(b["warm_run_s"]), cell(b["bound_s"]),
                      cell(b.get("ratio")), cell(b["bytes"] / 1e6, 1)]
        print("| " + " | ".join(cells) + " |")


def main():
    global BASE_TAG, HOIST
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fixtures", help=images.HELP)
    ap.add_argument("--hoist", default=str(HOIST), help="the hoist binary (default: %(default)s)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--rate-mbit", type=float, default=100, help="link rate, each direction")
    ap.add_argument("--rtt-ms", type=float, default=20, help="round-trip time the relay adds")
    ap.add_argument("--queue-ms", type=float, help="tbf queue, in ms of the rate (default: the RTT, min 5)")
    ap.add_argument("--congestion", default=CONGESTION,
                    help="TCP congestion control over the link, or default (the kernel's; default: %(default)s)")
    ap.add_argument("--workloads", default="main,readmost", help=f"comma-separated, of {','.join(WORKLOADS)}")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated")
    ap.add_argument("--hoist-modes", default="erofs,fuse", help="comma-separated hoist mount modes")
    ap.add_argument("--record-mode", default="fuse", choices=["fuse", "erofs"],
                    help="mode hoist record runs in (fuse: the trace holds the reads of files, "
                         "without the readahead EROFS does through the blob devices)")
    ap.add_argument("--tag", default=BASE_TAG, help="the image's tag in --fixtures")
    ap.add_argument("--trace", action="append", default=[], metavar="WORKLOAD=FILE",
                    help="use this trace instead of hoist record (repeatable)")
    ap.add_argument("--bound-rtts", type=int, default=4, help="round trips in the bound")
    ap.add_argument("--run-timeout", type=float, default=600, help="seconds a step may take")
    ap.add_argument("--scratch", default="/var/tmp/hoist-coldstart")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--json", default=str(ROOT / "bench/out/coldstart.json"))
    ap.add_argument("--relay", help=argparse.SUPPRESS)
    ap.add_argument("--relay-delay-ms", type=float, help=argparse.SUPPRESS)
    ap.add_argument("--relay-limit", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--relay-log", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.fixtures = args.fixtures or images.test_images()
    BASE_TAG = args.tag
    HOIST = Path(args.hoist).resolve()
    if args.relay:
        return relay_main(args)

    workloads = [w for w in args.workloads.split(",") if w]
    methods = [m for m in args.methods.split(",") if m]
    modes = [m for m in args.hoist_modes.split(",") if m]
    for w in workloads:
        if w not in WORKLOADS:
            sys.exit(f"unknown workload {w} (choose from {', '.join(WORKLOADS)})")
    for m in methods:
        if m not in METHODS:
            sys.exit(f"unknown method {m} (choose from {', '.join(METHODS)})")
    given = dict(t.split("=", 1) for t in args.trace)
    queue_ms = args.queue_ms if args.queue_ms is not None else max(args.rtt_ms, 5)
    args.congestion = congestion_control(args.congestion)
    fixtures, scratch = Path(args.fixtures).resolve(), Path(args.scratch)
    if os.geteuid() != 0:
        sys.exit("bench/coldstart.py must run as root (namespaces, tc, runc, mounts, drop_caches)")
    for tool in ("skopeo", "umoci", "runc", "docker-registry", "ip", "tc"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed")
    hoist_rows = [m for m in methods if m in HOIST_METHODS or m == "cri-hoist"]
    if any(m in CRI_METHODS for m in methods):
        if not shutil.which("containerd"):
            sys.exit("containerd is not installed (apt-get install containerd)")
        if not CRI.exists():
            subprocess.run(["cargo", "build", "--release", "-p", "hoist", "--example", "cri"], cwd=ROOT, check=True)
    if (hoist_rows or "bound" in methods) and not HOIST.exists():
        sys.exit(f"{HOIST} does not exist (cargo build --release -p hoist)")
    rows = [(m, mode) for m in methods if m != "bound"
            for mode in ([None] if m in ("full-pull", "cri-overlayfs") else modes)]
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("terminated"))

    clean_leftovers(scratch)
    scratch.mkdir(parents=True)
    (scratch / MARKER).touch()
    (scratch / "homes").mkdir()
    ctx = {"scratch": scratch, "timeout": args.run_timeout, "hoist_error": None, "traces": {}}
    results, bounds, link = {row_name(r): {wl: {"runs": []} for wl in workloads} for r in rows}, None, {}
    try:
        print(f"network namespace {NETNS}, registry on {REGISTRY}", flush=True)
        setup_network()
        start_registry(scratch)
        print("pushing python:v1 (skopeo)", flush=True)
        sh(["skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{fixtures}:{BASE_TAG}",
            f"docker://{REGISTRY}/{REPO}:v1"])
        if hoist_rows or "bound" in methods:
            print("pushing python:hoist (hoist convert)", flush=True)
            secs, err = convert(f"oci:{fixtures}:{BASE_TAG}", f"docker://{REGISTRY}/{REPO}:hoist",
                                scratch / "homes" / "convert")
            ctx["hoist_error"] = err and f"convert: {err}"
            ctx["convert_s"] = secs
            print(f"  {err}" if err else f"  {secs:.1f} s", flush=True)
        print(f"warm runs under runc ({args.runs} + 1 each)", flush=True)
        ctx["warm"] = warm_runs(fixtures, scratch, workloads, args.runs, args.run_timeout)
        if any(m in CRI_METHODS for m in methods):
            print("pushing pause:1 (the pod sandbox image)", flush=True)
            push_pause(fixtures, scratch)
        if any(m == "cri-hoist" or HOIST_METHODS[m][0] == "trace" for m in hoist_rows) or "bound" in methods:
            if ctx["hoist_error"] and not given:
                ctx["traces"] = {wl: {"error": ctx["hoist_error"], "convert_error": None} for wl in workloads}
            else:
                ctx["traces"] = make_traces(fixtures, scratch, workloads, given, args.record_mode,
                                            args.run_timeout)

        link["tbf"] = shape(args.rate_mbit, queue_ms, args.congestion)
        _, port, limit = start_relay(scratch, args.rtt_ms, args.rate_mbit)
        ctx["port"] = port
        layers = manifest(fixtures, BASE_TAG)["layers"]
        blob = min(layers, key=lambda l: abs(l["size"] - 20e6))
        link.update(measure_link(port, blob["digest"], blob["size"], args.rate_mbit, args.rtt_ms),
                    relay_port=port, relay_queue_limit_bytes=limit)
        b = link["blob"]
        print(f"link: {args.rate_mbit:g} Mbit/s, RTT {args.rtt_ms:g} ms: measured RTT {link['rtt_ms']:.1f} ms "
              f"(keep-alive /v2/, median of 5), first request on a new connection {link['first_request_ms']:.1f} ms; "
              f"a {b['bytes'] / 1e6:.1f} MB blob in {b['seconds']:.2f} s = {b['mbit_s']:.1f} Mbit/s "
              f"(ideal {b['ideal_seconds']:.2f} s)", flush=True)

        for i in range(args.runs):
            for wl in workloads:
                for row in rows:
                    name, cellr = row_name(row), results[row_name(row)][wl]
                    if "error" in cellr:
                        continue
                    err = setup_error(row, wl, ctx)
                    if err:
                        cellr["error"] = err
                        continue
                    print(f"run {i + 1}/{args.runs}: {wl}, {name}", flush=True)
                    try:
                        r = one_run(row, wl, ctx)
                    except RunError as e:
                        cellr["error"] = str(e)
                        print(f"  error: {e}", flush=True)
                        continue
                    cellr["runs"].append(r)
                    print(f"  ready {r['ready_s']:.2f} s, exit {r['exit_s']:.2f} s, {r['link_mb']:.1f} MB, "
                          f"{r['connections']} connections, {r['tbf_dropped'][NS_IF]} of "
                          f"{r['tbf_packets'][NS_IF]} packets to the client dropped by tbf", flush=True)
        link["tbf_stats_end"] = {dev: sh(pre + ["tc", "-s", "qdisc", "show", "dev", dev], check=False).stdout.strip()
                                 for dev, pre in ((HOST_IF, []), (NS_IF, ["ip", "netns", "exec", NETNS]))}
    finally:
        for p in list(CHILDREN):
            kill_child(p)
        teardown_network()
        clean_scratch(scratch, args.keep)

    for name, per in results.items():
        for wl, cellr in per.items():
            rs = cellr["runs"]
            if rs and "error" not in cellr:
                cellr["median"] = {k: median_of(rs, k) for k in
                                   ("pull_mount_s", "run_s", "ready_s", "exit_s", "link_mb", "pull_s", "unpack_s")}
    for per in results.values():
        for wl, cellr in per.items():
            fp = results.get("full-pull", {}).get(wl, {}).get("median")
            if cellr.get("median") and fp:
                cellr["ratio"] = fp["ready_s"] / cellr["median"]["ready_s"]
    if "bound" in methods:
        bounds = {}
        for wl in workloads:
            t = ctx["traces"].get(wl, {})
            if t.get("error") or "trace" not in t:
                bounds[wl] = {"error": t.get("error") or "no trace"}
                continue
            try:
                bounds[wl] = bound_from_trace(t["trace"], args.rate_mbit, args.rtt_ms / 1000,
                                              ctx["warm"][wl]["ready_s"], args.bound_rtts)
            except (KeyError, TypeError) as e:
                bounds[wl] = {"error": f"trace {t['path']}: missing {e}"}
                continue
            fp = results.get("full-pull", {}).get(wl, {}).get("median")
            if fp:
                bounds[wl]["ratio"] = fp["ready_s"] / bounds[wl]["bound_s"]

    print(f"\ncold start of {BASE_TAG} over {args.rate_mbit:g} Mbit/s, {args.rtt_ms:g} ms RTT (measured "
          f"{link['rtt_ms']:.1f} ms, {link['blob']['mbit_s']:.1f} Mbit/s; TCP {link['tbf']['congestion']}); "
          f"median of {args.runs} runs, "
          f"empty local state and caches dropped before each; kernel {platform.release()}, {os.cpu_count()} cores; "
          f"hoist {HOIST}")
    report(results, bounds, rows, workloads)
    fp = results.get("full-pull")
    for wl in workloads:
        m = fp and fp[wl].get("median")
        if m:
            print(f"full-pull {wl}: pull {m['pull_s']:.2f} s, unpack {m['unpack_s']:.2f} s, "
                  f"run {m['run_s']:.2f} s (exit {m['exit_s']:.2f} s); warm run {ctx['warm'][wl]['ready_s']:.3f} s")
    trace_vs_bound = {}
    for mode in modes:
        for wl in workloads:
            r = results.get(f"hoist-trace ({mode})", {}).get(wl, {}).get("median")
            b = (bounds or {}).get(wl, {})
            if r and "bound_s" in b:
                trace_vs_bound[f"{wl} ({mode})"] = r["ready_s"] / b["bound_s"]
                print(f"hoist-trace vs bound: {r['ready_s'] / b['bound_s']:.2f}x ({wl}, {mode})")
    cri_targets = {}
    for mode in modes:
        for wl in workloads:
            ch = results.get(f"cri-hoist ({mode})", {}).get(wl, {}).get("median")
            co = results.get("cri-overlayfs", {}).get(wl, {}).get("median")
            ht = results.get(f"hoist-trace ({mode})", {}).get(wl, {}).get("median")
            if ch and co:
                cri_targets[f"{wl} ({mode}) cri-overlayfs / cri-hoist"] = co["ready_s"] / ch["ready_s"]
                print(f"cri-hoist vs cri-overlayfs: {co['ready_s'] / ch['ready_s']:.2f}x faster ({wl}, {mode}; target >= 4)")
            if ch and ht:
                cri_targets[f"{wl} ({mode}) cri-hoist / hoist-trace"] = ch["ready_s"] / ht["ready_s"]
                print(f"cri-hoist vs hoist-trace: {ch['ready_s'] / ht['ready_s']:.2f}x the time ({wl}, {mode}; target <= 1.3)")
    for wl, b in (bounds or {}).items():
        if "bound_s" in b:
            print(f"bound {wl}: ({b['meta_bytes']} meta + {b['chunk_bytes']} chunk bytes) * 8 / "
                  f"{b['rate_mbit']:g} Mbit/s = {b['transfer_s']:.3f} s + {b['round_trips']} x "
                  f"{b['rtt_s'] * 1000:g} ms + warm run {b['warm_run_s']:.3f} s = {b['bound_s']:.3f} s")

    traces = {wl: {k: v for k, v in t.items() if k != "trace"} for wl, t in ctx["traces"].items()}
    result = {"kernel": platform.release(), "cores": os.cpu_count(), "runs": args.runs, "image": BASE_TAG,
              "settings": {"rate_mbit": args.rate_mbit, "rtt_ms": args.rtt_ms, "measured_rtt_ms": link["rtt_ms"],
                           "queue_ms": queue_ms, "bound_round_trips": args.bound_rtts, "link": link},
              "workloads": {wl: WORKLOADS[wl] for wl in workloads}, "hoist_modes": modes,
              "convert_s": ctx.get("convert_s"), "hoist_error": ctx["hoist_error"],
              "warm": ctx["warm"], "traces": traces, "bound": bounds, "results": results,
              "trace_vs_bound": trace_vs_bound, "cri_targets": cri_targets}
    out_json = Path(args.json)
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(result, indent=2))
    print(f"JSON: {out_json}")


if __name__ == "__main__":
    main()
