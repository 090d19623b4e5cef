"""OpenAI-style error bodies ``{"error": {"message", "type", "code", "param"}}`` and their statuses."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapterhub.errors import UserError
from adapterhub.runtime.api import RequestError
from adapterhub.server.schemas import ErrorBody

REQUEST_ERROR_STATUS = {
    "unknown_adapter": 404,
    "prompt_too_long": 400,
    "bad_request": 400,
    "incompatible_adapter": 400,
    "unsupported_adapter": 400,
    "corrupt_adapter": 400,
    "slot_capacity": 400,  # a LoRA rank above the slots' capacity: only a restart with more helps
    "cancelled": 503,
    "overloaded": 429,
}
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "invalid_request_error",
    409: "invalid_request_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody} for status in (400, 401, 403, 404, 408, 409, 413, 422, 429, 503)
}
RETRY_AFTER_S = 1  # what a 429 tells clients to wait: the queue moves at decode speed


class ApiError(Exception):
    """An error answered with an OpenAI-style body; ``code`` is machine-readable."""

    def __init__(self, status: int, message: str, code: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param


def error_body(status: int, message: str, code: str | None, param: str | None = None) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": error_type, "code": code, "param": param}}


def error_response(
    status: int,
    message: str,
    code: str | None,
    param: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    if status == 401:
        headers = {**(headers or {}), "WWW-Authenticate": "Bearer"}
    if status == 429:
        headers = {**(headers or {}), "Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def request_error_status(err: RequestError) -> int:
    return REQUEST_ERROR_STATUS.get(err.code, 500)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, err: ApiError) -> JSONResponse:
        return error_response(err.status, err.message, err.code, err.param)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, err: RequestError) -> JSONResponse:
        return error_response(request_error_status(err), str(err), err.code)

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> JSONResponse:
        return error_response(400, str(err), "invalid_request")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0]
        param = ".".join(str(part) for part in first["loc"] if part != "body")
        message = f"{param or 'body'}: {first['msg']}"
        more = len(err.errors()) - 1
        if more:
            message += f" (and {more} more problem{'s' if more > 1 else ''})"
        return error_response(422, message, "invalid_value", param or None)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail), None, headers=err.headers)

    # Other exceptions are bugs: ``middleware.CatchBugs`` answers them, keeping the connection usable.


def internal_error_message(err: BaseException) -> str:
    first_line = (str(err).splitlines() or [""])[0][:200]
    return f"internal error ({type(err).__name__}: {first_line})"
