"""Editors: the protocol (base.py) and one file per backend."""

from __future__ import annotations

import importlib.util

from ..session import EditrlInputError

REAL_EDITORS = ("flux-kontext", "qwen-edit")


def load_editor(spec: str, mode: str = "explicit", model=None):
    """`tiny` (the shipped checkpoint), `tiny:PATH` (a .safetensors file or a run folder),
    `outputs:DIR` (precomputed images, `DIR/<session id>/turn_<k>.png`; `mode` is ignored),
    `flux-kontext:PATH` / `qwen-edit:PATH` (a diffusers pipeline folder written by
    save_pretrained, or a LoRA file / run folder trained on one). `model` (a
    `diffusers_common.ModelConfig`) sets dtype, LoRA and the other options of the last two."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from .tiny import load_tiny
        return load_tiny(spec, mode=mode)
    if spec.startswith("outputs:"):
        from .outputs import load_outputs
        return load_outputs(spec)
    kind, _, path = spec.partition(":")
    if kind in REAL_EDITORS:
        if not path:
            raise EditrlInputError(f"editor {spec!r}: give the model folder, {kind}:PATH")
        missing = [m for m in ("diffusers", "transformers", "peft") if importlib.util.find_spec(m) is None]
        if missing:
            raise EditrlInputError(f"{kind} needs {', '.join(missing)}: pip install 'editrl[hf]'")
        if kind == "flux-kontext":
            from .flux_kontext import load_flux_kontext as load
        else:
            from .qwen_edit import load_qwen_edit as load
        return load(spec, mode=mode, opts=model)
    raise EditrlInputError(f"unknown editor {spec!r} (expected tiny, tiny:PATH, outputs:DIR, "
                           f"flux-kontext:PATH or qwen-edit:PATH)")
