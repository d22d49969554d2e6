"""Compile: capture a model, build the pass list its config asks for, run it.

``api`` holds the entry points (:func:`~qqq_compile.compiler.api.compile`, ``compile_from_disk``);
``driver`` the one way a pipeline is built and run; ``pipeline`` the pass machinery;
``passes/`` the target-neutral passes and ``presets`` the named pass lists. This package's
``__init__`` imports nothing, so its low modules import without pulling in the high ones.
"""
