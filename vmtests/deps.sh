#!/usr/bin/env bash
# Installs what `make vmtest` needs on Debian/Ubuntu; a no-op when all is there.
# The test suites' own needs (iptables, haproxy, ...) come from scripts/deps.sh: the guest
# gets the host's copies.
set -euo pipefail

source "$(dirname "$0")/../scripts/apt.sh"

need=()
have qemu-system-x86_64 || need+=(qemu-system-x86)
have apt-get && have dpkg-deb || { echo "vmtests: needs apt-get and dpkg-deb (Debian or Ubuntu)" >&2; exit 1; }
have xz || need+=(xz-utils)     # 6.1/5.10 vmlinuz and 6.12's modules are xz
have zstd || need+=(zstd)       # 6.12's vmlinuz is zstd
have ldd || need+=(libc-bin)
[ -e /usr/share/keyrings/debian-archive-keyring.gpg ] || need+=(debian-archive-keyring)
# RUNNER=vng only: virtme-ng itself is not in Debian 12; see vmtests/README.md.
if [ "${RUNNER:-qemu}" = vng ]; then
  have vng || { echo "vmtests: RUNNER=vng needs virtme-ng; see vmtests/README.md" >&2; exit 1; }
  have busybox || need+=(busybox-static)
fi

install_missing vmtests "${need[@]}"
