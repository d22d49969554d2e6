"""Generation speed: TTFT, prefill and decode tokens/s, peak RSS, every engine in one run.

    benchmarks/peers/setup.sh llamacpp      # once: builds llama-cpp-python from source (~12 min on 2 cores)
    python benchmarks/generate_speed.py     # all engines; or --engines hf-fp32,llamacpp-q4_1,...

Workload (SmolLM2-135M-Instruct, greedy, ``--threads`` 2 per engine): ``b1`` is one
512-token prompt (BOS + real text: the gensim Wikipedia excerpt of ``qqq_compile.data``)
plus 128 new tokens; ``b8`` is 8 prompts of 128 tokens, 128 new tokens each. Every engine
lives in its own long-lived worker process (``benchmarks/engines``), so its peak RSS is its
own and llama.cpp runs from its own venv. The parent loads each worker (which warms
every case up), then asks them in turn, round-robin, for ``--reps`` generations per case,
and reports medians: drift of a shared machine spreads over all engines instead of
landing on one.

* TTFT: from the call to the first new token; prefill tok/s = prompt tokens / TTFT.
* decode tok/s = rows x (new tokens - 1) / (time from the first to the last new token).
* HF and ours are timed by the same streamer (``put``/``end``); llama.cpp by its C API:
  one ``llama_decode`` over the prompt, then one per step (``engines/llamacpp.py``).
* peak RSS: the worker's peak during generation (counter reset after loading and warm-up).
* floor: weight bytes read per decoded token / memory read bandwidth measured in the same
  run (torch ``sum`` over 1 GiB, same thread count). Weight bytes: ``weight_bytes()`` for
  ours, unique parameter bytes for HF, the file size for a GGUF.
* probe: before each turn (after the pause) the parent times a fixed int8 GEMM
  (:class:`Int8Probe`): the machine's compute rate at that moment, reported per engine with
  TTFT / probe (``--no-probe`` skips it). Ours also reports how its C++ kernels shared their
  work in each run (``paths_prefill`` / ``paths_decode`` in the JSON: team, solo and stall
  calls, ``csrc/parallel_cpu.cpp``).

The demo model's weights are Q4_1 dequantized, so llamacpp-q4_1 runs the model exactly as
shipped, and HF/ours run its float dequantization.
"""

from __future__ import annotations

import argparse
import json
import os
import selectors
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))  # `engines` (the report helpers) when run as a script

from engines.report import agreement, render, summarize  # noqa: E402 - needs the path above

from qqq_compile.config import DEFAULT_PRESET  # noqa: E402

LLAMACPP_VENV = HERE / "peers" / "venv-llamacpp"
RESULT = HERE / "results" / "generate_speed.json"


@dataclass(frozen=True)
class EngineSpec:
    target: str  # "module:Class" imported by the worker
    kwargs: dict[str, Any] = field(default_factory=dict)
    venv: str = "main"  # "main": this interpreter; "llamacpp": the peer venv's


ENGINES: dict[str, EngineSpec] = {
    "hf-fp32": EngineSpec("engines.torch_engines:HFEngine", {"dtype": "float32"}),
    "hf-bf16": EngineSpec("engines.torch_engines:HFEngine", {"dtype": "bfloat16"}),
    "llamacpp-q4_1": EngineSpec("engines.llamacpp:LlamaCppEngine", {"quant": "q4_1"}, "llamacpp"),
    "llamacpp-q4_0": EngineSpec("engines.llamacpp:LlamaCppEngine", {"quant": "q4_0"}, "llamacpp"),
    "ours-eager": EngineSpec("engines.torch_engines:OursEngine", {"runtime": "eager"}),
    # the default compile (int8 lm_head + embedding, QuantConfig.int8_head=True) ...
    "ours-compiled": EngineSpec("engines.torch_engines:OursEngine", {"runtime": "aot"}),
    # ... and the float head (results before the default changed list these two as
    # "ours-compiled" (float head) and "ours-compiled-int8head")
    "ours-compiled-fp32head": EngineSpec("engines.torch_engines:OursEngine", {"runtime": "aot", "int8_head": False}),
    # the default compile with the KV cache in bf16 (prepare_generation(cache_dtype=torch.bfloat16))
    "ours-compiled-bf16kv": EngineSpec(
        "engines.torch_engines:OursEngine", {"runtime": "aot", "cache_dtype": "bfloat16"}
    ),
    # a second artifact (--alt-artifact: e.g. another weight format), AOT step
    "ours-compiled-alt": EngineSpec(
        "engines.torch_engines:OursEngine", {"runtime": "aot", "artifact_key": "alt_artifact"}
    ),
    "ours-compiled-alt2": EngineSpec(
        "engines.torch_engines:OursEngine", {"runtime": "aot", "artifact_key": "alt_artifact2"}
    ),
}


class WorkerError(RuntimeError):
    pass


class Worker:
    """One engine's worker process, spoken to in JSON lines (see ``engines/worker.py``)."""

    def __init__(self, name: str, python: str, spec: EngineSpec, log_dir: Path, threads: int) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        # Thread pools sized at import (OpenMP, tokenizers) must not exceed the share either.
        env.update(OMP_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
        self.log = open(self.log_path, "w")  # noqa: SIM115 - lives as long as the worker
        self.proc = subprocess.Popen(
            [python, "-m", "engines.worker", spec.target, json.dumps(spec.kwargs)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
            env=env,
            cwd=ROOT,
        )

    def log_tail(self, lines: int = 6) -> str:
        self.log.flush()
        text = self.log_path.read_text(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:])

    def request(self, msg: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send ``msg``, return the reply's payload; a worker-side error raises WorkerError."""
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except BrokenPipeError:
            pass  # died already: reported below with its exit code
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(timeout):
                self.close(kill=True)
                raise WorkerError(f"no reply within {timeout:.0f} s (worker killed); log: {self.log_tail()}")
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise WorkerError(f"worker exited with code {code}; log: {self.log_tail()}")
        reply = json.loads(line)
        if not reply.get("ok"):
            raise WorkerError(reply.get("error", "unknown error"))
        return reply

    def close(self, kill: bool = False) -> None:
        if self.proc.poll() is None:
            if not kill:
                try:
                    self.proc.stdin.write('{"cmd": "quit"}\n')
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=30)
                except (BrokenPipeError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def prepare_cases(args: argparse.Namespace) -> dict[str, list[list[int]]]:
    """Prompts from the real text: the last windows of the Wikipedia excerpt, each BOS + text."""
    from transformers import AutoTokenizer

    from qqq_compile.data import load_text, token_windows
    from qqq_compile.models import demo_model_path

    tok = AutoTokenizer.from_pretrained(demo_model_path())
    text = load_text("wikipedia")
    cases = {"b1": [token_windows(tok, text, args.prompt_len, n=1, select="last")[0][0].tolist()]}
    if args.batch > 0:
        rows = token_windows(tok, text, args.batch_prompt_len, n=args.batch, select="last")
        cases[f"b{args.batch}"] = [w[0].tolist() for w in rows]
    return cases


def memory_bandwidth(threads: int, gib: float = 1.0, reps: int = 7) -> float:
    """Read bandwidth (bytes/s): median time of a torch ``sum`` over a ``gib`` GiB fp32 tensor."""
    import torch

    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()  # first touch and thread-pool start outside the timing
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


PROBE_SETTLE_S = 0.05  # libgomp's idle threads spin well under this before they sleep


class Int8Probe:
    """The machine's int8 GEMM rate right now: ms for ``calls`` ``torch._int_mm`` of one of
    SmolLM2's 512-token prefill shapes (512 x 576 @ 576 x 3072), ``threads`` threads.

    Timed by the parent before each turn: on this 2-core VM the same GEMM swings by a quarter
    over seconds with nothing else running in the VM (the host's doing), and our prefill, half
    of it int8 GEMM at the VNNI rate, swings with it (TTFT vs the probe: correlation 0.93 over 30
    prompts in one process; docs/RESULTS.md, round 19), so a slow turn can be told from a slow
    engine."""

    M, K, N = 512, 576, 3072

    def __init__(self, threads: int, calls: int = 10) -> None:
        import torch

        self.torch, self.threads, self.calls = torch, threads, calls
        g = torch.Generator().manual_seed(0)
        self.a = torch.randint(-127, 128, (self.M, self.K), dtype=torch.int8, generator=g)
        self.b = torch.randint(-127, 128, (self.K, self.N), dtype=torch.int8, generator=g)
        self()  # oneDNN's kernel generation and the thread pool's start outside any timing

    def describe(self) -> str:
        """What one probe times (the report prints it beside the figures)."""
        return f"{self.calls} x {self.M}x{self.K} @ {self.K}x{self.N} int8, {self.threads} threads"

    def __call__(self) -> float:
        self.torch.set_num_threads(self.threads)
        t0 = time.perf_counter()
        for _ in range(self.calls):
            self.torch._int_mm(self.a, self.b)
        return 1e3 * (time.perf_counter() - t0)


def engine_python(spec: EngineSpec, venv: Path) -> str:
    if spec.venv == "main":
        return sys.executable
    python = venv / "bin" / "python"
    if not (python.is_file() and (venv / ".complete").is_file()):
        raise WorkerError(f"llama.cpp venv missing at {venv}: build it with benchmarks/peers/setup.sh llamacpp")
    return str(python)


def run(
    engines: dict[str, EngineSpec],
    cases: dict[str, list[list[int]]],
    options: dict[str, Any],
    *,
    reps: int,
    max_new: int,
    llamacpp_venv: Path,
    log_dir: Path,
    bandwidth: bool = True,
    settle_s: float = 0.0,
    probe: bool = False,
    load_timeout: float = 3600.0,
    run_timeout: float = 900.0,
) -> dict[str, Any]:
    """Load every engine's worker, time ``reps`` round-robin rounds; raw per-run results."""
    from tqdm.auto import tqdm

    threads = int(options["threads"])
    out: dict[str, Any] = {name: {"status": "ok", "info": {}, "runs": {c: [] for c in cases}} for name in engines}
    workers: dict[str, Worker] = {}
    bw = None
    int8_probe: Int8Probe | None = None
    try:
        for name in tqdm(engines, desc="loading engines", unit="engine"):
            try:
                worker = Worker(name, engine_python(engines[name], llamacpp_venv), engines[name], log_dir, threads)
                workers[name] = worker
                msg = {"cmd": "load", "options": options, "cases": cases, "max_new": max_new}
                out[name]["info"] = worker.request(msg, load_timeout)["info"]
            except WorkerError as exc:
                out[name]["status"] = f"failed: {exc}"
                if name in workers:
                    workers.pop(name).close(kill=True)
        # Measured while every worker sits loaded and idle: the same memory state the runs see.
        bw = memory_bandwidth(threads) if bandwidth else None
        int8_probe = Int8Probe(threads) if probe else None
        live = [n for n in engines if n in workers]
        steps = [(c, n) for _ in range(reps) for c in cases for n in live]
        for case, name in tqdm(steps, desc="round-robin generations", unit="gen"):
            entry = out[name]
            if name not in workers or entry.get(f"error_{case}") or case in entry["info"].get("case_errors", {}):
                continue
            # The previous engine's threads may still be spinning on the cores (llama.cpp's
            # threadpool polls after each decode; libgomp spins before it sleeps): let them
            # go idle, so each engine is timed as a user running it alone meets it.
            time.sleep(settle_s)
            probe_ms = None
            if int8_probe is not None:
                # After the pause (timed right after the other engine's turn, the probe took up
                # to 1.5x longer before ours than before llama.cpp: that engine's threads were
                # still spinning), then a pause for the probe's own threads to go idle.
                probe_ms = int8_probe()
                time.sleep(PROBE_SETTLE_S)
            try:
                result = workers[name].request({"cmd": "run", "case": case}, run_timeout)["result"]
                if probe_ms is not None:
                    result["int8_probe_ms"] = probe_ms
                # Other tenants of a shared machine show up here: judge a slow run by it.
                result["loadavg_1m"] = os.getloadavg()[0]
                entry["runs"][case].append(result)
            except WorkerError as exc:
                entry[f"error_{case}"] = str(exc)
                if workers[name].proc.poll() is not None:
                    workers.pop(name).close(kill=True)
    finally:
        for worker in workers.values():
            worker.close()
    probe_desc = int8_probe.describe() if int8_probe is not None else None
    return {"engines": out, "bandwidth_bytes_s": bw, "probe": probe_desc}


def gguf_tensor_types(path: str) -> dict[str, int] | None:
    """Tensor type counts of a GGUF file (``{"Q4_1": 210, "Q8_0": 1, ...}``), if ``gguf`` is installed."""
    try:
        import gguf
    except ImportError:
        return None
    counts: dict[str, int] = {}
    for t in gguf.GGUFReader(path).tensors:
        counts[t.tensor_type.name] = counts.get(t.tensor_type.name, 0) + 1
    return counts


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)  # atomic: a crash never leaves half a results file


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated, from: {', '.join(ENGINES)}")
    ap.add_argument("--reps", type=int, default=3, help="timed generations per engine and case (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="threads per engine (the machine has 2 cores)")
    ap.add_argument(
        "--settle-s",
        type=float,
        default=1.0,
        help="pause before each timed generation, so the previous engine's spinning threads go idle (0: none)",
    )
    ap.add_argument(
        "--no-probe",
        dest="probe",
        action="store_false",
        help="skip the int8 GEMM probe timed before each turn (the machine's rate at that moment)",
    )
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="rows of the batched case (0: skip it)")
    ap.add_argument("--batch-prompt-len", type=int, default=128)
    ap.add_argument("--preset", default=DEFAULT_PRESET, help="ours: qqq_compile preset (default: %(default)s)")
    ap.add_argument("--calib-windows", type=int, default=16, help="ours: 512-token calibration windows")
    ap.add_argument("--artifact", help="ours: load this saved artifact (qqq_compile.load) instead of compiling")
    ap.add_argument("--alt-artifact", help="engine ours-compiled-alt: a second artifact (e.g. another format)")
    ap.add_argument("--alt-artifact2", help="engine ours-compiled-alt2: a third artifact")
    ap.add_argument("--llamacpp-venv", type=Path, default=LLAMACPP_VENV)
    ap.add_argument("--out", type=Path, default=RESULT)
    args = ap.parse_args(argv)
    names = [n.strip() for n in args.engines.split(",") if n.strip()]
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        ap.error(f"unknown engine(s) {unknown or names}; choose from {', '.join(ENGINES)}")
    if args.reps < 1 or args.new_tokens < 2 or args.threads < 1:
        ap.error("--reps >= 1, --new-tokens >= 2 (decode needs two tokens) and --threads >= 1 are required")
    args.engine_names = names
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # SIGTERM (kill PID) unwinds like Ctrl-C, so run()'s finally still stops every worker.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from qqq_compile.models import demo_gguf_path

    cases = prepare_cases(args)
    options = {
        "threads": args.threads,
        "gguf": str(demo_gguf_path()),
        # The requantized file depends on the llama.cpp build: cache it inside that venv.
        "cache_dir": str(args.llamacpp_venv / "gguf"),
        "max_batch": max(len(p) for p in cases.values()),
        "max_prompt_tokens": max(sum(map(len, p)) for p in cases.values()),
        "max_kv_tokens": max(sum(len(r) + args.new_tokens for r in p) for p in cases.values()),
        "preset": args.preset,
        "calib_windows": args.calib_windows,
        "artifact": args.artifact,
        "alt_artifact": args.alt_artifact,
        "alt_artifact2": args.alt_artifact2,
        # The KV cache ours builds once: every case's rows, its longest prompt + new tokens.
        "batch": max(len(p) for p in cases.values()),
        "max_len": max(len(r) for p in cases.values() for r in p) + args.new_tokens,
    }
    log_dir = Path(tempfile.mkdtemp(prefix="generate_speed-logs-"))
    t0 = time.time()
    raw = run(
        {n: ENGINES[n] for n in args.engine_names},
        cases,
        options,
        reps=args.reps,
        max_new=args.new_tokens,
        llamacpp_venv=args.llamacpp_venv,
        log_dir=log_dir,
        settle_s=args.settle_s,
        probe=args.probe,
    )
    for entry in raw["engines"].values():
        if entry["info"].get("gguf"):
            entry["info"]["gguf_tensor_types"] = gguf_tensor_types(entry["info"]["gguf"])
    summary = summarize(raw["engines"], raw["bandwidth_bytes_s"])
    agree = agreement(raw["engines"], reference="hf-fp32", first=16)
    meta = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t0)),
        "wall_s": time.time() - t0,
        "loadavg_end": os.getloadavg(),
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "cases": {c: {"rows": len(p), "prompt_len": len(p[0])} for c, p in cases.items()},
        "worker_logs": str(log_dir),
        "probe": raw["probe"],
    }
    text = render(summary, agree, meta)
    print(text)
    write_json(args.out, {"meta": meta, "summary": summary, "agreement": agree, "raw": raw})
    args.out.with_suffix(".md").write_text(text + "\n")
    print(f"\nwrote {args.out} (worker logs: {log_dir})")


if __name__ == "__main__":
    main()
