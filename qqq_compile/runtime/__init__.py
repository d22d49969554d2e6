"""Run a compiled model: the KV-cache rewrite (``kv_cache``), decode steps (``steps``),
the generate loop (``generate``), :class:`~qqq_compile.runtime.compiled.CompiledModel`
and the OpenAI-compatible server (``server``). Imports nothing by itself."""
