"""The built-in site as a module-level ASGI app, so that uvicorn (on tapstack or on the
kernel) serves the very same app as tapstack's own server in tools/bench_tls.py."""

from stack.apps.http.site import Site

app = Site()
