"""The text side the ShapesWorld base was built with: a char-level CLIP tokenizer built in memory, and small CLIP
and T5 text-encoder configs.

The shipped base (``sources/base``) holds text encoders made from exactly these values, so ShapesWorld owns them:
a change here would describe a model other than the one that ships. The tiny test pipelines
(:mod:`danceopd_diffusers.tiny`) reuse them from here rather than keep a copy, which is the allowed direction: test
fixtures may build on ShapesWorld, while the library and ShapesWorld never import the fixtures.
"""

from __future__ import annotations

import string
from typing import Any

#: the characters the char-level tokenizers know (ids follow this order)
CHARACTERS = list(string.ascii_lowercase + string.digits + ",.'-!?:;()")


def clip_tokenizer(max_length: int = 77) -> Any:
    """A CLIPTokenizer over :data:`CHARACTERS` (each alone and word-final), built without a download."""
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in CHARACTERS:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    # model_max_length is required: SD3's encode_prompt reads it.
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


def clip_config(
    vocab_size: int, hidden: int = 32, layers: int = 2, intermediate: int | None = None, heads: int = 4
) -> Any:
    """A small CLIP text config for the char-level tokenizer (ids 0/1 = start/end; ``projection_dim`` = hidden)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_attention_heads=heads,
        num_hidden_layers=layers,
        projection_dim=hidden,
        vocab_size=vocab_size,
        max_position_embeddings=77,
        hidden_act="gelu",
    )


def t5_config(
    vocab_size: int, d_model: int = 64, d_ff: int = 128, layers: int = 2, heads: int = 4, buckets: int = 8
) -> Any:
    """A small T5 encoder config for the in-memory tokenizers (pad 0, eos 1)."""
    from transformers import T5Config

    return T5Config(
        vocab_size=vocab_size,
        d_model=d_model,
        d_kv=d_model // heads,
        d_ff=d_ff,
        num_layers=layers,
        num_heads=heads,
        relative_attention_num_buckets=buckets,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
