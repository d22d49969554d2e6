"""``CompiledModel``: the callable ``compile()`` returns."""

from __future__ import annotations

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
        # An inference model: the packed ops have no backward, and a call outside no_grad
        # would otherwise keep an autograd graph of every float op's inputs alive.
        for p in graph_module.parameters():
            p.requires_grad_(False)
        self.graph_module = graph_module
        self.input_names = list(input_names)
        self.output_kind = output_kind
        self.report = report or Report()
        self.model_config = model_config
        self.model_class = model_class
        self.source_graph = source_graph  # readable graph before the pipeline (for reports)
        # Decode steps (prepare_generation's, and the one generate() builds on first use): one
        # step serves every request that fits its rows and positions; several may coexist
        # (say 1 and 8 rows: a one-row step has a static batch and decodes faster).
        self._steps: list[Any] = []
        # Where AOT packages of this graph live: an artifact's step/ folder (load() sets it),
        # searched before $QQQ_CACHE/aot; new packages go to the first writable of the two.
        self.aot_dir: str | None = None
        self.step_size: tuple[int, int] | None = None  # (rows, positions) of the artifact's shipped step

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

    @property
    def device(self) -> torch.device:
        """Where the graph module's tensors live (its first parameter, else buffer; torch's
        default device when it has none): :meth:`generate` makes its ids, masks and
        positions there."""
        from qqq_compile.runtime.kv_cache import graph_device

        return graph_device(self.graph_module)

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

        ``max_len`` (prompt + new tokens) defaults to the size of the step an artifact ships,
        else the model's context capped at :data:`~qqq_compile.runtime.generate.DEFAULT_MAX_LEN`
        (2048); an AOT request for fewer positions than the shipped step (same rows, default
        cache dtype) gets the shipped step, which serves every shorter length, instead of a
        compile. ``runtime``: ``"eager"`` (FX, the reference), ``"aot"`` (AOTInductor, C++; its
        package is looked up beside the artifact and in ``$QQQ_CACHE``, compiled once if
        absent) or ``"auto"`` (AOT, falling back to eager with a warning if it cannot be
        built). Several steps may be prepared (say ``max_batch=1`` and ``max_batch=8``: a
        one-row step has a static batch and decodes faster); :meth:`generate` takes the
        smallest that fits each request, the latest prepared among equals.
        A prompt's attention takes bf16 dot products with fp32 sums where the CPU has
        AVX512-BF16 (:func:`~qqq_compile.runtime.kv_cache.add_kv_cache`; 1.54x faster than fp32
        products per SmolLM2 layer, perplexity +0.059%), per row, so a serving engine's rows
        prefill bit for bit as :meth:`generate` does. ``cache_dtype=torch.bfloat16`` also keeps
        the KV cache in bf16 (half the bytes a decode step reads); greedy tokens can differ
        from the fp32 cache's where the top two logits nearly tie."""
        step = self._build_step(max_batch, max_len, runtime, package_dir, progress, cache_dtype)
        self._steps = [s for s in self._steps if (s.runtime, s.spec.max_batch, s.spec.max_len) != _size(step)]
        self._steps.append(step)
        return step

    @property
    def decode_steps(self) -> list[Any]:
        """The decode steps built so far (``step.describe()``: runtime, rows x positions)."""
        return list(self._steps)

    def default_max_len(self) -> int:
        """Positions of the step :meth:`generate` builds when none is prepared."""
        from qqq_compile.runtime.generate import default_max_len

        return self.step_size[1] if self.step_size else default_max_len(self.model_config)

    def package_dirs(self) -> list[str]:
        """Folders searched for AOT packages, in order (an artifact's step/, then the cache)."""
        from qqq_compile.runtime.steps import default_package_dir

        return [d for d in (self.aot_dir, str(default_package_dir())) if d]

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
        max_len = max_len or self.default_max_len()
        if limit is not None and max_len > limit:
            raise ValueError(
                f"max_len={max_len} exceeds this model's usable context of {limit} positions "
                f"(max_position_embeddings or its sliding window); use max_len <= {limit}"
            )
        choice = "aot" if runtime == "auto" else runtime
        shipped = self.step_size
        if choice == "aot" and cache_dtype is None and shipped and shipped[0] == max_batch and max_len < shipped[1]:
            # The artifact's step serves every length up to its own (its KV pages are only
            # resident as written): taking it costs nothing, a shorter one a compile.
            max_len = shipped[1]
        dirs = [package_dir] if package_dir is not None else self.package_dirs()
        kw = {"max_batch": max_batch, "max_len": max_len, "package_dir": dirs, "progress": progress}
        if cache_dtype is not None:
            kw["cache_dtype"] = cache_dtype
        try:
            step = build_step(self.graph_module, runtime=choice, **kw)
        except Exception as e:  # noqa: BLE001 - auto falls back to the reference path
            if runtime != "auto" or isinstance(e, ValueError):
                raise
            import warnings

            why = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
            warnings.warn(
                f"qqq_compile: the AOTInductor decode step could not be built ({why}); generating with the eager "
                "step, several times slower. runtime='aot' raises the error instead.",
                RuntimeWarning,
                stacklevel=3,
            )
            step = build_step(self.graph_module, runtime="eager", **kw)
            step.notes.append(f"AOT compile failed ({why}); running eager")
        for msg in [f"generation runtime: {step.describe()}", *step.notes]:
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
        ``return_dict_in_generate``).

        Uses a step from :meth:`prepare_generation`, or builds one on first use (``runtime``,
        default ``"auto"``: see there) sized for the model's whole usable context
        (:meth:`default_max_len`), so later, longer requests never build another. A request
        that fits no existing step is refused with the fix, except with ``runtime="eager"``
        (building an eager step compiles nothing)."""
        from qqq_compile.runtime.generate import GenerationError, SamplingConfig, context_limit
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
        if input_ids.dim() != 2 or input_ids.shape[-1] < 1:
            raise GenerationError(
                f"input_ids has shape {tuple(input_ids.shape)}: give [batch, tokens] with at least one prompt token"
            )
        need = input_ids.shape[-1] + max_new_tokens
        limit = context_limit(meta)
        if limit is not None and need > limit:
            raise GenerationError(
                f"the prompt ({input_ids.shape[-1]} tokens) plus max_new_tokens ({max_new_tokens}) is {need} "
                f"positions, more than this model's context of {limit}: shorten the prompt or lower max_new_tokens"
            )
        step = self._pick_step(input_ids.shape[0], need, runtime)
        if generator is None and seed is not None:
            generator = torch.Generator(device=step.device).manual_seed(seed)  # sampling runs on the step's device
        out = _generate(step, input_ids, attention_mask, cfg, streamer=streamer, generator=generator)
        return out if return_dict_in_generate else out.sequences

    def _pick_step(self, rows: int, need: int, runtime: str | None) -> Any:
        """The smallest step (of ``runtime``, if given) that fits ``rows`` x ``need``
        positions, the latest built among equals. Without one: with ``runtime="eager"``, or
        when no step of the runtime exists yet, a new step of :meth:`default_max_len`
        positions; otherwise the largest existing step (which refuses the request with the
        fix: a request never triggers a second AOT compile)."""
        wanted = None if runtime in (None, "auto") else runtime
        steps = [s for s in self._steps if wanted is None or s.runtime == wanted]
        fit = [i for i, s in enumerate(self._steps) if s in steps and _fits(s, rows, need)]
        if fit:
            return self._steps[min(fit, key=lambda i: (*_size(self._steps[i])[1:], -i))]
        if steps and wanted != "eager":
            return max(steps, key=lambda s: _size(s)[1:])
        size = max([rows, *(s.spec.max_batch for s in steps)])
        step = self._build_step(size, max(self.default_max_len(), need if wanted == "eager" else 0), runtime or "auto")
        self._steps.append(step)
        return step

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

    def save(self, path: str, tokenizer: Any = None, **options: Any) -> None:
        """Write packed weights + manifest atomically, with the AOT decode step unless
        ``prepare_step=False`` (see :func:`qqq_compile.artifact.save`).

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
        steps = f"; decode steps: {', '.join(s.describe() for s in self._steps)}" if self._steps else ""
        return f"CompiledModel({self.model_class or 'graph'}, {low}/{len(lin)} linears lowered to W4A8{steps})"


def _size(step: Any) -> tuple[str, int, int]:
    return step.runtime, step.spec.max_batch, step.spec.max_len


def _fits(step: Any, rows: int, need: int) -> bool:
    return step.spec.max_batch >= rows and step.spec.max_len >= need
