"""`racer-local serve`: an OpenAI-compatible local server with a built-in web chat.

Starlette on uvicorn: a small, well-kept ASGI pair with streaming responses and disconnect
detection built in, and no schema layer we would not use (the request handling is
openai_api.py's, shared with the Python API). One Engine serves every request; requests
wait their turn in arrival order (an asyncio.Lock is FIFO), at most `max_queue` of them, and
a full queue answers 503 with Retry-After. Generations run on one worker thread, so two
`llama_decode`s never overlap. A client that disconnects mid-stream cancels its generation
after the current forward pass and frees the engine for the next request.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from racer_local import openai_api
from racer_local.openai_api import RequestError

MAX_BODY = 4 << 20  # bytes: a full 32k-token context is well under 1 MiB of JSON
MAX_QUEUE = 16  # requests waiting or running before new ones get 503


def error(status: int, message: str, kind: str, code: str | None = None, headers=None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": None, "code": code}},
                        status_code=status, headers=headers)


class Server:
    """The app's state: the engine, its queue and its worker thread."""

    def __init__(self, engine, *, api_key: str | None = None, max_queue: int = MAX_QUEUE) -> None:
        self.engine, self.api_key, self.max_queue = engine, api_key, max_queue
        self.lock = asyncio.Lock()
        self.waiting = 0  # requests holding or waiting for the lock
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="racer-engine")
        routes = [Route("/", self.page), Route("/health", self.health),
                  Route("/v1/models", self.models), Route("/models", self.models)]
        for path, kind in (("/v1/chat/completions", "chat"), ("/chat/completions", "chat"),
                           ("/v1/completions", "completion"), ("/completions", "completion")):
            routes.append(Route(path, self._endpoint(kind), methods=["POST"]))
        self.app = Starlette(routes=routes,
                             exception_handlers={404: self._not_found, 405: self._not_allowed})

    async def _not_found(self, request, exc) -> JSONResponse:
        return error(404, f"no such endpoint: {request.method} {request.url.path}", "not_found_error")

    async def _not_allowed(self, request, exc) -> JSONResponse:
        return error(405, f"{request.method} is not allowed on {request.url.path}", "invalid_request_error")

    async def page(self, request: Request) -> Response:
        return HTMLResponse(files("racer_local").joinpath("web/chat.html").read_text(encoding="utf-8"))

    async def health(self, request: Request) -> Response:
        """200 once the server listens, which is after the model has loaded."""
        return JSONResponse({"status": "ok", "model": openai_api.model_id(self.engine)})

    async def models(self, request: Request) -> Response:
        return self._refused(request) or JSONResponse(openai_api.models(self.engine))

    def _refused(self, request: Request) -> Response | None:
        if self.api_key is None:
            return None
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
            return error(401, "invalid or missing API key: send 'Authorization: Bearer <key>'",
                         "invalid_request_error", "invalid_api_key")
        return None

    async def _body(self, request: Request) -> dict:
        too_large = RequestError(f"the request body is over {MAX_BODY >> 20} MiB", None, "request_too_large")
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY):
            raise too_large
        data = bytearray()
        async for part in request.stream():
            data += part
            if len(data) > MAX_BODY:
                raise too_large
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise RequestError(f"the request body is not valid JSON: {e}", None, "invalid_json") from e
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        return body

    def _endpoint(self, kind: str):
        make = openai_api.chat_completion if kind == "chat" else openai_api.completion

        async def endpoint(request: Request) -> Response:
            refused = self._refused(request)
            if refused:
                return refused
            try:
                body = await self._body(request)
            except RequestError as e:
                return JSONResponse(e.body(), status_code=413 if e.code == "request_too_large" else 400)
            if self.waiting >= self.max_queue:
                return error(503, f"the server is busy ({self.waiting} requests queued); retry shortly",
                             "server_busy", "queue_full", headers={"Retry-After": "2"})
            self.waiting += 1
            try:
                await self.lock.acquire()
            except BaseException:
                self.waiting -= 1
                raise
            release = _Once(lambda: (self.lock.release(), setattr(self, "waiting", self.waiting - 1)))
            try:
                result = await self._run(lambda: make(self.engine, body))
            except RequestError as e:
                release()
                return JSONResponse(e.body(), status_code=400)
            except BaseException:
                release()
                raise
            if isinstance(result, dict):
                release()
                return JSONResponse(result)
            return StreamingResponse(self._sse(result, release), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

        return endpoint

    async def _run(self, fn):
        return await asyncio.get_running_loop().run_in_executor(self.worker, fn)

    async def _sse(self, chunks, release):
        """Chunk dicts as server-sent events; a disconnect cancels the generation at once.

        Nothing is awaited on the way out: a cancelled task may not await again (anyio's
        cancellation repeats), so the lock is released when the worker has drained the
        cancelled generation, from that future's callback.
        """
        finished = False
        try:
            while True:
                chunk = await self._run(lambda: next(chunks, None))
                if chunk is None:
                    break
                yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            yield "data: [DONE]\n\n"
            finished = True
        finally:
            if finished:
                release()
            else:  # the client went away (or the server is stopping)
                self.engine.cancel()
                drained = asyncio.get_running_loop().run_in_executor(self.worker, _drain, chunks)
                drained.add_done_callback(lambda _: release())


def _drain(chunks) -> None:
    """Finish a cancelled generation: it ends after its current forward pass, KV rolled back."""
    for _ in chunks:
        pass


class _Once:
    def __init__(self, fn) -> None:
        self.fn, self.called = fn, False

    def __call__(self) -> None:
        if not self.called:
            self.called = True
            self.fn()


def serve(engine, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          max_queue: int = MAX_QUEUE, log_level: str = "info") -> None:
    import uvicorn

    app = Server(engine, api_key=api_key, max_queue=max_queue).app
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
