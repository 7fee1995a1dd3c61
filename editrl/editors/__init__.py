"""Editors: the protocol (base.py) and one file per backend."""

from __future__ import annotations

from ..session import EditrlInputError


def load_editor(spec: str, mode: str = "explicit"):
    """`tiny` (the shipped checkpoint), `tiny:PATH` (a .safetensors file or a run folder) or
    `outputs:DIR` (precomputed images, `DIR/<session id>/turn_<k>.png`; `mode` is ignored)."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from .tiny import load_tiny
        return load_tiny(spec, mode=mode)
    if spec.startswith("outputs:"):
        from .outputs import load_outputs
        return load_outputs(spec)
    raise EditrlInputError(f"unknown editor {spec!r} (expected tiny, tiny:PATH or outputs:DIR)")
