"""Where the memory of a generating process goes: ours against llama.cpp, stage by stage.

Each stage runs in a fresh child process that does everything up to that stage and then
reports its resident set (``VmRSS``), its peak (``VmHWM``, i.e. ``ru_maxrss``) and, at the
end, a breakdown (``/proc/self/smaps_rollup``; the bytes of the tensors the model holds;
the KV cache pages actually touched; the AOT package's mapped code).

    python benchmarks/generate_memory.py --artifact smollm2-w4a8            # one command
    python benchmarks/generate_memory.py --artifact smollm2-w4a8 --prompt 1900 --json out.json
    python benchmarks/generate_memory.py --artifact smollm2-w4a8 --rows 2   # a step the artifact lacks: compiled

Stages (ours): ``import torch``; ``import qqq_compile``; ``load()``; ``load()`` + the first
``generate()`` (``--prompt`` tokens, ``--new`` new tokens; the artifact's shipped AOT step,
else whatever ``runtime`` builds: a compile, reported, which runs in a child process whose memory
is not this process's).
llama.cpp (``benchmarks/peers/venv-llamacpp``, if built): load the shipped GGUF with a
context of the same size, then generate the same number of tokens. The goal this measures
(issue 19): peak RSS of ``load()`` + ``generate()`` on SmolLM2 at most 800 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DEFAULT_VENV = REPO / "benchmarks" / "peers" / "venv-llamacpp"
MAIN_VENV = Path("/work/main/benchmarks/peers/venv-llamacpp")

# The child's code: stdlib only until the stage imports something (``STAGE`` chosen by argv).
CHILD = r"""
import json, os, resource, sys, time
stage, artifact, n_prompt, n_new, runtime = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
rows = int(sys.argv[6])

def status():
    out = {}
    for ln in open("/proc/self/status"):
        k, _, v = ln.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out

def rollup():
    out = {}
    try:
        for ln in open("/proc/self/smaps_rollup"):
            parts = ln.split()
            if len(parts) == 3 and parts[2] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) / 1024
    except OSError:
        pass
    return {k: out.get(k) for k in ("Rss", "Pss_Anon", "Pss_File", "Anonymous")}

def mapped(pattern):
    # Resident MB of the mappings whose path contains `pattern` (from /proc/self/smaps).
    total, cur = 0.0, False
    for ln in open("/proc/self/smaps"):
        head = ln.split()
        if head and "-" in head[0] and len(head) >= 5 and not head[0].endswith(":"):
            cur = len(head) >= 6 and pattern in head[-1]
        elif cur and ln.startswith("Rss:"):
            total += int(ln.split()[1]) / 1024
    return total

rec = {"stage": stage}
t0 = time.perf_counter()
import torch
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
rec["import_torch_s"] = time.perf_counter() - t0
if stage != "import torch":
    import qqq_compile
    rec["transformers_imported_by_import"] = "transformers" in sys.modules
if stage in ("load", "load + generate"):
    t = time.perf_counter()
    compiled = qqq_compile.load(artifact)
    rec["load_s"] = time.perf_counter() - t
    rec["transformers_imported_by_load"] = "transformers" in sys.modules
if stage == "load + generate":
    from qqq_compile.runtime import steps as _steps
    builds = []
    _real = _steps._aot_compile
    _steps._aot_compile = lambda *a, **k: (builds.append(1), _real(*a, **k))[1]
    ids = (torch.arange(n_prompt) % 1000 + 100)[None].expand(rows, -1)
    t = time.perf_counter()
    if rows > 1:  # the server's step: a multi-row one, built unless the artifact's folder has it
        compiled.prepare_generation(max_batch=rows, runtime=runtime, progress=False)
    out = compiled.generate(ids, max_new_tokens=n_new, eos_token_id=[], runtime=runtime, return_dict_in_generate=True)
    rec["generate_s"] = time.perf_counter() - t
    (step,) = compiled.decode_steps
    rec["runtime"] = step.describe()
    rec["aot_compiles"] = len(builds)
    seen, weights = set(), 0
    for t_ in list(compiled.graph_module.parameters()) + list(compiled.graph_module.buffers()):
        st = t_.untyped_storage()
        if st.data_ptr() not in seen:
            seen.add(st.data_ptr())
            weights += st.nbytes()
    rec["model_tensor_mb"] = weights / 2**20
    rec["kv_cache_reserved_mb"] = step.spec.cache_bytes() / 2**20
    rec["aot_package_code_resident_mb"] = mapped("wrapper.so")
    rec["transformers_imported_by_generate"] = "transformers" in sys.modules
rec.update(status())
rec["smaps_rollup"] = rollup()
rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(rec))
"""

LLAMA_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
from engines.llamacpp import LlamaCppEngine
from engines.worker import TokenClock
gguf = sys.argv[2]
n_prompt, n_new, n_ctx, threads = (int(x) for x in sys.argv[3:7])

def status():
    out = {}
    for ln in open("/proc/self/status"):
        k, _, v = ln.partition(":")
        if k in ("VmRSS", "VmHWM"):
            out[k] = int(v.split()[0]) / 1024
    return out

rec = {"stage": "llama.cpp"}
eng = LlamaCppEngine("q4_1")
t = time.perf_counter()
eng.load({"threads": threads, "gguf": gguf, "max_batch": 1, "max_prompt_tokens": max(n_prompt, 512),
          "max_kv_tokens": n_ctx - 256, "cache_dir": "/tmp"})
rec["load_s"] = time.perf_counter() - t
rec["after_load"] = status()
clock = TokenClock()
clock.begin()
t = time.perf_counter()
eng.generate([[100 + i % 1000 for i in range(n_prompt)]], n_new, clock)
rec["generate_s"] = time.perf_counter() - t
rec.update(status())
rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print("RESULT " + json.dumps(rec))
"""

STAGES = ("import torch", "import qqq_compile", "load", "load + generate")


def run_child(cmd: list[str], env: dict[str, str]) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-2000:]
        raise RuntimeError(f"{' '.join(cmd[:3])} ... failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("RESULT ") :])


def ours(args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    out = []
    for stage in STAGES:
        with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
            f.write(CHILD)
        try:
            cmd = [sys.executable, f.name, stage, str(args.artifact), str(args.prompt), str(args.new), args.runtime]
            cmd.append(str(args.rows))
            rec = run_child(cmd, env)
        finally:
            os.unlink(f.name)
        out.append(rec)
        print(f"  {stage:<20} RSS {rec['VmRSS']:7.0f} MB   peak {rec['VmHWM']:7.0f} MB", flush=True)
    return out


def llamacpp(args: argparse.Namespace, env: dict[str, str], n_ctx: int) -> dict | None:
    venv = args.llamacpp_venv
    python = venv / "bin" / "python"
    if not (venv / ".complete").exists() or not python.exists():
        print(f"  llama.cpp: skipped ({venv} is not built)")
        return None
    from qqq_compile.models import demo_gguf_path

    with tempfile.NamedTemporaryFile("w", suffix=".py", delete=False) as f:
        f.write(LLAMA_CHILD)
    try:
        cmd = [str(python), f.name, str(HERE), str(demo_gguf_path()), str(args.prompt), str(args.new), str(n_ctx)]
        rec = run_child([*cmd, env.get("THREADS", "2")], env)
    finally:
        os.unlink(f.name)
    print(f"  {'llama.cpp':<20} RSS {rec['VmRSS']:7.0f} MB   peak {rec['VmHWM']:7.0f} MB", flush=True)
    return rec


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--artifact", type=Path, required=True, help="a saved artifact (SmolLM2: qqq-compile quantize demo)"
    )
    ap.add_argument("--prompt", type=int, default=32, help="prompt tokens (default 32)")
    ap.add_argument("--new", type=int, default=16, help="new tokens (default 16)")
    ap.add_argument("--runtime", default="auto", choices=("auto", "aot", "eager"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--rows", type=int, default=1, help="rows of the step and of the batch (more than 1: the server's step)"
    )
    ap.add_argument("--llamacpp-venv", type=Path, default=DEFAULT_VENV if DEFAULT_VENV.exists() else MAIN_VENV)
    ap.add_argument("--json", type=Path, help="also write the records here")
    args = ap.parse_args(argv)
    if not (args.artifact / "qqq_manifest.json").is_file():
        ap.error(f"{args.artifact} is not an artifact; make one with: qqq-compile quantize demo --out {args.artifact}")
    env = {**os.environ, "THREADS": str(args.threads), "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "false"}
    manifest = json.loads((args.artifact / "qqq_manifest.json").read_text())
    n_ctx = int((manifest.get("decode_step") or {}).get("max_len") or 2048)
    print(f"memory of a generating process ({args.prompt} prompt tokens + {args.new} new; one child per stage):")
    records = ours(args, env)
    peer = llamacpp(args, env, n_ctx)
    last = records[-1]
    print(
        f"\nours: {last['runtime']} step, {last['aot_compiles']} AOT compile(s) (in a child process); model tensors "
        f"{last['model_tensor_mb']:.0f} MB; KV cache {last['kv_cache_reserved_mb']:.0f} MB reserved (resident as "
        f"written); AOT package code resident {last['aot_package_code_resident_mb']:.0f} MB; transformers imported: "
        f"{last['transformers_imported_by_generate']}"
    )
    print(f"smaps_rollup after generate (MB): {last['smaps_rollup']}")
    goal = 800
    verdict = "meets" if last["VmHWM"] <= goal else "misses"
    print(f"peak RSS of load() + generate(): {last['VmHWM']:.0f} MB ({verdict} the {goal} MB goal)")
    if peer:
        print(f"llama.cpp peak: {peer['VmHWM']:.0f} MB  (ours / llama.cpp: {last['VmHWM'] / peer['VmHWM']:.2f}x)")
    if args.json:
        args.json.write_text(json.dumps({"ours": records, "llama.cpp": peer}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
