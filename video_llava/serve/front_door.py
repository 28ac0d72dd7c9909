"""Bodies bounded at the front door: Serve's HTTP proxy refuses a request body over the limit as it arrives (by its
Content-Length before reading, chunked at the first byte over) and closes the connection instead of reading the
rest.

The routes limit bodies too, but only as they reach the ingress replica: Serve's proxy had already read and
forwarded what the client sent, and kept forwarding after the replica's 413 (a 400 MiB chunked body in full; four
such clients grew the proxy by 780 MiB and the ingress by 1.1 GB). Serve takes proxy middleware from
``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (read by each proxy as it starts): ``proxy_middlewares`` here, with the
limit from ``VIDEO_LLAVA_MAX_BODY_BYTES``. Both must be in the environment of every node's Ray (``ray start`` or
``ray.init``); ``front_door_env`` gives them for a service's settings, and ``python -m video_llava.serve.front_door
CONFIG.yaml`` prints them as shell exports.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Callable

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
LIMIT_ENV = "VIDEO_LLAVA_MAX_BODY_BYTES"
CALLBACK = "video_llava.serve.front_door:proxy_middlewares"
FORM_OVERHEAD = 64 * 1024  # multipart fields and boundaries next to an upload


def largest_body(limits: Any) -> int:
    """The largest body any route of a service with these ``LimitSettings`` accepts: an upload and its form, or a
    JSON body whose media are base64 ``data:`` URLs (4/3 of their bytes)."""
    return max(limits.max_upload_bytes, limits.max_request_bytes * 4 // 3) + FORM_OVERHEAD


def front_door_env(args: Any) -> dict[str, str]:
    """The environment Ray's proxies need for a service built from ``args`` (``ServeArgs``)."""
    return {CALLBACK_ENV: CALLBACK, LIMIT_ENV: str(largest_body(args.limits))}


def configured_limit() -> int | None:
    """The proxies' limit in this cluster's environment, or None when the front door is not set up."""
    if os.environ.get(CALLBACK_ENV) != CALLBACK or not os.environ.get(LIMIT_ENV, "").isdigit():
        return None
    return int(os.environ[LIMIT_ENV])


def proxy_middlewares() -> list:
    """What Serve's proxy calls as it starts (``CALLBACK_ENV``): the body limit, when one is configured."""
    from starlette.middleware import Middleware

    limit = configured_limit()
    return [Middleware(BodyLimit, max_bytes=limit)] if limit else []


class BodyLimit:
    """Pure ASGI middleware: a body over ``max_bytes`` is answered 413 ``request_too_large`` with
    ``Connection: close``, so the server stops reading it and drops the connection; the app behind sees the client
    gone (``http.disconnect``) and whatever it would send is not sent."""

    def __init__(self, app: Callable, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._refuse(send, int(declared))  # before a byte of the body is read
            return
        received, refused, started = 0, False, False

        async def guarded_send(message: dict) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out: the app's own reply to a client it saw leave is not sent
            started = started or message["type"] == "http.response.start"
            await send(message)

        async def limited_receive() -> dict:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await self._refuse(send, None)
                    return {"type": "http.disconnect"}
            return message

        await self.app(scope, limited_receive, guarded_send)

    async def _refuse(self, send: Callable, declared: int | None) -> None:
        size = f"of {declared} bytes " if declared is not None else ""
        body = json.dumps({"error": {
            "message": f"request body {size}exceeds the limit of {self.max_bytes} bytes",
            "type": "invalid_request_error", "code": "request_too_large", "param": None}}).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def main(argv: list[str]) -> int:
    """Print the shell exports of the front door for the service of a Serve config file."""
    import yaml

    from video_llava.serve.config import ServeArgs

    if len(argv) != 1:
        print("usage: python -m video_llava.serve.front_door CONFIG.yaml", file=sys.stderr)
        return 2
    with open(argv[0]) as f:
        config = yaml.safe_load(f)
    for app in config.get("applications", []):
        for name, value in front_door_env(ServeArgs.model_validate(app.get("args") or {})).items():
            print(f"export {name}={value}")
        break
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
