"""Which attention kernels give non-finite LoRA gradients on this GPU: one forward and backward of
the velocity of the test suite's tiny FLUX.1-Kontext and Qwen-Image-Edit pipelines (LoRA rank 32,
non-zero LoRA B), over dtype x gradient checkpointing x T5 length x SDPA backend (PyTorch's
default choice, or MATH only). Prints one JSON line per setting and writes them all.

    python benchmarks/gpu_attention_diag.py [OUT.json]      (default runs/gpu_attention_diag.json)

The default backend is whatever the process allows: a diffusers editor loaded on cuda with
`model.cudnn_attention=false` (the default) has already turned cuDNN attention off, so this
script checks the fix; set `EDITRL_CUDNN_ATTENTION=1` to load with cuDNN allowed and see the
failure it avoids. Session 17's H200 readings are in docs/RESULTS.md.
"""

import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_edit  # noqa: E402

from editrl.editors import load_editor  # noqa: E402
from editrl.editors.base import images_to_tensor  # noqa: E402
from editrl.editors.diffusers_common import ModelConfig  # noqa: E402

CUDNN = os.environ.get("EDITRL_CUDNN_ATTENTION", "") == "1"
tmp = Path(tempfile.mkdtemp(prefix="editrl-attn-diag-"))
save_tiny_flux_kontext(tmp / "kontext")
save_tiny_qwen_edit(tmp / "qwen")
imgs = [(np.random.RandomState(i).rand(64, 64, 3) * 255).astype(np.uint8) for i in range(2)]


def run(kind, path, dtype, ck, seq, backend):
    ed = load_editor(f"{kind}:{path}", model=ModelConfig(dtype=dtype, lora_rank=32, max_sequence_length=seq,
                                                         gradient_checkpointing=ck, guidance_scale=2.5,
                                                         cudnn_attention=CUDNN))
    with torch.no_grad():   # non-zero LoRA B, as after a first update
        for n, p in enumerate(ed.trainable_parameters()):
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(n)).to(p.device) * 0.01)
    cond = ed.encode(images_to_tensor(imgs), ["make the red circle blue", "remove it"])
    x = torch.randn(ed.latent_shape(cond), generator=torch.Generator().manual_seed(0))
    ed.set_training(True)
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        v = ed.velocity(x, torch.tensor([0.5, 0.5]), cond)
        v.square().mean().backward()
    names = [n for n, _ in ed.transformer.named_parameters() if ".lora_" in n and ".default." in n]
    bad = [n for n, p in zip(names, ed.trainable_parameters()) if p.grad is None or not torch.isfinite(p.grad).all()]
    return dict(kind=kind, dtype=dtype, ckpt=ck, seq=seq, backend=str(backend), cudnn_allowed=CUDNN,
                v_finite=bool(torch.isfinite(v).all()), n_bad=len(bad), first_bad=bad[:3], n=len(names))


res = []
for kind, path in (("flux-kontext", tmp / "kontext"), ("qwen-edit", tmp / "qwen")):
    for dtype in ("bfloat16", "float32"):
        for ck in (True, False):
            for seq in (512, 16):
                for be in (None, SDPBackend.MATH):
                    if kind == "qwen-edit" and (seq == 16 or be is not None): continue
                    try:
                        r = run(kind, path, dtype, ck, seq, be)
                    except Exception as e:
                        r = dict(kind=kind, dtype=dtype, ckpt=ck, seq=seq, backend=str(be), error=f"{type(e).__name__}: {str(e)[:200]}")
                    print(json.dumps(r), flush=True); res.append(r)
out = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/gpu_attention_diag.json")
out.parent.mkdir(parents=True, exist_ok=True)
out.write_text(json.dumps(res, indent=1))
print(f"wrote {out}", file=sys.stderr)
