"""Send raw Ethernet frames out of a device (run inside the test's namespace).

usage: inject.py DEVICE COUNT HEXFRAME [HEXFRAME ...]
"""

import socket
import sys


def main() -> None:
    dev, count, frames = sys.argv[1], int(sys.argv[2]), [bytes.fromhex(h) for h in sys.argv[3:]]
    with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as s:
        s.bind((dev, 0))
        for frame in frames:
            for _ in range(count):
                s.send(frame)


if __name__ == "__main__":
    main()
