"""Tiny random diffusers edit pipelines saved to a folder, built offline from configs the way
diffusers' own tests build them (`get_dummy_components`): the real FluxKontextPipeline and
QwenImageEditPipeline classes and their real component classes, at toy sizes.

`save_tiny_flux_kontext(path)` / `save_tiny_qwen_edit(path)` write what
`Pipeline.save_pretrained` writes, so `flux-kontext:PATH` / `qwen-edit:PATH` load them like a
released checkpoint. Sizes follow ECOSYSTEM_NOTES (one or two transformer layers, 16-dim
heads, 4 latent channels, 2-layer 32-wide text encoders); tokenizers need no files (the
byte-level alphabet, no merges). Every module is put in eval mode before saving.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from tiny_vlm import CHAT_TEMPLATE, SPECIAL_TOKENS, build_image_processor, text_and_token_config
from tiny_vlm import build_tokenizer as build_qwen_tokenizer


def byte_alphabet() -> list[str]:
    """The 256 byte-level symbols, sorted (their raw order differs between processes)."""
    from tokenizers.pre_tokenizers import ByteLevel

    return sorted(ByteLevel.alphabet())


def flux_kontext_components(seed: int = 0) -> dict:
    """FluxKontextPipeline components: a 1+1-layer Flux transformer (in_channels 16 = 4 x the VAE's
    4 latent channels), an AutoencoderKL with 4 blocks of width 4 (8x downsampling, like FLUX's),
    CLIP and T5 text encoders of width 32, FLUX's dynamically shifted flow-matching scheduler."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
    vae = AutoencoderKL(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4, 4, 4, 4),
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                        layers_per_block=1, latent_channels=4, norm_num_groups=1, use_quant_conv=False,
                        use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in byte_alphabet():
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[], model_max_length=77)
    clip = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=37,
                                        num_attention_heads=4, num_hidden_layers=2, projection_dim=32,
                                        max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1))
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz▁.,"]
    tokenizer_2 = T5Tokenizer(vocab=pieces, extra_ids=0)
    t5 = T5EncoderModel(T5Config(vocab_size=len(pieces), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                 relative_attention_num_buckets=8, decoder_start_token_id=0))
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    for m in (transformer, vae, clip, t5):
        m.eval()
    return dict(scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=tokenizer, text_encoder_2=t5,
                tokenizer_2=tokenizer_2, transformer=transformer)


def qwen_edit_components(seed: int = 0) -> dict:
    """QwenImageEditPipeline components: a 2-layer Qwen-Image transformer (patch 2, 16 packed
    channels), the Qwen-Image VAE at base width 24 with 4 latent channels, a 2-layer 32-wide
    Qwen2.5-VL text encoder with a 1-block vision tower, a Qwen2VLProcessor without its video
    part (which needs torchvision) and Qwen-Image's shifted, terminal-stretched scheduler."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from editrl.hf_vl import image_only_processor

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                              attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                              guidance_embeds=False, axes_dims_rope=(8, 4, 4))
    vae = AutoencoderKLQwenImage(base_dim=24, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True, True], latents_mean=[0.0] * 4, latents_std=[1.0] * 4)
    tokenizer = build_qwen_tokenizer()
    cfg = Qwen2_5_VLConfig(
        **text_and_token_config(tokenizer),
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32, window_size=56,
                           fullatt_block_indexes=[0]))
    text_encoder = Qwen2_5_VLForConditionalGeneration(cfg)
    processor = image_only_processor(build_image_processor(), tokenizer, CHAT_TEMPLATE)
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.5, max_shift=0.9,
                                                base_image_seq_len=256, max_image_seq_len=8192, shift_terminal=0.02)
    for m in (transformer, vae, text_encoder):
        m.eval()
    return dict(scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, processor=processor,
                transformer=transformer)


def save_tiny_flux_kontext(path: str | Path, seed: int = 0) -> Path:
    from diffusers import FluxKontextPipeline

    FluxKontextPipeline(**flux_kontext_components(seed)).save_pretrained(path)
    return Path(path)


def save_tiny_qwen_edit(path: str | Path, seed: int = 0) -> Path:
    from diffusers import QwenImageEditPipeline

    QwenImageEditPipeline(**qwen_edit_components(seed)).save_pretrained(path)
    declare_stock_processor(Path(path))
    return Path(path)


def declare_stock_processor(path: Path) -> None:
    """save_pretrained names the processor's class as found, i.e. the video-less subclass in
    editrl.hf_vl; a released Qwen-Image-Edit folder names transformers' Qwen2VLProcessor, whose
    tokenizer and image-processor files are these. Write the names the stock class writes."""
    index_file, proc_file = path / "model_index.json", path / "processor" / "processor_config.json"
    index = json.loads(index_file.read_text())
    index["processor"] = ["transformers", "Qwen2VLProcessor"]
    index_file.write_text(json.dumps(index, indent=2))
    proc = json.loads(proc_file.read_text())
    proc["processor_class"] = "Qwen2VLProcessor"
    proc_file.write_text(json.dumps(proc, indent=2))
