#!/usr/bin/env bash
# Make a fresh Debian machine ready for `make run` / `make test` / `make lint`:
# the Debian tools those targets use (apt-get, only when a command is missing) and a
# .venv with tapstack and its test extra (rebuilt when pyproject.toml is newer).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${1:-test}

if [ "$target" != lint ] && [ "$(id -u)" -ne 0 ]; then
    echo "tapstack: 'make $target' needs root for TAP devices and network namespaces; run: sudo make $target" >&2
    exit 1
fi

# command -> Debian package
declare -A pkg_of=(
    [ip]=iproute2 [ping]=iputils-ping [arping]=iputils-arping [tcpdump]=tcpdump
    [tshark]=tshark [curl]=curl [nc]=netcat-openbsd [socat]=socat [iptables]=iptables
    [hping3]=hping3 [gcc]=gcc [wrk]=wrk [ab]=apache2-utils [nmap]=nmap
    [shellcheck]=shellcheck [vagrant]=vagrant [traceroute]=traceroute
    [tracepath]=iputils-tracepath [iperf3]=iperf3 [conntrack]=conntrack
    [dig]=bind9-dnsutils [kdig]=knot-dnsutils [unbound]=unbound [dnsperf]=dnsperf
    [testssl]=testssl.sh [openssl]=openssl [chromium]=chromium [ffmpeg]=ffmpeg
    [ffprobe]=ffmpeg
)
case "$target" in
    run) wanted=(ip gcc ping arping tcpdump curl nc) ;;  # what the banner says to try
    test) wanted=(ip ping arping tcpdump tshark curl nc socat iptables hping3 gcc wrk ab nmap
                 shellcheck vagrant traceroute tracepath iperf3 conntrack dig kdig
                 unbound dnsperf testssl openssl chromium ffmpeg ffprobe) ;;
    *) wanted=() ;;
esac

missing=()
for cmd in "${wanted[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${pkg_of[$cmd]}")
done
py=${PYTHON:-python3}
if ! command -v "$py" >/dev/null 2>&1; then
    missing+=(python3 python3-venv python3-dev)
else
    "$py" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    # python-pytun compiles a C extension: it needs Python.h (Debian's python3-dev).
    "$py" - <<'PY' || missing+=(python3-dev)
import os, sys, sysconfig
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))
PY
fi

if [ "${#missing[@]}" -gt 0 ]; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "tapstack: missing Debian packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
    echo "bootstrap: installing ${missing[*]}"
    tools/apt-install.sh "${missing[@]}"
fi

"$py" - <<'PY' || { echo "tapstack: Python 3.11 or newer is needed" >&2; exit 1; }
import sys
sys.exit(sys.version_info < (3, 11))
PY

if [ ! -x .venv/bin/python ] || [ pyproject.toml -nt .venv/.bootstrap-stamp ]; then
    echo "bootstrap: creating .venv with tapstack[test]"
    "$py" -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
    touch .venv/.bootstrap-stamp
fi
