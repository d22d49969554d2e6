"""Quantize a model larger than the memory it is given: streaming compile under a hard cap.

A random-weight LLaMA (TinyLlama-1.1B's shape by default: hidden 2048, 22 layers, MLP
5632, 32 heads / 4 KV heads, vocab 32000; 4.4 GB in fp32) is written to disk as
safetensors shards, one layer at a time (the whole model is never in memory). A child
process then runs ``qqq_compile.compile(folder, ..., streaming=True)`` inside a memory
cgroup whose limit is well below the fp32 model, checks the compiled model's logits, and
reports its peak resident set (``ru_maxrss``) next to the model's size.

    python benchmarks/memory.py                          # RTN, 2 GiB cap
    python benchmarks/memory.py --preset gptq --calib 8  # GPTQ through the block runner
    python benchmarks/memory.py --preset qqq_rot --calib 128 --seq 512 --cap-gib 3  # the default
    python benchmarks/memory.py --baseline               # also: in-memory compile, same cap
    python benchmarks/memory.py --demo --calib 128       # `qqq-compile quantize demo` (SmolLM2-135M)
    python benchmarks/memory.py --demo --calib 128 --no-step --cap-gib 8   # without the step's compile
    python benchmarks/memory.py --demo --calib 128 --no-step --no-streaming  # the model loaded whole

The cap is a cgroup memory limit (v2 ``memory.max`` or v1 ``memory.limit_in_bytes``,
swap off), created as a child of this process's own cgroup and removed afterwards.
``RLIMIT_AS``/``RLIMIT_DATA`` cannot stand in for it: the skeleton used for export
reserves (but never touches) the model's size in address space. Without a usable cgroup
the run is uncapped and only the peak RSS is reported.

``--demo`` measures ``qqq-compile quantize demo`` instead (the real SmolLM2-135M, the
default preset, ``--calib`` windows of 512 tokens): its peak RSS against the float
model's size, under the cap if one is given with ``--cap-gib``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GiB = 2**30


# ----------------------------------------------------------------------------- the model


def llama_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        vocab_size=args.vocab,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
        dtype="float32",
    )


def write_random_llama(folder: Path, cfg, layers_per_shard: int = 2, seed: int = 0) -> int:
    """Write a random LLaMA checkpoint shard by shard; returns the bytes written."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    def layer(i: int) -> dict[str, torch.Tensor]:
        p = f"model.layers.{i}."
        return {
            p + "input_layernorm.weight": torch.ones(h),
            p + "post_attention_layernorm.weight": torch.ones(h),
            p + "self_attn.q_proj.weight": randn(h, h),
            p + "self_attn.k_proj.weight": randn(kv, h),
            p + "self_attn.v_proj.weight": randn(kv, h),
            p + "self_attn.o_proj.weight": randn(h, h),
            p + "mlp.gate_proj.weight": randn(f, h),
            p + "mlp.up_proj.weight": randn(f, h),
            p + "mlp.down_proj.weight": randn(h, f),
        }

    folder.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(folder)
    nl = cfg.num_hidden_layers
    groups = [list(range(i, min(i + layers_per_shard, nl))) for i in range(0, nl, layers_per_shard)]
    n = len(groups) + 2
    weight_map, total = {}, 0
    shards = [("embed", None), *[("layers", grp) for grp in groups], ("head", None)]
    for k, (kind, grp) in enumerate(shards, 1):
        if kind == "embed":
            tensors = {"model.embed_tokens.weight": randn(v, h)}
        elif kind == "head":
            tensors = {"model.norm.weight": torch.ones(h), "lm_head.weight": randn(v, h)}
        else:
            tensors = {}
            for i in grp:
                tensors.update(layer(i))
        name = f"model-{k:05d}-of-{n:05d}.safetensors"
        save_file(tensors, folder / name, metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors  # one shard in memory at a time
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return total


# ----------------------------------------------------------------------------- the cap


def _own_cgroup() -> tuple[str, Path] | None:
    """(version, folder) of a memory cgroup this process sits in and may nest under."""
    lines = Path("/proc/self/cgroup").read_text().splitlines()
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if ctrls == "":  # v2
            for root in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified")):
                ctl = root / path.lstrip("/") / "cgroup.controllers"
                if ctl.is_file() and "memory" in ctl.read_text().split():
                    return "v2", root / path.lstrip("/")
    for line in lines:
        _, ctrls, path = line.split(":", 2)
        if "memory" in ctrls.split(","):
            d = Path("/sys/fs/cgroup/memory") / path.lstrip("/")
            if (d / "memory.limit_in_bytes").is_file():
                return "v1", d
    return None


class MemoryCap:
    """A child memory cgroup with a hard limit; ``cgroup.procs`` takes the child's pid."""

    def __init__(self, limit: int):
        self.limit, self.version, self.dir = limit, None, None
        own = _own_cgroup()
        if own is None:
            return
        version, parent = own
        d = parent / f"qqq-memory-{os.getpid()}-{id(self):x}"  # several caps may live at once
        made = False
        try:
            d.mkdir()
            made = True
            if version == "v2":
                (parent / "cgroup.subtree_control").write_text("+memory")
                (d / "memory.max").write_text(str(limit))
                if (d / "memory.swap.max").exists():
                    (d / "memory.swap.max").write_text("0")
            else:
                (d / "memory.limit_in_bytes").write_text(str(limit))
                if (d / "memory.memsw.limit_in_bytes").exists():
                    (d / "memory.memsw.limit_in_bytes").write_text(str(limit))  # no swapping either
        except OSError as e:
            print(f"# cannot create a memory cgroup ({e}); running uncapped", file=sys.stderr)
            if made:
                d.rmdir()
            return
        self.version, self.dir = version, d

    @staticmethod
    def describe(limit: int) -> str:
        cap = MemoryCap(limit)
        try:
            return cap.text()
        finally:
            cap.close()

    def text(self) -> str:
        if self.dir is None:
            return "none (no writable memory cgroup: peak RSS measured only)"
        knob = "memory.max" if self.version == "v2" else "memory.limit_in_bytes"
        return f"cgroup {self.version} {knob} = {self.limit / GiB:.2f} GiB, swap off"

    def enter(self) -> None:
        """Run in the child before exec: move it into the cgroup."""
        if self.dir is not None:
            (self.dir / "cgroup.procs").write_text(str(os.getpid()))

    def events(self) -> dict[str, int]:
        if self.dir is None:
            return {}
        out = {}
        if self.version == "v2":
            peak = self.dir / "memory.peak"
            if peak.exists():
                out["cgroup_peak"] = int(peak.read_text())
            for line in (self.dir / "memory.events").read_text().splitlines():
                k, v = line.split()
                out[k] = int(v)
        else:
            out["cgroup_peak"] = int((self.dir / "memory.max_usage_in_bytes").read_text())
            out["failcnt"] = int((self.dir / "memory.failcnt").read_text())
            for line in (self.dir / "memory.oom_control").read_text().splitlines():
                k, v = line.split()
                if k == "oom_kill":
                    out[k] = int(v)
        return out

    def close(self) -> None:
        if self.dir is not None:
            # A cgroup that failed half-way (or that the system removed) is already gone.
            with contextlib.suppress(FileNotFoundError):
                self.dir.rmdir()
            self.dir = None


def run_capped(cmd: list[str], cap: MemoryCap) -> tuple[int, float, dict, str]:
    """(exit status, peak RSS bytes of the child, cgroup counters, stdout)."""
    proc = subprocess.Popen(cmd, preexec_fn=cap.enter, stdout=subprocess.PIPE, text=True)  # noqa: PLW1509
    out = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return proc.returncode, usage.ru_maxrss * 1024, cap.events(), out


# ----------------------------------------------------------------------------- the child


def child(args: argparse.Namespace) -> None:
    """Quantize ``args.folder`` (streamed, or in memory with ``--in-memory``); print JSON."""
    import warnings

    import torch

    # compile() warns that a few windows are too little calibration: expected here.
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    import qqq_compile as qc
    from qqq_compile.cli.common import return_freed_memory

    return_freed_memory()  # as the CLI does: this process is ours
    t0 = time.perf_counter()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    g = torch.Generator().manual_seed(1)
    calib = torch.randint(0, args.vocab, (args.calib, args.seq), generator=g)
    cfg = {"preset": args.preset, "calib": {"batch_size": args.batch_size}}
    if args.in_memory:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
        compiled = qc.compile(model, calib, cfg, progress=False)
        del model
    else:
        compiled = qc.compile(args.folder, calib, cfg, progress=False, streaming=True)
    t1 = time.perf_counter()
    rss_compile = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with torch.no_grad():
        logits = compiled(calib[:1, :32]).logits
    stats = getattr(compiled, "stream_stats", None)
    print(
        json.dumps(
            {
                "compile_s": t1 - t0,
                "rss_after_imports": base,
                "rss_peak_compile": rss_compile,
                "logits_finite": bool(torch.isfinite(logits).all()),
                "lowered": sum(1 for li in compiled.linears() if li.lowered),
                "compiled_bytes": compiled.weight_bytes(),
                "stream": stats.to_dict() if stats is not None else None,
            }
        )
    )


def demo(args: argparse.Namespace) -> None:
    """Peak RSS of `qqq-compile quantize demo` (optionally capped) against the float model."""
    float_bytes = 134_515_008 * 4  # SmolLM2-135M in fp32 (tied embedding counted once)
    cap = MemoryCap(int(args.cap_gib * GiB))
    flags = (" --no-step" if args.no_step else "") + (" --no-streaming" if args.no_streaming else "")
    what = f"`qqq-compile quantize demo --n-calib {args.calib}{flags}`"
    print(f"{what}; cap: {cap.text()}")
    with tempfile.TemporaryDirectory(prefix="qqq-memory-demo-", dir=args.workdir) as out:
        cmd = [sys.executable, "-m", "qqq_compile.cli.main", "quantize", "demo", "--n-calib", str(args.calib)]
        cmd += ["--seq-len", str(args.seq), "--out", str(args.demo_out or Path(out) / "art"), "--quiet"]
        cmd += flags.split()
        t0 = time.perf_counter()
        try:
            rc, peak, events, text = run_capped(cmd, cap)
        finally:
            cap.close()
    wall = time.perf_counter() - t0
    print(f"exit status {rc}, wall {wall:.0f} s: {text.strip().splitlines()[-1] if text.strip() else ''}")
    print(f"peak RSS {peak / GiB:.2f} GiB = {peak / float_bytes:.1f}x the fp32 model ({float_bytes / GiB:.2f} GiB)")
    if events:
        print(f"cgroup: {', '.join(f'{k} {v}' for k, v in events.items())}")


# ----------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=22)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--preset", default="rtn", help="rtn (default), gptq, qqq, ...")
    ap.add_argument("--calib", type=int, default=4, help="calibration windows")
    ap.add_argument("--batch-size", type=int, default=None, help="windows per calibration batch (default: auto)")
    ap.add_argument("--demo", action="store_true", help="measure `qqq-compile quantize demo` instead")
    ap.add_argument("--demo-out", default=None, metavar="DIR", help="--demo: write the artifact here (kept)")
    ap.add_argument("--no-step", action="store_true", help="--demo: quantize without building the decode step")
    ap.add_argument(
        "--no-streaming", action="store_true", help="--demo: load the model whole (the CLI streams 'demo' by default)"
    )
    ap.add_argument("--seq", type=int, default=None, help="tokens per calibration window (64; --demo: 512)")
    ap.add_argument("--cap-gib", type=float, default=2.0, help="memory cap for the quantizing process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", default=None, help="where to write the model (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the written model")
    ap.add_argument("--baseline", action="store_true", help="also run the in-memory compile under the cap")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--in-memory", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.seq = args.seq or (512 if args.demo else 64)
    if args.child:
        child(args)
        return
    sys.stdout.reconfigure(line_buffering=True)  # progress shows when redirected to a file
    if args.demo:
        demo(args)
        return

    work = Path(tempfile.mkdtemp(prefix="qqq-memory-", dir=args.workdir))
    folder = work / "model"
    try:
        cfg = llama_config(args)
        t0 = time.perf_counter()
        size = write_random_llama(folder, cfg)
        t_write = time.perf_counter() - t0
        params = size // 4
        shape = f"{args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, vocab {args.vocab}"
        print(f"model: random LLaMA, {shape}")
        print(f"  {params / 1e9:.2f} B parameters, {size / GiB:.2f} GiB fp32 on disk (written in {t_write:.0f} s)")
        print(f"cap: {MemoryCap.describe(int(args.cap_gib * GiB))}")
        base = [sys.executable, os.path.abspath(__file__), "--child", "--folder", str(folder)]
        for k in ("vocab", "preset", "calib", "seq", "threads"):
            base += [f"--{k}", str(getattr(args, k))]
        if args.batch_size is not None:
            base += ["--batch-size", str(args.batch_size)]
        runs = [("streaming", base)] + ([("in-memory", [*base, "--in-memory"])] if args.baseline else [])
        for name, cmd in runs:
            cap = MemoryCap(int(args.cap_gib * GiB))  # a fresh cgroup per run: its peak is this run's
            t0 = time.perf_counter()
            try:
                rc, peak, events, out = run_capped(cmd, cap)
            finally:
                cap.close()
            wall = time.perf_counter() - t0
            print(f"\n{name} compile, preset {args.preset}, {args.calib} x {args.seq} calibration tokens:")
            print(
                f"  exit status {rc}, wall {wall:.0f} s, peak RSS (ru_maxrss) {peak / GiB:.2f} GiB "
                f"= {peak / size:.0%} of the fp32 model"
            )
            if events:
                print(f"  cgroup: {', '.join(f'{k} {v}' for k, v in events.items())}")
            if rc != 0 or not out.strip():
                print("  the process failed (killed by the cap?)")
                continue
            r = json.loads(out.strip().splitlines()[-1])
            print(
                f"  compile {r['compile_s']:.0f} s; RSS after imports {r['rss_after_imports'] / GiB:.2f} GiB, "
                f"peak during compile {r['rss_peak_compile'] / GiB:.2f} GiB"
            )
            print(
                f"  {r['lowered']} linears lowered to W4A8, compiled model holds "
                f"{r['compiled_bytes'] / GiB:.2f} GiB, logits finite: {r['logits_finite']}"
            )
            s = r["stream"]
            if s:
                print(
                    f"  float weights alive at once: peak {s['peak_bytes'] / 2**20:.0f} MiB "
                    f"(largest block {s['block_bytes'] / 2**20:.0f} MiB, {s['peak_blocks']} block(s) at once); "
                    f"read {s['bytes_read'] / GiB:.2f} GiB, spilled {s['bytes_spilled'] / 2**20:.0f} MiB"
                )
    finally:
        if args.keep:
            print(f"model kept in {folder}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
