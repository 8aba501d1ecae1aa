#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian/Ubuntu; a no-op when all is there.
set -euo pipefail

source "$(dirname "$0")/apt.sh"

need=()
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

install_missing deps "${need[@]}"
