"""What the diffusers editor adapters (FLUX.1-Kontext, Qwen-Image-Edit) share: loading a
pipeline folder, the latent layout, the σ schedule, the velocity loop around the
transformer, LoRA through peft (train it, disable it for the reference, switch to a second
adapter for NFT's old policy) and LoRA checkpoints as safetensors.

Model space. editrl samples the *unpacked* latent x [B, C, h, w] (C VAE latent channels,
h, w the latent grid, both even). The transformer reads it packed into 2x2 patches,
[B, (h/2)(w/2), 4C], followed by the packed latents of the condition image (sequence
concatenation), and its prediction is sliced back to the target tokens and unpacked.
Packing is a permutation, so every per-element step (Euler, SDE, log-prob, KL) is the
same in either layout, and the initial noise drawn as torch.randn([B, C, h, w]) from a
generator is exactly the noise the diffusers pipeline draws from the same generator.

Sign convention. Both transformers predict v = ε − x0 (the flow x_σ = (1 − σ)·x0 + σ·ε)
and the diffusers scheduler steps x_next = x + (σ_next − σ)·v: editrl's velocity
(ALGORITHMS §1, `sampling.ode_step`) without any change of sign or scale.

Images keep their own size: the diffusers edit pipelines rescale the input to ~1 MP; here
the size is only rounded down to the VAE x patch multiple (16 for both models), as the
pipelines round, and resized (bicubic, antialiased) only when it is not a multiple.

diffusers, transformers and peft are imported lazily: importing editrl (and the tiny
editor) does not need them.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..session import EditrlInputError, atomic_path, weights_sha256
from .base import FlowEditor, tensor_to_images
from .tiny import PICKLE_SUFFIXES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DEFAULT_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")   # the joint-attention projections of both models
ADAPTER = "default"        # the trained LoRA adapter (peft's default name)
OLD_ADAPTER = "old"        # DiffusionNFT's old policy: a second adapter on the same transformer
LORA_FILE = "lora.safetensors"
LORA_PREFIX = "transformer."   # diffusers' LoRA key layout (`pipe.load_lora_weights` reads these files)


@dataclass
class ModelConfig:
    """How a diffusers edit model is loaded and adapted (the `model` block of a training config)."""
    path: str = ""                     # pipeline folder written by save_pretrained, or a LoRA file / run folder
    dtype: str = "float32"             # float32 | bfloat16: model weights and activations (LoRA weights, optimiser and sampling math stay float32)
    lora_rank: int = 32                # LoRA rank on the attention projections (0 = no adapter: inference only)
    lora_alpha: float = 0.0            # LoRA alpha (scale alpha / rank); 0 = the rank (scale 1)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS   # module names peft adapts
    lora_seed: int = 0                 # seed of the LoRA A-matrix initialisation (B starts at zero)
    gradient_checkpointing: bool = False   # recompute transformer blocks in the backward pass (less memory, ~30% slower)
    guidance_scale: float = 2.5        # FLUX.1-Kontext's distilled-guidance input (the diffusers example's value); unused by Qwen-Image-Edit
    max_sequence_length: int = 512     # T5 tokens for FLUX.1-Kontext (padded to this length, as the pipeline does); unused by Qwen
    device: str = ""                   # "" = cuda when available, else cpu
    cudnn_attention: bool = False      # allow PyTorch's cuDNN attention kernels (its first choice on H100/H200); off:
                                       # flash / memory-efficient attention. On an H200 (torch 2.11) cuDNN's backward gave
                                       # non-finite LoRA gradients for FLUX.1-Kontext in bf16 (docs/RESULTS.md, session 17)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.lora_rank < 0 or self.lora_alpha < 0:
            raise ValueError("model.lora_rank and model.lora_alpha must be >= 0")
        if not 1 <= self.max_sequence_length <= 512:
            raise ValueError("model.max_sequence_length must be in 1..512")
        if self.lora_rank and not self.lora_targets:
            raise ValueError("model.lora_targets must name at least one module when model.lora_rank > 0")

    def to_meta(self) -> str:
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        return json.dumps(d)


@dataclass
class EditCond:
    """One batch's conditioning: what stays fixed while the target latent is denoised."""
    image_latents: Tensor          # [B, L_img, 4C] packed condition-image latents (model dtype)
    grid: tuple[int, int]          # (h, w) latent grid of the target (= the condition image's)
    text: dict[str, Any] = field(default_factory=dict)   # model-specific prompt tensors (batch-first)

    @property
    def batch(self) -> int:
        return self.image_latents.shape[0]


# ----------------------------------------------------------------------------- pure helpers

def pack_latents(x: Tensor) -> Tensor:
    """[B, C, h, w] -> [B, (h/2)(w/2), 4C]: 2x2 patches in raster order (diffusers' `_pack_latents`)."""
    B, C, h, w = x.shape
    x = x.view(B, C, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)                # [B, h/2, w/2, C, 2, 2]
    return x.reshape(B, (h // 2) * (w // 2), C * 4)


def unpack_latents(t: Tensor, h: int, w: int) -> Tensor:
    """[B, (h/2)(w/2), 4C] -> [B, C, h, w] (inverse of `pack_latents`)."""
    B, L, D = t.shape
    t = t.view(B, h // 2, w // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)          # [B, C, h/2, 2, w/2, 2]
    return t.reshape(B, D // 4, h, w)


def rounded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """Pixel size rounded down to the VAE x patch multiple, as the pipelines round."""
    H, W = height // multiple * multiple, width // multiple * multiple
    if H == 0 or W == 0:
        raise EditrlInputError(f"image {width}x{height} is smaller than the model's {multiple}-pixel granule")
    return H, W


def fit_images(images: Tensor, multiple: int) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> [B, 3, H', W'] with H', W' multiples of `multiple` (a no-op
    when they already are; else an antialiased bicubic resize, clamped to [-1, 1])."""
    H, W = rounded_size(images.shape[-2], images.shape[-1], multiple)
    if (H, W) == tuple(images.shape[-2:]):
        return images
    return F.interpolate(images, size=(H, W), mode="bicubic", antialias=True, align_corners=False).clamp(-1, 1)


def schedule_shift_mu(seq_len: int, scheduler_config: Any) -> float:
    """The resolution-dependent shift μ of the FLUX / Qwen-Image pipelines (`calculate_shift`),
    linear in the number of image tokens between (base_image_seq_len, base_shift) and
    (max_image_seq_len, max_shift) of the scheduler config."""
    get = scheduler_config.get
    base_len, max_len = get("base_image_seq_len", 256), get("max_image_seq_len", 4096)
    base_shift, max_shift = get("base_shift", 0.5), get("max_shift", 1.15)
    m = (max_shift - base_shift) / (max_len - base_len)
    return seq_len * m + (base_shift - m * base_len)


def pipeline_sigmas(scheduler: Any, steps: int, seq_len: int) -> Tensor:
    """σ_0 = 1 > ... > σ_T = 0 exactly as the pipelines set them: linspace(1, 1/T, T) through the
    scheduler's own `set_timesteps` (static shift, or dynamic shift with μ from the sequence
    length, terminal stretch, ...) plus the terminal 0 it appends. Returns float32 [T+1]."""
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=schedule_shift_mu(seq_len, scheduler.config),
                            device="cpu")
    sig = scheduler.sigmas.detach().to("cpu", torch.float32).clone()                   # [T+1]
    if sig.numel() != steps + 1 or abs(float(sig[0]) - 1.0) > 1e-6 or float(sig[-1]) != 0.0:
        raise EditrlInputError(f"the pipeline's scheduler gives a schedule editrl cannot sample "
                               f"(needs {steps + 1} values from 1 to 0, got {sig.tolist()})")
    sig[0] = 1.0
    return sig


def model_timestep(sigma: Tensor, dtype: torch.dtype, num_train_timesteps: int) -> Tensor:
    """The transformer's timestep input as the pipelines compute it: t = σ·N in float32 (the
    scheduler's timesteps), cast to the model dtype, divided by 1000. [B] -> [B]."""
    t = sigma.to(torch.float32) * num_train_timesteps                                     # [B]
    return t.to(dtype) / 1000


def lora_state_names(transformer: torch.nn.Module, adapter: str) -> list[str]:
    """Names of one adapter's LoRA parameters, in module order."""
    return [n for n, _ in transformer.named_parameters() if ".lora_" in n and f".{adapter}." in n]


# ----------------------------------------------------------------------------- loading

def read_model_index(path: Path, pipeline_class: str, components: Sequence[str]) -> dict[str, Any]:
    """model_index.json of a save_pretrained folder, checked for the components the adapter
    drives (any pipeline with them loads, whatever its class name)."""
    index_file = path / "model_index.json"
    if not path.is_dir():
        raise EditrlInputError(f"{path}: model folder not found")
    if not index_file.is_file():
        raise EditrlInputError(f"{path}: not a diffusers pipeline folder (no model_index.json; "
                               f"write one with {pipeline_class}.save_pretrained)")
    try:
        index = json.loads(index_file.read_text())
    except ValueError as e:
        raise EditrlInputError(f"{index_file}: unreadable ({e})") from None
    missing = [c for c in components if not (isinstance(index.get(c), list) and index[c][0] is not None)]
    if missing:
        raise EditrlInputError(f"{path}: a {index.get('_class_name', 'pipeline')} folder without "
                               f"{', '.join(missing)}; {pipeline_class} needs {', '.join(components)}")
    return index


def load_pipeline(cls: Any, path: Path, dtype: torch.dtype, **components: Any) -> Any:
    """`cls.from_pretrained(path)` offline, with a one-line EditrlInputError on failure."""
    try:
        return cls.from_pretrained(str(path), dtype=dtype, local_files_only=True, **components)
    except Exception as e:  # noqa: BLE001 - any loader failure is a bad model folder for the user
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise EditrlInputError(f"{path}: could not load it as a {cls.__name__} ({type(e).__name__}: {first})") from None


def pick_device(spec: str) -> torch.device:
    if spec:
        return torch.device(spec)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def add_lora(transformer: torch.nn.Module, opts: ModelConfig, adapter: str) -> None:
    """Inject a LoRA adapter (peft) into the attention projections; its weights are float32
    (the base may be bf16) and its A matrices seeded by `opts.lora_seed` (B starts at 0, so
    the adapted model starts equal to the base)."""
    from peft import LoraConfig

    cfg = LoraConfig(r=opts.lora_rank, lora_alpha=opts.lora_alpha or opts.lora_rank,
                     target_modules=list(opts.lora_targets), init_lora_weights=True)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # a second adapter (NFT's old policy) is intended: peft warns about it
        warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
        torch.manual_seed(opts.lora_seed)
        try:
            transformer.add_adapter(cfg, adapter_name=adapter)
        except ValueError as e:
            raise EditrlInputError(f"model.lora_targets {list(opts.lora_targets)}: {str(e).splitlines()[0]}") from None
    for n, p in transformer.named_parameters():
        if ".lora_" in n and f".{adapter}." in n:
            p.data = p.data.float()


# ----------------------------------------------------------------------------- the editor

class DiffusersEditor(FlowEditor):
    """A FlowEditor over the components of a diffusers edit pipeline.

    Subclasses name the pipeline and implement the model-specific parts: `_load` (the
    pipeline from a folder), `_encode_text`, `_vae_encode` / `_vae_decode` (normalised
    latents [B, C, h, w] <-> images in [-1, 1]) and `_forward` (one transformer call on the
    packed sequence).
    """

    name: ClassVar[str] = "diffusers"
    pipeline_class: ClassVar[str] = ""
    components: ClassVar[tuple[str, ...]] = ("transformer", "vae", "scheduler")
    checkpoint_file: ClassVar[str] = LORA_FILE
    weights_sha256: str | None = None

    def __init__(self, pipe: Any, opts: ModelConfig, mode: str = "explicit", base_path: str = "") -> None:
        if mode not in ("explicit", "in_context"):
            raise EditrlInputError(f"unknown conditioning mode {mode!r} (expected explicit or in_context)")
        self.pipe, self.opts, self.mode = pipe, opts, mode
        self.base_path = base_path
        self.transformer = pipe.transformer
        self.vae = pipe.vae
        self.scheduler = pipe.scheduler
        self.multiple = int(pipe.vae_scale_factor) * 2
        self._device = pick_device(opts.device)
        if self._device.type == "cuda" and not opts.cudnn_attention:
            torch.backends.cuda.enable_cudnn_sdp(False)   # process-wide: see ModelConfig.cudnn_attention
        self._dtype = DTYPES[opts.dtype]
        for m in self._modules():
            m.requires_grad_(False)
            m.eval()                                  # models built from config start in train mode (dropout)
            m.to(self._device)
        if opts.gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        self.has_lora = opts.lora_rank > 0
        if self.has_lora:
            add_lora(self.transformer, opts, ADAPTER)

    # -- model-specific -----------------------------------------------------------------
    def _encode_text(self, prompts: list[str], images: Tensor) -> dict[str, Any]:
        raise NotImplementedError

    def _vae_encode(self, images: Tensor) -> Tensor:
        raise NotImplementedError

    def _vae_decode(self, latents: Tensor) -> Tensor:
        raise NotImplementedError

    def _forward(self, hidden: Tensor, timestep: Tensor, cond: EditCond) -> Tensor:
        raise NotImplementedError

    # -- plumbing -----------------------------------------------------------------------
    def _modules(self) -> list[torch.nn.Module]:
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def prompts(self, instructions: Sequence[str], contexts: Sequence[Sequence[str]] | None) -> list[str]:
        """explicit: the instruction; in_context: the session's earlier instructions, one per
        line, then the current one (the baseline intent reconstruction is measured against)."""
        if self.mode != "in_context" or not contexts:
            return list(instructions)
        return ["\n".join([*ctx, ins]) for ins, ctx in zip(instructions, contexts)]

    # -- FlowEditor ---------------------------------------------------------------------
    @torch.no_grad()
    def encode_image(self, images: Tensor) -> Tensor:
        """Images [B, 3, H, W] in [-1, 1] -> normalised latents [B, C, h, w] (model space, float32):
        the condition-image latents, and DiffusionNFT's clean targets."""
        x = fit_images(images.to(self.device), self.multiple).to(self.dtype)
        return self._vae_encode(x).float()

    @torch.no_grad()
    def encode(self, images: Tensor, instructions: Sequence[str],
               contexts: Sequence[Sequence[str]] | None = None) -> EditCond:
        """Prompt embeddings and packed condition-image latents (frozen encoders: no gradient)."""
        if len(instructions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(instructions)} instructions")
        x = fit_images(images.to(self.device), self.multiple)                            # [B, 3, H, W]
        lat = self._vae_encode(x.to(self.dtype))                                          # [B, C, h, w]
        cond = EditCond(pack_latents(lat).to(self.dtype), tuple(lat.shape[-2:]))
        cond.text = self._encode_text(self.prompts(instructions, contexts), x)
        return cond

    def latent_shape(self, cond: EditCond) -> tuple[int, ...]:
        """[B, C, h, w]: the target has the condition image's latent shape."""
        return (cond.batch, cond.image_latents.shape[-1] // 4, *cond.grid)

    def sigmas(self, steps: int, cond: EditCond | None = None) -> Tensor:
        if cond is None:
            raise ValueError(f"{self.name}: the σ schedule depends on the image size (dynamic shift); pass cond")
        h, w = cond.grid
        return pipeline_sigmas(self.scheduler, steps, (h // 2) * (w // 2))

    def velocity(self, x: Tensor, sigma: Tensor, cond: EditCond) -> Tensor:
        """v(x_σ) [B, C, h, w] float32: the transformer's prediction on [target tokens ; condition
        tokens], sliced to the target tokens and unpacked."""
        h, w = x.shape[-2:]
        target = pack_latents(x.to(self.device, self.dtype))                             # [B, L, 4C]
        hidden = torch.cat([target, cond.image_latents], 1)                               # [B, L + L_img, 4C]
        t = model_timestep(sigma.to(self.device).expand(x.shape[0]), self.dtype,
                           self.scheduler.config.num_train_timesteps)                     # [B]
        out = self._forward(hidden, t, cond)                                              # [B, L + L_img, 4C]
        return unpack_latents(out[:, : target.shape[1]], h, w).float()                   # [B, C, h, w]

    @torch.no_grad()
    def decode(self, x0: Tensor) -> list[np.ndarray]:
        img = self._vae_decode(x0.to(self.device, self.dtype))                            # [B, 3, H, W] in [-1, 1]
        return tensor_to_images(img.float())

    # -- LoRA ---------------------------------------------------------------------------
    def lora_parameters(self, adapter: str = ADAPTER) -> list[torch.nn.Parameter]:
        params = dict(self.transformer.named_parameters())
        return [params[n] for n in lora_state_names(self.transformer, adapter)]

    def fsdp_modules(self) -> list[torch.nn.Module]:
        """Every transformer block (any ModuleList of blocks on the transformer: Flux's double and
        single stream blocks, Qwen-Image's blocks), then the transformer itself; the text
        encoders and the VAE stay replicated (frozen, used outside the transformer)."""
        blocks = [m for _, lst in self.transformer.named_children() if isinstance(lst, torch.nn.ModuleList)
                  for m in lst]
        return [*blocks, self.transformer]

    def trainable_parameters(self) -> Iterable[torch.nn.Parameter]:
        """The LoRA parameters of the trained adapter only (empty without an adapter)."""
        return self.lora_parameters(ADAPTER) if self.has_lora else []

    def state_dict(self, adapter: str = ADAPTER) -> dict[str, Tensor]:
        """The adapter's LoRA weights, keyed like diffusers LoRA files (`transformer.<module>.lora_A.weight`)."""
        tag = f".{adapter}."
        return {LORA_PREFIX + n.replace(tag, "."): p.detach().contiguous()
                for n, p in zip(lora_state_names(self.transformer, adapter), self.lora_parameters(adapter))}

    def load_state_dict(self, sd: dict[str, Tensor], adapter: str = ADAPTER) -> None:
        """Copy LoRA weights (state_dict's keys) into the adapter; every key must fit exactly."""
        mine = self.state_dict(adapter)
        missing, unexpected = sorted(set(mine) - set(sd)), sorted(set(sd) - set(mine))
        if missing or unexpected:
            raise EditrlInputError(f"LoRA weights do not fit this model and config "
                                   f"(missing {missing[:2]}, unexpected {unexpected[:2]})")
        with torch.no_grad():
            for n, p in zip(lora_state_names(self.transformer, adapter), self.lora_parameters(adapter)):
                src = sd[LORA_PREFIX + n.replace(f".{adapter}.", ".")]
                if src.shape != p.shape:
                    raise EditrlInputError(f"LoRA weight {n}: shape {tuple(src.shape)}, the model has {tuple(p.shape)}")
                p.copy_(src.to(p.dtype))

    def set_training(self, on: bool) -> None:
        """Train mode for the transformer (the frozen encoders stay in eval mode)."""
        self.transformer.train(on)

    @contextlib.contextmanager
    def _same_grad_flags(self) -> Iterator[None]:
        """peft flips requires_grad when adapters are switched or disabled; restore the flags."""
        flags = {n: p.requires_grad for n, p in self.transformer.named_parameters() if ".lora_" in n}
        try:
            yield
        finally:
            for n, p in self.transformer.named_parameters():
                if n in flags:
                    p.requires_grad_(flags[n])

    @contextlib.contextmanager
    def reference(self) -> Iterator[None]:
        """Inside: the base model, every adapter disabled (the KL / NFT reference policy)."""
        if not self.has_lora:
            yield
            return
        with self._same_grad_flags():
            self.transformer.disable_adapters()
            try:
                yield
            finally:
                self.transformer.enable_adapters()

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Inside: the transformer runs with adapter `name` instead of the trained one."""
        with self._same_grad_flags():
            self.transformer.set_adapter(name)
            try:
                yield
            finally:
                self.transformer.set_adapter(ADAPTER)

    def policy_copy(self) -> "AdapterView":
        """A frozen copy of the current policy sharing the base model: a second LoRA adapter
        holding a copy of the trained one (DiffusionNFT's old policy)."""
        if not self.has_lora:
            raise EditrlInputError(f"{self.name}: training needs a LoRA adapter (model.lora_rank > 0)")
        if OLD_ADAPTER not in getattr(self.transformer, "peft_config", {}):
            add_lora(self.transformer, self.opts, OLD_ADAPTER)
            self.transformer.set_adapter(ADAPTER)
            for p in self.lora_parameters(OLD_ADAPTER):
                p.requires_grad_(False)
        view = AdapterView(self, OLD_ADAPTER)
        view.load_state_dict(self.state_dict(ADAPTER))
        return view

    def reference_policy(self) -> "AdapterView":
        """The reference policy: this editor with its adapters disabled (shares every weight)."""
        return AdapterView(self, None)

    # -- persistence --------------------------------------------------------------------
    def save(self, path: str | Path, extra_meta: dict[str, str] | None = None,
             state: dict[str, Tensor] | None = None) -> None:
        """The trained LoRA as safetensors; the metadata names the base pipeline folder and the
        model options, so `<name>:PATH` loads base + LoRA back.
        `state`: weights to write instead of `state_dict()` (e.g. gathered from FSDP shards)."""
        from safetensors.torch import save_file

        if not self.has_lora:
            raise EditrlInputError(f"{self.name}: nothing to save (no LoRA adapter; model.lora_rank = 0)")
        meta = {"editrl": "lora", "editor": self.name, "base_model": str(Path(self.base_path).resolve()),
                "model": self.opts.to_meta(), **(extra_meta or {})}
        with atomic_path(path) as tmp:
            save_file(self.state_dict() if state is None else state, tmp, metadata=meta)

    @classmethod
    def load(cls, path: str | Path, mode: str = "explicit", opts: ModelConfig | None = None) -> "DiffusersEditor":
        """A pipeline folder (fresh LoRA per `opts`), or a LoRA file / folder holding lora.safetensors
        (base model and options from its metadata; `opts.device` still applies)."""
        p = Path(path)
        opts = opts or ModelConfig()
        if p.suffix.lower() in PICKLE_SUFFIXES:
            raise EditrlInputError(f"{p}: refusing a pickle checkpoint; editrl loads weights only from safetensors")
        lora_file = p if p.is_file() else p / LORA_FILE
        if (p / "model_index.json").is_file() or not lora_file.is_file():
            index = read_model_index(p, cls.pipeline_class, cls.components)
            pipe = cls._load(p, DTYPES[opts.dtype], index)
            return cls(pipe, opts, mode=mode, base_path=str(p))
        meta, sd = read_lora_file(lora_file, cls.name)
        saved = json.loads(meta["model"])
        saved["lora_targets"] = tuple(saved["lora_targets"])
        saved["device"] = opts.device
        base = Path(meta["base_model"])
        ed = cls.load(base, mode=mode, opts=ModelConfig(**{**saved, "path": str(base)}))
        ed.load_state_dict(sd)
        ed.weights_sha256 = weights_sha256(lora_file)
        return ed

    @classmethod
    def _load(cls, path: Path, dtype: torch.dtype, index: dict[str, Any]) -> Any:
        raise NotImplementedError


def read_lora_file(path: Path, editor_name: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """(metadata, tensors) of an editrl LoRA file written by `DiffusersEditor.save`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # noqa: BLE001 - an unreadable file is bad input
        raise EditrlInputError(f"{path}: not a readable safetensors file ({e})") from None
    if meta.get("editrl") != "lora" or "base_model" not in meta or "model" not in meta:
        raise EditrlInputError(f"{path}: not an editrl LoRA checkpoint (no editrl metadata)")
    if meta.get("editor") != editor_name:
        raise EditrlInputError(f"{path}: a LoRA for {meta.get('editor')!r}, not {editor_name!r}")
    return meta, load_file(str(path))



class AdapterView(FlowEditor):
    """The same editor run with another adapter (`adapter`) or none (None, the reference):
    NFT's old policy and the KL reference without a second copy of the model. Conditioning
    is shared (the encoders carry no adapter); only the transformer call is switched."""

    def __init__(self, editor: DiffusersEditor, adapter: str | None) -> None:
        self.editor, self.adapter_name = editor, adapter
        self.name, self.default_steps = editor.name, editor.default_steps

    def _ctx(self):
        return self.editor.reference() if self.adapter_name is None else self.editor.adapter(self.adapter_name)

    @property
    def device(self) -> torch.device:
        return self.editor.device

    def encode(self, images, instructions, contexts=None):
        return self.editor.encode(images, instructions, contexts)

    def encode_image(self, images: Tensor) -> Tensor:
        return self.editor.encode_image(images)

    def latent_shape(self, cond):
        return self.editor.latent_shape(cond)

    def sigmas(self, steps: int, cond=None) -> Tensor:
        return self.editor.sigmas(steps, cond)

    def velocity(self, x, sigma, cond):
        with self._ctx():
            return self.editor.velocity(x, sigma, cond)

    def decode(self, x0):
        return self.editor.decode(x0)

    def trainable_parameters(self):
        """The view's own LoRA weights (the old policy's EMA target); none for the reference."""
        return [] if self.adapter_name is None else self.editor.lora_parameters(self.adapter_name)

    def state_dict(self):
        return {} if self.adapter_name is None else self.editor.state_dict(self.adapter_name)

    def load_state_dict(self, sd):
        if self.adapter_name is not None:
            self.editor.load_state_dict(sd, self.adapter_name)

    def set_training(self, on: bool) -> None:
        pass
