#!/usr/bin/env bash
# Prepares everything the e2e tests need to boot QEMU guests against our vhost-user backend.
#
#   test/e2e/setup.sh                 # everything (base + qemu-console)
#   test/e2e/setup.sh base            # apt packages, guest kernel, initramfs (no QEMU build)
#   test/e2e/setup.sh qemu-console    # only the patched QEMU build (installs its build deps)
#
# Idempotent and CI-safe (no prompts). Every step is skipped when its outputs already exist, so a warm
# run takes ~50 ms. Everything is cached outside the repo under $E2E_CACHE
# (default /var/cache/vhost-backend-e2e). The paths of the artifacts are written as JSON to
# $E2E_CACHE/rig.json and, when set, to $E2E_RIG_JSON (test/e2e/rig.ts reads that one).
#
# Why each piece exists:
#  - QEMU 10 from bookworm-backports: bookworm's 7.2 lacks devices/fixes we rely on.
#  - A patched QEMU ("qemu-console"): the generic vhost-user-device(-pci) is the only way to attach a
#    vhost-user virtio-console, but upstream marks it user_creatable = false.
#  - The backports 6.12 kernel, extracted rather than installed: it has virtio-snd, and we must not touch
#    the host's /boot.
#  - A tiny busybox initramfs whose /init runs the command handed in through fw_cfg and prints
#    E2E-EXIT-STATUS=<n> on the serial console, so one QEMU process == one test command.
set -Eeuo pipefail
# Under set -e a failing command exits silently: say which one.
trap 'echo "[e2e-setup] ERROR: line $LINENO: \"$BASH_COMMAND\" failed (exit $?)" >&2' ERR

CACHE="${E2E_CACHE:-/var/cache/vhost-backend-e2e}"
QEMU_UPSTREAM_VERSION=10.0.2
SCRIPT_PATH="$(readlink -f "${BASH_SOURCE[0]}")"
export DEBIAN_FRONTEND=noninteractive
export LC_ALL=C

log() { echo "[e2e-setup $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  command -v sudo >/dev/null || die "must run as root (or have sudo)"
  SUDO="sudo -n"
fi

mkdir -p "$CACHE" 2>/dev/null || { $SUDO mkdir -p "$CACHE"; $SUDO chown "$(id -u):$(id -g)" "$CACHE"; }

# Serialize concurrent runs (parallel CI jobs, several bun test processes) on one cache.
exec 9>"$CACHE/.setup.lock"
flock 9

# ---------------------------------------------------------------------------------------------------
# apt: bookworm-backports sources + packages
# ---------------------------------------------------------------------------------------------------

# Packages from plain bookworm.
APT_PACKAGES=(
  busybox-static fio e2fsprogs util-linux cpio xz-utils kmod
  dpkg-dev build-essential ninja-build libglib2.0-dev libpixman-1-dev pkg-config python3-venv
  flex bison libaio-dev libnbd0 nbdkit
)
# Net tests: namespaces and taps, traffic, captures, offload checks, DPDK's vhost as a reference.
APT_PACKAGES+=(iproute2 iperf3 tcpdump ethtool iputils-ping dpdk dpdk-dev)
# Sound tests: ALSA tools for the guest initramfs (aplay/arecord/amixer), the host ALSA backend and its plugins, PulseAudio as a host sound server.
APT_PACKAGES+=(alsa-utils libasound2 libasound2-plugins pulseaudio)
# Metrics tests: the Prometheus project's own exposition parsers (strict OpenMetrics, text 0.0.4).
APT_PACKAGES+=(python3-prometheus-client)
# The acquire-phase tests: every device's full session traced with strace -f.
APT_PACKAGES+=(strace)
# RBD tests: a single-node Ceph cluster (test/support/ceph_cluster.ts) and librbd for the disk.
APT_PACKAGES+=(ceph-mon ceph-osd ceph-common librbd1)
# Packages that must come from bookworm-backports, with the minimum version we need (QEMU's configure
# insists on meson >= 1.5 and pycotap, and cannot fetch them offline).
# qemu-block-extra: qemu-storage-daemon's rbd driver (block-rbd.so), the RBD bench's peer.
BPO_PACKAGES=(qemu-system-x86 qemu-utils qemu-block-extra meson python3-pycotap)
declare -A BPO_MIN=([qemu-system-x86]="1:10.0" [qemu-utils]="1:10.0" [qemu-block-extra]="1:10.0" [meson]="1.5" [python3-pycotap]="1.1")

backports_configured() {
  # --no-release-info lists configured targets even if `apt-get update` has not fetched them yet.
  local t
  t="$(apt-get indextargets --no-release-info --format '$(TARGET_OF) $(RELEASE)' 2>/dev/null | sort -u)"
  grep -qx 'deb bookworm-backports' <<<"$t" && grep -qx 'deb-src bookworm-backports' <<<"$t"
}

backports_fetched() {
  local t
  t="$(apt-get indextargets --format '$(TARGET_OF) $(RELEASE)' 2>/dev/null | sort -u)"
  grep -qx 'deb bookworm-backports' <<<"$t" && grep -qx 'deb-src bookworm-backports' <<<"$t"
}

# Reuse the mirror URI and keyring of the existing bookworm entry (deb822 or one-line format).
detect_mirror() {
  local uri="" key=""
  local f
  for f in /etc/apt/sources.list.d/*.sources; do
    [ -e "$f" ] || continue
    # Print "URI KEYRING" of the first stanza whose Suites contain plain "bookworm".
    read -r uri key < <(awk '
      function flush() { if (isbw && uri != "") { print uri, (key == "" ? "-" : key); found = 1; exit } uri = ""; key = ""; isbw = 0 }
      /^[ \t]*#/ { next }
      /^[ \t]*$/ { flush(); next }
      tolower($1) == "uris:" { uri = $2 }
      tolower($1) == "signed-by:" { key = $2 }
      tolower($1) == "suites:" { for (i = 2; i <= NF; i++) if ($i == "bookworm") isbw = 1 }
      END { if (!found) flush() }' "$f") || true
    [ -n "$uri" ] && break
  done
  if [ -z "$uri" ] && [ -e /etc/apt/sources.list ]; then
    uri="$(awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\//) { u = $i; if ($(i+1) == "bookworm") { print u; exit } } }' /etc/apt/sources.list || true)"
    key="-"
  fi
  [ -n "$uri" ] || uri="http://deb.debian.org/debian"
  # No keyring path (one-line sources, or an inline armored key): Debian's archive keyring.
  case "$key" in /*) ;; *) key="/usr/share/keyrings/debian-archive-keyring.gpg" ;; esac
  echo "$uri $key"
}

ensure_backports_sources() {
  backports_configured && return 1
  local uri key
  read -r uri key < <(detect_mirror)
  log "adding bookworm-backports (deb + deb-src) from $uri"
  $SUDO tee /etc/apt/sources.list.d/bookworm-backports.sources >/dev/null <<EOF
# Added by test/e2e/setup.sh (vhost-user backend e2e rig): QEMU 10, meson >= 1.5, the 6.12 kernel.
Types: deb deb-src
URIs: $uri
Suites: bookworm-backports
Components: main
Signed-By: $key
EOF
  return 0
}

# Prints the packages that are missing or too old.
missing_packages() {
  local p st ver
  declare -A have=()
  while read -r p st ver; do
    [ "$st" = "installed" ] && have[$p]="$ver"
  done < <(dpkg-query -W -f='${Package} ${db:Status-Status} ${Version}\n' \
             "${APT_PACKAGES[@]}" "${BPO_PACKAGES[@]}" 2>/dev/null || true)
  for p in "${APT_PACKAGES[@]}"; do [ -n "${have[$p]:-}" ] || echo "$p"; done
  for p in "${BPO_PACKAGES[@]}"; do
    if [ -z "${have[$p]:-}" ] || dpkg --compare-versions "${have[$p]}" lt "${BPO_MIN[$p]}"; then
      echo "$p"
    fi
  done
}

# apt-get/apt-cache take ~0.5 s per call here; a warm run skips them all when nothing that could change
# their answers (sources, downloaded lists, installed packages) has changed since the last good run.
apt_fingerprint() {
  { cat /etc/apt/sources.list /etc/apt/sources.list.d/* 2>/dev/null || true
    stat -c '%n %Y %s' /var/lib/dpkg/status /var/lib/apt/lists/*Release 2>/dev/null || true
    echo "${APT_PACKAGES[*]} ${BPO_PACKAGES[*]}"  # a package added to the lists gets installed
  } | sha256sum | cut -c1-32
}

step_apt() {
  if [ "$(cat "$CACHE/.apt-ok" 2>/dev/null)" = "$(apt_fingerprint)" ]; then return 0; fi
  step_apt_check
  apt_fingerprint >"$CACHE/.apt-ok"
}

step_apt_check() {
  local added=0
  ensure_backports_sources && added=1
  local missing
  missing="$(missing_packages)"
  if [ "$added" = 1 ] || [ -n "$missing" ] || ! backports_fetched; then
    log "apt-get update"
    $SUDO apt-get update -qq
  fi
  if [ -n "$missing" ]; then
    log "installing: $(echo $missing)"
    local plain=() bpo=() p
    for p in $missing; do
      if [ -n "${BPO_MIN[$p]:-}" ]; then bpo+=("$p"); else plain+=("$p"); fi
    done
    if [ "${#plain[@]}" -gt 0 ]; then
      $SUDO apt-get install -y -qq --no-install-recommends "${plain[@]}" >/dev/null
    fi
    if [ "${#bpo[@]}" -gt 0 ]; then
      # qemu-system-x86 recommends seabios/ipxe-qemu (firmware): keep recommends for it.
      $SUDO apt-get install -y -qq -t bookworm-backports "${bpo[@]}" >/dev/null
    fi
    missing="$(missing_packages)"
    [ -z "$missing" ] || die "packages still missing or too old after install: $(echo $missing)"
  fi
}

# ---------------------------------------------------------------------------------------------------
# Guest kernel: bookworm-backports' linux-image-amd64, extracted (never installed on the host)
# ---------------------------------------------------------------------------------------------------

KERNEL_DIR=""   # $CACHE/kernel/<versioned package>; contains boot/vmlinuz-* and lib/modules/<kver>
KVER=""

step_kernel() {
  # The meta package depends on the versioned image package (e.g. linux-image-6.12.xx+bpo-amd64).
  local pkg fp resolved
  fp="$(apt_fingerprint)"
  resolved="$CACHE/kernel/.resolved-$fp"
  if [ -s "$resolved" ]; then
    pkg="$(cat "$resolved")"
  else
    pkg="$(apt-cache -t bookworm-backports depends linux-image-amd64 2>/dev/null \
           | awk '!found && $1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; found = 1 }')"
    [ -n "$pkg" ] || die "cannot resolve linux-image-amd64 in bookworm-backports (apt lists missing?)"
    mkdir -p "$CACHE/kernel"
    rm -f "$CACHE"/kernel/.resolved-*
    echo "$pkg" >"$resolved"
  fi
  KERNEL_DIR="$CACHE/kernel/$pkg"
  if [ ! -e "$KERNEL_DIR/.done" ]; then
    log "downloading + extracting kernel $pkg"
    local tmp
    tmp="$(mktemp -d "$CACHE/kernel-dl.XXXXXX")"
    (cd "$tmp" && apt-get download -qq "$pkg/bookworm-backports" 2>/dev/null || apt-get download -qq "$pkg")
    rm -rf "$KERNEL_DIR" && mkdir -p "$KERNEL_DIR"
    dpkg-deb -x "$tmp"/"$pkg"_*.deb "$KERNEL_DIR"
    rm -rf "$tmp"
    # Keep only what a guest needs: vmlinuz and the modules tree.
    rm -rf "$KERNEL_DIR/usr" "$KERNEL_DIR/etc"
    touch "$KERNEL_DIR/.done"
  fi
  KVER="$(ls "$KERNEL_DIR/lib/modules" | head -n1)"
  # The .deb ships no modules.dep (its postinst runs depmod): generate it inside the extracted tree.
  [ -s "$KERNEL_DIR/lib/modules/$KVER/modules.dep" ] || depmod -b "$KERNEL_DIR" "$KVER"
  [ -f "$KERNEL_DIR/boot/vmlinuz-$KVER" ] || die "no vmlinuz in $KERNEL_DIR"
}

# ---------------------------------------------------------------------------------------------------
# Initramfs: busybox + modules + fio + mke2fs + blkdiscard + /init
# ---------------------------------------------------------------------------------------------------

# Modules to load at boot (plus their dependencies). Missing ones (built in or not built) are skipped.
GUEST_MODULES=(
  qemu_fw_cfg
  virtio_blk
  failover net_failover virtio_net
  soundcore snd snd-timer snd-pcm virtio_snd
  crc32c_generic ext2 ext4
)
# Host binaries copied in (with their shared libraries, found with ldd).
# These go to /usr/{s,}bin, ahead of busybox's applet links of the same name in PATH.
GUEST_BINARIES=(/usr/bin/fio /usr/sbin/mke2fs /usr/sbin/blkdiscard)
# Net tests: iproute2's ip and tc (per-queue qdisc counters), iputils' ping (-M do), iperf3, ethtool (busybox lacks or limits them).
GUEST_BINARIES+=(/usr/bin/ip /usr/sbin/tc /usr/bin/ping /usr/bin/iperf3 /usr/sbin/ethtool)
# Sound tests: ALSA's aplay/arecord/amixer and the configuration they read (/usr/share/alsa, copied as a tree).
GUEST_BINARIES+=(/usr/bin/aplay /usr/bin/arecord /usr/bin/amixer /usr/share/alsa)

INIT_SCRIPT='#!/bin/sh
# Guest init for the e2e rig: run the fw_cfg command, report its status on the serial console, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm /tmp /run
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
# Everything below goes to the serial console (console=ttyS0).
exec </dev/console >/dev/console 2>&1
# Modules in dependency order (resolved from modules.dep when the initramfs was built).
while read -r m; do
  [ -z "$m" ] || insmod "$m" || echo "E2E-WARNING: insmod $m failed"
done </etc/e2e-modules
echo "E2E-GUEST-UP uptime=$(cut -d" " -f1 /proc/uptime)"
cmd=/sys/firmware/qemu_fw_cfg/by_name/opt/cmd/raw
if [ -r "$cmd" ]; then
  cp "$cmd" /tmp/e2e-cmd.sh
  cd /tmp
  sh /tmp/e2e-cmd.sh
  rc=$?
  cd /
else
  echo "E2E-ERROR: no command in fw_cfg (opt/cmd)"
  rc=255
fi
sync
echo "E2E-EXIT-STATUS=$rc"
# Let the UART drain before power-off cuts it.
sleep 0.1
poweroff -f
'

# Prints .ko paths (relative to the modules dir) of the wanted modules in load order.
resolve_modules() {
  local moddir="$1"; shift
  awk -v want="$*" '
    function norm(s) { gsub(/-/, "_", s); return s }
    function base(p,   b) { b = p; sub(/.*\//, "", b); sub(/\.ko(\.[a-z]+)?$/, "", b); return norm(b) }
    function visit(p,   n, i, d) {
      if (p in done) return
      done[p] = 1
      n = split(deps[p], d, " ")
      for (i = 1; i <= n; i++) visit(d[i])
      print p
    }
    {
      mod = $1; sub(/:$/, "", mod)
      path[base(mod)] = mod
      deps[mod] = ""
      for (i = 2; i <= NF; i++) deps[mod] = deps[mod] " " $i
    }
    END {
      n = split(want, w, " ")
      for (i = 1; i <= n; i++) { b = norm(w[i]); if (b in path) visit(path[b]) }
    }' "$moddir/modules.dep"
}

copy_with_libs() {
  local root="$1" bin="$2" lib
  mkdir -p "$root$(dirname "$bin")"  # cp 9.1's --parents fails when the destination's parent is missing
  cp -a --parents "$bin" "$root/"
  [ -L "$bin" ] && cp -a --parents "$(readlink -f "$bin")" "$root/"
  for lib in $(ldd "$bin" 2>/dev/null | awk '/=> \// { print $3 } /^\t\/[^ ]+ \(/ { print $1 }'); do
    cp -aL --parents "$lib" "$root/" 2>/dev/null || cp -L --parents "$lib" "$root/"
  done
}

INITRAMFS=""

step_initramfs() {
  local moddir="$KERNEL_DIR/lib/modules/$KVER"
  local pkgvers hash
  pkgvers="$(dpkg-query -W -f='${Package}=${Version}\n' busybox-static fio e2fsprogs util-linux libc6 | sort)"
  # The hash covers this script (init text, module list, builder), the kernel and the copied packages.
  hash="$( { cat "$SCRIPT_PATH"; echo "$KVER"; echo "$pkgvers"; } | sha256sum | cut -c1-16)"
  INITRAMFS="$CACHE/initramfs/initramfs-$KVER-$hash.cpio"
  [ -s "$INITRAMFS" ] && return 0

  log "building initramfs $INITRAMFS"
  mkdir -p "$CACHE/initramfs"
  local root
  root="$(mktemp -d "$CACHE/initramfs/root.XXXXXX")"
  mkdir -p "$root"/{bin,sbin,usr/bin,usr/sbin,etc,proc,sys,dev,tmp,run,root,lib/modules}
  # busybox + one symlink per applet.
  cp /bin/busybox "$root/bin/busybox"
  local a
  for a in $(/bin/busybox --list-full); do
    [ -e "$root/$a" ] || ln -s /bin/busybox "$root/$a"
  done
  # Real tools (the busybox applets of the same name are too limited).
  local b
  for b in "${GUEST_BINARIES[@]}"; do
    rm -f "$root$b"
    copy_with_libs "$root" "$b"
  done
  ln -sf mke2fs "$root/usr/sbin/mkfs.ext2"
  ln -sf mke2fs "$root/usr/sbin/mkfs.ext4"
  # /bin/sh is dash, not busybox ash: busybox-static's ash runs its own applet for any name it knows
  # (mke2fs, blkdiscard, ip, ...) before looking at PATH, which would silently shadow the real tools.
  # dash does a plain PATH lookup; busybox stays available as `busybox sh`/`ash` and for the applets.
  rm -f "$root/bin/sh"
  copy_with_libs "$root" /bin/dash
  ln -s dash "$root/bin/sh"
  # Modules, decompressed (busybox insmod cannot read .ko.xz), listed in load order.
  local mods=() m
  mapfile -t mods < <(resolve_modules "$moddir" "${GUEST_MODULES[@]}")
  : >"$root/etc/e2e-modules"
  for m in "${mods[@]}"; do
    local dst="/lib/modules/$KVER/${m%.xz}"
    dst="${dst%.zst}"
    mkdir -p "$root$(dirname "$dst")"
    case "$m" in
      *.xz) xz -dc "$moddir/$m" >"$root$dst" ;;
      *.zst) zstd -dqc "$moddir/$m" >"$root$dst" ;;
      *) cp "$moddir/$m" "$root$dst" ;;
    esac
    echo "$dst" >>"$root/etc/e2e-modules"
  done
  printf '%s' "$INIT_SCRIPT" >"$root/init"
  chmod 755 "$root/init"
  # The kernel opens /dev/console for init before devtmpfs is mounted.
  mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
  echo "root:x:0:0:root:/root:/bin/sh" >"$root/etc/passwd"
  echo "root:x:0:" >"$root/etc/group"
  (cd "$root" && find . -print0 | sort -z | cpio --null -o -H newc --quiet >"$INITRAMFS.tmp")
  mv "$INITRAMFS.tmp" "$INITRAMFS"
  rm -rf "$root"
  log "initramfs: $(du -h "$INITRAMFS" | cut -f1), modules: $(echo "${mods[@]##*/}")"
  # Keep the three newest images (other checkouts may still use an older one).
  ls -1t "$CACHE"/initramfs/initramfs-*.cpio 2>/dev/null | tail -n +4 | xargs -r rm -f
}

# ---------------------------------------------------------------------------------------------------
# QEMU's vhost-user backend schema (docs/interop/vhost-user.json), which capabilities and backend
# description files are checked against: kept from the QEMU build, or taken from the source tarball.
# ---------------------------------------------------------------------------------------------------

QEMU_SCHEMA="$CACHE/qemu-console/vhost-user.json"

step_qemu_schema() {
  [ -s "$QEMU_SCHEMA" ] && return 0
  local work="$CACHE/qemu-schema-work"
  rm -rf "$work" && mkdir -p "$work" "$(dirname "$QEMU_SCHEMA")"
  local orig
  orig="$(fetch_qemu_orig "$work")"
  tar -xf "$orig" -C "$work" --wildcards '*/docs/interop/vhost-user.json'
  install -m 644 "$(find "$work" -path '*/docs/interop/vhost-user.json' | head -n1)" "$QEMU_SCHEMA"
  rm -rf "$work"
  log "kept QEMU's vhost-user schema in $QEMU_SCHEMA"
}

# ---------------------------------------------------------------------------------------------------
# Patched QEMU with user-creatable vhost-user-device(-pci) whose back-end state migrates
# ---------------------------------------------------------------------------------------------------

QEMU_CONSOLE="$CACHE/qemu-console/qemu-system-x86_64"
# Patches applied (patch -p1) on top of the user_creatable edit; part of the build's cache key.
QEMU_CONSOLE_PATCHES=("$(dirname "$SCRIPT_PATH")"/qemu-patches/*.patch)

# Changes whenever the recipe below or a patch changes: a binary built from another recipe is rebuilt.
qemu_console_key() {
  { echo "qemu-console recipe 2 ($QEMU_UPSTREAM_VERSION): user_creatable edit, edk2 skip"
    cat "${QEMU_CONSOLE_PATCHES[@]}"
  } | sha256sum | cut -c1-32
}

# Downloads QEMU's orig tarball (bookworm-backports source package) into $1, checks it against the
# Sources index, and prints its path.
fetch_qemu_orig() {
  local work="$1"
  log "fetching QEMU source package (bookworm-backports)"
  # Only the orig tarball matters (we build upstream QEMU, not Debian's patched package). Some mirrors
  # serve it but 404 on the .dsc/.debian.tar.xz, so a partial download is fine if the tarball's
  # checksum matches the Sources index.
  (cd "$work" && apt-get source -qq --download-only "qemu/bookworm-backports" >/dev/null 2>"$work/source.err") \
    || log "apt-get source reported: $(grep '^E:' "$work/source.err" | head -n3 | tr '\n' ' ')"
  local orig
  orig="$(ls "$work"/qemu_"$QEMU_UPSTREAM_VERSION"*.orig.tar.* 2>/dev/null | head -n1)"
  [ -n "$orig" ] || die "no qemu_${QEMU_UPSTREAM_VERSION}*.orig.tar.* from apt-get source: $(cat "$work/source.err")"
  local want
  # (awk reads all input: exiting early would SIGPIPE apt-cache and fail the pipeline under pipefail.)
  want="$(apt-cache showsrc qemu 2>/dev/null \
          | awk -v f="$(basename "$orig")" '/^Checksums-Sha256:/ { c = 1; next } /^[^ ]/ { c = 0 } c && $3 == f && !n++ { print $1 }')"
  [ -n "$want" ] || die "no sha256 for $(basename "$orig") in the Sources index"
  echo "$want  $orig" | sha256sum -c --quiet - || die "checksum mismatch for $orig"
  echo "$orig"
}

step_qemu_console() {
  local key
  key="$(qemu_console_key)"
  if [ -x "$QEMU_CONSOLE" ] && [ "$(cat "$QEMU_CONSOLE.key" 2>/dev/null)" = "$key" ]; then return 0; fi
  [ -x "$QEMU_CONSOLE" ] && log "patched QEMU is out of date (recipe or patches changed): rebuilding"
  local work="$CACHE/qemu-console/work"
  rm -rf "$work" && mkdir -p "$work"
  local orig
  orig="$(fetch_qemu_orig "$work")"
  tar -xf "$orig" -C "$work"
  local src
  src="$(find "$work" -maxdepth 1 -mindepth 1 -type d -name 'qemu*' | head -n1)"
  [ -n "$src" ] || die "orig tarball did not unpack to a qemu* directory"

  # The patch: let users create the generic vhost-user device (needed for virtio-console).
  sed -i 's/user_creatable = false/user_creatable = true/' \
    "$src/hw/virtio/vhost-user-device.c" "$src/hw/virtio/vhost-user-device-pci.c"
  grep -q 'user_creatable = true' "$src/hw/virtio/vhost-user-device.c" || die "patch did not apply (device)"
  grep -q 'user_creatable = true' "$src/hw/virtio/vhost-user-device-pci.c" || die "patch did not apply (pci)"
  # Back-end state migration for vhost-user-base devices (SET_DEVICE_STATE_FD, like vhost-user-fs).
  local p
  for p in "${QEMU_CONSOLE_PATCHES[@]}"; do
    patch -p1 -N -s -d "$src" <"$p" >"$work/patch.log" 2>&1 || { cat "$work/patch.log" >&2; die "patch $(basename "$p") did not apply"; }
  done
  # The +ds tarball has no firmware blobs: drop the edk2 unpack step (it would reference missing
  # .bz2 inputs). The binary uses Debian's firmware via -L at run time.
  sed -i 's/^if unpack_edk2_blobs$/if false/; s/^if install_edk2_blobs$/if false/' "$src/pc-bios/meson.build"

  log "configuring QEMU"
  mkdir -p "$src/build"
  # --python: Debian's meson lives in /usr/bin/python3's site-packages; a pyenv/venv python3 earlier in
  # PATH would not see it (and mkvenv works offline, so it cannot fetch meson either).
  (cd "$src/build" && ../configure --python=/usr/bin/python3 \
      --target-list=x86_64-softmmu \
      --without-default-features \
      --enable-kvm --enable-tcg --enable-vhost-user --enable-vhost-kernel --enable-linux-aio \
      --disable-docs --disable-install-blobs --disable-werror --disable-download \
      >"$work/configure.log" 2>&1) || { tail -n 40 "$work/configure.log" >&2; die "QEMU configure failed"; }
  log "building qemu-system-x86_64 (takes a few minutes)"
  (cd "$src/build" && ninja -j"${E2E_JOBS:-$(nproc)}" qemu-system-x86_64 >"$work/build.log" 2>&1) \
    || { tail -n 40 "$work/build.log" >&2; die "QEMU build failed"; }
  install -s -m 755 "$src/build/qemu-system-x86_64" "$QEMU_CONSOLE.tmp"
  mv "$QEMU_CONSOLE.tmp" "$QEMU_CONSOLE"
  echo "$key" >"$QEMU_CONSOLE.key"
  # Keep the logs and the vhost-user backend schema (test/unit/ops_capabilities.test.ts), drop the ~1 GB tree.
  cp "$src/docs/interop/vhost-user.json" "$QEMU_SCHEMA"
  mv "$work"/*.log "$CACHE/qemu-console/" 2>/dev/null || true
  rm -rf "$work"
  log "installed $QEMU_CONSOLE"
}

# ---------------------------------------------------------------------------------------------------

write_paths() {
  local qc="null"
  [ -x "$QEMU_CONSOLE" ] && qc="\"$QEMU_CONSOLE\""
  cat >"$CACHE/rig.json.tmp" <<EOF
{
  "cacheDir": "$CACHE",
  "kernel": "$KERNEL_DIR/boot/vmlinuz-$KVER",
  "kernelVersion": "$KVER",
  "modulesDir": "$KERNEL_DIR/lib/modules/$KVER",
  "initramfs": "$INITRAMFS",
  "qemu": "$(command -v qemu-system-x86_64)",
  "qemuStorageDaemon": "$(command -v qemu-storage-daemon)",
  "qemuConsole": $qc,
  "firmwareDirs": ["/usr/share/qemu", "/usr/share/seabios", "/usr/lib/ipxe/qemu"]
}
EOF
  # $E2E_RIG_JSON: private copy for the caller (rig.ts), immune to other checkouts sharing the cache.
  [ -z "${E2E_RIG_JSON:-}" ] || cp "$CACHE/rig.json.tmp" "$E2E_RIG_JSON"
  mv "$CACHE/rig.json.tmp" "$CACHE/rig.json"
}

main() {
  local what="${1:-all}"
  local t0=$SECONDS
  case "$what" in
    all|base|qemu-console) ;;
    *) die "usage: $0 [all|base|qemu-console]" ;;
  esac
  step_apt
  if [ "$what" != qemu-console ]; then
    step_kernel
    step_initramfs
  fi
  if [ "$what" != base ]; then
    step_qemu_console
  fi
  step_qemu_schema
  if [ "$what" != qemu-console ]; then
    write_paths
  fi
  log "done ($what) in $((SECONDS - t0)) s"
}

main "$@"; exit $?  # one line: bash parses it before running, so edits during a run are safe
