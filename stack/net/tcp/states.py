"""The states of a TCP connection (RFC 9293 3.3.2) and the constants the engine's parts
share."""

# States (RFC 9293 3.3.2). CLOSED is where a connection ends; LISTEN lives in Listener.
CLOSED, LISTEN, SYN_SENT, SYN_RECEIVED, ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2, CLOSE_WAIT, \
    CLOSING, LAST_ACK, TIME_WAIT = range(11)
STATE_NAMES = ("CLOSED", "LISTEN", "SYN-SENT", "SYN-RECEIVED", "ESTABLISHED", "FIN-WAIT-1",
               "FIN-WAIT-2", "CLOSE-WAIT", "CLOSING", "LAST-ACK", "TIME-WAIT")

# States in which we may still send data, and in which received data is delivered.
SEND_STATES = frozenset({ESTABLISHED, CLOSE_WAIT})
PROBE_STATES = frozenset({ESTABLISHED, CLOSE_WAIT, FIN_WAIT_1, CLOSING, LAST_ACK})
RECV_STATES = frozenset({ESTABLISHED, FIN_WAIT_1, FIN_WAIT_2})

TS_OPTION_LEN = 12  # NOP NOP TS: what every data segment carries when timestamps are on
MAX_SACK_BLOCKS = 3  # with timestamps, 3 blocks fit in 40 option bytes (RFC 2018 3)
WC_DELACK = 0.2  # RFC 8985 7.2 WCDelAckT: the longest a peer may delay an ACK
PAWS_IDLE = 24 * 86400.0  # RFC 7323 5.5: TS.Recent is invalid after 24 days idle

# What the retransmission timer (t_rtx) is waiting for: one timer, one explicit kind.
RTO = 0  # the retransmission timeout (RFC 6298)
TLP = 1  # a tail loss probe (RFC 8985 7.2)
REORDER = 2  # RACK's reordering window of a byte still undelivered (RFC 8985 6.3)
RECOVERY = 3  # the ACK of a retransmission made in recovery (RACK's reasoning, 6.3)
RTX_KINDS = ("RTO", "TLP", "reorder", "recovery")
