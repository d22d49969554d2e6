"""Generation engines for ``benchmarks/generate_speed.py``, each run in its own worker process.

``worker`` is stdlib-only: it is also started by the llama.cpp venv's python, which has
neither torch nor qqq_compile.
"""
