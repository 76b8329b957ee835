"""The OpenAI-compatible FastAPI app over an EngineFrontend: /v1/completions, /v1/chat/completions,
/v1/models, /health and /metrics, with an optional Bearer API key on /v1/*."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from rapid.model.default_name import DEFAULT_MODEL_NAME, DEFAULT_MODEL_REPO
from rapid.core.adaptive import make_placement
from rapid.entrypoints.frontend import EngineFrontend
from rapid.entrypoints.openai import protocol as P
from rapid.entrypoints.version import version
from rapid.entrypoints.openai.metrics import CONTENT_TYPE, ServerMetrics
from rapid.entrypoints.openai.serving import OpenAIServing

logger = logging.getLogger(__name__)
STATS_WAIT_S = 1.0  # how long /metrics waits for the engine loop's stats (a long step holds them)


async def json_body(request: Request) -> bytes:
    """The body of a POST that says it is JSON. As vLLM, any other Content-Type is refused: a web page may send
    text/plain or a form to a loopback server without asking it first (no CORS preflight), and start generation."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json":
        raise P.ApiError(415, f"Content-Type must be application/json, not {media_type or 'none'!r}",
                         param="Content-Type", code="unsupported_media_type")
    return await request.body()


def _error(e: P.ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _unless_disconnected(request: Request, coro, on_disconnect) -> dict | None:
    """Await `coro`; if the client disconnects first, cancel it, call on_disconnect and return None."""
    task = asyncio.ensure_future(coro)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    on_disconnect()
    return None


def served_names(folder: str, given: str | list[str] | None) -> tuple[str, tuple[str, ...]]:
    """(the name responses report, the other names requests may use): the names given (`--served-model-name`),
    else the model folder; the bundled default model's cached folder is served by its own names."""
    names = [given] if isinstance(given, str) else list(given or [])
    if names:
        return names[0], tuple(names[1:])
    path = Path(folder)
    if path.parent.name == "models" and path.name.startswith(f"{DEFAULT_MODEL_NAME}-"):  # default_model_path()
        return DEFAULT_MODEL_NAME, (DEFAULT_MODEL_REPO,)
    return folder, ()


def build_app(frontend: EngineFrontend, *, model_name: str | list[str] | None = None, api_key: str | None = None,
              metrics: ServerMetrics | None = None, chat_template: str | None = None,
              allowed_origins: list[str] | None = None, log_requests: bool = False,
              trust_request_chat_template: bool = False) -> FastAPI:
    """The app; `model_name` (one name, or several as `vllm serve --served-model-name A B`: the first is the one
    responses report) defaults to the model folder given to the LLM (requests may use any of them, and the folder;
    the bundled default model is served as SmolLM2-135M-Instruct).
    `allowed_origins`: the browser origins CORS lets in ("*": any; None: no CORS headers); `log_requests`
    (`rapid serve --enable-log-requests`): an INFO line per request received; `trust_request_chat_template`: run
    a request's own chat_template (refused otherwise, as vLLM)."""
    config = frontend.llm.config
    model_name, aliases = served_names(config.model, model_name)
    if metrics is None:
        get_stats = getattr(frontend, "get_stats", None)  # a scrape waits STATS_WAIT_S at most, then shows the last
        quick = (lambda: get_stats(timeout_s=STATS_WAIT_S)) if get_stats is not None else None
        metrics = ServerMetrics(model_name, config.mode, get_stats=quick,
                                placement=make_placement(config).name, max_model_len=config.scheduler.max_model_len)
    serving = OpenAIServing(frontend, model_name, metrics, chat_template, aliases, log_requests,
                            trust_request_chat_template)
    app = FastAPI(title="RAPID", openapi_url=None, docs_url=None, redoc_url=None)
    app.state.serving = serving
    created = int(time.time())

    @app.exception_handler(P.ApiError)
    async def on_api_error(_request: Request, e: P.ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(HTTPException)
    async def on_http_error(_request: Request, e: HTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return _error(P.ApiError(e.status_code, str(e.detail), type=kind))

    @app.middleware("http")
    async def check_api_key(request: Request, call_next):
        if api_key is not None and request.url.path.startswith("/v1"):
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.encode(), api_key.encode()):
                return _error(P.ApiError(401, "Incorrect API key provided; send 'Authorization: Bearer <key>'",
                                         code="invalid_api_key"))
        try:
            return await call_next(request)
        except Exception as e:  # a bug: an OpenAI-shaped 500 (not text/plain), and the connection stays usable
            logger.exception("%s %s failed", request.method, request.url.path)
            return _error(P.ApiError(500, f"internal error: {type(e).__name__}: {e}", type="internal_server_error"))

    @app.get("/health")
    async def health() -> Response:
        if frontend.dead_reason is not None:
            return _error(P.ApiError(503, f"the engine is dead: {frontend.dead_reason}", type="service_unavailable"))
        stalled = frontend.llm.engine.stall_reason()
        if stalled is not None:  # going nowhere: load balancers route elsewhere until it continues or restarts
            return _error(P.ApiError(503, f"the engine is not serving: {stalled}", type="service_unavailable"))
        if serving.closing:  # draining after SIGTERM: load balancers stop routing here (/v1/* answers 503 too)
            return _error(P.ApiError(503, "the server is shutting down", type="service_unavailable"))
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        body = await asyncio.to_thread(metrics.render)  # engine stats may be a round trip
        return Response(body, media_type=CONTENT_TYPE)

    def card(name: str) -> dict:  # max_model_len: what one request can use (LLM.longest_sequence)
        # vLLM's model card: parent and permission too (no fine-tunes or organisations here: fixed values)
        permission = {"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                      "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                      "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                      "organization": "*", "group": None, "is_blocking": False}
        return {"id": name, "object": "model", "created": created, "owned_by": "rapid", "root": config.model,
                "parent": None, "max_model_len": frontend.llm.longest_sequence, "permission": [permission]}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [card(name) for name in (model_name, *aliases)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        if model_id not in (model_name, *aliases, config.model):
            raise P.ApiError(404, f"the model {model_id!r} does not exist; this server serves {model_name!r}",
                             param="model", code="model_not_found")
        return card(model_id)

    async def run(request: Request, chat: bool) -> Response:
        body = await json_body(request)
        req = P.decode(body, P.ChatCompletionRequest if chat else P.CompletionRequest)
        items = await serving.off_loop(serving.chat_items if chat else serving.completion_items, req)
        builder = serving.builder(chat, P.chat_logprobs(req) if chat else req.logprobs, req.return_token_ids)
        job = serving.start(items, builder.id)
        if req.stream:
            opts = req.stream_options
            include_usage = bool(opts and opts.include_usage)
            continuous = bool(opts and opts.continuous_usage_stats)
            return StreamingResponse(serving.stream(job, builder, include_usage, continuous),
                                     media_type="text/event-stream")
        result = await _unless_disconnected(request, serving.collect(job, builder), job.abort)
        return JSONResponse(result) if result is not None else Response(status_code=499)

    @app.get("/version")
    async def server_version() -> dict:
        return {"version": version()}

    @app.api_route("/ping", methods=["GET", "POST"])
    async def ping() -> Response:  # what SageMaker-style load balancers call: /health's answer
        return await health()

    @app.post("/tokenize")
    @app.post("/v1/tokenize")
    async def tokenize(request: Request) -> dict:
        return await serving.off_loop(serving.tokenize, P.decode(await json_body(request), P.TokenizeRequest))

    @app.post("/detokenize")
    @app.post("/v1/detokenize")
    async def detokenize(request: Request) -> dict:
        return await serving.off_loop(serving.detokenize, P.decode(await json_body(request), P.DetokenizeRequest))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await run(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await run(request, chat=True)

    if allowed_origins:  # outermost: a browser's preflight is answered before the API key is asked for
        app.add_middleware(CORSMiddleware, allow_origins=allowed_origins, allow_methods=["*"], allow_headers=["*"],
                           allow_credentials="*" not in allowed_origins)
    return app
