"""TCP (RFC 9293): connections, listeners, timers, congestion control. Pure: no I/O."""
