"""``qqq-compile serve`` under load: throughput and latency at 1, 4 and 16 concurrent clients.

    python benchmarks/serve_bench.py ARTIFACT                    # defaults: 1,4,16 clients, 3 rounds
    python benchmarks/serve_bench.py ARTIFACT --runtime eager --rounds 1 --requests 2   # a smoke run

Starts ``qqq-compile serve ARTIFACT`` as a subprocess on a free port of 127.0.0.1 (the
server runs as users run it; the clients' threads do not share its GIL), waits for
``/health``, then for each concurrency ``c`` runs ``c`` client threads (the ``openai``
client, streaming completions), each sending ``--requests`` requests one after the other.
Every request is a distinct window of ``--prompt-tokens`` tokens of the bundled Wikipedia
text (sent as token ids, so lengths are exact), greedy, ``--max-tokens`` new tokens with
``ignore_eos`` (every request decodes the same number of tokens).

Per concurrency: total completion tokens / wall time, per-request latency and time to
first token (p50, p99), and the throughput as a ratio to one client in the same round.
Concurrency levels are interleaved over ``--rounds`` rounds and medians reported, so drift
of a shared machine spreads over all of them. Prints a markdown table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT = ROOT / "benchmarks" / "results" / "serve_bench.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "qqq_compile.cli.main", "serve", args.artifact, "--port", str(port), "--quiet"]
    cmd += ["--max-batch", str(args.max_batch), "--runtime", args.runtime, "--model-name", "bench"]
    cmd += ["--max-len", str(args.max_len), "--max-queue", str(max(64, 4 * max(args.concurrency)))]
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + args.start_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {proc.stderr.read()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if json.loads(r.read()).get("status") == "ok":
                    return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {args.start_timeout} s")


def prompts(artifact: str, n: int, length: int) -> list[list[int]]:
    """``n`` distinct windows of ``length`` token ids of the bundled text."""
    from qqq_compile.artifact import load_tokenizer
    from qqq_compile.data import load_text

    tok = load_tokenizer(artifact)
    ids = tok(load_text("wikipedia")).input_ids
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step : i * step + length] for i in range(n)]


def one_request(client: Any, prompt: list[int], max_tokens: int) -> dict[str, float]:
    t0 = time.perf_counter()
    first, n = None, 0
    stream = client.completions.create(
        model="bench",
        prompt=prompt,
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
    end = time.perf_counter()
    return {"latency": end - t0, "ttft": (first or end) - t0, "tokens": n}


def run_level(url: str, c: int, work: list[list[int]], args: argparse.Namespace) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=3600)
    results: list[dict[str, float]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def worker(k: int) -> None:
        for j in range(args.requests):
            try:
                r = one_request(client, work[(k * args.requests + j) % len(work)], args.max_tokens)
            except Exception as e:  # noqa: BLE001 - reported, not fatal
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                return
            with lock:
                results.append(r)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(k,)) for k in range(c)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed at concurrency {c}: {errors[0]}")
    tokens = sum(r["tokens"] for r in results)
    return {
        "clients": c,
        "requests": len(results),
        "tokens": tokens,
        "wall_s": wall,
        "tokens_per_s": tokens / wall,
        "latency_s": [r["latency"] for r in results],
        "ttft_s": [r["ttft"] for r in results],
    }


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


def summarize(rounds: list[dict[int, dict]], levels: list[int]) -> list[dict[str, Any]]:
    rows = []
    for c in levels:
        runs = [r[c] for r in rounds]
        lat = [x for r in runs for x in r["latency_s"]]
        ttft = [x for r in runs for x in r["ttft_s"]]
        ratio = [r[c]["tokens_per_s"] / r[levels[0]]["tokens_per_s"] for r in rounds]
        rows.append(
            {
                "clients": c,
                "requests": sum(r["requests"] for r in runs),
                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
                "vs_first_level": statistics.median(ratio),
                "latency_p50_s": pct(lat, 50),
                "latency_p99_s": pct(lat, 99),
                "ttft_p50_s": pct(ttft, 50),
                "ttft_p99_s": pct(ttft, 99),
            }
        )
    return rows


def table(rows: list[dict[str, Any]], first: int) -> str:
    head = f"| clients | requests | tokens/s | vs {first} client(s) | latency p50 / p99 (s) | TTFT p50 / p99 (s) |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['clients']} | {r['requests']} | {r['tokens_per_s']:.1f} | {r['vs_first_level']:.2f}x | "
            f"{r['latency_p50_s']:.2f} / {r['latency_p99_s']:.2f} | {r['ttft_p50_s']:.2f} / {r['ttft_p99_s']:.2f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("artifact", help="artifact folder written by 'qqq-compile quantize'")
    p.add_argument("--concurrency", default="1,4,16", help="client counts (default: 1,4,16)")
    p.add_argument("--requests", type=int, default=4, help="requests per client per round (default: 4)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default: 3)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="prompt length (default: 64)")
    p.add_argument("--max-tokens", type=int, default=64, help="new tokens per request (default: 64)")
    p.add_argument("--max-batch", type=int, default=8, help="server --max-batch (default: 8)")
    p.add_argument("--max-len", type=int, default=1024, help="server --max-len (default: 1024)")
    p.add_argument("--runtime", default="auto", choices=("auto", "eager", "aot"), help="server --runtime")
    p.add_argument("--start-timeout", type=float, default=1800, help="seconds to wait for the server (AOT builds)")
    p.add_argument("--out", default=str(RESULT), help=f"JSON output (default: {RESULT.relative_to(ROOT)})")
    args = p.parse_args()
    args.concurrency = [int(x) for x in args.concurrency.split(",")]
    work = prompts(args.artifact, max(args.concurrency) * args.requests, args.prompt_tokens)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"starting qqq-compile serve {args.artifact} on {url} (runtime {args.runtime}) ...", file=sys.stderr)
    proc = start_server(args, port)
    try:
        run_level(url, 1, work, argparse.Namespace(**{**vars(args), "requests": 1}))  # warm-up
        rounds = []
        for i in range(args.rounds):
            rounds.append({c: run_level(url, c, work, args) for c in args.concurrency})
            print(f"round {i + 1}/{args.rounds} done", file=sys.stderr)
        with urllib.request.urlopen(url + "/stats", timeout=10) as r:
            stats = json.loads(r.read())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    rows = summarize(rounds, args.concurrency)
    print(table(rows, args.concurrency[0]))
    out = {"config": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows, "server_stats": stats}
    out["raw"] = [{str(c): r for c, r in rnd.items()} for rnd in rounds]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1) + "\n")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
