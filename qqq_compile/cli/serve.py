"""``qqq-compile serve``: an OpenAI-compatible HTTP server for a saved artifact.

The server itself is :mod:`qqq_compile.runtime.server`; this module parses the flags,
loads the artifact and its tokenizer, builds the decode step and runs uvicorn.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qqq_compile.runtime.steps import RUNTIMES


def add_command(
    add: Callable[[str, str, str], argparse.ArgumentParser], steps: type, load_artifact: Callable[..., Any]
) -> None:
    """Register ``serve`` on the CLI's sub-parser factory ``add`` (``steps`` and
    ``load_artifact`` are the CLI's helpers, handed down as for ``generate``)."""
    s = add(
        "serve",
        "serve an artifact over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions)",
        "example:\n  qqq-compile serve smollm2-w4a8 --port 8000 --max-batch 8\n"
        "  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "smollm2-w4a8", "prompt": "The capital of France is", "max_tokens": 16}\'',
    )
    s.add_argument("artifact", metavar="DIR", help="artifact folder written by 'quantize'")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    s.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (default: 8)")
    s.add_argument("--max-len", type=int, default=None, metavar="N", help="context: prompt + new tokens (default 2048)")
    s.add_argument("--runtime", choices=("auto", *RUNTIMES), default="auto", help="decode step (default: auto)")
    s.add_argument("--max-queue", type=int, default=64, metavar="N", help="waiting requests before 429 (default: 64)")
    s.add_argument(
        "--batch-window-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="an idle server waits this long for more requests to start together (default: 10)",
    )
    s.add_argument(
        "--max-tokens-cap", type=int, default=None, metavar="N", help="largest max_tokens (default: max-len)"
    )
    s.add_argument("--model-name", default=None, help="the model id clients send (default: the artifact folder's name)")
    s.add_argument("--tokenizer", metavar="MODEL", help="tokenizer to use if the artifact has none")
    s.set_defaults(func=cmd_serve, steps=steps, load_artifact=load_artifact)


def _import_server() -> Any:
    try:
        import uvicorn

        from qqq_compile.runtime import server
    except ImportError as e:
        raise RuntimeError(
            f"'serve' needs the package '{e.name}', which is not installed: pip install 'qqq-compile[serve]'"
        ) from e
    return server, uvicorn


def cmd_serve(args: argparse.Namespace) -> int:
    from qqq_compile.cli.common import positive

    for name in ("max_batch", "max_queue", "port"):
        positive("--" + name.replace("_", "-"), getattr(args, name))
    server_mod, uvicorn = _import_server()
    steps = args.steps(2, args.quiet)
    with steps(f"loading {args.artifact}"):
        compiled, tok = args.load_artifact(args.artifact, args.tokenizer, need_tokenizer=True)
    name = args.model_name or Path(args.artifact).expanduser().resolve().name
    config = server_mod.ServeConfig(model_name=name, max_tokens_cap=args.max_tokens_cap)
    with steps(f"building the decode step ({args.max_batch} rows, runtime: {args.runtime})"):
        srv = server_mod.OpenAIServer.from_compiled(
            compiled,
            tok,
            config,
            max_batch=args.max_batch,
            max_len=args.max_len,
            runtime=args.runtime,
            max_queue=args.max_queue,
            batch_window_s=args.batch_window_ms / 1000,
            progress=not args.quiet,
        )
    st = srv.engine.stats()
    print(
        f"serving '{name}' on http://{args.host}:{args.port}/v1 ({st['rows']} rows x {st['max_len']} positions, "
        f"runtime {st['runtime']}); Ctrl-C stops",
        file=sys.stderr,
    )
    # What startup made (torch, transformers, the model's graph: ~400 k tracked objects for
    # SmolLM2) lives as long as the server: frozen, a full collection scans only what serving
    # allocates (one took ~210 ms, about once per 1,000 decode steps, stalling every row).
    gc.collect()
    gc.freeze()
    try:
        uvicorn.run(
            server_mod.create_app(srv), host=args.host, port=args.port, log_level="warning" if args.quiet else "info"
        )
    finally:
        srv.close()
    return 0


__all__ = ["add_command", "cmd_serve"]
