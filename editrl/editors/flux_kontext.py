"""FLUX.1-Kontext as an editrl FlowEditor, over the components of a diffusers
`FluxKontextPipeline` folder (`flux-kontext:PATH`).

Mirrors `FluxKontextPipeline.__call__` (diffusers 0.42) step by step, minus its ~1 MP
resize: prompts through CLIP (pooled) and T5 (sequence, padded to max_sequence_length);
the condition image through the VAE (posterior mode, (z − shift)·scale), packed into 2x2
patches and appended to the target tokens; rotary ids (0, row, col) for the target and
(1, row, col) for the condition; the distilled-guidance input; timestep σ (as σ·1000/1000);
the scheduler's σ schedule with the resolution-dependent shift. No true CFG (Flow-GRPO
trains without it). The shared machinery is in `diffusers_common`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .diffusers_common import DiffusersEditor, EditCond, ModelConfig, load_pipeline


def latent_ids(h2: int, w2: int, first: float) -> Tensor:
    """Rotary position ids of an (h2 x w2) token grid: (first, row, col) per token -> [h2*w2, 3]."""
    ids = torch.zeros(h2, w2, 3)
    ids[..., 0] = first
    ids[..., 1] = ids[..., 1] + torch.arange(h2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w2)[None, :]
    return ids.reshape(h2 * w2, 3)


class FluxKontextEditor(DiffusersEditor):
    name = "flux-kontext"
    pipeline_class = "FluxKontextPipeline"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
    default_steps = 28          # FluxKontextPipeline's num_inference_steps default

    @classmethod
    def _load(cls, path: Path, dtype: torch.dtype, index: dict[str, Any]) -> Any:
        from diffusers import FluxKontextPipeline

        return load_pipeline(FluxKontextPipeline, path, dtype)

    def _encode_text(self, prompts: list[str], images: Tensor) -> dict[str, Any]:
        embeds, pooled, txt_ids = self.pipe.encode_prompt(prompt=prompts, prompt_2=None, device=self.device,
                                                          max_sequence_length=self.opts.max_sequence_length)
        return {"embeds": embeds.to(self.dtype),            # [B, S, D_t5]
                "pooled": pooled.to(self.dtype),            # [B, D_clip]
                "txt_ids": txt_ids.to(self.dtype)}          # [S, 3] zeros

    def _vae_encode(self, images: Tensor) -> Tensor:
        cfg = self.vae.config
        z = self.vae.encode(images).latent_dist.mode()                                  # [B, C, h, w]
        return (z - (cfg.shift_factor or 0.0)) * cfg.scaling_factor

    def _vae_decode(self, latents: Tensor) -> Tensor:
        cfg = self.vae.config
        z = latents / cfg.scaling_factor + (cfg.shift_factor or 0.0)
        return self.vae.decode(z, return_dict=False)[0]                                 # [B, 3, H, W]

    def _forward(self, hidden: Tensor, timestep: Tensor, cond: EditCond) -> Tensor:
        B = hidden.shape[0]
        h2, w2 = cond.grid[0] // 2, cond.grid[1] // 2
        img_ids = torch.cat([latent_ids(h2, w2, 0.0), latent_ids(h2, w2, 1.0)], 0).to(self.device, self.dtype)  # [2L, 3]
        guidance = (torch.full([B], self.opts.guidance_scale, device=self.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        return self.transformer(hidden_states=hidden, timestep=timestep, guidance=guidance,
                                pooled_projections=cond.text["pooled"], encoder_hidden_states=cond.text["embeds"],
                                txt_ids=cond.text["txt_ids"], img_ids=img_ids, joint_attention_kwargs=None,
                                return_dict=False)[0]                                   # [B, 2L, 4C]


def load_flux_kontext(spec: str, mode: str = "explicit", opts: ModelConfig | None = None) -> FluxKontextEditor:
    """`flux-kontext:PATH`: a FluxKontextPipeline folder, or a LoRA file / run folder trained on one."""
    path = spec.split(":", 1)[1] if spec.startswith("flux-kontext:") else spec
    return FluxKontextEditor.load(path, mode=mode, opts=opts)
