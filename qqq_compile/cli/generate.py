"""``qqq-compile generate`` and ``qqq-compile chat``: text from a saved W4A8 artifact.

Both stream tokens as they are produced (transformers' ``TextStreamer``) and end with
prefill and decode tokens/s; ``chat`` formats every turn with the tokenizer's chat
template and keeps the conversation.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from qqq_compile.runtime.steps import RUNTIMES


def add_commands(
    add: Callable[[str, str, str], argparse.ArgumentParser], steps: type, load_artifact: Callable[..., Any]
) -> None:
    """Register ``generate`` and ``chat`` on the CLI's sub-parser factory ``add``; ``steps``
    (progress lines) and ``load_artifact`` are the CLI's own helpers, handed down so this
    module does not import the CLI back."""
    g = add(
        "generate",
        "generate text from an artifact, streaming it, then print prefill and decode tokens/s",
        'example:\n  qqq-compile generate smollm2-w4a8 --prompt "The capital of France is" --max-new-tokens 64',
    )
    g.add_argument("artifact", metavar="DIR", help="artifact folder written by 'quantize'")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--chat-template", action="store_true", help="wrap the prompt as a user turn of the chat template")
    _sampling_args(g)
    g.set_defaults(func=cmd_generate, steps=steps, load_artifact=load_artifact)
    c = add(
        "chat",
        "interactive chat with an artifact through its tokenizer's chat template (empty line or Ctrl-D ends)",
        "example:\n  qqq-compile chat smollm2-w4a8 --system 'You are a helpful assistant.'",
    )
    c.add_argument("artifact", metavar="DIR", help="artifact folder written by 'quantize'")
    c.add_argument("--system", default=None, help="system prompt")
    _sampling_args(c)
    c.set_defaults(func=cmd_chat, steps=steps, load_artifact=load_artifact)


def _sampling_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, metavar="N", help="tokens to generate (default: 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy; > 0: sampling")
    p.add_argument("--top-k", type=int, default=None, metavar="K", help="sample from the K most likely tokens")
    p.add_argument("--top-p", type=float, default=None, metavar="P", help="nucleus sampling threshold")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="X", help="> 1 discourages repeats")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        metavar="N",
        help="KV cache positions (default: the artifact's decode step, else the model's context up to 2048)",
    )
    p.add_argument(
        "--runtime",
        choices=("auto", *RUNTIMES),
        default="auto",
        help="auto (default): the AOTInductor step the artifact ships (built once if absent), eager FX if it "
        "cannot be built",
    )
    p.add_argument("--tokenizer", metavar="MODEL", help="tokenizer to use if the artifact has none")


def _kwargs(args: argparse.Namespace) -> dict[str, Any]:
    sample = args.temperature > 0
    return {
        "max_new_tokens": args.max_new_tokens,
        "do_sample": sample,
        "temperature": args.temperature if sample else 1.0,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "return_dict_in_generate": True,
    }


def _prepare(args: argparse.Namespace) -> tuple[Any, Any]:
    steps = args.steps(2, args.quiet)
    with steps(f"loading {args.artifact}"):
        compiled, tok = args.load_artifact(args.artifact, args.tokenizer, need_tokenizer=True)
    with steps(f"preparing the decode step (runtime {args.runtime}: the artifact's own, else built once)"):
        compiled.prepare_generation(max_batch=1, max_len=args.max_len, runtime=args.runtime, progress=not args.quiet)
    return compiled, tok


def _require_template(tok: Any) -> None:
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            "the tokenizer has no chat template: use 'generate' without --chat-template, or pass "
            "--tokenizer MODEL with a tokenizer that has one"
        )


def _speed_line(out: Any) -> str:
    return (
        f"[{out.prompt_tokens} prompt tokens, {out.new_tokens} new; prefill {out.prefill_tokens_per_s:.1f} tok/s, "
        f"decode {out.decode_tokens_per_s:.1f} tok/s; runtime {out.runtime}]"
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    compiled, tok = _prepare(args)
    if args.chat_template:
        _require_template(tok)
        ids = tok.apply_chat_template(
            [{"role": "user", "content": args.prompt}], add_generation_prompt=True, return_tensors="pt"
        )
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    ids = getattr(ids, "input_ids", ids)
    streamer = TextStreamer(tok, skip_prompt=False, skip_special_tokens=True)
    out = compiled.generate(ids, streamer=streamer, eos_token_id=tok.eos_token_id, **_kwargs(args))
    print(_speed_line(out), file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from transformers import TextStreamer

    compiled, tok = _prepare(args)
    _require_template(tok)
    messages: list[dict[str, str]] = [{"role": "system", "content": args.system}] if args.system else []
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True)
    print("chat: type a message; an empty line or Ctrl-D ends", file=sys.stderr)
    while True:
        try:
            text = input("> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = getattr(ids, "input_ids", ids)
        out = compiled.generate(ids, streamer=streamer, eos_token_id=tok.eos_token_id, **_kwargs(args))
        reply = tok.decode(out.sequences[0, ids.shape[1] :], skip_special_tokens=True)
        messages.append({"role": "assistant", "content": reply.strip()})
        print(_speed_line(out), file=sys.stderr)
    return 0


__all__ = ["add_commands", "cmd_chat", "cmd_generate"]
