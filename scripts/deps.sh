#!/usr/bin/env bash
# Installs what building, testing and the demo need on Debian/Ubuntu; a no-op when all is there.
set -euo pipefail

source "$(dirname "$0")/apt.sh"

need=()
have clang-14 || need+=(clang-14) # bpf/gen.go pins it: Debian 12's clang
have llvm-strip || need+=(llvm)
have bpftool || need+=(bpftool)
have iptables || need+=(iptables)
have nft || need+=(nftables)
have ip || need+=(iproute2)
have nsenter || need+=(util-linux)
have haproxy || need+=(haproxy)
have dig || need+=(bind9-dnsutils)  # DNS capture tests: a real resolver
have dnsmasq || need+=(dnsmasq-base) # and a real forwarder as the agent (-base: no host service)
[ -x /usr/lib/cni/ptp ] || need+=(containernetworking-plugins) # node-mode tests chain after ptp

install_missing deps "${need[@]}"
