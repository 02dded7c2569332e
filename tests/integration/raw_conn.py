"""Hold one keep-alive HTTP connection open (run inside the test's namespace).

Prints "port <local port>" after a first request succeeded, waits for a line on stdin,
then sends a second request on the same connection and prints its status line.
"""

import socket
import sys


def request(s: socket.socket) -> bytes:
    s.sendall(b"GET /bytes/10 HTTP/1.1\r\nHost: x\r\n\r\n")
    data = b""
    while not data.endswith(bytes(range(10))):
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return data.split(b"\r\n", 1)[0]


def main() -> None:
    s = socket.create_connection((sys.argv[1], 80), timeout=10)
    print("first", request(s).decode(), flush=True)
    print("port", s.getsockname()[1], flush=True)
    sys.stdin.readline()
    try:
        print("second", request(s).decode(), flush=True)
    except OSError as exc:
        print("second failed", exc, flush=True)


if __name__ == "__main__":
    main()
