"""A steering program for a multi-queue TAP: the kernel puts each frame it sends on the
queue of the worker that owns the frame's flow (stack/workers.py, `owner_of`).

Without one, the TAP picks a queue by a hash of the flow that userspace cannot compute
(and its table of "the queue that last wrote this flow" did not keep flows in place on
this project's machines), so half the flows would arrive at a worker that must hand
them over. The program is eBPF, assembled here from a few dozen instructions (no
compiler, no library) and loaded with the bpf() system call; TUNSETSTEERINGEBPF attaches
it to the TAP. The kernel takes its return value modulo the number of queues.

What it does, frame by frame (offsets from the Ethernet header):

- not IPv4, or an IPv4 fragment, or neither TCP nor UDP: queue 0 (the worker there
  answers ARP and pings, reassembles fragments, and hands what it does not own on);
- a local (destination) port among the ephemeral ports: that port modulo the number of
  workers (each worker picks its own ephemeral ports that way);
- otherwise the same hash of the remote address, remote port and local port as
  `owner_of`, in 32-bit arithmetic.

If the kernel refuses the program (no bpf(), a verifier that says no), `attach`
returns the reason and tapstack runs on, handing flows over in software.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import platform
import struct

TUNSETSTEERINGEBPF = 0x800454E0  # _IOR('T', 224, int)
BPF_PROG_LOAD = 5
BPF_PROG_TYPE_SOCKET_FILTER = 1
SYS_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine())

# eBPF opcodes (linux/bpf_common.h, linux/bpf.h)
LD_ABS_W, LD_ABS_H, LD_ABS_B = 0x20, 0x28, 0x30
LD_IND_H = 0x48
MOV64_X, MOV64_K = 0xBF, 0xB7
ALU32_K = {"and": 0x54, "lsh": 0x64, "rsh": 0x74, "mul": 0x24, "add": 0x04, "mod": 0x94,
           "xor": 0xA4}
ALU32_X = {"add": 0x0C, "xor": 0xAC, "mov": 0xBC}
JEQ_K, JNE_K, JLT_K, JGT_K, JA = 0x15, 0x55, 0xA5, 0x25, 0x05
EXIT = 0x95

INSN = struct.Struct("<BBhi")


def _signed(value: int) -> int:
    """A 32-bit immediate as the s32 the instruction holds."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value & 0x80000000 else value


class _Assembler:
    """Instructions with labels: a jump names its target, resolved at the end."""

    def __init__(self) -> None:
        self.code: list[tuple[int, int, int, int | str, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, dst: int = 0, src: int = 0, off: int | str = 0,
           imm: int = 0) -> None:
        self.code.append((code, dst, src, off, _signed(imm)))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = bytearray()
        for i, (code, dst, src, off, imm) in enumerate(self.code):
            if isinstance(off, str):
                off = self.labels[off] - (i + 1)
            out += INSN.pack(code, src << 4 | dst, off, imm)
        return bytes(out)


def program(count: int, low: int, high: int) -> bytes:
    """The steering program for `count` workers and ephemeral ports low..high."""
    a = _Assembler()
    a.op(MOV64_X, 6, 1)                   # r6 = the skb (LD_ABS/LD_IND read through it)
    a.op(LD_ABS_H, imm=12)                # ethertype
    a.op(JNE_K, 0, off="zero", imm=0x0800)
    a.op(LD_ABS_H, imm=20)                # flags and fragment offset
    a.op(ALU32_K["and"], 0, imm=0x3FFF)   # MF or an offset: a fragment
    a.op(JNE_K, 0, off="zero", imm=0)
    a.op(LD_ABS_B, imm=23)                # protocol
    a.op(JEQ_K, 0, off="ports", imm=6)
    a.op(JEQ_K, 0, off="ports", imm=17)
    a.op(JA, off="zero")
    a.label("ports")
    a.op(LD_ABS_B, imm=14)                # version and header length
    a.op(ALU32_K["and"], 0, imm=0x0F)
    a.op(ALU32_K["lsh"], 0, imm=2)
    a.op(MOV64_X, 7, 0)                   # r7 = IPv4 header length
    a.op(LD_IND_H, 0, 7, imm=14)          # source port: the remote one
    a.op(MOV64_X, 8, 0)
    a.op(LD_IND_H, 0, 7, imm=16)          # destination port: ours
    a.op(MOV64_X, 9, 0)
    a.op(JLT_K, 9, off="hash", imm=low)
    a.op(JGT_K, 9, off="hash", imm=high)
    a.op(ALU32_X["mov"], 0, 9)            # an ephemeral port: port % count
    a.op(ALU32_K["mod"], 0, imm=count)
    a.op(EXIT)
    a.label("hash")
    a.op(LD_ABS_W, imm=26)                # source address: the remote one
    a.op(ALU32_K["mul"], 0, imm=0x9E3779B1)
    a.op(ALU32_K["mul"], 8, imm=0x85EBCA6B)
    a.op(ALU32_X["add"], 0, 8)
    a.op(ALU32_X["add"], 0, 9)            # h = ip*A + rport*B + lport (mod 2**32)
    a.op(ALU32_X["mov"], 1, 0)
    a.op(ALU32_K["rsh"], 1, imm=15)
    a.op(ALU32_X["xor"], 0, 1)            # h ^ (h >> 15)
    a.op(ALU32_K["mul"], 0, imm=0x2C1B3C6D)
    a.op(ALU32_K["mod"], 0, imm=count)
    a.op(EXIT)
    a.label("zero")
    a.op(MOV64_K, 0, imm=0)
    a.op(EXIT)
    return a.assemble()


def _load(code: bytes) -> int:
    """bpf(BPF_PROG_LOAD): the program's fd; OSError with the verifier's words."""
    if SYS_BPF is None:
        raise OSError(0, f"no bpf() system call number known for {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(65536)
    attr = ctypes.create_string_buffer(128)
    struct.pack_into("<IIQQIIQ", attr, 0, BPF_PROG_TYPE_SOCKET_FILTER, len(code) // 8,
                     ctypes.addressof(insns), ctypes.addressof(license_), 1, len(log),
                     ctypes.addressof(log))
    libc.syscall.restype = ctypes.c_long
    fd = libc.syscall(ctypes.c_long(SYS_BPF), ctypes.c_long(BPF_PROG_LOAD), attr,
                      ctypes.c_long(len(attr)))
    if fd < 0:
        err = ctypes.get_errno()
        words = log.value.decode(errors="replace").strip().splitlines()
        raise OSError(err, f"{os.strerror(err)}" + (f" ({words[-1]})" if words else ""))
    return fd


def attach(tap_fd: int, count: int, low: int, high: int) -> str | None:
    """Steer the TAP's frames to their owners; None when done, else why not."""
    try:
        prog = _load(program(count, low, high))
    except OSError as exc:
        return f"the kernel refused the steering program: {exc.strerror}"
    try:
        fcntl.ioctl(tap_fd, TUNSETSTEERINGEBPF, struct.pack("i", prog))
    except OSError as exc:
        return f"the TAP refused the steering program: {exc.strerror}"
    finally:
        os.close(prog)  # the TAP holds its own reference
    return None
