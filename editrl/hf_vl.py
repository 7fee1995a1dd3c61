"""Qwen-VL processors without torchvision, shared by the local VLM judge, the LLM intent
reconstructor and the Qwen-Image-Edit editor (whose prompt encoder is a Qwen2.5-VL).

The stock `Qwen2VLProcessor` cannot be built or loaded without torchvision (its video
processor needs it) and the only torchvision on these machines is a broken CUDA build
(ECOSYSTEM_NOTES traps 1 and 6). transformers' PIL image processor plus a processor subclass
without the video part do the same image work.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def image_processor_for(path: Path, model_type: str):
    """A PIL-backed Qwen-VL image processor (no torchvision) with the folder's settings, read
    from preprocessor_config.json or (transformers 5 processor folders) the `image_processor`
    block of processor_config.json."""
    try:
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:  # transformers 4.x: the slow processor is the PIL one
        from transformers import Qwen2VLImageProcessor as cls
    cfg = (_read_json(path / "preprocessor_config.json")
           or _read_json(path / "processor_config.json").get("image_processor", {}))
    kw: dict[str, Any] = {"patch_size": 16 if model_type.startswith("qwen3") else 14, "merge_size": 2,
                          "temporal_patch_size": 2}
    for k in ("patch_size", "merge_size", "temporal_patch_size", "image_mean", "image_std", "do_convert_rgb",
              "do_normalize", "do_rescale", "rescale_factor", "resample"):
        if k in cfg:
            kw[k] = cfg[k]
    size = cfg.get("size") if isinstance(cfg.get("size"), dict) else {}
    min_pixels = cfg.get("min_pixels", size.get("shortest_edge"))
    max_pixels = cfg.get("max_pixels", size.get("longest_edge"))
    if min_pixels:
        kw["min_pixels"] = int(min_pixels)
    if max_pixels:
        kw["max_pixels"] = int(max_pixels)
    return cls(**kw)


def image_only_processor(image_processor, tokenizer, chat_template: str | None):
    """A Qwen-VL processor without its video part (which needs torchvision): it expands each
    image placeholder to the image's patch tokens and tokenizes, like the stock one."""
    from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor

    class ImageOnlyQwenVLProcessor(Qwen2VLProcessor):
        attributes = ["image_processor", "tokenizer"]

        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            super().__init__(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template,
                             **kwargs)

    return ImageOnlyQwenVLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=chat_template)
