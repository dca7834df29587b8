#!/usr/bin/env bash
# The real OCI images the integration tests read: prints the path of the OCI layout to test
# with, building it first if there is none. In this order:
#   1. $HOIST_FIXTURES, when set (it must be an OCI layout);
#   2. ../shared/fixtures/oci beside the checkout, when there;
#   3. images this script builds, cached outside the checkout in
#      ${HOIST_TEST_IMAGES:-/var/cache/hoist/test-images}/KEY/oci, KEY being the start of this
#      script's sha256, so that a later run (of any clone) reuses them and a changed script
#      builds anew. The first build takes about 3 minutes: it needs root, Debian's mirror
#      ($MIRROR, default http://deb.debian.org/debian) and installs debootstrap umoci attr
#      busybox-static openssl when missing.
#
# Tags (every layer a gzip tar, as `docker push` makes them):
#   tiny-v1           busybox-static and the edge cases below; 3 layers
#   debian-python-v1  debootstrap bookworm (minbase), python3, an app; 3 layers: python3 /app/main.py
#   debian-python-v2  v1's base layer as is, the python3 layer rebuilt with python3-yaml, the app
#                     changed: an update whose layers differ but whose files mostly do not
# Every image's app/ holds the edge cases an image format must keep: a setuid file, a mode-000
# file, hardlinks across directories, relative, absolute and dangling symlinks, a user.* xattr,
# a name over 100 bytes (PAX), a UTF-8 name, a FIFO, a character device, a directory of 3000
# entries, 8 MiB of incompressible data and 16 MiB of zeros. Its top layer whites out a file
# (etc/motd) and a directory (usr/share/man) and makes usr/share/doc opaque; in tiny-v1 it
# also overwrites one name of a hardlink pair.
#
# Concurrent runs build once (a lock); a build happens in a temporary directory renamed into
# place when complete, so a killed build leaves nothing a later run would trust.
set -euo pipefail
SELF=$(realpath "$0")
REPO=$(dirname "$(dirname "$SELF")")

if [[ -n "${HOIST_FIXTURES:-}" ]]; then
  [[ -f "$HOIST_FIXTURES/index.json" ]] \
    || { echo "HOIST_FIXTURES=$HOIST_FIXTURES is not an OCI layout (no index.json)" >&2; exit 1; }
  echo "$HOIST_FIXTURES"; exit 0
fi
SHARED=$(dirname "$REPO")/shared/fixtures/oci
if [[ -f "$SHARED/index.json" ]]; then echo "$SHARED"; exit 0; fi

CACHE=${HOIST_TEST_IMAGES:-/var/cache/hoist/test-images}
KEY=$(sha256sum "$SELF" | cut -c1-16)
DONE=$CACHE/$KEY
if [[ -f "$DONE/oci/index.json" ]]; then echo "$DONE/oci"; exit 0; fi

if [[ $(id -u) != 0 ]]; then
  echo "no test images: neither HOIST_FIXTURES, nor $SHARED, nor $DONE/oci;" \
    "building them needs root (debootstrap, chroot, mknod): run 'sudo $SELF' once" >&2
  exit 1
fi
mkdir -p "$CACHE"
exec 9>"$CACHE/.lock"
flock 9
# Another run may have built them while this one waited for the lock.
if [[ -f "$DONE/oci/index.json" ]]; then echo "$DONE/oci"; exit 0; fi

log() { echo "test images: $*" >&2; }
# Detaches whatever is mounted under $1 (deepest first), then removes it, never crossing into
# a file system still mounted there (a chroot's /dev is the host's).
remove_tree() {
  { findmnt -rno TARGET | grep -F "$1/" || true; } | sort -r | xargs -r -d '\n' umount -l
  rm -rf --one-file-system "$1"
}
# What a build killed before its end left behind.
for stale in "$CACHE"/.build-*; do [[ -e "$stale" ]] && remove_tree "$stale"; done

need=(debootstrap umoci attr busybox-static openssl tar gzip)
missing=(); for p in "${need[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  log "installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}
umask 022

BUILD=$(mktemp -d "$CACHE/.build-XXXXXX")
trap 'remove_tree "$BUILD"' EXIT
OCI=$BUILD/result/oci
WORK=$BUILD/work
mkdir -p "$WORK"
started=$SECONDS
umoci init --layout "$OCI"

# A tar of DIR's contents as the next layer of image FROM, tagged TO: sorted, numeric owners
# as they are (debootstrap's files are not all root's), one mtime, PAX headers (long names,
# xattrs), user.* xattrs kept. umoci gzips it.
layer() { # FROM TO DIR WHAT
  tar -C "$3" -cf "$WORK/layer.tar" --sort=name --format=pax --numeric-owner \
    --mtime='2024-01-01 00:00:00Z' --xattrs --xattrs-include='user.*' .
  umoci raw add-layer --image "$OCI:$1" --tag "$2" --history.created_by "$4" "$WORK/layer.tar"
  rm "$WORK/layer.tar"
}

empty_image() { # TAG CMD...
  local tag=$1; shift
  local args=(); for a in "$@"; do args+=(--config.cmd "$a"); done
  umoci new --image "$OCI:$tag"
  umoci config --image "$OCI:$tag" --os linux --architecture amd64 --author hoist-tests \
    --config.env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "${args[@]}"
}

# Runs a shell command in ROOTFS (with /proc, /dev and the host's resolver), as apt needs.
in_chroot() { # ROOTFS COMMAND
  local root=$1 rc=0
  cp /etc/resolv.conf "$root/etc/resolv.conf"
  mount -t proc proc "$root/proc"
  mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
  chroot "$root" /bin/sh -c "$2" || rc=$?
  umount -R "$root/dev"; umount "$root/proc"
  rm -f "$root/etc/resolv.conf"
  return $rc
}

# The edge cases, in DIR/app; SEED varies the data between images.
edge_cases() { # DIR SEED
  local app=$1/app seed=$2 i
  mkdir -p "$app/sub/deep/nested" "$app/bigdir" "$app/dev"
  # (a process substitution: the pipe's writer dies of SIGPIPE, which pipefail would see)
  head -c 8M <(openssl enc -aes-128-ctr -nosalt -pass "pass:$seed" </dev/zero 2>/dev/null) >"$app/data.bin"
  head -c 16M /dev/zero >"$app/zeros.bin"
  echo "hello from $seed" >"$app/hello.txt"
  ln "$app/hello.txt" "$app/sub/hello-hardlink.txt"
  : >"$app/empty" && chmod 4755 "$app/empty"
  echo secret >"$app/mode000" && chmod 000 "$app/mode000"
  ln -s hello.txt "$app/current"
  ln -s /etc/os-release "$app/abs-link"
  ln -s does/not/exist "$app/dangling"
  echo nested >"$app/sub/deep/nested/file.txt"
  echo x >"$app/xattr.txt" && setfattr -n user.fixture.comment -v "hello-xattr-$seed" "$app/xattr.txt"
  echo long >"$app/$(printf '%0120d' 0 | tr 0 n)-long-name.txt"
  echo utf8 >"$app/ünïcødé-名前.txt"
  mkfifo "$app/fifo"
  mknod "$app/dev/null-copy" c 1 3
  for i in $(seq 3000); do echo "$i" >"$app/bigdir/f$i"; done
}

# What the top layer removes from the ones below: a file, a directory, a directory's old
# contents (opaque).
whiteouts() { # DIR
  mkdir -p "$1/etc" "$1/usr/share/doc"
  : >"$1/etc/.wh.motd"
  : >"$1/usr/share/.wh.man"
  : >"$1/usr/share/doc/.wh..wh..opq"
  echo 'docs replaced by an opaque directory' >"$1/usr/share/doc/README.image"
}

log "building tiny-v1 in $BUILD"
t=$WORK/tiny
mkdir -p "$t/1/bin" "$t/1/etc" "$t/1/usr/share/doc/a" "$t/1/usr/share/man/man1" "$t/2" "$t/3/app"
cp /bin/busybox "$t/1/bin/busybox"
for cmd in sh ls cat echo head wc find stat sha256sum; do ln -s busybox "$t/1/bin/$cmd"; done
echo 'root:x:0:0:root:/root:/bin/sh' >"$t/1/etc/passwd"
echo tiny >"$t/1/etc/motd"
echo doc-a >"$t/1/usr/share/doc/a/README"
echo man >"$t/1/usr/share/man/man1/x.1"
edge_cases "$t/2" tiny
whiteouts "$t/3"
echo 'hello from tiny-v1 upper' >"$t/3/app/hello.txt"
find "$t" -type d -exec chmod 755 {} +
empty_image tiny /bin/sh -c 'cat /app/hello.txt'
layer tiny tiny-1 "$t/1" 'busybox'
layer tiny-1 tiny-2 "$t/2" 'edge cases'
layer tiny-2 tiny-v1 "$t/3" 'whiteouts, opaque directory, hardlink pair broken'

log "debootstrap bookworm from $MIRROR"
base=$WORK/base
debootstrap --variant=minbase bookworm "$base" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
  || { tail -20 "$WORK/debootstrap.log" >&2; exit 1; }
rm -rf "$base"/dev/* "$base"/var/cache/apt/archives/*.deb "$base"/var/cache/apt/*.bin \
  "$base"/var/lib/apt/lists/* "$base/etc/resolv.conf"
empty_image debian python3 /app/main.py
layer debian debian-base "$base" 'debootstrap --variant=minbase bookworm'
remove_tree "$base"

# One image on debian-base: PACKAGES installed by apt (umoci repack keeps what changed), then
# the app and the edge cases.
debian_python() { # TAG PACKAGES SEED
  local bundle=$WORK/bundle app=$WORK/app
  log "$1: apt-get install $2"
  umoci unpack --image "$OCI:debian-base" "$bundle" >/dev/null
  in_chroot "$bundle/rootfs" "export DEBIAN_FRONTEND=noninteractive
    apt-get update -q && apt-get install -y -q --no-install-recommends $2 && apt-get clean
    rm -rf /var/lib/apt/lists/*" >"$WORK/apt.log" 2>&1 || { tail -20 "$WORK/apt.log" >&2; exit 1; }
  umoci repack --image "$OCI:$1-python" --history.created_by "apt-get install $2" "$bundle"
  remove_tree "$bundle"
  mkdir -p "$app/app"
  cat >"$app/app/main.py" <<'EOF'
import hashlib, json, os, sqlite3, sys
data = hashlib.sha256(open('/app/data.bin', 'rb').read()).hexdigest()
print(json.dumps({"python": sys.version.split()[0], "data": data[:16],
                  "motd": os.path.exists('/etc/motd'), "man": os.path.exists('/usr/share/man'),
                  "doc": sorted(os.listdir('/usr/share/doc')), "sqlite": sqlite3.sqlite_version}))
EOF
  edge_cases "$app" "$3"
  whiteouts "$app"
  find "$app" -type d -exec chmod 755 {} +
  layer "$1-python" "$1" "$app" "app ($3), whiteouts, opaque directory"
  rm -rf "$app"
}
debian_python debian-python-v1 python3 v1
debian_python debian-python-v2 'python3 python3-yaml' v2

for tag in tiny tiny-1 tiny-2 debian debian-base debian-python-v1-python debian-python-v2-python; do
  umoci rm --image "$OCI:$tag"
done
umoci gc --layout "$OCI"
[[ $(umoci ls --layout "$OCI" | sort | tr '\n' ' ') == 'debian-python-v1 debian-python-v2 tiny-v1 ' ]] \
  || { echo "test images: unexpected tags: $(umoci ls --layout "$OCI")" >&2; exit 1; }
remove_tree "$WORK"
rm -rf "$DONE"
mv -T "$BUILD/result" "$DONE"
log "built in $((SECONDS - started)) s: $DONE/oci ($(du -sh "$DONE/oci" | cut -f1))"
echo "$DONE/oci"
