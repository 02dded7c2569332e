"""What the layers above may read of a TCP connection: a small public surface, so that
transports never reach into the engine's fields."""

from __future__ import annotations

from typing import Any

from stack.net.tcp.connection import Connection
from stack.net.tcp.seq import seq_diff


def unsent_bytes(conn: Connection) -> int:
    """Bytes the application wrote that have not been sent yet."""
    return max(seq_diff(conn.snd_buf.end, conn.snd_nxt), 0)


def fin_acked(conn: Connection) -> bool:
    """Our FIN was sent and acknowledged: the close is complete on our side."""
    return conn._fin_acked()


def tcp_info(conn: Connection) -> dict[str, Any]:
    """A snapshot in the spirit of Linux's TCP_INFO."""
    rto = conn.rto
    return {
        "state": conn.state_name,
        "srtt_ms": None if rto.srtt is None else round(rto.srtt * 1000, 3),
        "rttvar_ms": round(rto.rttvar * 1000, 3),
        "rto_ms": round(rto.current() * 1000, 1),
        "cwnd": conn.cc.cwnd,
        "ssthresh": conn.cc.ssthresh_shown,
        "mss": conn.eff_mss,
        "peer_mss": conn.peer_mss,
        "snd_wnd": conn.snd_wnd,
        "rcv_wnd": max(seq_diff(conn.rcv_adv, conn.rcv_nxt), 0),
        "snd_wscale": conn.snd_wscale,
        "rcv_wscale": conn.rcv_wscale,
        "timestamps": conn.ts_ok,
        "sack": conn.sack_ok,
        "unacked": conn.flight_size,
        "segs_in": conn.segs_in,
        "segs_out": conn.segs_out,
        "retransmits": conn.retransmits,
        "nodelay": conn.nodelay,
        "send_queue": max(seq_diff(conn.snd_buf.end, conn.snd_una), 0),
        "recv_queue": len(conn._rcv_buffer),
        "bytes_acked": max(seq_diff(conn.snd_una, conn.iss) - 1, 0),
        "bytes_received": max(seq_diff(conn.rcv_nxt, conn.irs) - 1, 0) if conn.irs else 0,
        "congestion_control": conn.cc.name,
    }
