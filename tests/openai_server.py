"""A small, real OpenAI-compatible server over a local model, for tests: the subset of the API
vLLM's server offers that kubetune uses (GET /v1/models, POST /v1/chat/completions, GET
/health), greedy generation with transformers. Runs in a thread on a free local port."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class OpenAIServer:
    def __init__(self, model_dir: Path, name: str) -> None:
        from kubetune_trainer.chat import load

        self.name = name
        self.lm, self.tok = load(str(model_dir))
        self.lock = threading.Lock()
        self.requests: list[dict] = []
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> OpenAIServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, prompt: str, max_tokens: int) -> str:
        from kubetune_trainer.chat import generate

        with self.lock:
            return generate(self.lm, self.tok, prompt, max_new_tokens=max_tokens)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(200, {})
                elif self.path == "/v1/models":
                    self._send(200, {"object": "list", "data": [
                        {"id": server.name, "object": "model", "owned_by": "kubetune-test"}]})
                else:
                    self._send(404, {"error": {"message": "not found"}})

            def do_POST(self) -> None:
                if self.path != "/v1/chat/completions":
                    self._send(404, {"error": {"message": "not found"}})
                    return
                req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(req)
                if req.get("model") != server.name:
                    self._send(404, {"error": {"message": f"model {req.get('model')!r} does "
                                               "not exist", "type": "NotFoundError"}})
                    return
                prompt = req["messages"][-1]["content"]
                text = server.answer(prompt, int(req.get("max_tokens") or 16))
                self._send(200, {
                    "id": "chatcmpl-test", "object": "chat.completion",
                    "created": int(time.time()), "model": server.name,
                    "choices": [{"index": 0, "finish_reason": "length",
                                 "message": {"role": "assistant", "content": text}}],
                    "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}})

        return Handler
