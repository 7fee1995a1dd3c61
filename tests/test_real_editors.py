"""The FLUX.1-Kontext and Qwen-Image-Edit adapters on tiny random diffusers pipelines (real
component classes, toy sizes, saved with save_pretrained and loaded through `load_editor`),
checked against the diffusers pipelines themselves and through editrl's RL updates."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

pytest.importorskip("diffusers")
pytest.importorskip("peft")

from PIL import Image  # noqa: E402
from run_metrics import metric_rows, untimed_rows  # noqa: E402
from tiny_pipelines import save_tiny_flux_kontext, save_tiny_qwen_edit  # noqa: E402

from editrl.editors import load_editor  # noqa: E402
from editrl.editors.base import images_to_tensor  # noqa: E402
from editrl.editors.diffusers_common import ModelConfig, pack_latents  # noqa: E402
from editrl.rl.rollout import grouped_rollout  # noqa: E402
from editrl.rl.train import TrainConfig, grpo_update, nft_update, training_sessions  # noqa: E402
from editrl.sampling import sde_step_with_logprob  # noqa: E402
from editrl.session import EditrlInputError  # noqa: E402
from editrl.world.grammar import session_scenes  # noqa: E402
from editrl.world.render import render  # noqa: E402

KINDS = ("flux-kontext", "qwen-edit")
OPTS = dict(lora_rank=4, max_sequence_length=16)   # T5 padded to 16 tokens (the pipeline is given the same)
LATENT_ATOL = 1e-5       # float32 latents, adapter vs pipeline (measured: bitwise equal)
PIXEL_ATOL = 1 / 255     # decoded images: the same float image, rounded to uint8 on our side only
PROMPTS = ["make the red circle blue", "remove it"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {"flux-kontext": save_tiny_flux_kontext(root / "kontext"), "qwen-edit": save_tiny_qwen_edit(root / "qwen")}


def load(kind: str, model_dirs, **kw):
    return load_editor(f"{kind}:{model_dirs[kind]}", model=ModelConfig(**{**OPTS, **kw}))


def source_images(n: int, h: int = 48, w: int = 64) -> list[np.ndarray]:
    """Non-square uint8 images (axis mix-ups show)."""
    rng = np.random.RandomState(0)
    return [(rng.rand(h, w, 3) * 255).astype(np.uint8) for _ in range(n)]


def pipeline_call(kind: str, ed, images: list[np.ndarray], prompts: list[str], steps: int, seed: int, output: str,
                  monkeypatch):
    """The diffusers pipeline itself at the images' own size (its ~1 MP resize switched off:
    Kontext by arguments, Qwen-Image-Edit by patching its module-level size rule)."""
    pil = [Image.fromarray(a) for a in images]
    h, w = images[0].shape[:2]
    g = torch.Generator().manual_seed(seed)
    if kind == "flux-kontext":
        return ed.pipe(image=pil, prompt=prompts, height=h, width=w, max_area=h * w, _auto_resize=False,
                       num_inference_steps=steps, guidance_scale=ed.opts.guidance_scale, generator=g,
                       max_sequence_length=OPTS["max_sequence_length"], output_type=output).images
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as qwen_module
    monkeypatch.setattr(qwen_module, "calculate_dimensions", lambda area, ratio: (w, h, None))
    return ed.pipe(image=pil, prompt=prompts, num_inference_steps=steps, true_cfg_scale=1.0, generator=g,
                   output_type=output).images


@pytest.mark.parametrize("kind", KINDS)
def test_ode_sample_matches_the_diffusers_pipeline(kind, model_dirs, monkeypatch):
    """Same seed, same guidance, no CFG: the adapter's ODE latents equal the pipeline's within
    LATENT_ATOL and its decoded images within one uint8 level, for a batch of two different
    prompts (padding masks) and images."""
    ed = load(kind, model_dirs)
    images, steps = source_images(2), 4
    cond = ed.encode(images_to_tensor(images), PROMPTS)
    res = ed.sample(cond, steps=steps, solver="ode", generator=torch.Generator().manual_seed(0))
    ref_latents = pipeline_call(kind, ed, images, PROMPTS, steps, 0, "latent", monkeypatch)      # [B, L, 4C]
    assert torch.allclose(pack_latents(res.x0), ref_latents, atol=LATENT_ATOL, rtol=0)
    ref_images = pipeline_call(kind, ed, images, PROMPTS, steps, 0, "np", monkeypatch)           # [B, H, W, 3] in [0, 1]
    ours = np.stack(ed.decode(res.x0)).astype(np.float64) / 255
    assert ours.shape == ref_images.shape == (2, 48, 64, 3)
    assert np.abs(ours - ref_images).max() <= PIXEL_ATOL + 1e-6


@pytest.mark.parametrize("kind", KINDS)
def test_sde_at_zero_noise_is_the_ode_and_stored_logprobs_recompute_to_ratio_one(kind, model_dirs):
    ed = load(kind, model_dirs)
    images = [render(session_scenes(s)[0]) for s in training_sessions(TrainConfig(sessions_per_step=2), 0)]
    cond = ed.encode(images_to_tensor(images), PROMPTS)
    x_init = torch.randn(ed.latent_shape(cond), generator=torch.Generator().manual_seed(1))      # [B, C, h, w]
    ode = ed.sample(cond, steps=4, solver="ode", x_init=x_init).x0
    sde0 = ed.sample(cond, steps=4, solver="sde", noise_level=0.0, x_init=x_init,
                     generator=torch.Generator().manual_seed(2)).x0
    assert torch.equal(ode, sde0)
    res = ed.sample(cond, steps=4, solver="sde", noise_level=0.7, window=2, x_init=x_init,
                    generator=torch.Generator().manual_seed(3), return_transitions=True)
    tr = res.transitions
    assert tr.x.shape[0] == 2 and tr.in_window.sum(1).tolist() == [2, 2]   # per-sample windows of 2 of the 3 SDE-able steps
    sig1 = ed.sigmas(4, cond)[1]
    ed.set_training(True)                    # as in the update: train mode, gradients on
    for s in range(tr.x.shape[1]):
        v = ed.velocity(tr.x[:, s], tr.sigma[:, s], cond)
        st = sde_step_with_logprob(tr.x[:, s], v, tr.sigma[:, s], tr.sigma_next[:, s], noise_level=0.7,
                                   prev_sample=tr.x_next[:, s], sigma_max_fallback=sig1)
        w = tr.in_window[:, s]
        assert torch.allclose(st.log_prob[w], tr.log_prob[w, s], atol=1e-6, rtol=0)
        assert st.log_prob.requires_grad
    ed.set_training(False)


def frozen_snapshot(ed) -> dict[str, torch.Tensor]:
    return {f"{c}.{n}": p.detach().clone() for c, m in ed.pipe.components.items() if isinstance(m, torch.nn.Module)
            for n, p in m.named_parameters()}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("algorithm", ("grpo", "nft"))
def test_one_update_changes_only_the_lora_and_not_the_reference(kind, algorithm, model_dirs):
    """One Flow-GRPO / DiffusionNFT step through rl.train's update functions (grpo_loss /
    nft_loss on a real grouped rollout) moves only the trained LoRA; the reference (adapter
    disabled) and NFT's old policy (a second adapter) give the same velocities as before."""
    ed = load(kind, model_dirs)
    cfg = TrainConfig(algorithm=algorithm, init=kind, sessions_per_step=1, group=2, turns=1, rollout_steps=3,
                      minibatch=8, lr=1e-2, window=0)
    sessions = training_sessions(cfg, 0)
    sources = [render(session_scenes(s)[0]) for s in sessions]
    old = ed.policy_copy() if algorithm == "nft" else None
    ref = ed.reference_policy()
    grpo = algorithm == "grpo"
    ro = grouped_rollout(old or ed, sessions, sources, cfg.group, cfg.turns, steps=cfg.rollout_steps,
                         solver="sde" if grpo else "ode", noise_level=cfg.noise_level, store=grpo,
                         generator=torch.Generator().manual_seed(0))
    probe_cond = ed.encode(ro.turns[0].inputs, ro.turns[0].texts)
    probe_x = torch.randn(ed.latent_shape(probe_cond), generator=torch.Generator().manual_seed(5))
    probe_s = torch.full((2,), 0.6)
    with torch.no_grad():
        v_policy0, v_ref0 = ed.velocity(probe_x, probe_s, probe_cond), ref.velocity(probe_x, probe_s, probe_cond)
        v_old0 = old.velocity(probe_x, probe_s, probe_cond) if old is not None else None
    assert torch.equal(v_policy0, v_ref0)    # LoRA B starts at zero: the adapted model is the base model
    before = frozen_snapshot(ed)
    params = list(ed.trainable_parameters())
    assert params and all(p.requires_grad and p.dtype == torch.float32 for p in params)
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    A = torch.tensor([[[1.0], [-1.0]]])                                                  # [B, G, K]
    mask = torch.ones_like(A, dtype=torch.bool)
    ed.set_training(True)
    if grpo:
        stats = grpo_update(cfg, ed, None, ro, A, mask)
        assert stats["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)     # on-policy recompute
    else:
        stats = nft_update(cfg, ed, old, None, ro, A, mask, torch.Generator().manual_seed(1))
        assert stats["nft/samples"] == 2
    assert all(p.grad is not None for p in params)
    opt.step()
    ed.set_training(False)
    after = frozen_snapshot(ed)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and all(".lora_" in n and ".default." in n for n in changed), sorted(changed)[:5]
    with torch.no_grad():
        assert torch.equal(ref.velocity(probe_x, probe_s, probe_cond), v_ref0)
        assert not torch.allclose(ed.velocity(probe_x, probe_s, probe_cond), v_policy0)
        if old is not None:
            assert torch.equal(old.velocity(probe_x, probe_s, probe_cond), v_old0)
    assert all(p.requires_grad for p in ed.trainable_parameters())           # adapter switches keep the flags


@pytest.mark.parametrize("kind", KINDS)
def test_lora_save_and_load_give_identical_outputs(kind, model_dirs, tmp_path):
    ed = load(kind, model_dirs)
    with torch.no_grad():
        for p in ed.trainable_parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)   # CPU draw: any device
    run = tmp_path / "final"
    ed.save(run / ed.checkpoint_file, extra_meta={"rl_steps": "1"})
    back = load_editor(f"{kind}:{run}")                           # base model and options from the LoRA's metadata
    sd, sd_back = ed.state_dict(), back.state_dict()
    assert sd.keys() == sd_back.keys() and all(k.startswith("transformer.") for k in sd)
    assert all(torch.equal(sd[k], sd_back[k]) for k in sd)
    images = source_images(1)
    cond = ed.encode(images_to_tensor(images), PROMPTS[:1])
    x = torch.randn(ed.latent_shape(cond), generator=torch.Generator().manual_seed(0))
    s = torch.tensor([0.7])
    with torch.no_grad():
        assert torch.equal(ed.velocity(x, s, cond), back.velocity(x, s, back.encode(images_to_tensor(images), PROMPTS[:1])))
    (tmp_path / "lora.pt").write_bytes(b"")
    with pytest.raises(EditrlInputError, match="pickle"):
        load_editor(f"{kind}:{tmp_path / 'lora.pt'}")


def test_bad_model_folders_are_one_line_input_errors(model_dirs, tmp_path):
    cases = {
        f"flux-kontext:{tmp_path / 'missing'}": "not found",
        f"qwen-edit:{tmp_path}": "no model_index.json",
        f"qwen-edit:{model_dirs['flux-kontext']}": "without processor",
        f"flux-kontext:{model_dirs['qwen-edit']}": "without text_encoder_2",
        "flux-kontext:": "give the model folder",
    }
    for spec, message in cases.items():
        with pytest.raises(EditrlInputError, match=message) as e:
            load_editor(spec)
        assert "\n" not in str(e.value)
    with pytest.raises(EditrlInputError, match="lora_targets"):
        load_editor(f"flux-kontext:{model_dirs['flux-kontext']}", model=ModelConfig(lora_targets=("no_such_proj",)))


def test_bf16_and_gradient_checkpointing(model_dirs):
    """bf16 weights sample finite images; gradient checkpointing gives the same LoRA gradients."""
    ed16 = load("flux-kontext", model_dirs, dtype="bfloat16")
    assert ed16.transformer.dtype == torch.bfloat16 and all(p.dtype == torch.float32 for p in ed16.trainable_parameters())
    out = ed16.edit(source_images(1), PROMPTS[:1], steps=2, generator=torch.Generator().manual_seed(0))
    assert out[0].shape == (48, 64, 3)
    grads = []
    for ckpt in (False, True):
        ed = load("flux-kontext", model_dirs, gradient_checkpointing=ckpt)
        with torch.no_grad():
            for p in ed.trainable_parameters():
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.05)   # CPU draw: any device
        cond = ed.encode(images_to_tensor(source_images(1)), PROMPTS[:1])
        x = torch.randn(ed.latent_shape(cond), generator=torch.Generator().manual_seed(0))
        ed.set_training(True)
        ed.velocity(x, torch.tensor([0.5]), cond).square().mean().backward()
        grads.append([p.grad.clone() for p in ed.trainable_parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


# ----------------------------------------------------------------------------- training

SMALL_RUN = ["sessions_per_step=1", "group=2", "turns=2", "rollout_steps=2", "minibatch=4", "threads=1",
             "model.dtype=float32", "model.lora_rank=4", "model.max_sequence_length=16",
             "model.gradient_checkpointing=false", "adv.group_filter=false", "adv.trajectory_filter=false"]


def editrl_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "editrl.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=1800)


@pytest.mark.parametrize("preset,kind", [("kontext-nft", "flux-kontext"), ("qwen-edit-grpo", "qwen-edit")])
def test_train_presets_end_to_end_from_the_command_line(preset, kind, model_dirs, tmp_path):
    """`editrl train --config PRESET model.path=TINY max_steps=2` (shrunk to CPU size) trains the
    LoRA, writes DIR/final/lora.safetensors, and `editrl bench --editor KIND:DIR/final` runs it."""
    run = tmp_path / "run"
    p = editrl_cli("train", "--config", preset, f"model.path={model_dirs[kind]}", "max_steps=2", "--out", run,
                   *SMALL_RUN)
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads(p.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2
    rows = metric_rows(run)
    assert [r["step"] for r in rows] == [1, 2] and all("reward/IF" in r for r in rows)
    if preset.endswith("grpo"):
        assert rows[0]["grpo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    else:
        assert rows[0]["nft/samples"] > 0
    final = run / "final" / "lora.safetensors"
    assert final.is_file() and not (run / "final" / "model.safetensors").exists()
    trained = load_editor(f"{kind}:{run / 'final'}")
    assert any(bool(v.abs().sum() > 0) for k, v in trained.state_dict().items() if "lora_B" in k)
    b = editrl_cli("bench", "--suite", "shapes", "--editor", f"{kind}:{run / 'final'}", "--judge", "program",
                   "--sessions", "2", "--turns", "1", "--steps", "2", "--out", tmp_path / "bench")
    assert b.returncode == 0, b.stderr[-3000:]
    assert json.loads((tmp_path / "bench" / "results.json").read_text())["n_sessions"] == 2


def test_lora_training_resumes_exactly(model_dirs, tmp_path):
    """A LoRA run stopped after step 1 and resumed equals an uninterrupted one (metrics and LoRA)."""
    from editrl.config import load_config
    from editrl.rl.train import train

    cfg = load_config(TrainConfig, "kontext-nft", [f"model.path={model_dirs['flux-kontext']}", "max_steps=2",
                                                   "final_eval=false", *SMALL_RUN])
    train(cfg, tmp_path / "full", log=lambda m: None)
    train(cfg, tmp_path / "cut", log=lambda m: None, stop_at=1)
    train(cfg, tmp_path / "cut", log=lambda m: None)

    assert untimed_rows(tmp_path / "full") == untimed_rows(tmp_path / "cut")
    a = load_editor(f"flux-kontext:{tmp_path / 'full' / 'final'}").state_dict()
    b = load_editor(f"flux-kontext:{tmp_path / 'cut' / 'final'}").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
