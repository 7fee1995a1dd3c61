"""Editors: the protocol (base.py) and one file per backend."""

from __future__ import annotations

from ..session import EditrlInputError


def load_editor(spec: str, mode: str = "explicit"):
    """`tiny` (the shipped checkpoint) or `tiny:PATH` (a .safetensors file or a run folder)."""
    if spec == "tiny" or spec.startswith("tiny:"):
        from .tiny import load_tiny
        return load_tiny(spec, mode=mode)
    raise EditrlInputError(f"unknown editor {spec!r} (expected tiny or tiny:PATH)")
