"""A real HTTP server on loopback that speaks the embedding endpoints of OpenAI, Cohere (v2) and
Voyage, as their API references give the request and response shapes, plus an OpenAI-compatible
route (as vLLM, TEI or infinity serve it) that can run a real model.

    /openai/v1/embeddings   /cohere/v2/embed   /voyage/v1/embeddings   /compat/v1/embeddings

Vectors are deterministic (seeded by model, input type and text), so two builds must store the
same targets. `faults` injects answers in order (429 with Retry-After, 500, a stall past the client's
timeout); `log` records every request with its texts, so a test can count what was billed twice.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import xxhash

MODELS = {"openai": {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072},
          "cohere": {"embed-v4.0": 1536, "embed-english-v3.0": 1024},
          "voyage": {"voyage-3-large": 1024, "voyage-3.5": 1024}}
MAX_TEXTS = {"openai": 2048, "cohere": 96, "voyage": 1000, "compat": 10_000}


def fake_vector(model: str, input_type, text: str, dim: int) -> list[float]:
    rng = np.random.default_rng(xxhash.xxh64_intdigest(f"{model}|{input_type}|{text}".encode()))
    vector = rng.standard_normal(dim)
    return (vector / np.linalg.norm(vector)).tolist()


class EmbeddingServer:
    def __init__(self, key: str = "sk-test-key", delay: float = 0.0, compat_encoder=None):
        self.key, self.delay, self.compat_encoder = key, delay, compat_encoder
        self.faults: list[tuple] = []  # ("status", code, retry_after | None) or ("stall", seconds)
        self.log: list[dict] = []
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                server.handle(self)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def base_url(self, provider: str) -> str:
        return {"openai": f"http://127.0.0.1:{self.port}/openai/v1", "cohere": f"http://127.0.0.1:{self.port}/cohere/v2",
                "voyage": f"http://127.0.0.1:{self.port}/voyage/v1",
                "compat": f"http://127.0.0.1:{self.port}/compat/v1"}[provider]

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    def billed_texts(self) -> list[str]:
        """Every text of every answered request, in the order answered (repeats = paid twice)."""
        return [text for entry in self.log if entry["status"] == 200 for text in entry["texts"]]

    def handle(self, request: BaseHTTPRequestHandler) -> None:
        body = json.loads(request.rfile.read(int(request.headers["Content-Length"])))
        provider = request.path.split("/")[1]
        texts = body.get("texts") if provider == "cohere" else body.get("input")
        entry = {"path": request.path, "status": None, "texts": texts or [], "body": body,  # status: when answered
                 "authorization": request.headers.get("Authorization")}
        with self.lock:
            fault = self.faults.pop(0) if self.faults else None
            self.log.append(entry)
        if self.delay:
            time.sleep(self.delay)
        status, headers, answer = self.answer(provider, request.path, request.headers.get("Authorization"), body,
                                              texts, fault)
        entry["status"] = status
        payload = json.dumps(answer).encode()
        try:
            request.send_response(status)
            for name, value in headers.items():
                request.send_header(name, value)
            request.send_header("Content-Type", "application/json")
            request.send_header("Content-Length", str(len(payload)))
            request.end_headers()
            request.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, or killed)

    def answer(self, provider, path, auth, body, texts, fault):
        if fault is not None and fault[0] == "stall":
            time.sleep(fault[1])
            return 503, {}, {"error": "stalled"}
        if fault is not None:
            _, code, retry = fault
            return code, ({"Retry-After": str(retry)} if retry is not None else {}), {"error": f"injected {code}"}
        if provider != "compat" and auth != f"Bearer {self.key}":
            # like OpenAI's answer, it quotes the key it got: the client must not repeat it
            return 401, {}, {"error": {"message": f"Incorrect API key provided: {auth}", "type": "invalid_request_error"}}
        model = body.get("model")
        if provider != "compat" and model not in MODELS[provider]:
            return 404, {}, {"error": {"message": f"model {model} does not exist"}}
        if not isinstance(texts, list) or not texts or len(texts) > MAX_TEXTS[provider]:
            return 400, {}, {"error": {"message": f"give 1 to {MAX_TEXTS[provider]} texts"}}
        tokens = sum(len(text.split()) + 1 for text in texts)
        if provider == "compat":
            vectors = self.compat_encoder(texts).tolist()
            return 200, {}, {"object": "list", "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
                             "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]}
        dim = body.get("dimensions") or body.get("output_dimension") or MODELS[provider][model]
        input_type = body.get("input_type")
        vectors = [fake_vector(model, input_type, text, dim) for text in texts]
        if provider == "cohere":
            return 200, {}, {"id": "emb-1", "response_type": "embeddings_by_type", "texts": texts,
                             "embeddings": {"float": vectors},
                             "meta": {"api_version": {"version": "2"}, "billed_units": {"input_tokens": tokens}}}
        # OpenAI and Voyage: a list of {"embedding", "index"}, answered here in reverse order on
        # purpose (clients must place them by index)
        data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)][::-1]
        return 200, {}, {"object": "list", "data": data, "model": model, "usage": {"total_tokens": tokens}}
