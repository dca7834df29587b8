#!/usr/bin/env bash
# The main job, on a fresh Debian machine: build a sample application image (Debian
# bookworm + python3 + a small app), serve it from a local registry behind an emulated
# 100 Mbit/s, 20 ms link, and cold-start it two ways, printing both times:
#   full pull   skopeo copy + umoci unpack + runc (what a node does today)
#   hoist       hoist run: lazy mount + runc, without and with a recorded start-up trace
# Needs root (apt-get, debootstrap, mounts, network namespaces) and a Rust toolchain.
# Leaves its files in ${WORK:-/var/tmp/hoist-quickstart}; the sample image is built once
# (2-3 minutes, from the Debian mirror apt uses) and reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/hoist-quickstart}
MIRROR=${MIRROR:-http://deb.debian.org/debian}

need=(debootstrap umoci skopeo docker-registry runc fuse3 erofs-utils iproute2 python3 openssl)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  echo "== installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "needs a Rust toolchain (https://rustup.rs)"; exit 1; }
echo "== building hoist"
cargo build --release -q -p hoist

OCI=$WORK/oci
if ! umoci ls --layout "$OCI" 2>/dev/null | grep -qx python-app; then
  echo "== building the sample image (debootstrap bookworm + python3 + app) in $OCI"
  # (grep finds nothing on a fresh machine: not an error under pipefail)
  { findmnt -rno TARGET | grep "^$WORK/" || true; } | sort -r | xargs -r umount -l
  rm -rf --one-file-system "$WORK"; mkdir -p "$WORK"
  B=$(mktemp -d "$WORK/build.XXXXXX")
  trap 'umount -R "$B/rootfs/dev" 2>/dev/null || true; umount "$B/rootfs/proc" 2>/dev/null || true' EXIT
  debootstrap --variant=minbase bookworm "$B/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  cp /etc/resolv.conf "$B/rootfs/etc/resolv.conf"
  mount -t proc proc "$B/rootfs/proc"; mount --rbind /dev "$B/rootfs/dev"; mount --make-rslave "$B/rootfs/dev"
  chroot "$B/rootfs" /bin/sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get update -q && apt-get install -y -q --no-install-recommends python3 && apt-get clean' \
    >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log"; exit 1; }
  umount -R "$B/rootfs/dev"; umount "$B/rootfs/proc"; trap - EXIT
  rm -rf "$B/rootfs/dev/"* "$B/rootfs/var/lib/apt/lists/"* "$B/rootfs/var/cache/apt/"*.bin "$B/rootfs/etc/resolv.conf"
  # The app: imports from the standard library and hashes 8 MiB of its own data.
  mkdir -p "$B/rootfs/app"
  head -c 8388608 <(openssl enc -aes-128-ctr -pass pass:sample -nosalt </dev/zero 2>/dev/null) >"$B/rootfs/app/data.bin"
  cat >"$B/rootfs/app/main.py" <<'EOF'
import hashlib, json, sqlite3, sys
h = hashlib.sha256(open('/app/data.bin', 'rb').read()).hexdigest()
print(json.dumps({"python": sys.version.split()[0], "data": h[:16], "sqlite": sqlite3.sqlite_version}))
EOF
  umoci init --layout "$OCI"
  umoci new --image "$OCI:python-app"
  umoci config --image "$OCI:python-app" --os linux --architecture amd64 \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --config.cmd python3 --config.cmd /app/main.py
  umoci unpack --image "$OCI:python-app" "$B/bundle" >/dev/null
  cp -a "$B/rootfs/." "$B/bundle/rootfs/"
  umoci repack --image "$OCI:python-app" "$B/bundle" >/dev/null
  rm -rf "$B"
fi
echo "sample image: oci:$OCI:python-app ($(du -sh "$OCI" | cut -f1) in the layout)"

echo "== cold start over an emulated 100 Mbit/s, 20 ms link (registry in a network namespace)"
python3 bench/coldstart.py --fixtures "$OCI" --tag python-app --runs 1 --workloads main \
  --hoist-modes fuse --methods full-pull,hoist-lazy,hoist-trace,bound \
  --scratch "$WORK/bench" --json "$WORK/coldstart.json"
