#!/usr/bin/env bash
# Builds a small sample image, converts it with hoist, verifies it, and mounts it lazily,
# with the kernel's EROFS and with FUSE: the main job of this stage of the project,
# runnable on a fresh Debian. Needs root (apt-get, mount). Leaves its files in ${WORK:-/var/tmp/hoist-quickstart}.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-/var/tmp/hoist-quickstart}
export HOIST_HOME=${HOIST_HOME:-$WORK/home}

need=(umoci busybox-static erofs-utils fuse3)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "needs a Rust toolchain (rustup.rs)"; exit 1; }
cargo build --release -q -p hoist
HOIST=$PWD/target/release/hoist

rm -rf "$WORK"; mkdir -p "$WORK"
echo "== building a sample image (busybox + a small app) in $WORK/oci"
umoci init --layout "$WORK/oci"
umoci new --image "$WORK/oci:sample"
umoci config --image "$WORK/oci:sample" --config.cmd /bin/sh --config.cmd=-c --config.cmd='cat /app/hello.txt'
umoci unpack --image "$WORK/oci:sample" "$WORK/bundle" >/dev/null
mkdir -p "$WORK/bundle/rootfs/bin" "$WORK/bundle/rootfs/app"
cp /bin/busybox "$WORK/bundle/rootfs/bin/busybox"
for t in sh cat ls; do ln -sf busybox "$WORK/bundle/rootfs/bin/$t"; done
echo "hello from a lazily loadable image" >"$WORK/bundle/rootfs/app/hello.txt"
head -c 4194304 /dev/urandom >"$WORK/bundle/rootfs/app/data.bin"
umoci repack --image "$WORK/oci:sample" "$WORK/bundle" >/dev/null

echo "== hoist convert"
"$HOIST" convert "oci:$WORK/oci:sample" "oci:$WORK/hoist:sample"
echo "== hoist check"
"$HOIST" check "oci:$WORK/hoist:sample"
echo "== hoist inspect"
"$HOIST" inspect "oci:$WORK/hoist:sample"
mkdir -p "$WORK/mnt"
cleanup() { "$HOIST" umount "$WORK/mnt" >/dev/null 2>&1 || true; "$HOIST" daemon stop >/dev/null 2>&1 || true; }
trap cleanup EXIT
for mode in erofs fuse; do
  echo "== hoist mount --mode $mode (lazy: only the metadata is read to mount)"
  "$HOIST" mount --mode "$mode" "oci:$WORK/hoist:sample" "$WORK/mnt"
  chroot "$WORK/mnt" /bin/sh -c 'cat /app/hello.txt; ls -l /app'
  "$HOIST" stat "$WORK/mnt"
  "$HOIST" umount "$WORK/mnt"
done
