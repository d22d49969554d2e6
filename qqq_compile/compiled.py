"""``CompiledModel``: the callable ``compile()`` returns."""

from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule

from .graph import LinearInfo, info
from .report import Report


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

    def linears(self) -> list[LinearInfo]:
        """Per-linear facts (name, shape, format, method), in graph order."""
        out = []
        for n in self.graph_module.graph.nodes:
            li = info(n)
            if isinstance(li, LinearInfo):
                out.append(li)
        return out

    def save(self, path: str, tokenizer: Any = None) -> None:
        """Write packed weights + manifest atomically (see :mod:`qqq_compile.artifact`)."""
        from .artifact import save

        save(self, path, tokenizer=tokenizer)

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
