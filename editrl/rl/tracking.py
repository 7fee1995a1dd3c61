"""Optional experiment tracking for `editrl train`: TensorBoard and Weights & Biases.

`metrics.jsonl` is always written; these mirror it. `TrainConfig.track` is a comma-separated
list (`tensorboard`, `wandb`, or both). Each step's scalars go to every backend; every
`track_strips_every` steps, sample session strips (source -> each turn's output, the first
trajectory of the first sessions, with a green / red bar for the turn's success) go along as
images. A backend whose package is missing is a clear error at start, not a crash later:
`pip install 'editrl[tensorboard]'` or `'editrl[wandb]'`. W&B honours its own environment
(WANDB_MODE=offline works without network).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..session import EditrlInputError

BACKENDS = ("tensorboard", "wandb")


def parse_backends(spec: str) -> list[str]:
    names = [x.strip() for x in spec.split(",") if x.strip()]
    bad = [n for n in names if n not in BACKENDS]
    if bad:
        raise EditrlInputError(f"unknown tracking backend {bad[0]!r} (expected: {', '.join(BACKENDS)})")
    return names


def session_strip(images: Sequence[np.ndarray], success: Sequence[bool | None], bar: int = 3) -> np.ndarray:
    """uint8 [H + bar, (K+1)·W, 3]: the source then every turn, each with a coloured bar
    under it (grey: source / unjudged, green: success, red: failure)."""
    cells = []
    for i, img in enumerate(images):
        ok = None if i == 0 else success[i - 1]
        colour = (150, 150, 150) if ok is None else ((26, 127, 55) if ok else (207, 34, 46))
        strip = np.empty((bar, img.shape[1], 3), np.uint8)
        strip[:] = colour
        cells.append(np.concatenate([img, strip], 0))
    return np.concatenate(cells, 1)


class Tracker:
    """Mirrors metrics rows (and sample strips) to the chosen backends."""

    def __init__(self, spec: str, out: Path, config: dict[str, Any], project: str = "editrl",
                 run_name: str | None = None) -> None:
        self.backends = parse_backends(spec)
        self.tb = None
        self.wandb = None
        if "tensorboard" in self.backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise EditrlInputError("track=tensorboard needs the tensorboard package: "
                                       "pip install 'editrl[tensorboard]'") from None
            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"))
        if "wandb" in self.backends:
            try:
                import wandb
            except ImportError:
                raise EditrlInputError("track=wandb needs the wandb package: pip install 'editrl[wandb]'") from None
            self.wandb = wandb.init(project=project, name=run_name or out.name, dir=str(out), config=config,
                                    resume="allow", id=_run_id(out))

    @property
    def active(self) -> bool:
        return bool(self.backends)

    def scalars(self, step: int, row: dict[str, Any]) -> None:
        vals = {k: float(v) for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                and k != "step"}
        if self.tb is not None:
            for k, v in vals.items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(vals, step=step)

    def strips(self, step: int, strips: Sequence[tuple[str, np.ndarray]]) -> None:
        if self.tb is not None:
            for name, img in strips:
                self.tb.add_image(f"sessions/{name}", img, step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({f"sessions/{name}": wandb.Image(img) for name, img in strips}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _run_id(out: Path) -> str:
    import hashlib
    return hashlib.sha256(str(out.resolve()).encode()).hexdigest()[:12]
