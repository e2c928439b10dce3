"""The FastAPI app: OpenAI-compatible routes over an async engine, plus the extras.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/models/{model}``, ``POST /tokenize``, ``POST /detokenize`` (all of these, and any
other /v1 path, need ``Authorization: Bearer <api_key>`` when the app has an API key, checked
before anything else), and, always open,
``GET /health`` (503 while shutting down or after an engine failure) and ``GET /metrics``.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Optional

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response

from cacheflow_models import has_tokenizer
from cacheflow_runtime import BaseAsyncEngine, InvalidArgumentError
from cacheflow_serve import __version__
from cacheflow_serve.server.chat import create_chat_completion, render_chat
from cacheflow_serve.server.completions import create_completion
from cacheflow_serve.server.errors import APIError, error_response, install_error_handlers
from cacheflow_serve.server.metrics import CONTENT_TYPE, ServerMetrics
from cacheflow_serve.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from cacheflow_serve.server.serving import ServingContext

DEFAULT_MAX_REQUEST_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class CorsPolicy:
    """Which browser pages may call the server (the CORS headers and preflight answers of
    Starlette's ``CORSMiddleware``); vLLM's defaults: any origin, method and header, without
    credentials."""

    allowed_origins: tuple[str, ...] = ("*",)
    allowed_methods: tuple[str, ...] = ("*",)
    allowed_headers: tuple[str, ...] = ("*",)
    allow_credentials: bool = False


class _BodyLimit:
    """ASGI middleware: 413 for a request body over ``limit`` bytes (declared or streamed)."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No length declared (chunked): read the body here, up to the limit, then replay it.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._reject(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> Any:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope: Any, receive: Any, send: Any) -> None:
        response = error_response(413, f"the request body is larger than {self.limit} bytes",
                                  code="request_too_large")
        await response(scope, receive, send)


#: Paths that need the API key: every /v1 path (unknown ones included, as vLLM's) and the
#: tokenizer routes.
_PROTECTED_PREFIXES = ("/v1/", "/tokenize", "/detokenize")


class _ApiKeyCheck:
    """ASGI middleware: 401 for a protected path (``_PROTECTED_PREFIXES``, or exactly "/v1")
    without ``Authorization: Bearer <api_key>``, before the body is read or validated (as vLLM's
    middleware does); CORS preflights (OPTIONS) pass."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.expected = api_key.encode("utf-8")

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope.get("method") != "OPTIONS" and self._protected(
                scope.get("path", "")) and not self._authorized(scope):
            response = error_response(
                401, "invalid or missing API key (send Authorization: Bearer KEY)",
                code="invalid_api_key")
            response.headers["WWW-Authenticate"] = "Bearer"
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    @staticmethod
    def _protected(path: str) -> bool:
        return path == "/v1" or path.startswith(_PROTECTED_PREFIXES)

    def _authorized(self, scope: Any) -> bool:
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), self.expected)


def _check_api_key(api_key: Optional[str]) -> None:
    """InvalidArgumentError for a key that is not None and not a non-blank string."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
        raise InvalidArgumentError(f"api_key must be a non-blank string or None (no "
                                   f"authentication), got {api_key!r}", field="api_key",
                                   value=api_key)


def build_app(engine: BaseAsyncEngine, *, served_model_names: Optional[Sequence[str] | str] = None,
              api_key: Optional[str] = None,
              max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              generation_defaults: Optional[Mapping[str, Any]] = None,
              cors: Optional[CorsPolicy] = None, chat_template: Optional[str] = None,
              trust_request_chat_template: bool = False) -> FastAPI:
    """The server app over ``engine`` (an AsyncLLMEngine or an EngineCoreClient, not started
    yet or started on the loop that will run the app). ``served_model_names``: the names
    clients may ask for (the first is reported; default: the model path). ``api_key``: the key
    every /v1 route and the tokenizer routes require as ``Authorization: Bearer KEY`` (None: no
    authentication; an empty or blank key is refused with InvalidArgumentError).
    ``generation_defaults``: sampling values for fields a request leaves unset
    (``LLM.generation_defaults``). ``cors``: the browser origins allowed (default
    ``CorsPolicy()``: any; a preflight is answered before the API key is asked for).
    ``chat_template``: the template chat messages are rendered with (default: the tokenizer's;
    ``load_chat_template`` reads ``--chat-template``); ``trust_request_chat_template``: whether
    a request's own ``chat_template`` is used (else it is refused with 400). The app's metrics
    are attached to the engine as its observer, in a registry of the app's own."""
    cors = cors or CorsPolicy()
    _check_api_key(api_key)
    if isinstance(served_model_names, str):
        served_model_names = [served_model_names]
    names = list(served_model_names or [str(engine.model_config.model_path)])
    metrics = ServerMetrics(names[0])
    metrics.watch_engine(engine)
    engine.observer = metrics
    tokenizer = engine.tokenizer
    ctx = ServingContext(engine=engine, tokenizer=tokenizer if has_tokenizer(tokenizer) else None,
                         model_names=names, max_model_len=engine.scheduler_config.max_model_len,
                         metrics=metrics, sampling_defaults=dict(generation_defaults or {}),
                         chat_template=chat_template,
                         trust_request_chat_template=trust_request_chat_template)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await engine.shutdown(grace_period=0.0)
            ctx.tokenization.shutdown()

    app = FastAPI(title="cacheflow", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=max_request_bytes)
    if api_key is not None:
        app.add_middleware(_ApiKeyCheck, api_key=api_key)  # before the body limit
    app.add_middleware(CORSMiddleware, allow_origins=list(cors.allowed_origins),
                       allow_methods=list(cors.allowed_methods),
                       allow_headers=list(cors.allowed_headers),
                       allow_credentials=cors.allow_credentials)  # outermost
    app.include_router(_open_routes(ctx))
    app.include_router(_api_routes(ctx))
    return app


def _open_routes(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.get("/health")
    async def health() -> Response:
        """200 while the engine serves; 503 while shutting down or after a failure."""
        if not ctx.engine.is_accepting:
            return error_response(503, "the engine is not serving", code="service_unavailable")
        return JSONResponse({})

    @router.get("/version")
    async def version() -> dict[str, str]:
        """The cacheflow-serve version (vLLM's route of the same name)."""
        return {"version": __version__}

    @router.get("/metrics")
    async def metrics() -> Response:
        """Prometheus metrics."""
        return Response(ctx.metrics.render(), media_type=CONTENT_TYPE)

    return router


def _model_card(ctx: ServingContext, name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": 0, "owned_by": "cacheflow",
            "max_model_len": ctx.max_model_len}


def _api_routes(ctx: ServingContext) -> APIRouter:
    router = APIRouter()

    @router.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        """The served model names."""
        return {"object": "list", "data": [_model_card(ctx, n) for n in ctx.model_names]}

    @router.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        """One served model (404 for another name)."""
        ctx.check_model(model)
        return _model_card(ctx, model)

    @router.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        """OpenAI completions."""
        return await create_completion(ctx, body, raw)

    @router.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        """OpenAI chat completions."""
        return await create_chat_completion(ctx, body, raw)

    @router.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> Response:
        """Token ids of a prompt, or of chat messages rendered by the chat template."""
        ctx.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        # Not bounded by max_model_len: counting the tokens of a text that is too long is one
        # use of this route (the request body limit bounds it).
        if body.messages is not None:
            text = await render_chat(ctx, body.messages, body.add_generation_prompt is not False,
                                     body.continue_final_message is True,
                                     body.chat_template_kwargs, body.chat_template)
            count, tokens = await ctx.encode_json(text, param="messages",
                                                  add_special_tokens=body.add_special_tokens
                                                  is True)
        else:
            count, tokens = await ctx.encode_json(body.prompt or "",
                                                  add_special_tokens=body.add_special_tokens
                                                  is not False)
        # The ids come as JSON text, so that millions of them are not serialized on the loop.
        content = f'{{"count":{count},"max_model_len":{ctx.max_model_len},"tokens":{tokens}}}'
        return Response(content, media_type="application/json")

    @router.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        """The text of token ids."""
        ctx.check_model(body.model)
        vocab = len(ctx.require_tokenizer("tokens"))
        bad = [t for t in body.tokens if t >= vocab]
        if bad:
            raise APIError(400, f"token ids must be in [0, {vocab}); got {bad[:5]}",
                           param="tokens")
        return {"prompt": await ctx.decode(body.tokens)}

    return router
