"""The Editor protocol shared by the benchmark and RL, and the one sampling loop every flow
editor uses.

An editor maps (input image, instruction, context) to an output image. Flow editors also
expose what RL needs: `encode` (conditioning), `velocity(x, sigma, cond)`, and `sample`
with a chosen solver that can return every stored transition (x_i, x_{i+1}, log-prob, mean,
std). Images cross this boundary as uint8 [H, W, 3] numpy arrays; inside, tensors are
float32 in [-1, 1], [B, C, H, W].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import sampling

SOLVERS = ("ode", "sde")


@dataclass
class Transitions:
    """The stored SDE steps of one sampling run (only steps inside the SDE window)."""
    x: Tensor          # [B, S, C, H, W]  x_i at each stored step
    x_next: Tensor     # [B, S, C, H, W]  x_{i+1}
    log_prob: Tensor   # [B, S]
    mean: Tensor       # [B, S, C, H, W]
    std: Tensor        # [B, S]           std_i * sqrt(-dt)
    sigma: Tensor      # [B, S]
    sigma_next: Tensor  # [B, S]
    step: Tensor       # [B, S] long, index i in the schedule
    in_window: Tensor  # [B, S] bool: the sample took the SDE path at this step (else ODE; not trained)


@dataclass
class SampleResult:
    x0: Tensor                        # [B, C, H, W] final sample, float32 in model space
    transitions: Transitions | None = None


def images_to_tensor(images: Sequence[np.ndarray]) -> Tensor:
    """list of uint8 [H, W, 3] -> float32 [B, 3, H, W] in [-1, 1]."""
    arr = np.stack([np.asarray(im, dtype=np.uint8) for im in images])          # [B, H, W, 3]
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def tensor_to_images(x: Tensor) -> list[np.ndarray]:
    """float [B, 3, H, W] in [-1, 1] -> list of uint8 [H, W, 3]."""
    x = x.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return [a for a in x.permute(0, 2, 3, 1).cpu().numpy()]


class FlowEditor:
    """Base class for flow-matching editors. Subclasses implement `encode`, `velocity`,
    `latent_shape`, `decode` and `encode_image` (identity for pixel-space editors).

    Training (`rl.train`) also uses `trainable_parameters`, `state_dict` / `load_state_dict`
    (exactly the trained weights: the whole net of the tiny editor, the LoRA of a diffusers
    editor), `set_training`, `policy_copy` (a frozen copy: NFT's old policy),
    `reference_policy` (the frozen initial policy) and `save` to `checkpoint_file`."""

    name: str = "flow"
    default_steps: int = 10
    checkpoint_file: str = "model.safetensors"

    # -- to implement -------------------------------------------------------------------
    def encode(self, images: Tensor, instructions: Sequence[str],
               contexts: Sequence[Sequence[str]] | None = None) -> Any:
        raise NotImplementedError

    def velocity(self, x: Tensor, sigma: Tensor, cond: Any) -> Tensor:
        raise NotImplementedError

    def latent_shape(self, cond: Any) -> tuple[int, ...]:
        raise NotImplementedError

    def decode(self, x0: Tensor) -> list[np.ndarray]:
        return tensor_to_images(x0)

    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> model space (where `sample` works and DiffusionNFT
        re-noises its targets). The identity for pixel-space editors."""
        return images

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        raise NotImplementedError

    def fsdp_modules(self) -> list[torch.nn.Module]:
        """The modules FSDP shards (inner blocks first, their root last). Only modules whose
        parameters are used inside their own `forward` may be listed: FSDP gathers the
        parameters in a forward hook. The rest of the model stays replicated on every rank."""
        from ..session import EditrlInputError
        raise EditrlInputError(f"the {self.name} editor does not support FSDP; launch with recipes/accelerate/ddp.yaml")

    # -- shared -------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sigmas(self, steps: int, cond: Any = None) -> Tensor:
        """σ_0 = 1 > ... > σ_T = 0 [T+1]. `cond` is for editors whose schedule depends on the
        input (the resolution-dependent shift of FLUX / Qwen-Image); the default ignores it."""
        return sampling.sigma_schedule(steps)

    @torch.no_grad()
    def edit(self, images: Sequence[np.ndarray], instructions: Sequence[str],
             contexts: Sequence[Sequence[str]] | None = None, generator: torch.Generator | None = None,
             steps: int | None = None, solver: str = "ode", noise_level: float = 0.7) -> list[np.ndarray]:
        """Batched edit: one output image per (image, instruction[, context])."""
        if len(images) != len(instructions):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        cond = self.encode(images_to_tensor(images).to(self.device), instructions, contexts)
        res = self.sample(cond, steps=steps or self.default_steps, solver=solver, noise_level=noise_level,
                          generator=generator)
        return self.decode(res.x0)

    def sample(self, cond: Any, steps: int, solver: str = "ode", noise_level: float = 0.7,
               window: int | None = None, generator: torch.Generator | None = None,
               return_transitions: bool = False, x_init: Tensor | None = None) -> SampleResult:
        """Integrate from noise (σ = 1) to σ = 0.

        `solver='ode'`: Euler steps. `solver='sde'`: the Flow-GRPO SDE on every step but the
        last, or only on a window of `window` consecutive steps drawn per sample from
        `generator` (ODE elsewhere). With `return_transitions`, the SDE steps are stored.
        """
        if solver not in SOLVERS:
            raise ValueError(f"unknown solver {solver!r} (expected one of {', '.join(SOLVERS)})")
        sig = self.sigmas(steps, cond).to(self.device)                             # [T+1]
        shape = self.latent_shape(cond)
        x = x_init.to(self.device) if x_init is not None else sampling.randn(shape, generator, self.device)
        B = x.shape[0]
        if solver == "sde":
            # the last step (to σ = 0) is always an ODE step: noise added there would stay in
            # the image. SDE windows therefore lie within the first T - 1 steps.
            w = steps - 1 if window is None else window
            if not 0 <= w <= steps - 1:
                raise ValueError(f"SDE window must be in 0..{steps - 1} for {steps} steps, got {w}")
            if generator is None:
                generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,))))
            mask = torch.zeros(B, steps, dtype=torch.bool, device=self.device)
            if w > 0:
                starts = sampling.sample_sde_window(steps - 1, w, B, generator)      # [B]
                mask[:, : steps - 1] = sampling.sde_mask(starts, w, steps - 1).to(self.device)  # [B, T]
        else:
            mask = torch.zeros(B, steps, dtype=torch.bool, device=self.device)
        store: dict[str, list[Tensor]] = {k: [] for k in ("x", "x_next", "log_prob", "mean", "std", "sigma", "sigma_next", "step")}
        for i in range(steps):
            s, s_next = sig[i], sig[i + 1]
            sigma_b = s.expand(B)                                                  # [B]
            with torch.set_grad_enabled(False):
                v = self.velocity(x, sigma_b, cond).float()                        # [B, C, H, W]
            x_ode = sampling.ode_step(x, v, s, s_next)
            if mask[:, i].any():
                st = sampling.sde_step_with_logprob(x, v, s, s_next, noise_level=noise_level, generator=generator,
                                                    sigma_max_fallback=sig[1])
                m = mask[:, i].view(B, *([1] * (x.dim() - 1)))
                x_new = torch.where(m, st.prev_sample, x_ode)
                if return_transitions:
                    store["x"].append(x)
                    store["x_next"].append(x_new)
                    store["log_prob"].append(st.log_prob)
                    store["mean"].append(st.mean)
                    store["std"].append(st.std.reshape(B, -1)[:, 0] if st.std.numel() > 1 else st.std.expand(B))
                    store["sigma"].append(sigma_b)
                    store["sigma_next"].append(s_next.expand(B))
                    store["step"].append(torch.full((B,), i, dtype=torch.long, device=self.device))
                x = x_new
            else:
                x = x_ode
        trans = None
        if return_transitions and store["x"]:
            trans = Transitions(
                x=torch.stack(store["x"], 1), x_next=torch.stack(store["x_next"], 1),
                log_prob=torch.stack(store["log_prob"], 1), mean=torch.stack(store["mean"], 1),
                std=torch.stack(store["std"], 1), sigma=torch.stack(store["sigma"], 1),
                sigma_next=torch.stack(store["sigma_next"], 1), step=torch.stack(store["step"], 1),
                in_window=torch.stack([mask[:, int(i)] for i in torch.stack(store["step"], 1)[0]], 1))
        return SampleResult(x0=x, transitions=trans)
