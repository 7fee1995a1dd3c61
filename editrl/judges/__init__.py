"""Judges: `program` (ShapesWorld, exact), `vlm:URL` (OpenAI-compatible), `vlm-local:PATH` (transformers)."""
