"""vLLM's error contract: every failure is `{"error": {"message", "type", "param", "code"}}`.

Schema errors are 400 (not FastAPI's 422), built from `exc.errors()` and bounded (at most 10
errors, inputs cut to 200 characters, each message to 1,000): `str(exc)` can leak server paths
and a small hostile body once produced a 23 MB reply in vLLM. Overload is 429 with Retry-After
(TGI's admission cap); 503 only while loading, draining or dead.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

TYPES = {400: "BadRequestError", 404: "NotFoundError", 405: "MethodNotAllowed", 408: "RequestTimeout",
         413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntityError",
         429: "RateLimitError", 500: "InternalServerError", 501: "NotImplementedError",
         503: "ServiceUnavailableError"}
MAX_ERRORS = 10
MAX_INPUT_CHARS = 200
MAX_ERROR_CHARS = 1000


class APIError(Exception):
    """Raised by handlers and the scheduler; turned into the error envelope."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers


def error_body(status: int, message: str, param: str | None = None) -> dict:
    return {"error": {"message": message[:4 * MAX_ERROR_CHARS], "type": TYPES.get(status, "APIError"),
                      "param": param, "code": status}}


def error_response(status: int, message: str, param: str | None = None, headers: dict | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param), status_code=status, headers=headers)


def context_error(limit: int, prompt_tokens: int, max_tokens: int) -> APIError:
    """vLLM's wording for a prompt (plus requested output) over the context window."""
    return APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                         f"{max_tokens} output tokens and your prompt contains at least {prompt_tokens} input "
                         f"tokens, for a total of at least {prompt_tokens + max_tokens} tokens. Please reduce "
                         "the length of the input prompt or the number of requested output tokens.",
                    "input_tokens")


_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "function-after", "TextPart"}


def _clean_loc(loc) -> str:
    # ("body", "messages", 0, "content") -> "messages.0.content"; "body" and union tags dropped.
    parts = [str(p) for p in loc if p != "body" and not (isinstance(p, str) and (
        "[" in p or "-" in p or p in _TYPE_TAGS))]
    return ".".join(parts)


def _short(v) -> str:
    try:
        s = json.dumps(v, default=str)
    except Exception:
        s = repr(v)
    return s if len(s) <= MAX_INPUT_CHARS else s[:MAX_INPUT_CHARS] + "..."


def validation_message(errors: list[dict]) -> tuple[str, str | None]:
    """A bounded, path-free message from pydantic errors; the first error's field as `param`."""
    parts, param = [], None
    for e in errors[:MAX_ERRORS]:
        loc = _clean_loc(e.get("loc", ()))
        if e.get("type") == "json_invalid":
            msg = f"request body is not valid JSON ({e.get('ctx', {}).get('error', 'parse error')})"
        elif e.get("type") == "model_attributes_type" or (not loc and e.get("type", "").endswith("_type")):
            msg = "request body must be a JSON object (sent with Content-Type: application/json)"
        else:
            msg = f"{loc or 'body'}: {e.get('msg', 'invalid value')}"
            if "input" in e and e.get("type") != "missing":
                msg += f" (got {_short(e['input'])})"
        parts.append(msg[:MAX_ERROR_CHARS])
        param = param or (loc or None)
    if len(errors) > MAX_ERRORS:
        parts.append(f"... and {len(errors) - MAX_ERRORS} more errors")
    return "; ".join(parts), param


def install(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        # Union members each report their own failure: keep the most specific ones per field.
        msg, param = validation_message(_dedupe(exc.errors()))
        return error_response(400, msg, param)

    @app.exception_handler(APIError)
    async def _api(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.exception("internal error on %s", request.url.path)
        return error_response(500, f"internal server error ({type(exc).__name__})")


def _dedupe(errors: list[dict]) -> list[dict]:
    seen, out = set(), []
    for e in errors:
        key = _clean_loc(e.get("loc", ()))
        if key in seen:
            continue
        seen.add(key)
        out.append(e)
    return out
