# Sourced by scripts/build-wheels (aarch64) and scripts/test-wheel-aarch64: an arm64 Debian root run
# under qemu-user on an x86_64 Debian machine, as root.
#   - qemu-aarch64 10 from bookworm-backports, fetched with apt into a private state folder (the
#     host's apt sources are not changed) and registered with binfmt_misc (flag F: the kernel keeps
#     the interpreter open, so it works inside a chroot). Debian 12's qemu 7.2 is not used: under it,
#     reserving wasmtime's instance pool takes about a minute and gigabytes of RAM.
#   - the root: debootstrap --arch=arm64 --variant=minbase bookworm, plus python3 (venv, headers)
#     pip, and clang/wasi-libc for the tests' C modules; kept in $MINIKRUST_ARM64_ROOT (default
#     $MINIKRUST_BUILD_CACHE/arm64-root, outside the checkout), so a second run skips those minutes.
# Call arm64_root_ready once; then in_root CMD... runs CMD inside it (clean environment).
cache=${MINIKRUST_BUILD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/minikrust-build}
root=${MINIKRUST_ARM64_ROOT:-$cache/arm64-root}
SECONDS=0
step() { echo "== [${SECONDS}s] $*"; }

ensure_qemu() {
  local reg=/proc/sys/fs/binfmt_misc qemu=$cache/qemu/qemu-aarch64
  [ -e $reg/register ] || mount -t binfmt_misc binfmt_misc $reg
  if [ -e $reg/qemu-aarch64 ]; then
    local interp
    interp=$(sed -n 's/^interpreter //p' $reg/qemu-aarch64)
    if [ "$interp" = "$qemu" ] || "$interp" --version 2>/dev/null | grep -Eq 'version [1-9][0-9]\.'; then
      step "qemu-aarch64: $("$interp" --version | head -1) ($interp)"
      return
    fi
    echo "replacing the binfmt_misc entry qemu-aarch64 ($interp, older than qemu 10) with $qemu" >&2
    echo -1 > $reg/qemu-aarch64
  fi
  if [ ! -x "$qemu" ]; then
    local apt=$cache/qemu/apt
    mkdir -p "$apt/lists/partial"
    echo "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] http://deb.debian.org/debian bookworm-backports main" \
      > "$apt/sources.list"
    local opts=(-o "Dir::Etc::sourcelist=$apt/sources.list" -o Dir::Etc::sourceparts=- -o "Dir::State::Lists=$apt/lists")
    apt-get "${opts[@]}" update -q
    (cd "$apt" && rm -f qemu-user_*.deb && apt-get "${opts[@]}" download qemu-user)
    dpkg-deb -x "$apt"/qemu-user_*.deb "$apt/x"
    cp "$apt/x/usr/bin/qemu-aarch64" "$qemu"
    cp "$apt/x/usr/share/qemu/binfmt.d/qemu-aarch64.conf" "$cache/qemu/"
    rm -rf "$apt/x"
  fi
  # the package's own entry (magic and mask), with our interpreter and flag F
  awk -F: -v OFS=: -v q="$qemu" '{ $7 = q; $8 = "F"; print }' "$cache/qemu/qemu-aarch64.conf" > $reg/register
  step "qemu-aarch64: $("$qemu" --version | head -1) registered with binfmt_misc"
}

in_root() {  # run a command inside the arm64 root, with a clean environment
  chroot "$root" /usr/bin/env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/root LANG=C.UTF-8 \
    DEBIAN_FRONTEND=noninteractive PIP_DISABLE_PIP_VERSION_CHECK=1 ${https_proxy:+https_proxy=$https_proxy} \
    ${http_proxy:+http_proxy=$http_proxy} "$@"
}

mounted=()
unmount_root() {
  local m
  for m in "${mounted[@]}"; do umount -R "$m" 2>/dev/null || umount -l "$m" || true; done
  mounted=()
}

mount_root() {  # what another run has mounted already is left to it
  mountpoint -q "$root/proc" || { mount -t proc proc "$root/proc" && mounted+=("$root/proc"); }
  mountpoint -q "$root/dev" || { mount --rbind /dev "$root/dev" && mounted+=("$root/dev"); }
}

arm64_root_ready() {  # qemu registered, the root made and mounted (the caller's EXIT trap calls unmount_root)
  [ "$(id -u)" = 0 ] || { echo "$0: the arm64 root needs root (binfmt_misc, debootstrap, chroot); try sudo" >&2; exit 1; }
  export DEBIAN_FRONTEND=noninteractive
  ensure_qemu
  # python3: venvs, the headers the wheel builds against, and Debian's pip (it fills a fresh venv
  # made --without-pip: ensurepip's copy of pip costs a minute under qemu); clang, lld and wasi-libc
  # build the tests' C modules (wasm32, as on the host)
  local root_debs="python3 python3-venv python3-dev python3-pip ca-certificates clang lld wasi-libc libclang-rt-14-dev-wasm32"
  if ! { [ -x "$root/usr/bin/dpkg" ] && in_root dpkg -s $root_debs >/dev/null 2>&1; }; then
    if [ ! -e "$root/etc/os-release" ]; then
      command -v debootstrap >/dev/null || apt-get install -y -q --no-install-recommends debootstrap
      step "debootstrap --arch=arm64 --variant=minbase bookworm $root"
      debootstrap --arch=arm64 --variant=minbase bookworm "$root" http://deb.debian.org/debian
    fi
    mount_root
    step "apt-get install $root_debs (in the root)"
    in_root apt-get update -q
    in_root apt-get install -y -q --no-install-recommends $root_debs
  else
    mount_root
  fi
  # pip reaches the index as the host's does: the host's CA bundle and pip configuration
  [ ! -f /etc/ssl/certs/ca-certificates.crt ] || cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  [ ! -f /etc/pip.conf ] || cp /etc/pip.conf "$root/etc/pip.conf"
  step "arm64 root ready: $(in_root uname -m), $(in_root python3 --version)"
}
