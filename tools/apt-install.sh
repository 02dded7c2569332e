#!/usr/bin/env bash
# Install Debian packages quietly, as root: `tools/apt-install.sh PKG...`. A fresh
# machine has no package lists yet, so a failed install runs `apt-get update` once and
# tries again. Used by bootstrap.sh and the VM scripts alike.
set -euo pipefail
[ "$#" -gt 0 ] || exit 0
export DEBIAN_FRONTEND=noninteractive
if ! apt-get install -y -q --no-install-recommends "$@" >/dev/null 2>&1; then
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends "$@" >/dev/null
fi
