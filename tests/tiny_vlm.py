"""A tiny random Qwen2-VL saved to a folder: the real model class, tokenizer, image processor
and chat template, at toy size, built offline from a config (no file is downloaded).

`save_tiny_qwen2vl(path)` writes a folder that `AutoModelForImageTextToText.from_pretrained`
loads like a released checkpoint, so `load_judge("vlm-local:" + path)` runs the whole local
judging path end to end. With random weights the model writes gibberish: judges built on it
must report `judge_error`, never a made-up verdict.

Sizes (hidden 32, 2 text layers, 1 vision block, heads of 16 with `mrope_section` [2, 3, 3]
summing to head_dim / 2) keep a 24-token `generate` over three small images well under a
second on one CPU thread. The vocabulary is the 256-symbol byte-level alphabet (so every
digit and tag character is its own token) plus the Qwen chat and vision special tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "<|im_start|>{{ message['role'] }}\n"
    "{%- if message['content'] is string -%}{{ message['content'] }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}<|vision_start|><|image_pad|><|vision_end|>"
    "{%- elif part['type'] == 'text' -%}{{ part['text'] }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}<|im_end|>\n"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_start|>assistant\n{%- endif -%}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# 64x64 ShapesWorld images resize to 56x56: a 4x4 patch grid, 4 image tokens after merging
MIN_PIXELS = 56 * 56
MAX_PIXELS = 56 * 56


def build_tokenizer():
    """A byte-level BPE Qwen2 tokenizer over the 256-symbol alphabet, no merges, plus Qwen's
    special tokens. The alphabet is sorted: its raw order differs between processes."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet()))}
    tok = Qwen2Tokenizer(vocab=vocab, merges=[], unk_token=None, bos_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    tok.padding_side = "left"
    tok.chat_template = CHAT_TEMPLATE
    return tok


def text_and_token_config(tok) -> dict:
    """The Qwen-VL config fields a tiny model shares whatever its generation (Qwen2-VL here,
    Qwen2.5-VL in tests/tiny_pipelines.py): a 2-layer 32-wide text model over the tokenizer's
    vocabulary, and the special-token ids of the chat and vision markers."""
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    return dict(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                         bos_token_id=None, eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])


def build_model(tok, seed: int = 0):
    """A random Qwen2VLForConditionalGeneration with the tokenizer's special-token ids."""
    import torch
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2VLConfig(**text_and_token_config(tok),
                        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2,
                                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2))
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(cfg).eval()
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    return model


def build_image_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS, patch_size=14,
                                    merge_size=2, temporal_patch_size=2)


def save_tiny_qwen2vl(path: str | Path, seed: int = 0) -> Path:
    """Build the tiny model and save model, tokenizer, image processor config and chat
    template to `path` (created). Returns the folder."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    model = build_model(tok, seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    build_image_processor().save_pretrained(path)
    (path / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    # what a released checkpoint's preprocessor config says, in the legacy keys too
    pp = path / "preprocessor_config.json"
    cfg = json.loads(pp.read_text())
    cfg.update(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    pp.write_text(json.dumps(cfg, indent=2))
    return path
