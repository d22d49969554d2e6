"""Calibration data: token-id windows for LMs, forward calls for every other module."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import qqq_compile as qc
from qqq_compile.compiler.calibration import (
    BATCH_ACT_BYTES,
    DEFAULT_BATCH_SIZE,
    MAX_BATCH_TOKENS,
    auto_batch_size,
    calib_batches,
    check_calib,
    example_call,
    takes_token_ids,
    widest_linear,
)
from qqq_compile.config import CalibConfig
from tests.conftest import tiny_model


def test_token_windows_are_rebatched_by_length():
    rows = [torch.zeros(1, 8, dtype=torch.long)] * 5 + [torch.zeros(1, 4, dtype=torch.long)] * 2
    batches = calib_batches(rows, batch_size=2)
    assert [tuple(b["input_ids"].shape) for b in batches] == [(2, 8), (2, 8), (1, 8), (2, 4)]
    assert qc.calib_batches is calib_batches  # still exported at the top level


def test_batches_are_sized_to_the_model():
    """batch_size=None (CalibConfig's default): windows per batch from the widest linear
    (the lm_head aside) and the window length: one batch's widest activation near
    BATCH_ACT_BYTES, at most MAX_BATCH_TOKENS tokens, at least one window."""
    assert CalibConfig().batch_size is None
    llama = tiny_model("llama")  # hidden 64, MLP 160, vocab 256 (the lm_head is wider)
    assert widest_linear(llama) == 160 and widest_linear(None) is None
    rows = [torch.zeros(1, 32, dtype=torch.long)] * 300
    batches = calib_batches(rows, model=llama)
    assert [len(b["input_ids"]) for b in batches] == [256, 44]  # 8192 tokens / 32 per window
    # SmolLM2 (MLP 1536) at 512 tokens: 10 windows (31.5 MB, under glibc's 32 MB mmap
    # ceiling); a 7B's MLP (11008) and a 70B's: 1; a tiny model: MAX_BATCH_TOKENS.
    assert BATCH_ACT_BYTES == 32 << 20
    assert auto_batch_size(512, 1536) == BATCH_ACT_BYTES // (4 * 1536) // 512 == 10
    assert 10 * 512 * 1536 * 4 < BATCH_ACT_BYTES < 11 * 512 * 1536 * 4
    assert auto_batch_size(512, 11008) == 1 and auto_batch_size(512, 28672) == 1
    assert auto_batch_size(4096, 1536) == 1 and auto_batch_size(32, 160) == MAX_BATCH_TOKENS // 32
    assert auto_batch_size(512, None) == DEFAULT_BATCH_SIZE
    assert [len(b["input_ids"]) for b in calib_batches(rows[:20])] == [8, 8, 4]  # no model: the default
    assert [len(b["input_ids"]) for b in calib_batches(rows[:5], batch_size=2)] == [2, 2, 1]


def test_lm_refuses_float_and_one_token_windows():
    llama = tiny_model("llama")
    with pytest.raises(TypeError, match="integer token ids"):
        calib_batches([torch.randn(1, 8)], model=llama)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        calib_batches([torch.zeros(4, 1, dtype=torch.long)], model=llama)


def test_vocab_range_is_checked_for_token_batches_only():
    llama = tiny_model("llama")
    with pytest.raises(ValueError, match="token id 300 is out of range"):
        check_calib(llama, [{"input_ids": torch.full((2, 8), 300)}])
    check_calib(nn.Linear(4, 4), [{0: torch.randn(2, 4) * 1e6}])  # a call: no vocabulary, nothing to check


@pytest.mark.parametrize(
    "calib,expect",
    [
        (torch.randn(64, 16), [[0]]),  # a tensor given directly: one call
        ([torch.randn(8, 16), torch.randn(4, 16)], [[0], [0]]),  # a list of calls
        ((torch.randn(8, 16), torch.randn(8, 16)), [[0, 1]]),  # a tuple: one call's positional args
        ({"x": torch.randn(8, 16)}, [["x"]]),  # keyword args
        ([((torch.randn(8, 16),), {"mask": torch.ones(8, 16)})], [[0, "mask"]]),  # (args, kwargs)
    ],
)
def test_calls_for_modules_without_token_ids(calib, expect):
    batches = calib_batches(calib, batch_size=2, model=nn.Linear(16, 16))
    assert [list(b) for b in batches] == expect
    leaves = [v for b in batches for v in b.values()]
    assert all(isinstance(v, torch.Tensor) and v.shape[0] in (4, 8, 64) for v in leaves)  # batch_size left alone


def test_call_checks():
    with pytest.raises(ValueError, match="empty"):
        calib_batches([], model=nn.Linear(2, 2))
    with pytest.raises(ValueError, match="empty tensor"):
        calib_batches([torch.randn(0, 2)], model=nn.Linear(2, 2))
    with pytest.raises(TypeError, match="item 1 is a str"):
        calib_batches([torch.randn(2, 2), "text"], model=nn.Linear(2, 2))
    assert len(calib_batches([torch.randn(2, 2)] * 5, max_samples=3, model=nn.Linear(2, 2))) == 3


def test_which_data_is_token_ids():
    ids = [torch.randint(0, 9, (1, 8))]
    assert takes_token_ids(tiny_model("llama"), [torch.randn(1, 8)])  # a vocabulary: always token ids
    assert takes_token_ids(None, ids) and not takes_token_ids(None, [torch.randn(1, 8)])
    assert not takes_token_ids(nn.Embedding(9, 4), ids)  # forward(input): integer data is a call
    assert takes_token_ids(None, "wikipedia")


def test_example_call():
    tok = [{"input_ids": torch.arange(64).reshape(2, 32)}]
    (ex,) = example_call(tok).values()
    assert ex.shape == (2, 16) and ex.is_contiguous()
    x, m = torch.randn(3, 4), torch.ones(3, 4)
    assert example_call([{0: x, "mask": m}]) == ((x,), {"mask": m})


def test_graph_inputs_map_positions_to_names_and_check_shapes():
    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x, mask):
            return self.fc(x) * mask

    cap = qc.capture(Masked(), ((torch.randn(4, 8),), {"mask": torch.ones(4, 8)}))
    assert cap.input_names == ["x", "mask"] and cap.positional_names == ["x", "mask"]
    x, m = torch.randn(5, 8), torch.ones(5, 8)
    assert cap.graph_inputs({0: x, 1: m}).keys() == {"x", "mask"}
    assert cap.graph_inputs({0: x, "mask": m})["x"] is x
    with pytest.raises(ValueError, match=r"\['mask'\] missing"):
        cap.graph_inputs({0: x})
    with pytest.raises(ValueError, match=r"\['y'\] not captured"):
        cap.graph_inputs({0: x, "mask": m, "y": m})
    with pytest.raises(ValueError, match=r"shape \[5, 9\], but the graph takes \['\*', 8\]"):
        cap.graph_inputs({0: torch.randn(5, 9), "mask": m})
