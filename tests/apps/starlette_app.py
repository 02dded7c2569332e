"""A Starlette application, served by `tapstack run --app tests.apps.starlette_app:app`."""

from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route


async def hello(request):
    return JSONResponse({"hello": request.path_params["name"], "client": request.client.host,
                         "via": "starlette"})


app = Starlette(routes=[Route("/hello/{name}", hello)])
