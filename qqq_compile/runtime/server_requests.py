"""Parsing and checking the JSON of OpenAI ``/v1/completions`` and ``/v1/chat/completions`` requests.

Fields are OpenAI's, plus ``top_k``, ``repetition_penalty`` and ``ignore_eos`` (extensions,
as in vLLM and llama.cpp's server). Fields that would change the output but are not implemented
(``n`` > 1, ``logprobs``, ``echo``, ``suffix``, penalties, ``logit_bias``) are refused
with a 400 that names them, never silently ignored. Unknown fields are ignored (clients
send their own extras).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

MAX_STOP = 16


class ApiError(Exception):
    """An HTTP error with OpenAI's error body ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_
        self.headers = headers


@dataclass
class GenerationRequest:
    model: str
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    messages: list[dict[str, str]] | None = None  # chat
    chars: int = 0  # prompt characters (checked before tokenizing)
    max_tokens: int | None = None
    temperature: float = 1.0  # OpenAI's default; 0 = greedy
    top_p: float | None = None
    top_k: int | None = None
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False  # extension (benchmarks): decode max_tokens whatever comes


def _bad(message: str, param: str | None, code: str = "invalid_value") -> ApiError:
    return ApiError(400, message, param, code)


def _opt(body: dict, name: str, kinds: tuple[type, ...], what: str) -> Any:
    """``body[name]`` if present and not null, checked against ``kinds``."""
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) and bool not in kinds or not isinstance(v, kinds):
        raise _bad(f"'{name}' must be {what}, got {json.dumps(v)[:80]}", name, "invalid_type")
    return v


def _number(body: dict, name: str, lo: float, hi: float, *, lo_open: bool = False) -> float | None:
    v = _opt(body, name, (int, float), "a number")
    if v is not None and not ((lo < v if lo_open else lo <= v) and v <= hi):
        raise _bad(f"'{name}' must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}", name)
    return v


def _unsupported(body: dict, names_off: dict[str, tuple]) -> None:
    """Refuse fields set to anything but null or one of their "off" values (compared by type too)."""
    for name, off in names_off.items():
        v = body.get(name)
        if v is not None and not any(type(v) is type(o) and v == o for o in off):
            raise _bad(f"'{name}' is not supported by this server (got {json.dumps(v)[:80]}); leave it unset", name,
                       "unsupported_parameter")  # fmt: skip


def _common(body: dict, req: GenerationRequest, max_tokens_names: tuple[str, ...]) -> None:
    for name in max_tokens_names:
        v = _opt(body, name, (int,), "a positive integer")
        if v is not None:
            if v < 1:
                raise _bad(f"'{name}' must be at least 1, got {v}", name)
            req.max_tokens = v
    t = _number(body, "temperature", 0.0, 2.0)
    req.temperature = 1.0 if t is None else float(t)
    p = _number(body, "top_p", 0.0, 1.0, lo_open=True)
    req.top_p = None if p is None or p >= 1.0 else float(p)
    k = _opt(body, "top_k", (int,), "an integer (-1 or 0: off)")
    if k is not None and k < -1:
        raise _bad(f"'top_k' must be >= 1, or -1 / 0 for off, got {k}", "top_k")
    req.top_k = k if k is not None and k >= 1 else None
    rp = _number(body, "repetition_penalty", 0.0, 100.0, lo_open=True)
    req.repetition_penalty = 1.0 if rp is None else float(rp)
    req.seed = _opt(body, "seed", (int,), "an integer")
    stop = body.get("stop")
    if stop is not None:
        stops = [stop] if isinstance(stop, str) else stop
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            raise _bad("'stop' must be a string or a list of strings", "stop", "invalid_type")
        if len(stops) > MAX_STOP:
            raise _bad(f"'stop' may hold at most {MAX_STOP} strings, got {len(stops)}", "stop")
        req.stop = [s for s in stops if s]
    req.stream = bool(_opt(body, "stream", (bool,), "true or false"))
    req.ignore_eos = bool(_opt(body, "ignore_eos", (bool,), "true or false"))
    opts = _opt(body, "stream_options", (dict,), "an object")
    req.include_usage = bool(opts and opts.get("include_usage"))
    n = _opt(body, "n", (int,), "an integer")
    if n is not None and n != 1:
        raise _bad(f"'n' must be 1 (one choice per prompt) on this server, got {n}", "n", "unsupported_parameter")
    _unsupported(
        body, {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},), "top_logprobs": (0,)}
    )


def _model(body: dict) -> str:
    model = body.get("model")
    if model is None:
        raise _bad("'model' is required (GET /v1/models lists the served model)", "model", "missing_required_parameter")
    if not isinstance(model, str):
        raise _bad("'model' must be a string", "model", "invalid_type")
    return model


def parse_completion(body: dict) -> GenerationRequest:
    req = GenerationRequest(_model(body))
    if "prompt" not in body or body["prompt"] is None:
        raise _bad("'prompt' is required: a string, a list of strings, or token ids", "prompt",
                   "missing_required_parameter")  # fmt: skip
    p = body["prompt"]
    if isinstance(p, str):
        prompts: list[Any] = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(isinstance(x, int) and not isinstance(x, bool) for x in p):
        prompts = [list(p)]
    elif isinstance(p, list) and p and all(isinstance(x, list) and x and all(type(t) is int for t in x) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise _bad("'prompt' must be a string, a non-empty list of strings, a list of token ids or a list of such "
                   "lists", "prompt", "invalid_type")  # fmt: skip
    req.prompts = prompts
    req.chars = sum(len(x) for x in prompts if isinstance(x, str))
    _common(body, req, ("max_tokens",))
    _unsupported(body, {"logprobs": (False,), "echo": (False,), "suffix": ("",), "best_of": (1,)})
    return req


def _content(m: dict, i: int) -> str:
    c = m.get("content")
    if c is None:
        return ""
    if isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        parts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content must be a string or a list of text parts", f"messages[{i}].content")


def parse_chat(body: dict) -> GenerationRequest:
    req = GenerationRequest(_model(body))
    msgs = body.get("messages")
    if msgs is None:
        raise _bad("'messages' is required: a list of {role, content}", "messages", "missing_required_parameter")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("'messages' must be a non-empty list of {role, content}", "messages", "invalid_type")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise _bad(f"messages[{i}] must be an object with a string 'role'", f"messages[{i}]", "invalid_type")
        out.append({"role": m["role"], "content": _content(m, i)})
    req.messages = out
    req.chars = sum(len(m["content"]) for m in out)
    _common(body, req, ("max_tokens", "max_completion_tokens"))
    _unsupported(body, {"logprobs": (False,), "tools": ([],), "response_format": ({"type": "text"},)})
    return req


__all__ = ["ApiError", "GenerationRequest", "parse_chat", "parse_completion"]
