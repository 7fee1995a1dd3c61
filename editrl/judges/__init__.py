"""Judges: `program` (ShapesWorld, exact), `vlm:URL` (OpenAI-compatible), `vlm-local:PATH` (transformers).

`load_judge(spec, **options)` builds one behind the `Judge` protocol (see `base.py`).
"""

from __future__ import annotations

from typing import Any

from ..session import EditrlInputError
from .base import Judge, JudgeRequest, cache_key
from .program import ProgramJudge

JUDGE_FORMS = ("program (exact ShapesWorld judge)", "vlm:URL (OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1)",
               "vlm-local:PATH (a local Qwen2-VL / Qwen2.5-VL / Qwen3-VL folder)")

# options of VLMOptions, of the HTTP client and of the local client
_JUDGE_OPTS = {"protocol", "votes", "temperature", "think", "threshold", "max_tokens", "min_digit_mass", "top_logprobs"}
_HTTP_OPTS = {"model", "timeout", "retries", "backoff", "concurrency", "api_key", "max_backoff", "min_side", "seed"}
_LOCAL_OPTS = {"device", "dtype", "batch_size", "threads", "seed", "min_side"}


def load_judge(spec: str, **options: Any) -> Judge:
    """`program`, `vlm:URL` or `vlm-local:PATH` -> a judge. Options left as None take their
    defaults; the program judge has no options and ignores them, and a VLM judge ignores the
    other client kind's options; an unknown option name is an error. Options (VLM): `protocol`
    (binary | graded | graded-expect), `votes`, `temperature`, `think`, `threshold`,
    `max_tokens`; HTTP: `model` (default: the server's first), `timeout`, `retries`,
    `backoff`, `concurrency`, `api_key`; local: `device`, `dtype`, `batch_size`, `threads`."""
    opts = {k: v for k, v in options.items() if v is not None}
    if spec == "program":
        return ProgramJudge()
    if spec.startswith("vlm:") or spec.startswith("vlm-local:"):
        from .vlm import VLMJudge, VLMOptions

        local = spec.startswith("vlm-local:")
        target = spec.split(":", 1)[1]
        # options meant for the other kind of client are ignored (a harness passes them all)
        unknown = sorted(set(opts) - _JUDGE_OPTS - _HTTP_OPTS - _LOCAL_OPTS)
        if unknown:
            raise EditrlInputError(f"judge {spec}: unknown option(s) {', '.join(unknown)}")
        judge_opts = VLMOptions(**{k: v for k, v in opts.items() if k in _JUDGE_OPTS})
        if not target:
            raise EditrlInputError(f"judge {spec!r}: missing {'PATH' if local else 'URL'}")
        if local:
            from .clients import TransformersClient

            client = TransformersClient(target, **{k: v for k, v in opts.items() if k in _LOCAL_OPTS})
        else:
            from .clients import OpenAIClient

            client = OpenAIClient(target, **{k: v for k, v in opts.items() if k in _HTTP_OPTS})
            if judge_opts.protocol == "graded-expect":
                client.probe_logprobs()
        return VLMJudge(client, judge_opts)
    raise EditrlInputError(f"unknown judge {spec!r}; expected one of: {'; '.join(JUDGE_FORMS)}")


__all__ = ["Judge", "JudgeRequest", "ProgramJudge", "cache_key", "load_judge", "JUDGE_FORMS"]
