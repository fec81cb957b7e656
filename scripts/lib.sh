# Shared set-up for scripts/demo and scripts/test: install what is missing, or say exactly what is.
# shellcheck shell=bash

# Debian packages the demo needs.
DEMO_DEBS=(musl-tools qemu-system-x86 xz-utils iproute2 iputils-ping util-linux busybox dnsutils dnsmasq-base curl)
# Debian packages the test suite needs (real peers: the kernel in namespaces, busybox udhcpc,
# dhclient, dig, dnsmasq, tshark, scapy, iperf3, socat, ncat, slirp4netns, pasta, QEMU; nftables drops
# packets at random for the lossy TCP tests).
TEST_DEBS=(usbip musl-tools iproute2 iputils-ping util-linux busybox dnsutils dnsmasq-base isc-dhcp-client tshark tcpdump python3-scapy
  iperf3 socat ncat slirp4netns passt qemu-system-x86 xz-utils zstd cpio kmod e2fsprogs ca-certificates nftables)

say() { printf '%s\n' "$*" >&2; }

need_root() {
  if [ "$(id -u)" != 0 ]; then
    say "tender: this needs root (network namespaces and TAP devices): run it with sudo"
    exit 4
  fi
}

ensure_node() {
  if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    say "tender: Node.js 20 or newer with npm is missing (Debian: apt-get install nodejs npm, or use nodesource)"
    exit 1
  fi
  local major
  major=$(node -p 'process.versions.node.split(".")[0]')
  if [ "$major" -lt 20 ]; then
    say "tender: Node.js $(node -v) is too old: version 20 or newer is needed"
    exit 1
  fi
  if ! command -v make >/dev/null 2>&1 || ! command -v g++ >/dev/null 2>&1 || ! command -v python3 >/dev/null 2>&1; then
    say "tender: building the native addon needs make, g++ and python3 (Debian: apt-get install build-essential python3)"
    exit 1
  fi
}

ensure_debs() {
  local missing=() p
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  if ! command -v apt-get >/dev/null 2>&1; then
    say "tender: missing packages and no apt-get to install them: ${missing[*]}"
    exit 1
  fi
  say "tender: installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >&2
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >&2
}

# The test guest (and later the default machine image) is assembled from Debian's packages
# with `apt-get download`, which needs the package lists.
ensure_apt_lists() {
  command -v apt-get >/dev/null 2>&1 || return 0
  if ! apt-cache show linux-image-amd64 >/dev/null 2>&1 || ! apt-cache show busybox-static >/dev/null 2>&1; then
    say "tender: apt-get update (package lists for the guest image)"
    apt-get update -qq >&2
  fi
}

ensure_npm() {
  # node-gyp needs Node's headers; Debian's nodejs ships them in /usr/include/node, which saves
  # a download (and works where only the package registries are reachable).
  if [ -z "${npm_config_nodedir:-}" ] && [ -f /usr/include/node/node_api.h ] && ! npm config get nodedir 2>/dev/null | grep -q /; then
    export npm_config_nodedir=/usr
  fi
  # A fresh clone (or a changed lock file) gets a clean install, which also builds the native
  # addon (node-gyp) and compiles the TypeScript (the prepare script).
  if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ] || [ ! -f build/Release/tender_native.node ] || [ ! -f build/agent/tender-agent ] || [ ! -f build/vhost-vsock/tender-vhost-vsock ] || [ ! -d dist ]; then
    say "tender: npm ci (dependencies, native addon, TypeScript build)"
    npm ci --no-audit --no-fund >&2
  fi
}
