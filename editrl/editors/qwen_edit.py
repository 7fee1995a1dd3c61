"""Qwen-Image-Edit as an editrl FlowEditor, over the components of a diffusers
`QwenImageEditPipeline` folder (`qwen-edit:PATH`).

Mirrors `QwenImageEditPipeline.__call__` (diffusers 0.42) minus its ~1 MP resize (which it
computes with a module-level `calculate_dimensions` and offers no argument for): the prompt
and the condition image through Qwen2.5-VL in the pipeline's edit template (last hidden
state, template prefix dropped, padding masked); the condition image through the Qwen-Image
VAE (posterior mode, normalised by latents_mean / latents_std, single frame), packed into
2x2 patches and appended to the target tokens; `img_shapes` for the rotary embedding; timestep
σ (as σ·1000/1000); the scheduler's σ schedule with the resolution-dependent shift and
terminal stretch. No true CFG (the pipeline's `true_cfg_scale` with a negative prompt):
Flow-GRPO trains without it. The shared machinery is in `diffusers_common`.

Without torchvision the pipeline's stock `Qwen2VLProcessor` cannot be loaded, and with it the
stock loader needs the folder's `processor/video_preprocessor_config.json`; when either is
missing the loader builds the same processor from the folder's `processor/` files without its
video part (`editrl.hf_vl`; editing uses images only).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from ..hf_vl import image_only_processor, image_processor_for
from .base import tensor_to_images
from .diffusers_common import DiffusersEditor, EditCond, ModelConfig, load_pipeline


def torchvision_works() -> bool:
    try:
        import torchvision  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken CUDA build raises all sorts of errors
        return False
    return True


def processor_without_video(path: Path) -> Any:
    """The pipeline's Qwen-VL processor rebuilt from `path/processor` (tokenizer files there, or
    else `path/tokenizer`) with the PIL image processor and no video part."""
    from transformers import AutoTokenizer

    proc_dir = path / "processor"
    tok_dir = proc_dir if (proc_dir / "tokenizer_config.json").is_file() else path / "tokenizer"
    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir), local_files_only=True)
    return image_only_processor(image_processor_for(proc_dir, "qwen2_5_vl"), tokenizer, None)


class QwenImageEditor(DiffusersEditor):
    name = "qwen-edit"
    pipeline_class = "QwenImageEditPipeline"
    components = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "processor")
    default_steps = 50          # QwenImageEditPipeline's num_inference_steps default

    @classmethod
    def _load(cls, path: Path, dtype: torch.dtype, index: dict[str, Any]) -> Any:
        from diffusers import QwenImageEditPipeline

        stock = torchvision_works() and (path / "processor" / "video_preprocessor_config.json").is_file()
        extra = {} if stock else {"processor": processor_without_video(path)}
        return load_pipeline(QwenImageEditPipeline, path, dtype, **extra)

    def _encode_text(self, prompts: list[str], images: Tensor) -> dict[str, Any]:
        pil = [Image.fromarray(a) for a in tensor_to_images(images)]
        embeds, mask = self.pipe.encode_prompt(prompt=prompts, image=pil, device=self.device)
        return {"embeds": embeds.to(self.dtype),                    # [B, S, D]
                "mask": mask}                                       # [B, S] (None: no padding)

    def _latent_stats(self, like: Tensor) -> tuple[Tensor, Tensor]:
        cfg = self.vae.config
        mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        std = torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to(like.device, like.dtype)
        return mean, std

    def _vae_encode(self, images: Tensor) -> Tensor:
        z = self.vae.encode(images.unsqueeze(2)).latent_dist.mode()                    # [B, C, 1, h, w]
        mean, std = self._latent_stats(z)
        return ((z - mean) / std)[:, :, 0]                                             # [B, C, h, w]

    def _vae_decode(self, latents: Tensor) -> Tensor:
        z = latents.unsqueeze(2)                                                       # [B, C, 1, h, w]
        mean, std = self._latent_stats(z)
        z = z / (1.0 / std) + mean                       # as the pipeline writes it (bitwise the same numbers)
        return self.vae.decode(z, return_dict=False)[0][:, :, 0]                       # [B, 3, H, W]

    def _forward(self, hidden: Tensor, timestep: Tensor, cond: EditCond) -> Tensor:
        B = hidden.shape[0]
        h2, w2 = cond.grid[0] // 2, cond.grid[1] // 2
        img_shapes = [[(1, h2, w2), (1, h2, w2)]] * B                                  # target, condition
        guidance = (torch.full([B], self.opts.guidance_scale, device=self.device, dtype=torch.float32)
                    if self.transformer.config.guidance_embeds else None)
        return self.transformer(hidden_states=hidden, timestep=timestep, guidance=guidance,
                                encoder_hidden_states_mask=cond.text["mask"],
                                encoder_hidden_states=cond.text["embeds"], img_shapes=img_shapes,
                                attention_kwargs={}, return_dict=False)[0]             # [B, 2L, 4C]


def load_qwen_edit(spec: str, mode: str = "explicit", opts: ModelConfig | None = None) -> QwenImageEditor:
    """`qwen-edit:PATH`: a QwenImageEditPipeline folder, or a LoRA file / run folder trained on one."""
    path = spec.split(":", 1)[1] if spec.startswith("qwen-edit:") else spec
    return QwenImageEditor.load(path, mode=mode, opts=opts)
