"""Applications: plain asyncio Protocols, runnable on tapstack or on kernel sockets."""
