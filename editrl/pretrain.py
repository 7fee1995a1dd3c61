"""Supervised flow-matching pretraining of the tiny editor on ShapesWorld edits made on the fly.

Reads top to bottom: config -> data (one batch is a pure function of (seed, step), so
resume is exact without saving any loader state) -> model, optimiser, EMA -> the loop
(loss, step, EMA, log, evaluate, checkpoint) -> the final EMA weights as
DIR/model.safetensors (load with `--editor tiny:DIR`).

Each example: a random session (1-4 turns, all nine edit types, pronouns, rules), a random
turn k; input = the ground-truth image before turn k, target = the one after. The text is
the explicit instruction or, with probability `in_context_share`, the in-context form
(previous instructions + the current raw one). With probability `degrade_prob` the input is
degraded (blur, noise, colour shift) so that later-turn inputs that look like model
outputs are not out of distribution.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

from .checkpoint import (append_metrics, flatten_optimizer, load_state, prefixed, restore_rng, rng_tensors, save_state, truncate_metrics,
                         unflatten_optimizer, unprefixed)
from .config import to_dict
from .editors.base import images_to_tensor
from .editors.tiny import SIGMA_FLOOR, TinyConfig, TinyEditor, Tokenizer
from .world.grammar import GrammarConfig, sample_session, session_scenes
from .world.render import degrade, render


@dataclass
class PretrainConfig:
    seed: int = 0                       # data and init seed
    batch_size: int = 64
    lr: float = 5e-4                    # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_steps: int = 300
    max_steps: int = 12000              # cosine schedule length (and stop)
    max_minutes: float = 0.0            # stop earlier after this wall time (0 = no limit)
    min_lr_ratio: float = 0.05          # cosine floor as a share of lr
    grad_clip: float = 1.0
    ema_decay: float = 0.999            # ramped as min(decay, (1 + step) / (10 + step))
    max_turns: int = 4                  # sessions sampled with 1..max_turns turns
    in_context_share: float = 0.4       # share of examples in the in-context text form
    degrade_prob: float = 0.5           # share of inputs degraded like a model output
    sigma_logit_mean: float = 0.3       # σ ~ sigmoid(N(mean, std)) (SD3's logit-normal) ...
    sigma_logit_std: float = 1.0
    sigma_uniform_share: float = 0.1    # ... mixed with U(0, 1)
    loss_sigma_floor: float = 0.25      # x-loss weight 1/max(σ, floor)²: the velocity loss, bounded at low σ
    edit_loss_weight: float = 0.0       # + this x the mean error over the pixels the edit changes (dilated 1 px):
                                        # a typical object edit changes ~3% of the canvas, so a plain
                                        # per-pixel mean spends ~97% of its gradient on copying
    log_every: int = 50
    eval_every: int = 1000              # quick held-out single-turn eval (0 = never)
    eval_examples: int = 128
    eval_steps: int = 10
    ckpt_every: int = 500
    threads: int = 0                    # torch threads (0 = all cores)
    init: str = ""                      # start from these weights (tiny | tiny:PATH; the model config is
                                        # then the checkpoint's) instead of a random init: continued
                                        # supervised training, the control every RL claim needs
    model: TinyConfig = field(default_factory=TinyConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every", "ckpt_every", "max_turns", "eval_examples", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.edit_loss_weight < 0:
            raise ValueError("edit_loss_weight must be non-negative")
        for name in ("in_context_share", "degrade_prob", "sigma_uniform_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")
        if self.lr <= 0:
            raise ValueError("lr must be positive")


EVAL_SEED_OFFSET = 1_000_003  # held-out sessions never collide with training streams


# --------------------------------------------------------------------------------- data

Example = tuple[np.ndarray, np.ndarray, list[int], np.ndarray]  # source, target, token ids, changed-pixel mask


def session_examples(rng: np.random.Generator, cfg: PretrainConfig, tok: Tokenizer) -> list[Example]:
    """Every turn of one random session (1..max_turns turns) as an example: input = the
    ground-truth image before the turn (degraded with probability `degrade_prob`), target =
    the one after, text = the explicit instruction or (with probability `in_context_share`)
    the in-context form; the mask marks the pixels the edit changes (against the clean
    source, so degradation is not counted as edit). Using all turns of a session makes data
    2-3x cheaper than one turn per session, and the worker that makes it shares the 2 cores
    with the trainer."""
    K = int(rng.integers(1, cfg.max_turns + 1))
    s = sample_session(int(rng.integers(2**31)), 0, GrammarConfig(turns=K, canvas=cfg.model.canvas))
    scenes = session_scenes(s)
    images = [render(sc) for sc in scenes]
    out = []
    for k in range(1, K + 1):
        src = images[k - 1]
        changed = (src != images[k]).any(-1)                                           # [H, W]
        if rng.random() < cfg.degrade_prob:
            src = degrade(src, rng, blur=(0.0, 0.8), noise=float(rng.uniform(0.0, 0.05)), shift=0.03)
        turn = s.turns[k - 1]
        if rng.random() < cfg.in_context_share:
            ids = tok.encode(turn.instruction, [t.instruction for t in s.turns[: k - 1]], cfg.model.max_tokens)
        else:
            ids = tok.encode(turn.explicit, None, cfg.model.max_tokens)
        out.append((src, images[k], ids, changed))
    return out


def make_batch(cfg: PretrainConfig, step: int, tok: Tokenizer, seed_offset: int = 0) -> dict[str, torch.Tensor]:
    """Batch `step` of the stream: a pure function of (cfg.seed, step)."""
    rng = np.random.default_rng([cfg.seed + seed_offset, step])
    examples: list[Example] = []
    while len(examples) < cfg.batch_size:
        examples += session_examples(rng, cfg, tok)
    examples = examples[: cfg.batch_size]
    srcs, tgts, seqs, masks = zip(*examples)
    L = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    changed = torch.from_numpy(np.stack(masks)).float()[:, None]                        # [B, 1, H, W]
    return {"source": images_to_tensor(list(srcs)), "target": images_to_tensor(list(tgts)), "ids": ids,
            "mask": ids != tok.pad, "changed": changed}


class _Stream(torch.utils.data.IterableDataset):
    def __init__(self, cfg: PretrainConfig, start: int) -> None:
        self.cfg, self.start = cfg, start

    def __iter__(self):
        torch.set_num_threads(1)
        tok = Tokenizer(self.cfg.model.vocab)
        step = self.start
        while True:
            yield make_batch(self.cfg, step, tok)
            step += 1


# ------------------------------------------------------------------------------- math

def flow_matching_loss(editor: TinyEditor, batch: dict[str, torch.Tensor], gen: torch.Generator,
                       cfg: PretrainConfig) -> torch.Tensor:
    x0 = batch["target"]                                                               # [B, 3, H, W]
    B = x0.shape[0]
    eps = torch.randn(x0.shape, generator=gen)                                         # [B, 3, H, W]
    sigma = torch.sigmoid(cfg.sigma_logit_mean + torch.randn(B, generator=gen) * cfg.sigma_logit_std)   # [B]
    uni = torch.rand(B, generator=gen)
    sigma = torch.where(torch.rand(B, generator=gen) < cfg.sigma_uniform_share, uni, sigma)
    s = sigma.view(B, 1, 1, 1)
    x_sigma = (1 - s) * x0 + s * eps                                                   # [B, 3, H, W]
    cond = editor.encode_tokens(batch["source"], batch["ids"], batch["mask"])
    # The velocity loss ‖v_θ − (ε − x0)‖² of an x-predicting net is ‖x̂0 − x0‖² / σ². Its weight
    # is bounded below σ = loss_sigma_floor: unbounded, a few nearly clean samples dominate
    # every (clipped) step and starve the noisy regime where the edit is decided. Any positive
    # σ-weighting has the same minimiser, E[x0 | x_σ, condition].
    x0_hat = editor.predict_x0(x_sigma, sigma, cond)
    w = 1.0 / sigma.clamp(min=max(SIGMA_FLOOR, cfg.loss_sigma_floor)) ** 2             # [B]
    err = ((x0_hat - x0) ** 2).mean(1, keepdim=True)                                   # [B, 1, H, W]
    per_example = err.mean((1, 2, 3))                                                  # [B]
    if cfg.edit_loss_weight > 0:
        per_example = per_example + cfg.edit_loss_weight * edit_region_mean(err, batch["changed"])
    return (w * per_example).mean()


def edit_region_mean(err: torch.Tensor, changed: torch.Tensor) -> torch.Tensor:
    """Mean of `err` [B, 1, H, W] over each example's changed pixels grown by one pixel (the
    object's edge, where blur and shifted inputs put the error); 0 for an example that changes
    nothing, whose error the plain mean already covers."""
    m = F.max_pool2d(changed, 3, stride=1, padding=1)                                  # [B, 1, H, W]
    return (err * m).sum((1, 2, 3)) / m.sum((1, 2, 3)).clamp(min=1.0)                  # [B]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    p = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, step: int, decay: float) -> None:
    d = min(decay, (1 + step) / (10 + step))
    for pe, pm in zip(ema.parameters(), model.parameters()):
        pe.lerp_(pm, 1 - d)


@torch.no_grad()
def quick_eval(editor: TinyEditor, cfg: PretrainConfig) -> dict[str, float]:
    """Single-turn success on held-out sessions, explicit and in-context, by the exact judge."""
    from .world.verify import judge_turn

    out: dict[str, float] = {}
    rng = np.random.default_rng([cfg.seed + EVAL_SEED_OFFSET])
    items = []
    for i in range(cfg.eval_examples):
        s = sample_session(cfg.seed + EVAL_SEED_OFFSET, i, GrammarConfig(turns=1, canvas=cfg.model.canvas))
        items.append((s, session_scenes(s)))
    for mode in ("explicit", "in_context"):
        editor.mode = mode
        texts = [s.turns[0].explicit if mode == "explicit" else s.turns[0].instruction for s, _ in items]
        gen = torch.Generator().manual_seed(int(rng.integers(2**31)))
        outs = editor.edit([render(sc[0]) for _, sc in items], texts, [[] for _ in items], generator=gen,
                           steps=cfg.eval_steps)
        ok = {"IF": 0, "CC": 0, "success": 0}
        for (s, sc), img in zip(items, outs):
            v = judge_turn(img, sc[0], sc[1], s.turns[0], 1, s.global_constraint, s.id)
            ok["IF"] += v.IF.status == "pass"
            ok["CC"] += v.CC.status == "pass"
            ok["success"] += bool(v.success)
        for k, n in ok.items():
            out[f"eval/{mode}/{k}"] = n / len(items)
    editor.mode = "explicit"
    return out


# ------------------------------------------------------------------------------ recipe

def pretrain(cfg: PretrainConfig, out: str | os.PathLike, log: Callable[[str], None] = print,
             progress: Callable[[int, int, dict], None] | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) a pretraining run in `out`. `stop_at` ends the loop early after a
    checkpoint, as a kill would (used by the resume tests)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if cfg.init:
        from .editors.tiny import load_tiny
        start = load_tiny(cfg.init)
        cfg = replace(cfg, model=start.cfg)
        editor = TinyEditor(cfg.model, net=start.net)
    else:
        editor = TinyEditor(cfg.model)
    ema = TinyEditor(cfg.model)
    ema.net.load_state_dict(editor.net.state_dict())
    editor.net.train()
    opt = torch.optim.AdamW(editor.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    step, elapsed = 0, 0.0
    state_path = out / "state.safetensors"
    metrics_path = out / "metrics.jsonl"
    if state_path.exists():                                   # exact resume
        tensors, meta = load_state(state_path)
        if _resumable(meta.get("config")) != _resumable(to_dict(cfg)):
            from .session import EditrlInputError
            raise EditrlInputError(f"{out} holds a run with a different config; use a new --out or the same settings")
        editor.net.load_state_dict(unprefixed(tensors, "model"))
        ema.net.load_state_dict(unprefixed(tensors, "ema"))
        unflatten_optimizer(opt, tensors, meta["optimizer"])
        restore_rng(tensors)
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        truncate_metrics(metrics_path, step)
        log(f"resumed from step {step}")
    (out / "config.json").write_text(json.dumps(to_dict(cfg), indent=2) + "\n")

    def save() -> None:
        opt_t, opt_meta = flatten_optimizer(opt)
        tensors = {**prefixed(editor.net.state_dict(), "model"), **prefixed(ema.net.state_dict(), "ema"),
                   **opt_t, **rng_tensors()}
        save_state(state_path, tensors, {"step": step, "elapsed": elapsed, "config": to_dict(cfg), "optimizer": opt_meta})

    loader = torch.utils.data.DataLoader(_Stream(cfg, step), batch_size=None, num_workers=1,
                                         prefetch_factor=4, persistent_workers=False)
    it = iter(loader)
    t_start = time.time() - elapsed
    window: list[float] = []
    last: dict[str, Any] = {}
    try:
        while step < cfg.max_steps and (stop_at is None or step < stop_at):
            if cfg.max_minutes and (time.time() - t_start) / 60 >= cfg.max_minutes:
                log(f"max_minutes={cfg.max_minutes} reached at step {step}")
                break
            t0 = time.time()
            batch = next(it)
            t_data = time.time() - t0
            gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            loss = flow_matching_loss(editor, batch, gen, cfg)
            if not torch.isfinite(loss):
                log(f"step {step}: non-finite loss {loss.item()}, skipped")
                opt.zero_grad(set_to_none=True)
                step += 1
                continue
            opt.zero_grad(set_to_none=True)
            loss.backward()
            gnorm = float(torch.nn.utils.clip_grad_norm_(editor.net.parameters(), cfg.grad_clip))
            opt.step()
            ema_update(ema.net, editor.net, step, cfg.ema_decay)
            step += 1
            window.append(loss.item())
            elapsed = time.time() - t_start
            if step % cfg.log_every == 0 or step == cfg.max_steps:
                last = {"step": step, "loss": float(np.mean(window)), "lr": lr_at(step - 1, cfg), "grad_norm": gnorm,
                        "time_data_s": round(t_data, 4), "time_step_s": round(time.time() - t0, 4),
                        "elapsed_min": round(elapsed / 60, 2)}
                window = []
                if cfg.eval_every and step % cfg.eval_every == 0:
                    ema.net.eval()
                    last.update(quick_eval(ema, cfg))
                append_metrics(metrics_path, last)
                if progress:
                    progress(step, cfg.max_steps, last)
            if step % cfg.ckpt_every == 0:
                save()
    finally:
        del it, loader
    save()
    ema.save(out / "model.safetensors", extra_meta={"pretrain_steps": str(step), "pretrain_minutes": f"{elapsed / 60:.1f}",
                                                    "pretrain_seed": str(cfg.seed), "pretrain_init": cfg.init or "random"})
    return {"out": str(out), "steps": step, "minutes": round(elapsed / 60, 2), "last": last,
            "model": str(out / "model.safetensors")}


def _resumable(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """The settings a resumed run must share with its start: everything but the wall-clock
    budget (extending `max_minutes` to train longer is fine; the result stays exact)."""
    return None if cfg is None else {k: v for k, v in cfg.items() if k != "max_minutes"}
