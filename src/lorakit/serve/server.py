"""The OpenAI-compatible HTTP API on FastAPI + uvicorn: `/v1/models`, `/v1/completions`,
`/v1/chat/completions`, and vLLM's `/v1/load_lora_adapter` / `/v1/unload_lora_adapter`.

Every request becomes a row of the engine's one batched decoding loop; this side only parses, checks
and turns tokens into OpenAI answers (`stream: true`: server-sent events ending with `data: [DONE]`).
Errors use OpenAI's shape `{"error": {"message", "type", "param", "code"}}`. With an API key every
`/v1` route needs `Authorization: Bearer KEY` (missing: 401, wrong: 403); the runtime adapter routes
exist only when allowed, and only with a key.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from lorakit.serve.engine import Answer, Engine, Job, RequestError

MAX_BODY_BYTES = 1 << 20
ERROR_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
               429: "rate_limit_error"}


def error_body(status: int, message: str) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def make_app(engine: Engine, api_key: str | None = None, allow_runtime_adapters: bool = False,
             max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The ASGI app answering for `engine`."""
    if allow_runtime_adapters and not api_key:
        raise ValueError("runtime adapter loading needs an API key (--api-key or LORAKIT_API_KEY)")

    async def authorize(request: Request) -> None:
        """With an API key, every /v1 route needs it as a bearer token (a dependency, not a middleware, so that
        a streaming client's disconnect still reaches the answer)."""
        if not api_key or not request.url.path.startswith("/v1"):
            return
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            raise RequestError(401, "missing API key: send 'Authorization: Bearer KEY'")
        if not hmac.compare_digest(header[len("Bearer "):].encode(), api_key.encode()):
            raise RequestError(403, "wrong API key")

    app = FastAPI(title="lorakit", docs_url=None, redoc_url=None, openapi_url=None, dependencies=[Depends(authorize)])

    @app.exception_handler(RequestError)
    async def request_error(request: Request, e: RequestError) -> JSONResponse:
        return JSONResponse(error_body(e.status, str(e)), status_code=e.status)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        """A fault of ours (logged with its traceback by the server): still an answer in OpenAI's shape."""
        return JSONResponse(error_body(500, f"{type(e).__name__}: {e}"), status_code=500)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException) -> JSONResponse:
        message = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(error_body(e.status_code, message), status_code=e.status_code)

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return engine.models()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await answer(engine, await read_json(request, max_body_bytes), chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await answer(engine, await read_json(request, max_body_bytes), chat=True)

    if allow_runtime_adapters:
        @app.post("/v1/load_lora_adapter")
        async def load_lora_adapter(request: Request):
            body = await read_json(request, max_body_bytes)
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            name, path = body.get("lora_name"), body.get("lora_path")
            await asyncio.to_thread(engine.load, name, path)
            return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

        @app.post("/v1/unload_lora_adapter")
        async def unload_lora_adapter(request: Request):
            body = await read_json(request, max_body_bytes)
            if not isinstance(body, dict):
                raise RequestError(400, "the request body must be a JSON object")
            engine.unload(body.get("lora_name"))
            return PlainTextResponse(f"Success: LoRA adapter '{body['lora_name']}' removed successfully.")

    return app


async def read_json(request: Request, limit: int):
    """The parsed JSON body; a 413 past `limit` bytes (the rest is read and dropped, up to a bound, so that
    the client gets the answer rather than a reset connection)."""
    declared = request.headers.get("content-length")
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen <= limit:
            body += chunk
        elif seen > 16 * limit:
            break
    if seen > limit or (declared is not None and declared.isdigit() and int(declared) > limit):
        raise RequestError(413, f"request body of {max(seen, int(declared or 0))} bytes is over the limit of {limit}")
    try:
        return json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise RequestError(400, "the request body's JSON is nested too deeply") from None


async def answer(engine: Engine, request, chat: bool):
    """Queue the request, wait for its first token (errors before it are plain HTTP errors), then answer
    whole or as server-sent events."""
    job = engine.prepare(request, chat)
    items: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    seq = engine.submit(job, lambda item: loop.call_soon_threadsafe(items.put_nowait, item))
    try:
        first = await items.get()
    except BaseException:
        engine.cancel(seq)
        raise
    if isinstance(first, BaseException):
        engine.cancel(seq)
        if isinstance(first, RequestError):
            raise first
        raise RequestError(500, f"{type(first).__name__}: {first}")
    if not job.params["stream"]:
        result = Answer(engine, job)
        try:
            item = first
            while item is not None and not result.done:
                if isinstance(item, BaseException):
                    raise RequestError(500, f"{type(item).__name__}: {item}")
                result.add(item)
                item = await items.get()
        finally:
            engine.cancel(seq)
        return result.whole()
    return StreamingResponse(events(engine, job, seq, first, items), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def events(engine: Engine, job: Job, seq, first, items: asyncio.Queue):
    """Server-sent events: a chunk per piece of text, the last with the finish_reason, then [DONE]."""
    result = Answer(engine, job)
    try:
        item = first
        while item is not None and not result.done:
            if isinstance(item, BaseException):
                body = error_body(500, f"{type(item).__name__}: {item}")
                yield f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n"
                return
            piece = result.add(item)
            if piece:
                yield f"data: {json.dumps(result.chunk(piece, None))}\n\n"
            item = await items.get()
        engine.cancel(seq)
        rest, finish = result.finish()
        yield f"data: {json.dumps(result.chunk(rest, finish))}\n\n"
        if job.params["usage"]:
            yield f"data: {json.dumps({**job.head(chunk=True), 'choices': [], 'usage': result.usage()})}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        engine.cancel(seq)


class Server:
    """A uvicorn server for `app` on its own thread (tests, benchmarks); `url` once started."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> None:
        import uvicorn

        config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off",
                                timeout_graceful_shutdown=5)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="lorakit-http", daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            self.thread.join(0.01)
        return self

    @property
    def url(self) -> str:
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
