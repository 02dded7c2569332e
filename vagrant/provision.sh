#!/usr/bin/env bash
# Provision a Debian 12 machine for tapstack: exactly what the README's two commands,
# `make run` and `make test`, need, and nothing else. Idempotent: a second run installs
# nothing and rebuilds nothing.
#
# Runs as root, from Vagrant's shell provisioner or from vagrant/build-image.sh inside
# the image it is building. Argument: the repository's path in the machine (/vagrant).
set -euo pipefail
repo=${1:-/vagrant}

if [ "$(id -u)" -ne 0 ]; then
    echo "provision.sh: run as root" >&2
    exit 1
fi
if [ ! -f "$repo/tools/bootstrap.sh" ]; then
    echo "provision.sh: no tapstack repository at $repo" >&2
    exit 1
fi

# What tools/bootstrap.sh itself needs before it can run: make and a Python that can
# build python-pytun's C extension. bootstrap.sh then installs the Debian tools that
# `make test` drives (iproute2, curl, tcpdump, wrk, ...) and the .venv.
need=()
for pkg in make python3 python3-venv python3-dev gcc rsync ca-certificates; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'ok installed' || need+=("$pkg")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "provision: installing ${need[*]}"
    "$repo/tools/apt-install.sh" "${need[@]}"
fi

"$repo/tools/bootstrap.sh" test

# `tapstack` on root's PATH, so that `sudo tapstack run --no-netns` works from a shell.
ln -sfn "$repo/.venv/bin/tapstack" /usr/local/bin/tapstack

echo "provision: done; try: cd $repo && sudo make run   (or: sudo tapstack run --no-netns)"
