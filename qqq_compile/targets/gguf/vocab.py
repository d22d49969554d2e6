"""The tokenizer of a GGUF file, from a Hugging Face tokenizer, as llama.cpp's converter writes it.

llama.cpp tokenizes with what the file says: the model (``tokenizer.ggml.model``: ``gpt2``
for byte-level BPE), the pre-tokenizer's name (``tokenizer.ggml.pre``, which selects its
splitting regexes), the tokens with their types, the merges, the special ids and whether
to add BOS/EOS, and the chat template. :func:`read_vocab` collects them the way
``convert_hf_to_gguf.py`` does (``get_vocab_base``, ``_set_vocab_gpt2``): token types from
the tokenizer's added tokens, the pre-tokenizer by hashing its encoding of a fixed text
(:mod:`.pretokenizers`), merges / special ids / template through gguf-py's
``SpecialVocab`` on the tokenizer as ``save_pretrained`` writes it. Only byte-level BPE
tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2...) are supported; SentencePiece ones (Llama 2,
Mistral) get a :class:`VocabError`.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

from qqq_compile.errors import QQQError
from qqq_compile.targets.gguf.pretokenizers import CHKTXT, PRE_BY_HASH


class VocabError(QQQError, ValueError):
    """The tokenizer cannot be written so that llama.cpp tokenizes exactly as it does."""


@dataclass
class Vocab:
    """What a GGUF file says about its tokenizer (see the module docstring)."""

    pre: str
    tokens: list[str]
    token_types: list[int]
    special: Any  # gguf.SpecialVocab: merges, special ids, add_bos/eos, chat template
    add_space_prefix: bool | None = None

    def add_to(self, writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.token_types)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)
        self.special.add_to_gguf(writer, quiet=True)


def _backend_model(tokenizer: Any) -> dict[str, Any]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise VocabError(
            f"{type(tokenizer).__name__} is not a fast (Rust) tokenizer; load it with AutoTokenizer.from_pretrained"
            "(..., use_fast=True) so its BPE model can be written to the GGUF file"
        )
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    byte_level = any(
        "ByteLevel" in json.dumps(spec.get(part) or {}) for part in ("pre_tokenizer", "decoder", "post_processor")
    )
    if model.get("type") != "BPE" or not byte_level:
        kind = model.get("type") or "unknown"
        raise VocabError(
            f"the tokenizer is a {kind} model{'' if byte_level else ' without byte-level pre-tokenization'}: the "
            "GGUF export writes byte-level BPE tokenizers only (GPT-2, Llama 3, Qwen2, SmolLM2 style); "
            "SentencePiece tokenizers (Llama 2, Mistral) are not supported yet"
        )
    return spec


def pre_tokenizer_name(tokenizer: Any) -> str:
    """llama.cpp's name of the tokenizer's pre-tokenizer, identified as its converter does."""
    chkhsh = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
    if chkhsh not in PRE_BY_HASH:
        raise VocabError(
            f"llama.cpp does not know this tokenizer's pre-tokenizer (hash {chkhsh} of its encoding of "
            "llama.cpp's test text): llama.cpp would split text differently from it. If you know which of "
            "llama.cpp's pre-tokenizers it matches, pass tokenizer_pre=NAME (one of: "
            f"{', '.join(sorted(set(PRE_BY_HASH.values()))[:12])}, ...)"
        )
    return PRE_BY_HASH[chkhsh]


def _looks_special(token: str) -> bool:
    """convert_hf_to_gguf's ``does_token_look_special``."""
    return (
        token in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (token.startswith("<|") and token.endswith("|>"))
        or (token.startswith("<｜") and token.endswith("｜>"))
        or (token.startswith("<unused") and token.endswith(">"))
    )


def _tokens(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """Tokens and their llama.cpp types, ``vocab_size`` of them (ids the tokenizer lacks are
    ``[PAD<i>]`` of type UNUSED, as the converter pads them)."""
    import gguf

    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise VocabError(f"the tokenizer has ids up to {max(reverse)}, the model's vocabulary only {vocab_size}")
    added = tokenizer.get_added_vocab()
    decoder = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        if tok in added:
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if decoder[i].special or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                tok = tok.replace("\u2581", " ")
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    return tokens, [int(t) for t in types]


def _adds(tokenizer: Any) -> dict[str, bool]:
    """Whether the tokenizer adds BOS / EOS to a plain text (probed, not read from a config)."""
    ids = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return {
        "bos": bool(ids) and bos is not None and ids[0] == bos,
        "eos": len(ids) > 1 and eos is not None and ids[-1] == eos,
    }


def read_vocab(tokenizer: Any, vocab_size: int, pre: str | None = None) -> Vocab:
    """The :class:`Vocab` of ``tokenizer`` for a model with ``vocab_size`` embedding rows;
    ``pre`` names llama.cpp's pre-tokenizer when its hash is not in llama.cpp's table."""
    import gguf

    if tokenizer is None:
        raise VocabError(
            "a GGUF file carries its tokenizer and none was given: pass tokenizer=... (the model's Hugging Face "
            "tokenizer), or save the compiled artifact with its tokenizer"
        )
    _backend_model(tokenizer)
    name = pre or pre_tokenizer_name(tokenizer)
    tokens, types = _tokens(tokenizer, vocab_size)
    with tempfile.TemporaryDirectory(prefix="qqq_gguf_tok_") as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
        config = json.loads((Path(tmp) / "tokenizer_config.json").read_text(encoding="utf-8"))
    if not special.merges:
        raise VocabError("the tokenizer has no BPE merges; llama.cpp cannot tokenize with it")
    special.add_special_token.update(_adds(tokenizer))
    if special.chat_template is None and getattr(tokenizer, "chat_template", None):
        special.chat_template = tokenizer.chat_template
    return Vocab(name, tokens, types, special, config.get("add_prefix_space"))


__all__ = ["Vocab", "VocabError", "pre_tokenizer_name", "read_vocab"]
