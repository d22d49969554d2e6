"""``CompiledModel``: the callable ``compile()`` returns."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch.fx import GraphModule

from qqq_compile.compiler.report import Note, Report
from qqq_compile.graph import LinearInfo, info
from qqq_compile.targets.registry import get_target


class CompiledModel(torch.nn.Module):
    """Behaves like the original model: same call signature for token inputs, and a
    Hugging Face output object (``.logits``) for causal LMs.

    * ``.graph_module``: the lowered FX graph (print it, run passes on it).
    * ``.report``: the pipeline's records and notes; ``qqq_compile.inspect`` renders it.
    """

    def __init__(
        self,
        graph_module: GraphModule,
        *,
        input_names: list[str],
        output_kind: str,
        report: Report | None = None,
        model_config: dict[str, Any] | None = None,
        model_class: str | None = None,
        source_graph: str | None = None,
    ):
        super().__init__()
        self.graph_module = graph_module
        self.input_names = list(input_names)
        self.output_kind = output_kind
        self.report = report or Report()
        self.model_config = model_config
        self.model_class = model_class
        self.source_graph = source_graph  # readable graph before the pipeline (for reports)
        # Decode steps: those prepare_generation built (kept as built, several sizes may
        # coexist: a batch-1 step is static in the batch and faster), and the one generate()
        # grows on demand when none was prepared.
        self._prepared: list[Any] = []
        self._auto_step: Any = None
        self.aot_dir: str | None = None  # where AOT packages go (an artifact's aot/; else the cache)

    def forward(self, input_ids: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        kwargs.pop("use_cache", None)
        kwargs.pop("return_dict", None)
        inputs = dict(zip(self.input_names, (input_ids, *args), strict=False))
        for k, v in kwargs.items():
            if k not in self.input_names:
                if k == "attention_mask" and isinstance(v, torch.Tensor) and bool(v.all()):
                    continue  # an all-ones mask changes nothing
                raise TypeError(
                    f"input '{k}' was not captured (captured inputs: {self.input_names}); "
                    f"capture with example_inputs that include '{k}'"
                )
            inputs[k] = v
        missing = [n for n in self.input_names if inputs.get(n) is None]
        if missing:
            raise TypeError(f"missing input(s) {missing}")
        return self.graph_module(**inputs)

    # ------------------------------------------------------------------ generation

    def prepare_generation(
        self,
        max_batch: int = 1,
        max_len: int | None = None,
        runtime: str = "auto",
        package_dir: str | None = None,
        progress: bool = True,
        cache_dtype: torch.dtype | None = None,
    ) -> Any:
        """Build the KV-cache decode step that :meth:`generate` uses (see :mod:`qqq_compile.runtime.steps`).

        ``max_len`` (prompt + new tokens) defaults to the model's context capped at 2048.
        ``runtime``: ``"eager"`` (FX, the reference), ``"aot"`` (AOTInductor, C++, cached on
        disk) or ``"auto"`` (AOT, falling back to eager with a report note if it cannot be
        built). A step prepared here is kept as built; several may be prepared (say
        ``max_batch=1`` and ``max_batch=8``: a one-row step has a static batch and decodes
        faster), and :meth:`generate` takes the smallest that fits each request. Requests
        that fit none are refused. ``cache_dtype=torch.bfloat16`` keeps the KV cache in bf16
        (:func:`~qqq_compile.runtime.kv_cache.add_kv_cache`)."""
        step = self._build_step(max_batch, max_len, runtime, package_dir, progress, cache_dtype)
        same = (step.runtime, step.spec.max_batch, step.spec.max_len)
        self._prepared = [s for s in self._prepared if (s.runtime, s.spec.max_batch, s.spec.max_len) != same]
        self._prepared.append(step)
        return step

    def _build_step(
        self,
        max_batch: int,
        max_len: int | None,
        runtime: str,
        package_dir: str | None = None,
        progress: bool = True,
        cache_dtype: torch.dtype | None = None,
    ) -> Any:
        from qqq_compile.runtime.generate import context_limit
        from qqq_compile.runtime.steps import RUNTIMES, build_step

        if runtime not in (*RUNTIMES, "auto"):
            raise ValueError(f"runtime={runtime!r} is not known; use 'auto', 'eager' or 'aot'")
        limit = context_limit(self.model_config)
        max_len = max_len or min(limit or 2048, 2048)
        if limit is not None and max_len > limit:
            raise ValueError(
                f"max_len={max_len} exceeds this model's usable context of {limit} positions "
                f"(max_position_embeddings or its sliding window); use max_len <= {limit}"
            )
        choice = "aot" if runtime == "auto" else runtime
        if package_dir is None and self.aot_dir and os.access(os.path.dirname(self.aot_dir), os.W_OK):
            package_dir = self.aot_dir
        kw = {"max_batch": max_batch, "max_len": max_len, "package_dir": package_dir, "progress": progress}
        if cache_dtype is not None:
            kw["cache_dtype"] = cache_dtype
        try:
            step = build_step(self.graph_module, runtime=choice, **kw)
        except Exception as e:  # noqa: BLE001 - auto falls back to the reference path
            if runtime != "auto" or isinstance(e, ValueError):
                raise
            step = build_step(self.graph_module, runtime="eager", **kw)
            step.notes.append(f"AOT compile failed ({type(e).__name__}: {str(e)[:200]}); running eager")
        for msg in [f"generation runtime: {step.runtime}", *step.notes]:
            self.report.notes.append(Note("generate", msg))
        return step

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        *,
        max_new_tokens: int = 32,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        repetition_penalty: float = 1.0,
        eos_token_id: int | list[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        runtime: str | None = None,
        return_dict_in_generate: bool = False,
    ) -> Any:
        """Generate like transformers' ``generate()``: returns ``[B, T + new]`` token ids
        (a :class:`~qqq_compile.runtime.generate.GenerateOutput` with timings when
        ``return_dict_in_generate``). Uses the step from :meth:`prepare_generation`, or
        builds one on first use (``runtime``, default ``"auto"``: see there), rebuilt larger
        when a request outgrows it."""
        from qqq_compile.runtime.generate import GenerationError, SamplingConfig
        from qqq_compile.runtime.generate import generate as _generate

        meta = self.model_config or {}
        eos = eos_token_id if eos_token_id is not None else meta.get("eos_token_id")
        pad = pad_token_id if pad_token_id is not None else meta.get("pad_token_id")
        cfg = SamplingConfig(max_new_tokens, do_sample, temperature, top_k, top_p, repetition_penalty, eos, pad)
        cfg.validate()
        if not isinstance(input_ids, torch.Tensor):
            raise GenerationError(
                "input_ids must be a LongTensor [batch, tokens] (tokenizer(..., return_tensors='pt'))"
            )
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
            attention_mask = attention_mask[None] if attention_mask is not None else None
        step = self._pick_step(input_ids.shape[0], input_ids.shape[-1] + max_new_tokens, runtime)
        if generator is None and seed is not None:
            generator = torch.Generator().manual_seed(seed)
        out = _generate(step, input_ids, attention_mask, cfg, streamer=streamer, generator=generator)
        return out if return_dict_in_generate else out.sequences

    def _pick_step(self, rows: int, need: int, runtime: str | None) -> Any:
        """The smallest prepared step that fits ``rows`` x ``need`` positions; with prepared
        steps but none fitting, the largest (which refuses the request with the fix);
        without any, the on-demand step, grown (never shrunk) to what requests needed."""
        prepared = [s for s in self._prepared if runtime is None or s.runtime == runtime]
        if prepared:
            fit = [s for s in prepared if s.spec.max_batch >= rows and s.spec.max_len >= need]
            size = lambda s: (s.spec.max_batch, s.spec.max_len)  # noqa: E731
            return min(fit, key=size) if fit else max(prepared, key=size)
        old = self._auto_step
        if old is not None and (runtime is None or old.runtime == runtime):
            if old.spec.max_len >= need and old.spec.max_batch >= rows:
                return old
        size = max(need, 512, old.spec.max_len if old else 0)  # 512 positions at least
        self._auto_step = self._build_step(max(rows, old.spec.max_batch if old else 1), size, runtime or "auto")
        return self._auto_step

    @property
    def target(self) -> Any:
        """The :class:`~qqq_compile.targets.registry.Target` this model was compiled for
        (from its report's config; ``w4a8`` for a model compiled before targets existed)."""
        return get_target(((self.report.config or {}).get("quant") or {}).get("target", "w4a8"))

    def linears(self) -> list[LinearInfo]:
        """Per-linear facts (name, shape, format, method), in graph order."""
        out = []
        for n in self.graph_module.graph.nodes:
            li = info(n)
            if isinstance(li, LinearInfo):
                out.append(li)
        return out

    def save(self, path: str, tokenizer: Any = None) -> None:
        """Write packed weights + manifest atomically (see :mod:`qqq_compile.artifact`).

        The work lives in the artifact layer, above this one: importing
        :mod:`qqq_compile.artifact` (``import qqq_compile`` does) installs it here, so no
        import points up."""
        raise RuntimeError("CompiledModel.save needs qqq_compile.artifact: import qqq_compile first")

    def weight_bytes(self) -> int:
        """Bytes of all parameters and buffers the compiled graph holds."""
        seen, total = set(), 0
        for t in list(self.graph_module.parameters()) + list(self.graph_module.buffers()):
            if t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
        return total

    def __repr__(self) -> str:
        lin = self.linears()
        low = sum(1 for li in lin if li.lowered)
        return f"CompiledModel({self.model_class or 'graph'}, {low}/{len(lin)} linears lowered to W4A8)"
