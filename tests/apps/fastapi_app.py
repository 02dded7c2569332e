"""A FastAPI app with a lifespan that initialises state, HTTP routes and a WebSocket
route: served by uvicorn on tapstack and by tapstack's built-in server in the tests."""

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect

EVENTS: list[str] = []


@asynccontextmanager
async def lifespan(app: FastAPI):
    EVENTS.append("startup")
    yield {"greeting": "hello from the lifespan", "visits": []}
    EVENTS.append("shutdown")


app = FastAPI(lifespan=lifespan)


@app.get("/state")
async def state(request: Request) -> dict:
    request.state.visits.append(1)
    return {"greeting": request.state.greeting, "visits": len(request.state.visits),
            "events": EVENTS, "client": request.client.host}


@app.post("/echo")
async def echo(request: Request) -> dict:
    body = await request.body()
    return {"length": len(body)}


@app.websocket("/ws")
async def ws(websocket: WebSocket) -> None:
    await websocket.accept(subprotocol=(websocket.scope["subprotocols"] or [None])[0])
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                if message["text"] == "bye":
                    await websocket.close(code=4000, reason="asked to")
                    return
                await websocket.send_text(f"echo: {message['text']}")
            else:
                await websocket.send_bytes(message["bytes"][::-1])
    except WebSocketDisconnect:
        return


@app.websocket("/refuse")
async def refuse(websocket: WebSocket) -> None:
    await websocket.close()
