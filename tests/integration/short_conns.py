"""N sequential short connections to an echo server (run inside the test's namespace).

usage: short_conns.py HOST PORT COUNT   -> prints "ok=<n> failed=<n> seconds=<s>"
"""

import socket
import sys
import time


def main() -> None:
    host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    ok = failed = 0
    start = time.monotonic()
    for i in range(count):
        msg = b"hello %d\n" % i
        try:
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(msg)
                s.shutdown(socket.SHUT_WR)
                got = b""
                while chunk := s.recv(4096):
                    got += chunk
            ok += got == msg
            failed += got != msg
        except OSError:
            failed += 1
    print(f"ok={ok} failed={failed} seconds={time.monotonic() - start:.2f}")


if __name__ == "__main__":
    main()
