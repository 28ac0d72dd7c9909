"""A stand-in for a hosted LLM behind the OpenAI chat API (an external service, not our code): each request's body is
recorded and answered with what ``reply(body)`` says (``None``: HTTP 500)."""

from __future__ import annotations

import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Iterator


@contextmanager
def fake_chat_endpoint(reply: Callable[[dict], str | None], requests: list[dict]) -> Iterator[str]:
    """Serve on 127.0.0.1; yield the base URL (ending in /v1); every request body is appended to ``requests``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(body)
            content = reply(body)
            if content is None:
                self.send_response(500)
                self.end_headers()
                return
            data = json.dumps({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"], "choices": [
                {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
