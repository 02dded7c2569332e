"""ASGI apps that must not start: a lifespan startup that fails, and a non-ASGI object."""


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await receive()
        await send({"type": "lifespan.startup.failed",
                    "message": "the database is not there"})
        return


def not_asgi(environ, start_response):  # a WSGI app
    return []
