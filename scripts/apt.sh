# Sourced by scripts/deps.sh and vmtests/deps.sh: the one way this repo installs Debian
# packages it is missing.

have() { command -v "$1" >/dev/null 2>&1; }

# install_missing WHO PACKAGE...: apt-get install the packages (none: nothing to do); as
# non-root, name them and fail.
install_missing() {
  local who=$1
  shift
  [ $# -eq 0 ] && return 0
  if [ "$(id -u)" -ne 0 ]; then
    echo "$who: missing $*; run as root or: sudo apt-get install -y $*" >&2
    exit 1
  fi
  echo "$who: installing $*"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
