"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` with a fitting status.

Client mistakes get 400 / 401 / 404 / 413 / 429; a server that cannot serve now gets 503. A 500
only comes from a bug, never from what a client sent.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cacheflow_runtime import (
    CacheflowUserError,
    EngineClosedError,
    EngineOverloadedError,
    InvalidArgumentError,
    InvalidRequestError,
)

logger = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error",
          404: "invalid_request_error", 405: "invalid_request_error",
          413: "invalid_request_error", 422: "invalid_request_error",
          429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class APIError(Exception):
    """An error answered to the client with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None,
                 code: Optional[str] = None, err_type: Optional[str] = None,
                 headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.err_type = err_type or _TYPES.get(status, "invalid_request_error")
        self.headers = headers


def error_body(status: int, message: str, *, param: Optional[str] = None,
               code: Optional[str] = None, err_type: Optional[str] = None) -> dict[str, Any]:
    """The JSON body of an error."""
    return {"error": {"message": message,
                      "type": err_type or _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, **kwargs: Any) -> JSONResponse:
    """A JSONResponse carrying an OpenAI error body."""
    return JSONResponse(error_body(status, message, **kwargs), status_code=status)


def bad_request(exc: ValueError) -> APIError:
    """A 400 for a ValueError raised while checking a request (names the field if it can)."""
    message = str(exc)
    param = code = None
    if isinstance(exc, InvalidRequestError):
        param, code = exc.param, exc.code
    elif isinstance(exc, InvalidArgumentError) and exc.field:
        param = exc.field.rpartition(".")[2]  # "SamplingParams.top_p" -> "top_p"
    if code is None and param is None and "max_model_len" in message:
        code = "context_length_exceeded"
    return APIError(400, message, param=param, code=code)


def engine_error(exc: Exception) -> APIError:
    """The APIError for an exception raised by the async engine when adding a request."""
    if isinstance(exc, EngineOverloadedError):
        return APIError(429, str(exc), code="rate_limit_exceeded")
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), code="service_unavailable")
    if isinstance(exc, ValueError):
        return bad_request(exc)
    raise exc


def _validation_message(exc: RequestValidationError) -> tuple[str, Optional[str]]:
    parts, param = [], None
    for err in exc.errors()[:5]:
        if err.get("type") == "json_invalid":  # loc holds a character offset, not a field
            where = ":".join(str(p) for p in err.get("loc", ())[1:2])
            reason = (err.get("ctx") or {}).get("error") or err.get("msg", "invalid")
            parts.append(f"the body is not valid JSON (at character {where or '?'}): {reason}")
            continue
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        parts.append(f"{where}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request", param


def install_error_handlers(app: FastAPI) -> None:
    """Makes every error the app answers (validation, 404, 405, ...) OpenAI-shaped."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        response = error_response(exc.status, exc.message, param=exc.param, code=exc.code,
                                  err_type=exc.err_type)
        response.headers.update(exc.headers or {})
        return response

    @app.exception_handler(CacheflowUserError)
    async def _user_error(_: Request, exc: CacheflowUserError) -> JSONResponse:
        err = bad_request(exc)
        return error_response(err.status, err.message, param=err.param, code=err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        response = error_response(exc.status_code, str(exc.detail), code=code)
        for key, value in (exc.headers or {}).items():
            response.headers[key] = value
        return response

    @app.exception_handler(Exception)
    async def _bug(_: Request, exc: Exception) -> JSONResponse:
        logger.exception("internal error", exc_info=exc)
        return error_response(500, "internal server error", code="internal_error")


def stream_error(exc: Exception) -> APIError:
    """The APIError for an exception that ended a request's stream (the engine went away)."""
    if isinstance(exc, EngineClosedError):
        return APIError(503, str(exc), code="service_unavailable")
    logger.exception("a request stream failed", exc_info=exc)
    return APIError(500, f"the request failed: {exc!r}", code="internal_error")
