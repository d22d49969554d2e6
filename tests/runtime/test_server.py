"""``qqq-compile serve``: the OpenAI client against a real uvicorn server on 127.0.0.1.

The model is a tiny random-weight LLaMA quantized to W4A8 and saved as an artifact with a
word-level tokenizer whose every id is a word, so texts compare token for token. Each
response is checked against ``CompiledModel.generate()`` for the same request alone
(the independent reference). Every wait is bounded in time.
"""

from __future__ import annotations

import gc
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai  # the dev extra has it (scripts/setup.sh); serving itself needs only fastapi + uvicorn
import pytest
import torch

import qqq_compile as qc
from qqq_compile.artifact import load, load_tokenizer, save
from qqq_compile.cli.main import main
from qqq_compile.runtime.batching import BatchingEngine, Job, TextStream
from qqq_compile.runtime.generate import SamplingConfig
from qqq_compile.runtime.server import BackgroundServer, OpenAIServer, ServeConfig, create_app
from tests.conftest import tiny_calib, tiny_model

MAX_LEN = 64
TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}w5{% endif %}"
)


def word_tokenizer():
    """Word-level tokenizer over the model's 256 ids: '<unk>', '<s>', '</s>', then w0 .. w252."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(253)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()  # decoding joins the words with spaces
    out = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out.chat_template = TEMPLATE
    return out


@pytest.fixture(scope="module")
def artifact_dir(tmp_path_factory) -> Path:
    """A saved RTN artifact of the tiny llama, with the word tokenizer."""
    path = tmp_path_factory.mktemp("serve") / "tiny"
    model = tiny_model("llama", eos_token_id=2)
    compiled = qc.compile(model, calib=tiny_calib(), config=qc.CompileConfig(preset="rtn"), progress=False)
    save(compiled, str(path), tokenizer=word_tokenizer())
    return path


@pytest.fixture(scope="module")
def artifact(artifact_dir):
    """(compiled model, tokenizer) loaded back from a saved artifact, as ``qqq-compile serve`` does."""
    return load(str(artifact_dir)), load_tokenizer(str(artifact_dir))


class SlowStep:
    """A decode step that takes at least ``delay`` seconds per call (so a client can leave mid-stream)."""

    def __init__(self, step: Any, delay: float):
        self.inner, self.delay, self.spec, self.runtime = step, delay, step.spec, step.runtime

    def __call__(self, *args: Any) -> Any:
        time.sleep(self.delay)
        return self.inner(*args)


def start(compiled, tok, *, max_batch=4, max_queue=64, delay=0.0, cap=None):
    """An OpenAIServer (eager step) in a BackgroundServer; the caller enters it."""
    step = compiled._build_step(max_batch, MAX_LEN, "eager", progress=False)
    engine = BatchingEngine(SlowStep(step, delay) if delay else step, max_queue=max_queue, batch_window_s=0.01)
    srv = OpenAIServer(engine.start(), tok, ServeConfig("tiny", max_tokens_cap=cap), [tok.eos_token_id], 256)
    return srv, BackgroundServer(create_app(srv))


@pytest.fixture(scope="module")
def served(artifact):
    compiled, tok = artifact
    srv, bg = start(compiled, tok, cap=48)
    with bg:
        yield bg.url, srv
    srv.close()


def client(url: str) -> Any:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)


def reference_ids(artifact, ids: list[int], max_tokens: int, **sampling: Any) -> list[int]:
    """The tokens CompiledModel.generate() gives for this request alone (up to its EOS)."""
    compiled, tok = artifact
    out = compiled.generate(
        torch.tensor([ids]), max_new_tokens=max_tokens, eos_token_id=[tok.eos_token_id], runtime="eager", **sampling
    )
    return out[0, len(ids) :].tolist()


def reference(artifact, ids: list[int], max_tokens: int, **sampling: Any) -> str:
    """The same as text."""
    return artifact[1].decode(reference_ids(artifact, ids, max_tokens, **sampling), skip_special_tokens=True)


def words(seed: int, n: int) -> str:
    g = torch.Generator().manual_seed(seed)
    return " ".join(f"w{int(i)}" for i in torch.randint(0, 253, (n,), generator=g))


def raw(url: str, method: str, path: str, body: bytes | dict | None = None) -> tuple[int, dict, Any]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, dict(r.getheaders()), json.loads(text)
    except json.JSONDecodeError:
        return r.status, dict(r.getheaders()), text


def wait_for(pred, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return False


# ----------------------------------------------------------------------------- endpoints


def test_models_and_health(served):
    url, _ = served
    assert [m.id for m in client(url).models.list().data] == ["tiny"]
    assert raw(url, "GET", "/health")[2]["status"] == "ok"
    status, _, body = raw(url, "GET", "/v1/nothing")
    assert status == 404 and body["error"]["type"] == "not_found_error"


def test_completion_equals_generate(served, artifact):
    url, _ = served
    prompt = words(1, 7)
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    ids = artifact[1](prompt).input_ids
    assert r.choices[0].text == reference(artifact, ids, 12)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion" and r.id.startswith("cmpl-")
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (7, 12, 19)


def test_streaming_completion_matches_and_ends_with_done(served, artifact):
    url, _ = served
    prompt = words(2, 5)
    chunks = list(
        client(url).completions.create(model="tiny", prompt=prompt, max_tokens=10, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == reference(artifact, artifact[1](prompt).input_ids, 10)
    assert chunks[-1].choices[0].finish_reason == "length" and len(chunks) > 3
    status, headers, text = raw(
        url, "POST", "/v1/completions", {"model": "tiny", "prompt": prompt, "max_tokens": 3, "stream": True}
    )
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    assert text.rstrip().endswith("data: [DONE]") and text.count("data: ") >= 3


def test_list_of_prompts_gives_one_choice_each(served, artifact):
    url, _ = served
    prompts = [words(3, 4), words(4, 9)]
    r = client(url).completions.create(model="tiny", prompt=prompts, max_tokens=6, temperature=0)
    got = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    assert got == [reference(artifact, artifact[1](p).input_ids, 6) for p in prompts]
    n_new = sum(len(reference_ids(artifact, artifact[1](p).input_ids, 6)) for p in prompts)
    assert r.usage.prompt_tokens == 13 and r.usage.completion_tokens == n_new


def test_chat_uses_the_template_streaming_and_not(served, artifact):
    url, _ = served
    tok = artifact[1]
    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": words(5, 6)}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    want = reference(artifact, list(getattr(ids, "input_ids", ids)), 8)
    c = client(url)
    r = c.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
    assert r.choices[0].message.content == want and r.choices[0].message.role == "assistant"
    assert r.object == "chat.completion" and r.usage.prompt_tokens == len(getattr(ids, "input_ids", ids))
    stream = c.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == want
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-1].choices == []


def test_seeded_sampling_equals_generate_with_the_seed(served, artifact):
    url, _ = served
    prompt = words(6, 5)
    kw = {"temperature": 0.8, "top_p": 0.9}
    texts = [
        client(url)
        .completions.create(model="tiny", prompt=prompt, max_tokens=10, seed=s, extra_body={"top_k": 20}, **kw)
        .choices[0]
        .text
        for s in (11, 11, 12)
    ]
    want = reference(artifact, artifact[1](prompt).input_ids, 10, do_sample=True, top_k=20, seed=11, **kw)
    assert texts[0] == texts[1] == want and texts[2] != want


def test_stop_string_cuts_the_text(served, artifact):
    url, _ = served
    prompt = words(7, 6)
    full = reference(artifact, artifact[1](prompt).input_ids, 12).split()
    stop = " " + full[4]  # the text ends right before the fifth word's first appearance
    r = client(url).completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == " ".join(full).split(stop)[0]
    assert r.usage.completion_tokens < 12


def test_sixteen_concurrent_clients_each_get_their_own_text(served, artifact):
    url, srv = served
    prompts = [words(100 + i, 2 + (5 * i) % 17) for i in range(16)]
    wants = [reference(artifact, artifact[1](p).input_ids, 6 + i % 5) for i, p in enumerate(prompts)]
    before = srv.engine.stats()
    c = client(url)

    def ask(i: int) -> str:
        kw = {"model": "tiny", "prompt": prompts[i], "max_tokens": 6 + i % 5, "temperature": 0}
        if i % 2:
            return "".join(ch.choices[0].text for ch in c.completions.create(stream=True, **kw))
        return c.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(16), timeout=120))
    assert got == wants
    after = srv.engine.stats()
    assert after["rows_released"] - before["rows_released"] == 16 and after["rows_in_use"] == 0
    # 16 requests through 4 rows: rows were shared by consecutive requests, several decoded at once
    assert after["decode_row_steps"] - before["decode_row_steps"] > after["decode_steps"] - before["decode_steps"]


def test_a_client_that_disconnects_mid_stream_frees_its_row(artifact):
    compiled, tok = artifact
    srv, bg = start(compiled, tok, max_batch=2, delay=0.05)
    with bg:
        host, port = bg.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {"model": "tiny", "prompt": words(8, 4), "max_tokens": 50, "stream": True, "temperature": 0}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        assert resp.readline().startswith(b"data: ")
        assert srv.engine.stats()["rows_in_use"] == 1
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_for(lambda: srv.engine.stats().get("cancelled", 0) == 1)
        st = srv.engine.stats()
        assert st["rows_in_use"] == 0 and st["rows_released"] == 1 and st["completion_tokens"] < 50
        r = client(bg.url).completions.create(model="tiny", prompt=words(9, 3), max_tokens=4, temperature=0)
        assert r.choices[0].finish_reason == "length"
        # A non-streaming client that leaves: noticed within 0.5 s, its row freed as well.
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        body = {**body, "stream": False}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        assert wait_for(lambda: srv.engine.stats()["rows_in_use"] == 1)
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        assert wait_for(lambda: srv.engine.stats().get("cancelled", 0) == 2)
        assert srv.engine.stats()["rows_in_use"] == 0
    srv.close()


# ----------------------------------------------------------------------------- limits and errors


@pytest.mark.parametrize(
    "body, status, code, says",
    [
        (b"{not json", 400, "invalid_json", "not valid JSON"),
        (b"[1, 2]", 400, "invalid_json", "JSON object"),
        ({"prompt": "w1"}, 400, "missing_required_parameter", "'model' is required"),
        ({"model": "tiny"}, 400, "missing_required_parameter", "'prompt' is required"),
        ({"model": "gpt-9", "prompt": "w1"}, 404, "model_not_found", "'gpt-9' is not served"),
        ({"model": "tiny", "prompt": "w1", "n": 2}, 400, "unsupported_parameter", "'n' must be 1"),
        ({"model": "tiny", "prompt": "w1", "logprobs": 2}, 400, "unsupported_parameter", "'logprobs'"),
        ({"model": "tiny", "prompt": "w1", "temperature": -1}, 400, "invalid_value", "'temperature'"),
        ({"model": "tiny", "prompt": "w1", "max_tokens": 49}, 400, None, "max_tokens=49 is over this server's limit"),
        ({"model": "tiny", "prompt": [1, 999]}, 400, None, "token ids must be in [0, 256)"),
        ({"model": "tiny", "prompt": "w1 " * 40, "max_tokens": 30}, 400, "context_length_exceeded", "(40 tokens) plus"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_error_json(served, body, status, code, says):
    url, _ = served
    got, _, resp = raw(url, "POST", "/v1/completions", body)
    assert got == status and set(resp["error"]) == {"message", "type", "param", "code"}
    assert resp["error"]["code"] == code and says in resp["error"]["message"]


@pytest.mark.parametrize(
    "body, code, says",
    [
        ({"model": "tiny"}, "missing_required_parameter", "'messages' is required"),
        ({"model": "tiny", "messages": []}, "invalid_type", "non-empty list"),
        ({"model": "tiny", "messages": [{"content": "w1"}]}, "invalid_type", "string 'role'"),
        ({"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
         "invalid_value", "text parts"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "w1"}], "tools": [{"type": "function"}]},
         "unsupported_parameter", "'tools'"),
    ],
)  # fmt: skip
def test_bad_chat_requests_get_openai_error_json(served, body, code, says):
    status, _, resp = raw(served[0], "POST", "/v1/chat/completions", body)
    assert status == 400 and resp["error"]["code"] == code and says in resp["error"]["message"]


def test_an_oversize_prompt_is_refused_before_tokenizing(served):
    url, _ = served
    t0 = time.perf_counter()
    with pytest.raises(openai.BadRequestError) as e:
        client(url).completions.create(model="tiny", prompt="w1 " * 100_000, max_tokens=4)
    assert time.perf_counter() - t0 < 10  # a cheap length check, not 100k tokens of work
    assert "300000 characters, over this server's limit of 1024" in str(e.value)
    # A body announced over the 4 MiB limit is refused from its headers, before it is read.
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n")
        sock.sendall(b"Content-Length: 104857600\r\n\r\n{")
        reply = b""
        while b"request_too_large" not in reply and (part := sock.recv(65536)):
            reply += part
    assert reply.startswith(b"HTTP/1.1 413") and b"request_too_large" in reply


def test_a_full_queue_answers_429_with_retry_after(artifact):
    compiled, tok = artifact
    srv, bg = start(compiled, tok, max_batch=1, max_queue=1, delay=0.05)
    with bg:
        host, port = bg.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=30)
        # ignore_eos: the row must stay taken (sampling at the default temperature could draw EOS).
        body = {"model": "tiny", "prompt": "w1 w2", "max_tokens": 60, "stream": True, "ignore_eos": True}
        conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        assert conn.getresponse().readline().startswith(b"data: ")  # the one row is taken
        results: list = []
        waiting = threading.Thread(
            target=lambda: results.append(
                raw(bg.url, "POST", "/v1/completions", {**body, "stream": False, "max_tokens": 2})
            )
        )
        waiting.start()
        assert wait_for(lambda: srv.engine.stats()["waiting"] == 1)
        status, headers, resp = raw(bg.url, "POST", "/v1/completions", {**body, "stream": False})
        assert status == 429 and headers["retry-after"] == "1" and resp["error"]["code"] == "queue_full"
        conn.close()  # the streaming client leaves: its row goes to the waiting request
        waiting.join(30)
        assert results and results[0][0] == 200 and results[0][2]["usage"]["completion_tokens"] == 2
    srv.close()


# ----------------------------------------------------------------------------- engine


def test_text_stream_holds_back_partial_stop_strings_and_utf8():
    pieces = {1: "ab", 2: "c", 3: "\u00e9", 4: "XY", 5: "z"}
    decode = lambda ids: "".join(pieces[i] for i in ids).replace("\u00e9", "\ufffd" if ids[-1] == 3 else "\u00e9")
    s = TextStream(decode, ["cX", "Yq"])
    assert s.add(1) == "ab"
    assert s.add(2) == ""  # 'c' may start 'cX'
    assert s.add(3) == ""  # an incomplete character: 'c' may still become 'cX'
    assert s.add(4) == "c\u00e9X"  # 'Y' may start 'Yq'
    assert s.add(5) == "Yz" and not s.stopped and s.flush() == ""
    t = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["cX"])
    assert t.add(1) + t.add(2) == "ab" and t.add(4) == "" and t.stopped and t.text == "ab" and t.flush() == ""
    u = TextStream(lambda ids: "".join(pieces[i] for i in ids), ["cX"])
    assert u.add(1) + u.add(2) == "ab" and u.flush() == "c"  # at the end the held-back tail goes out


def test_a_request_joining_a_running_batch_gets_generate_tokens(artifact):
    """Row 0 runs a long request; a short one joins mid-batch at shifted positions. Both equal generate()."""
    compiled, tok = artifact
    step = compiled._build_step(2, MAX_LEN, "eager", progress=False)
    engine = BatchingEngine(step).start()
    done = threading.Semaphore(0)
    joined_at: list[int] = []
    long_ids, short_ids = tok(words(20, 10)).input_ids, tok(words(21, 3)).input_ids

    def job(ids: list[int], n: int, eos: list[int], on_event=None) -> Job:
        def sink(ev):
            if on_event:
                on_event(ev)
            if ev.finish_reason:
                done.release()

        text = TextStream(lambda ids: " ".join(map(str, ids)))  # some text per token, so each token is an event
        return Job(ids, SamplingConfig(max_new_tokens=n, eos_token_id=eos), text, sink)

    second: list[Job] = []

    def submit_second(ev):  # after the long request's third token: it is running at position 12
        if ev.completion_tokens == 3 and not second:
            joined_at.append(engine.stats()["position"])
            second.append(job(short_ids, 8, []))
            engine.submit(second)

    first = job(long_ids, 20, [], submit_second)
    engine.submit([first])
    assert done.acquire(timeout=60) and done.acquire(timeout=60)
    engine.close()
    for j, ids in ((first, long_ids), (second[0], short_ids)):
        want = compiled.generate(
            torch.tensor([ids]), max_new_tokens=j.cfg.max_new_tokens, eos_token_id=[], runtime="eager"
        )
        assert j.generated == want[0, len(ids) :].tolist()
    assert joined_at and joined_at[0] > len(short_ids)  # it really joined at shifted positions
    assert engine.stats()["prefill_calls"] == 2


def test_eos_ends_a_request_with_stop(artifact):
    compiled, tok = artifact
    ids = tok(words(22, 5)).input_ids
    free = compiled.generate(torch.tensor([ids]), max_new_tokens=8, eos_token_id=[], runtime="eager")[0, 5:].tolist()
    eos = free[3]
    engine = BatchingEngine(compiled._build_step(1, MAX_LEN, "eager", progress=False)).start()
    events: list = []
    j = Job(ids, SamplingConfig(max_new_tokens=8, eos_token_id=[eos]), TextStream(lambda x: ""), events.append)
    engine.submit([j])
    assert wait_for(lambda: events and events[-1].finish_reason)
    engine.close()
    assert j.generated == free[: free.index(eos) + 1] and events[-1].finish_reason == "stop"


def test_serve_is_a_cli_command(capsys):
    assert main(["serve", "--help"]) == 0
    out = capsys.readouterr().out
    assert "example" in out and "--max-batch" in out and "127.0.0.1" in out
    assert main(["serve", "/nonexistent/artifact", "--quiet"]) == 2
    assert "qqq-compile: error:" in capsys.readouterr().err


def test_serve_freezes_the_startup_heap_before_serving(artifact_dir, monkeypatch):
    """A full collection would otherwise scan every object of torch, transformers and the
    model (~210 ms on SmolLM2, a stall for every row being decoded)."""
    import uvicorn

    frozen = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: frozen.append(gc.get_freeze_count()))
    try:
        assert main(["serve", str(artifact_dir), "--quiet", "--runtime", "eager"]) == 0
    finally:
        gc.unfreeze()
    assert len(frozen) == 1 and frozen[0] > 10_000, frozen
