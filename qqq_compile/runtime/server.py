"""An OpenAI-compatible HTTP server for a :class:`~qqq_compile.runtime.compiled.CompiledModel`.

``qqq-compile serve ARTIFACT`` runs it (see ``docs/serving.md``). Endpoints:
``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream: true`` as
server-sent events ending in ``data: [DONE]``), ``GET /v1/models``, ``GET /health`` and
``GET /stats``. Requests share the model through the continuous-batching engine of
:mod:`qqq_compile.runtime.batching`, which runs the decode step in one worker thread;
the HTTP side is asyncio and gets each request's text through its own queue.

Every refusal is OpenAI's error JSON ``{"error": {"message", "type", "param", "code"}}``
with a 4xx status that says whose fault it is, and the message names the limit.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from qqq_compile.runtime.batching import BatchingEngine, EngineClosedError, Event, Job, QueueFullError, TextStream
from qqq_compile.runtime.generate import SamplingConfig
from qqq_compile.runtime.server_requests import ApiError, GenerationRequest, parse_chat, parse_completion


@dataclass
class ServeConfig:
    """Limits and names. ``None`` limits follow the step: ``max_tokens_cap`` = its
    ``max_len``, ``max_prompt_chars`` = 16 characters per position of it."""

    model_name: str
    max_tokens_cap: int | None = None
    max_prompt_chars: int | None = None
    max_body_bytes: int = 4 << 20
    default_max_tokens: int = 16  # completions; OpenAI's default
    retry_after_s: int = 1


class OpenAIServer:
    """The request handling: tokenize, check limits, hand jobs to the engine, answer."""

    def __init__(
        self,
        engine: BatchingEngine,
        tokenizer: Any,
        config: ServeConfig,
        eos_token_ids: list[int],
        vocab_size: int | None = None,
    ):
        self.engine, self.tok, self.config = engine, tokenizer, config
        self.eos_token_ids = eos_token_ids
        self.max_len = engine.max_len
        self.cap = min(config.max_tokens_cap or self.max_len, self.max_len)
        self.max_chars = config.max_prompt_chars or 16 * self.max_len
        self.vocab = vocab_size or len(tokenizer)  # token ids a prompt may hold (the embedding's rows)
        self.created = int(time.time())
        # HF fast tokenizers may mutate their backend's padding/truncation state during
        # encode: one lock for every tokenizer call (encode here, decode in the engine).
        self._tok_lock = threading.Lock()

    @classmethod
    def from_compiled(
        cls,
        compiled: Any,
        tokenizer: Any,
        config: ServeConfig,
        *,
        max_batch: int = 8,
        max_len: int | None = None,
        runtime: str = "auto",
        max_queue: int = 64,
        batch_window_s: float = 0.01,
        progress: bool = True,
    ) -> OpenAIServer:
        """Build the decode step (a step of its own: ``compiled.generate`` never shares
        its cache) and start the engine."""
        step = compiled._build_step(max_batch, max_len, runtime, progress=progress)
        meta = compiled.model_config or {}
        eos = [tokenizer.eos_token_id, meta.get("eos_token_id")]
        eos_ids = sorted({int(e) for x in eos if x is not None for e in (x if isinstance(x, list) else [x])})
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else 0)
        engine = BatchingEngine(step, max_queue=max_queue, batch_window_s=batch_window_s, pad_token_id=pad)
        return cls(engine.start(), tokenizer, config, eos_ids, meta.get("vocab_size"))

    def close(self) -> None:
        self.engine.close()

    # ------------------------------------------------------------------ tokenizer (worker threads)

    def _decode(self, ids: list[int]) -> str:
        with self._tok_lock:
            return self.tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _encode(self, req: GenerationRequest) -> list[list[int]]:
        with self._tok_lock:
            if req.messages is not None:
                if not getattr(self.tok, "chat_template", None):
                    raise ApiError(400, "this model's tokenizer has no chat template: use /v1/completions", "messages")
                try:
                    ids = self.tok.apply_chat_template(req.messages, add_generation_prompt=True, tokenize=True)
                except Exception as e:  # noqa: BLE001 - a template raises what it likes (jinja errors, ...)
                    raise ApiError(400, f"the chat template refused these messages: {e}", "messages") from e
                return [list(getattr(ids, "input_ids", ids))]
            return [p if isinstance(p, list) else list(self.tok(p).input_ids) for p in req.prompts]

    # ------------------------------------------------------------------ requests

    def _check(self, req: GenerationRequest) -> None:
        if req.model != self.config.model_name:
            raise ApiError(
                404,
                f"model {req.model!r} is not served here; this server serves "
                f"{self.config.model_name!r} (GET /v1/models)",
                "model",
                "model_not_found",
                "not_found_error",
            )
        if req.chars > self.max_chars:
            raise ApiError(
                400,
                f"the prompt has {req.chars} characters, over this server's limit of {self.max_chars} "
                f"(its context is {self.max_len} tokens)",
                "messages" if req.messages is not None else "prompt",
                "context_length_exceeded",
            )
        if req.max_tokens is not None and req.max_tokens > self.cap:
            raise ApiError(400, f"max_tokens={req.max_tokens} is over this server's limit of {self.cap}", "max_tokens")

    def _jobs(self, req: GenerationRequest, prompts: list[list[int]], sink_for: Any) -> list[Job]:
        jobs = []
        for i, ids in enumerate(prompts):
            if not ids:
                raise ApiError(400, "the prompt is empty (0 tokens): give at least one token", "prompt")
            if any(not 0 <= t < self.vocab for t in ids):
                raise ApiError(400, f"token ids must be in [0, {self.vocab})", "prompt")
            room = self.max_len - len(ids)
            default = self.config.default_max_tokens if req.messages is None else self.cap
            max_tokens = req.max_tokens if req.max_tokens is not None else max(1, min(default, room, self.cap))
            if len(ids) + max_tokens > self.max_len:
                raise ApiError(
                    400,
                    f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) is {len(ids) + max_tokens} "
                    f"tokens, more than this server's context of {self.max_len} tokens; shorten the prompt or "
                    f"lower max_tokens",
                    "max_tokens" if req.max_tokens is not None and room > 0 else "prompt",
                    "context_length_exceeded",
                )
            sample = req.temperature > 0
            cfg = SamplingConfig(
                max_new_tokens=max_tokens,
                do_sample=sample,
                temperature=req.temperature if sample else 1.0,
                top_k=req.top_k if sample else None,
                top_p=req.top_p if sample else None,
                repetition_penalty=req.repetition_penalty,
                eos_token_id=[] if req.ignore_eos else self.eos_token_ids,
            )
            stream = TextStream(self._decode, req.stop)
            jobs.append(Job(ids, cfg, stream, sink_for(i), seed=req.seed))
        return jobs

    async def handle(self, request: Request, chat: bool) -> Any:
        body = await _read_json(request, self.config.max_body_bytes)
        req = parse_chat(body) if chat else parse_completion(body)
        self._check(req)
        prompts = await run_in_threadpool(self._encode, req)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()

        def sink_for(i: int) -> Any:
            return lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev))

        jobs = self._jobs(req, prompts, sink_for)
        try:
            self.engine.submit(jobs)
        except QueueFullError as e:
            raise ApiError(
                429,
                f"the server is busy: {e}; retry after {self.config.retry_after_s} s",
                None,
                "queue_full",
                "rate_limit_error",
                {"Retry-After": str(self.config.retry_after_s)},
            ) from e
        except EngineClosedError as e:
            raise ApiError(503, str(e), None, "shutting_down", "server_error") from e
        meta = {
            "id": ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24],
            "created": int(time.time()),
            "model": self.config.model_name,
        }
        if req.stream:
            return StreamingResponse(
                self._stream(jobs, queue, meta, chat, req.include_usage),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        result = await self._collect(request, jobs, queue, meta, chat)
        return JSONResponse(result) if result is not None else Response(status_code=499)  # 499: client gone

    async def _collect(
        self, request: Request, jobs: list[Job], queue: asyncio.Queue, meta: dict, chat: bool
    ) -> dict | None:
        texts, reasons, done = [""] * len(jobs), [None] * len(jobs), 0
        next_check = time.monotonic() + 0.5
        try:
            while done < len(jobs):
                if time.monotonic() >= next_check:  # every 0.5 s, events or not
                    if await request.is_disconnected():
                        return None  # its jobs are cancelled below: their rows free at the next step
                    next_check = time.monotonic() + 0.5
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    continue
                texts[i] += ev.text
                if ev.finish_reason is not None:
                    if ev.finish_reason == "error":
                        raise ApiError(500, f"generation failed: {ev.error}", None, "generation_failed", "server_error")
                    reasons[i], done = ev.finish_reason, done + 1
        finally:
            for job in jobs:
                if job.finish_reason is None:
                    self.engine.cancel(job)
        if chat:
            choices = [
                {"index": 0, "message": {"role": "assistant", "content": texts[0]}, "logprobs": None,
                 "finish_reason": reasons[0]}
            ]  # fmt: skip
        else:
            choices = [
                {"index": i, "text": t, "logprobs": None, "finish_reason": r}
                for i, (t, r) in enumerate(zip(texts, reasons, strict=True))
            ]
        obj = "chat.completion" if chat else "text_completion"
        return {**meta, "object": obj, "choices": choices, "usage": _usage(jobs)}

    async def _stream(
        self, jobs: list[Job], queue: asyncio.Queue, meta: dict, chat: bool, include_usage: bool
    ) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i: int, text: str | None, reason: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {"role": "assistant", "content": ""} if first else {}
                if text:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            return _sse({**meta, "object": obj, "choices": [choice]})

        done = 0
        try:
            if chat:
                yield chunk(0, None, None, first=True)
            while done < len(jobs):
                i, ev = await queue.get()
                if ev.finish_reason == "error":
                    err = {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None,
                           "code": "generation_failed"}  # fmt: skip
                    yield _sse({"error": err})
                    return
                if ev.finish_reason is not None:
                    done += 1
                if ev.text or ev.finish_reason is not None:
                    yield chunk(i, ev.text, ev.finish_reason)
            if include_usage:
                yield _sse({**meta, "object": obj, "choices": [], "usage": _usage(jobs)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended
            for job in jobs:
                if job.finish_reason is None:
                    self.engine.cancel(job)

    def models(self) -> dict:
        card = {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "qqq-compile"}
        return {"object": "list", "data": [card]}


def _usage(jobs: list[Job]) -> dict[str, int]:
    p, c = sum(len(j.prompt) for j in jobs), sum(len(j.generated) for j in jobs)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _read_json(request: Request, limit: int) -> dict:
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        raise ApiError(413, f"the request body has {size} bytes, over this server's limit of {limit}", None,
                       "request_too_large")  # fmt: skip
    body = bytearray()
    async for part in request.stream():
        body += part
        if len(body) > limit:
            raise ApiError(413, f"the request body is over this server's limit of {limit} bytes", None,
                           "request_too_large")  # fmt: skip
    try:
        data = json.loads(bytes(body))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e})", None, "invalid_json") from e
    if not isinstance(data, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(data).__name__}", None, "invalid_json")
    return data


def _error(e: ApiError) -> JSONResponse:
    err = {"message": e.message, "type": e.type, "param": e.param, "code": e.code}
    return JSONResponse({"error": err}, status_code=e.status, headers=e.headers)


def create_app(server: OpenAIServer) -> FastAPI:
    """The ASGI app serving ``server`` (stop its engine with ``server.close()``)."""
    app = FastAPI(title="qqq-compile serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> JSONResponse:
        return _error(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return _error(ApiError(e.status_code, msg, None, None, kind))

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        return _error(ApiError(500, f"internal error: {type(e).__name__}: {e}", None, None, "server_error"))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await server.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await server.handle(request, chat=True)

    @app.get("/v1/models")
    async def models() -> dict:
        return server.models()

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict:
        card = server.models()["data"][0]
        if model_id != card["id"]:
            raise ApiError(404, f"model {model_id!r} is not served here", "model", "model_not_found", "not_found_error")
        return card

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": server.config.model_name}

    @app.get("/stats")
    async def stats() -> dict:
        return server.engine.stats()

    return app


class BackgroundServer:
    """uvicorn serving ``app`` in a daemon thread (tests, benchmarks, notebooks):
    ``with BackgroundServer(app, port=0) as s: ... s.url ...``."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import socket

        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        self.uv = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.uv.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uv.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"the server did not start on {self.url}")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.uv.should_exit = True
        self.thread.join(10)
        self.sock.close()


__all__ = ["ApiError", "BackgroundServer", "OpenAIServer", "ServeConfig", "create_app"]
