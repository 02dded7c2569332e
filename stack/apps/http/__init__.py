"""HTTP/1.1 over asyncio Protocols (server.py) and the built-in ASGI site (site.py)."""
