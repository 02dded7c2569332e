"""Network namespaces and the host side of the TAP, done with iproute2 and setns(2).

The stack process enters the namespace itself (setns on /run/netns/NAME) before it
creates the TAP, so the TAP, its address and the control socket all live there.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import subprocess

from stack.link import LinkError

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"


def _ip(*args: str) -> None:
    try:
        subprocess.run(["ip", *args], check=True, capture_output=True, text=True)
    except FileNotFoundError:
        raise LinkError("the 'ip' command is missing; install iproute2") from None
    except subprocess.CalledProcessError as exc:
        detail = (exc.stderr or "").strip().splitlines()
        raise LinkError(f"'ip {' '.join(args)}' failed: "
                        f"{detail[-1] if detail else exc.returncode}") from None


def netns_exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))


# tapstack run marks the namespaces it creates, so that one left behind by a killed
# instance is known for what it is (and `tapstack cleanup` can find it)
MARKS = "/run/tapstack/netns"


def create_netns(name: str, mark: bool = False) -> None:
    _ip("netns", "add", name)
    if mark:
        os.makedirs(MARKS, exist_ok=True)
        with open(os.path.join(MARKS, name), "w") as f:
            f.write(f"{os.getpid()}\n")


def delete_netns(name: str) -> None:
    if netns_exists(name):
        _ip("netns", "delete", name)
    unmark(name)


def unmark(name: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(os.path.join(MARKS, name))


def is_marked(name: str) -> bool:
    return os.path.exists(os.path.join(MARKS, name))


def marked_netns() -> list[str]:
    try:
        return sorted(os.listdir(MARKS))
    except FileNotFoundError:
        return []


def netns_pids(name: str) -> list[int]:
    """The processes in a namespace (`ip netns pids`)."""
    try:
        out = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True,
                             check=False).stdout
    except FileNotFoundError:
        return []
    return [int(p) for p in out.split() if p.isdigit()]


def enter_netns(name: str) -> None:
    """Move this process (its only thread) into the named network namespace."""
    path = os.path.join(NETNS_DIR, name)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise LinkError(f"network namespace {name} does not exist") from None
    try:
        _setns(fd, name)
    finally:
        os.close(fd)


def _setns(fd: int, name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise LinkError(f"cannot enter network namespace {name}: {os.strerror(err)}")


def current_netns() -> int:
    """A handle on the namespace this process is in now, to come back to it."""
    return os.open("/proc/self/ns/net", os.O_RDONLY)


def return_to_netns(fd: int) -> None:
    _setns(fd, "the starting namespace")


def write_sysctl(path: str, value: str) -> bool:
    """Write /proc/sys/...; False when the knob does not exist (e.g. no IPv6)."""
    try:
        with open(path, "w") as f:
            f.write(value)
        return True
    except FileNotFoundError:
        return False


def configure_host_side(tap: str, host_cidr: str | None, mtu: int,
                        txqueuelen: int = 10000) -> None:
    """Give the kernel's end of the TAP its address and bring it up, IPv6 off.

    IPv6 is disabled on this device before it goes up: router solicitations, MLD and
    DAD would otherwise appear on the wire and in every capture. The queue towards us
    is 10,000 frames (measured: the default 1,000 drops bursts on the plain path).
    """
    write_sysctl(f"/proc/sys/net/ipv6/conf/{tap}/disable_ipv6", "1")
    _ip("link", "set", "dev", tap, "mtu", str(mtu), "txqueuelen", str(txqueuelen))
    if host_cidr:
        _ip("addr", "add", host_cidr, "dev", tap)
    _ip("link", "set", "dev", tap, "up")


def ip_link_up(dev: str) -> None:
    _ip("link", "set", "dev", dev, "up")


def attach_to_bridge(dev: str, bridge: str) -> None:
    """Make `dev` a port of `bridge` (which must exist in the current namespace)."""
    try:
        _ip("link", "set", "dev", dev, "master", bridge)
    except LinkError:
        raise LinkError(f"cannot attach {dev} to bridge {bridge} (is there a bridge of "
                        "that name in its namespace?)") from None
