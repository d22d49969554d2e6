"""benchmarks/generate_speed.py: worker protocol, round-robin, failure rows, timing definitions.

Real engines are too slow for tests; ``FakeEngine`` below runs in the same worker
processes the benchmark uses (this module is importable there through PYTHONPATH).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import generate_speed as gs  # noqa: E402
from engines.report import agreement, render, summarize  # noqa: E402
from engines.worker import TokenClock  # noqa: E402

STEP_S = 0.01


class FakeEngine:
    """Sleeps ``STEP_S`` per decode step; token t of a row is ``last prompt id + t``."""

    def __init__(self, fail_batch=False, fail_load=False, crash_after=None, offset=0):
        self.fail_batch, self.fail_load, self.crash_after, self.offset = fail_batch, fail_load, crash_after, offset
        self.calls = 0

    def load(self, options):
        if self.fail_load:
            raise RuntimeError("no such model")
        return {"weight_bytes": 10**6, "threads": options["threads"]}

    def generate(self, prompts, max_new, clock):
        self.calls += 1
        if self.crash_after is not None and self.calls > self.crash_after:
            os._exit(3)  # a segfault-like death: no reply at all
        if self.fail_batch and len(prompts) > 1:
            raise ValueError("batch size 1 only")
        time.sleep(2 * STEP_S)  # "prefill"
        clock.tick()
        for _ in range(max_new - 1):
            time.sleep(STEP_S)
            clock.tick()
        return [[p[-1] + t + (self.offset if t >= 2 else 0) for t in range(max_new)] for p in prompts]


def spec(**kwargs) -> gs.EngineSpec:
    return gs.EngineSpec(f"{__name__}:FakeEngine", kwargs)


@pytest.fixture
def worker_path(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))


def test_round_robin_with_failing_engines(worker_path, tmp_path):
    engines = {
        "hf-fp32": spec(),
        "other": spec(offset=1),  # diverges from the reference at token 2
        "nobatch": spec(fail_batch=True),
        "badload": spec(fail_load=True),
        "crashes": spec(crash_after=3),  # 2 warm-ups, 1 timed run, then dies
    }
    cases = {"b1": [[5, 6, 7, 8]], "b8": [[1, 2]] * 8}
    raw = gs.run(
        engines, cases, {"threads": 1}, reps=2, max_new=6, llamacpp_venv=tmp_path, log_dir=tmp_path, bandwidth=False
    )
    e = raw["engines"]
    assert e["badload"]["status"] == "failed: RuntimeError: no such model"
    assert all(len(e["hf-fp32"]["runs"][c]) == 2 for c in cases)
    run = e["hf-fp32"]["runs"]["b8"][0]
    assert run["new_tokens"] == 6 and run["tokens"][0] == [2, 3, 4, 5, 6, 7]
    # 5 decode steps of STEP_S each, 8 rows per step; sleep only overshoots.
    assert 0.5 * 8 / STEP_S < run["decode_tok_s"] <= 8 / STEP_S
    assert run["ttft_s"] >= 2 * STEP_S and run["prefill_tok_s"] == pytest.approx(16 / run["ttft_s"])
    assert "exited with code 3" in e["crashes"]["error_b8"] and len(e["crashes"]["runs"]["b1"]) == 1

    summary = summarize(e, bandwidth=2e9)
    s = summary["engines"]
    assert s["nobatch"]["cases"]["b1"]["status"] == "ok"
    assert s["nobatch"]["cases"]["b8"]["status"] == "n/a: ValueError: batch size 1 only"
    assert s["crashes"]["cases"]["b8"]["status"].startswith("failed: worker exited with code 3")
    assert s["other"]["cases"]["b1"]["decode_tok_s_vs"]["hf-fp32"] == pytest.approx(
        s["other"]["cases"]["b1"]["decode_tok_s"] / s["hf-fp32"]["cases"]["b1"]["decode_tok_s"]
    )
    assert s["hf-fp32"]["floor_ms_per_step"] == pytest.approx(0.5)  # 1 MB at 2 GB/s
    assert s["hf-fp32"]["cases"]["b8"]["ceiling_tok_s"] == pytest.approx(8 * 2000)

    agree = agreement(e, reference="hf-fp32", first=4)
    assert agree["engines"]["other"]["b1"]["leading_agree_per_row"] == [2]
    assert agree["engines"]["nobatch"]["b1"]["leading_agree_per_row"] == [4]
    meta = {"cases": {"b1": {"rows": 1, "prompt_len": 4}, "b8": {"rows": 8, "prompt_len": 2}}, "started": "now"}
    meta["args"] = {"reps": 2, "threads": 1, "new_tokens": 6}
    text = render(summary, agree, meta)
    assert "| badload | failed: RuntimeError: no such model |" in text
    assert "| nobatch | n/a: ValueError: batch size 1 only |" in text
    assert "leading tokens equal per row [2] of 4" in text


def test_missing_llamacpp_venv_is_a_failed_row(tmp_path):
    raw = gs.run(
        {"llamacpp-q4_1": gs.ENGINES["llamacpp-q4_1"]},
        {"b1": [[1, 2]]},
        {"threads": 1},
        reps=1,
        max_new=2,
        llamacpp_venv=tmp_path / "nowhere",
        log_dir=tmp_path,
        bandwidth=False,
    )
    assert "setup.sh llamacpp" in raw["engines"]["llamacpp-q4_1"]["status"]


def test_clock_timing_definitions():
    clock = TokenClock()
    clock.start, clock.ticks = 10.0, [10.5, 10.6, 10.8]
    t = clock.timings(batch=2, prompt_tokens=100)
    assert t["ttft_s"] == pytest.approx(0.5) and t["prefill_tok_s"] == pytest.approx(200)
    assert t["decode_tok_s"] == pytest.approx(2 * 2 / 0.3)  # rows x (new - 1) / (last - first)
    assert t["step_ms"] == pytest.approx([100, 200])


def test_ours_without_generate_fails_with_the_api_it_needs(monkeypatch):
    from engines.torch_engines import OursEngine

    import qqq_compile

    monkeypatch.setattr(qqq_compile, "load", lambda path: object())
    with pytest.raises(RuntimeError, match=r"has no generate\(\) yet.*runtime="):
        OursEngine("aot").load({"threads": 1, "artifact": "somewhere"})


def test_unknown_engine_is_refused(capsys):
    with pytest.raises(SystemExit):
        gs.parse_args(["--engines", "hf-fp32,nope"])
    assert "nope" in capsys.readouterr().err


def test_ours_fails_before_calibrating_when_the_api_is_missing(monkeypatch):
    from engines.torch_engines import OursEngine

    import qqq_compile.models

    monkeypatch.delattr(qqq_compile.CompiledModel, "generate", raising=False)
    monkeypatch.setattr(qqq_compile.models, "load_model", lambda *a, **k: pytest.fail("loaded the model first"))
    with pytest.raises(RuntimeError, match=r"CompiledModel has no generate\(\) yet"):
        OursEngine("eager").load({"threads": 1, "preset": "rtn", "calib_windows": 1})


class NotesEngine(FakeEngine):
    """A FakeEngine that reports something about each generation (``run_notes``)."""

    def run_notes(self):
        return {"paths_prefill": {"team": self.calls}}


def test_int8_probe_and_engine_notes_land_in_each_run(worker_path, tmp_path):
    engines = {"hf-fp32": spec(), "noted": gs.EngineSpec(f"{__name__}:NotesEngine")}
    cases = {"b1": [[5, 6, 7, 8]]}
    raw = gs.run(
        engines, cases, {"threads": 1}, reps=3, max_new=4, llamacpp_venv=tmp_path, log_dir=tmp_path, probe=True
    )
    e = raw["engines"]
    for name in engines:
        runs = e[name]["runs"]["b1"]
        assert len(runs) == 3 and all(r["int8_probe_ms"] > 0 for r in runs)
    # One warm-up call at load, then one per timed run: each run's notes are its own call's.
    assert [r["paths_prefill"]["team"] for r in e["noted"]["runs"]["b1"]] == [2, 3, 4]
    assert "paths_prefill" not in e["hf-fp32"]["runs"]["b1"][0]

    summary = summarize(e, bandwidth=None)
    c = summary["engines"]["noted"]["cases"]["b1"]
    runs = e["noted"]["runs"]["b1"]
    assert c["int8_probe_ms"] == [r["int8_probe_ms"] for r in runs]
    expected = sorted(1e3 * r["ttft_s"] / r["int8_probe_ms"] for r in runs)[1]
    assert c["ttft_per_probe"] == pytest.approx(expected)
    meta = {"cases": {"b1": {"rows": 1, "prompt_len": 4}}, "started": "now"}
    meta["args"] = {"reps": 3, "threads": 1, "new_tokens": 4}
    text = render(summary, agreement(e, reference="hf-fp32", first=4), meta)
    assert f"noted b1 {sorted(c['int8_probe_ms'])[1]:.1f}" in text and f"{expected:.2f}" in text


def test_the_path_streamer_splits_the_counts_at_the_first_new_token():
    from engines.torch_engines import _PathStreamer

    ticks = iter(range(100))
    counts = {"team": 0, "solo": 0, "stall": 0}

    def read():
        next(ticks)
        return dict(counts)

    clock = TokenClock()
    clock.begin()
    s = _PathStreamer(clock, read)
    counts["team"] += 5  # the prefill's calls
    s.put("prompt")
    counts.update(team=7, solo=8, stall=1)  # still the prefill: the first token is not out yet
    s.put("token 1")
    counts.update(team=20, solo=10, stall=1)
    s.put("token 2")
    s.end()
    assert len(clock.ticks) == 2
    assert s.notes() == {
        "paths_prefill": {"team": 7, "solo": 8, "stall": 1},
        "paths_decode": {"team": 13, "solo": 2, "stall": 0},
    }
