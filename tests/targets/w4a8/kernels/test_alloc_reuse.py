"""The reusing CPU allocator (csrc/alloc_cpu.cpp): freed tensors of 256 KB or more go back,
whole, to the next request of the same size; the cache stays under its cap; removing it
restores torch's allocator and leaves the tensors it handed out valid.

Stats: ``[installed, cached bytes, live blocks, live bytes, reuses, maps, unmaps]``.
"""

from __future__ import annotations

import os

import pytest
import torch

from qqq_compile.compiler.block_runner import BlockRunner
from qqq_compile.compiler.calibration import calib_batches
from qqq_compile.compiler.capture import capture
from qqq_compile.targets.w4a8.kernels import cpu
from qqq_compile.targets.w4a8.kernels.cpu import AllocationReuse, loaded_extension, memory_limit
from tests.conftest import tiny_calib, tiny_model

pytestmark = pytest.mark.usefixtures("cpp_kernels")
MB = 1 << 20


def stats() -> dict[str, int]:
    keys = ("installed", "cached", "live", "live_bytes", "reuses", "maps", "unmaps")
    return dict(zip(keys, loaded_extension().alloc_cache_stats(), strict=True))


@pytest.fixture
def ext():
    ext = loaded_extension()
    assert not stats()["installed"], "a previous test left the allocator installed"
    yield ext
    ext.set_alloc_cache(0)


def test_a_freed_block_is_handed_back_to_the_next_request_of_its_size(ext):
    assert ext.set_alloc_cache(64 * MB)
    a = torch.randn(512, 1024)  # 2 MB: the allocator's
    ptr, before = a.data_ptr(), stats()
    assert before["live"] >= 1
    del a
    assert stats()["cached"] == 2 * MB
    b = torch.empty(512, 1024)
    after = stats()
    assert b.data_ptr() == ptr and after["reuses"] == before["reuses"] + 1 and after["maps"] == before["maps"]
    b.fill_(3.0)  # writable, whole
    assert float(b.sum()) == 3.0 * b.numel()
    small = torch.empty(1000)  # 4 KB: torch's own allocator, not counted
    assert stats()["live"] == after["live"] and small.numel() == 1000
    other = torch.empty(3 * MB // 4, dtype=torch.float32)  # 3 MB, none cached: a fresh mapping
    assert other.data_ptr() != ptr and stats()["maps"] == after["maps"] + 1
    del b
    smaller = torch.empty(MB // 4 + 1000)  # 1 MB + 4 KB: the cached 2 MB block is more than 1.5x
    assert smaller.data_ptr() != ptr and stats()["maps"] == after["maps"] + 2
    shrunk = torch.empty(3 * MB // 8)  # 1.5 MB fits the cached 2 MB block (at most 1.5x): reused
    assert shrunk.data_ptr() == ptr and stats()["reuses"] == after["reuses"] + 1


def test_the_cache_stays_under_its_cap(ext):
    assert ext.set_alloc_cache(5 * MB)
    ts = [torch.empty(MB // 4 * (i + 1), dtype=torch.float32) for i in range(4)]  # 1, 2, 3, 4 MB
    unmaps = stats()["unmaps"]
    del ts
    s = stats()
    assert s["cached"] <= 5 * MB and s["unmaps"] > unmaps
    big = torch.empty(8 * MB // 4)  # larger than the whole cache: unmapped when freed
    del big
    assert stats()["cached"] <= 5 * MB


def test_removing_it_restores_torch_and_keeps_handed_out_tensors_valid(ext):
    assert ext.set_alloc_cache(64 * MB)
    keep = torch.arange(MB // 2, dtype=torch.float32)  # 2 MB, ours
    spare = torch.empty(MB // 2)
    del spare  # cached
    live = stats()["live"]
    assert not ext.set_alloc_cache(0)
    s = stats()
    assert not s["installed"] and s["cached"] == 0
    maps = s["maps"]
    fresh = torch.empty(MB)  # torch's allocator again
    assert stats()["maps"] == maps and fresh.numel() == MB
    assert torch.equal(keep, torch.arange(MB // 2, dtype=torch.float32))
    del keep  # unmapped, not cached
    assert stats()["live"] == live - 1 and stats()["cached"] == 0


def test_allocation_reuse_scopes_nest_and_only_the_owner_removes_it(ext):
    outer, inner = AllocationReuse(16 * MB), AllocationReuse(16 * MB)
    assert outer.start() and outer.start()  # again: still the owner
    assert not inner.start()  # the outer scope owns it
    inner.stop()
    assert stats()["installed"]
    outer.stop()
    assert not stats()["installed"]
    assert not AllocationReuse(0).start() and not stats()["installed"]


def test_a_device_scope_installs_on_the_cpu_only_and_removes_on_exit(ext):
    with AllocationReuse.for_device(torch.device("cpu")) as scope:
        assert scope.owner and stats()["installed"]
    assert not stats()["installed"]
    with AllocationReuse.for_device(torch.device("meta")) as scope:  # not the CPU: nothing
        assert not scope.owner and not stats()["installed"]


def test_a_bad_cap_is_refused(ext):
    with pytest.raises(RuntimeError, match="byte count"):
        ext.set_alloc_cache(-1)


# ----------------------------------------------------------------------------- calibration's cap


def _write(path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_limit_reads_the_lowest_cgroup_limit_on_the_path(tmp_path):
    """v1 (memory controller, a parent lower than the leaf) and v2 ("max" when unlimited);
    the machine's RAM bounds both; an unreadable file is skipped."""
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    v1 = tmp_path / "v1"
    _write(v1 / "proc", "9:name=systemd:/\n4:cpu,cpuacct:/a/b\n3:memory:/a/b\n")
    _write(v1 / "fs/memory/a/b/memory.limit_in_bytes", str(3 << 30))
    _write(v1 / "fs/memory/a/memory.limit_in_bytes", str(2 << 30))
    _write(v1 / "fs/memory/memory.limit_in_bytes", "9223372036854771712")
    assert memory_limit(str(v1 / "proc"), str(v1 / "fs")) == min(ram, 2 << 30)
    v2 = tmp_path / "v2"
    _write(v2 / "proc", "0::/user.slice/job\n")
    _write(v2 / "fs/user.slice/job/memory.max", "max\n")
    _write(v2 / "fs/user.slice/memory.max", f"{1 << 30}\n")
    assert memory_limit(str(v2 / "proc"), str(v2 / "fs")) == min(ram, 1 << 30)
    assert memory_limit(str(tmp_path / "missing"), str(tmp_path)) == ram


def test_calibration_keeps_at_most_a_sixteenth_of_the_memory(monkeypatch):
    """512 MB on a roomy machine; under a 3 GiB cgroup 192 MB (the 1.1B shape peaked 0.38 GiB
    higher with 512 MB there, no faster); what the block runner installs follows it."""
    assert cpu.calib_reuse_bytes(64 << 30) == cpu.CALIB_REUSE_BYTES == 512 << 20
    assert cpu.calib_reuse_bytes(3 << 30) == 192 << 20
    monkeypatch.setattr(cpu, "memory_limit", lambda: 1 << 30)
    assert cpu.calib_reuse_bytes() == 64 << 20
    caps = []
    real = cpu.AllocationReuse.__init__

    def spy(self, cap=None):
        caps.append(cap)
        real(self, cap)

    monkeypatch.setattr(cpu.AllocationReuse, "__init__", spy)
    gm = capture(tiny_model("llama"), torch.randint(0, 256, (1, 8))).graph_module
    runner = BlockRunner(gm, calib_batches(tiny_calib(2, seq=16), batch_size=2), progress=False)
    for _ in runner.blocks():
        pass
    assert caps == [64 << 20]
