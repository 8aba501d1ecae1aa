#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian/Ubuntu; a no-op when all is there.
set -euo pipefail

need=()
have() { command -v "$1" >/dev/null 2>&1; }
have clang || need+=(clang)
have llvm-strip || need+=(llvm)
[ -e /usr/include/bpf/bpf_helpers.h ] || need+=(libbpf-dev)
have bpftool || need+=(bpftool)
have iptables || need+=(iptables)
have nft || need+=(nftables)
have ip || need+=(iproute2)
have nsenter || need+=(util-linux)
have haproxy || need+=(haproxy)
[ -x /usr/lib/cni/ptp ] || need+=(containernetworking-plugins) # node-mode tests chain after ptp

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  echo "deps: missing ${need[*]}; run as root or: sudo apt-get install -y ${need[*]}" >&2
  exit 1
fi
echo "deps: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
