"""Multi-turn RL post-training of a flow editor over whole sessions (`editrl train`).

The recipe, top to bottom (`train`):

1. **Setup.** Config -> the policy θ (initialised from `init`, e.g. the shipped tiny editor,
   or a diffusers FLUX.1-Kontext / Qwen-Image-Edit folder `model.path` trained through a LoRA
   adapter), for NFT the *old* policy (an EMA of θ that produces the rollouts), for a KL /
   reference term a frozen copy of the initial weights (LoRA editors: the adapter disabled),
   AdamW. `DIR/state.safetensors` holds the trained weights (the whole tiny net; only the
   LoRA of a diffusers editor), optimiser, old policy, step and wall time: a killed run
   resumes exactly (every random draw below is a pure function of (seed, step)).
2. **Rollout** (`rl.rollout.grouped_rollout`): B fresh ShapesWorld sessions x G trajectories
   x K turns on the policy's own outputs. GRPO samples with the SDE and stores each window
   step's log-probability; NFT samples with any solver and keeps each turn's clean output.
   With `branch` the G trajectories of a session go on from one shared output after every
   turn (a successful one, chosen as soon as the turn is judged).
3. **Reward** (`rl.rewards`). Every turn of every trajectory is judged by the benchmark's
   judges (`reward.judge`: the exact program judge on ShapesWorld, `vlm:URL` for an
   OpenAI-compatible server such as vLLM, `vlm-local:PATH` for a transformers VLM), turn by
   turn on a background thread while the rollout goes on; judge errors stay errors and mask
   their samples. Sessions come from the ShapesWorld grammar or a sessions file (`suite`).
4. **Advantages** (`rl.advantages.compute_advantages`): binary or graded scores, turn
   aggregation, reward- or advantage-level fusion, broadcast or per-turn assignment,
   trajectory and group filters; every masked share is logged.
5. **Loss and update.** Flow-GRPO (`rl.flow_grpo.grpo_loss`, the stored transitions'
   log-probabilities recomputed under θ) or DiffusionNFT (`rl.nft.nft_loss` on freshly
   re-noised outputs, v_old from the old policy); gradient clipping; AdamW; for NFT the old
   policy follows θ by EMA; with `ema_decay` > 0 an evaluation EMA of θ follows it too.
   A non-finite loss or reward skips the step with a logged reason.
6. **Log, evaluate, checkpoint.** `metrics.jsonl` (reward per judge, success per turn, masked
   shares, loss stats, KL, clip fraction, grad norm, seconds per phase); every `eval_every`
   steps the policy (its evaluation EMA when there is one) is benchmarked on held-out
   sessions through the benchmark harness (`DIR/eval/step_<n>/results.json`); the same
   weights go to `DIR/final/model.safetensors` at the end (load it
   with `--editor tiny:DIR/final`; LoRA editors write `DIR/final/lora.safetensors`, loaded
   with `--editor flux-kontext:DIR/final` / `qwen-edit:DIR/final`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from ..checkpoint import (append_metrics, flatten_optimizer, load_state, prefixed, save_state, truncate_metrics,
                          unflatten_optimizer, unprefixed)
from ..config import to_dict
from ..editors import REAL_EDITORS
from ..editors.base import FlowEditor
from ..editors.diffusers_common import ModelConfig
from ..sampling import sde_step_with_logprob
from ..session import EditrlInputError, atomic_write_text
from .advantages import AdvantageConfig, compute_advantages
from .flow_grpo import grpo_loss, transition_kl
from . import distributed as D
from .joint_intent import IntentActor, IntentConfig
from .curriculum import CurriculumConfig, TaskCurriculum
from .ema import ema_export, ema_init, ema_state_update_
from .nft import ema_update_, nft_loss, old_policy_decay, optimality_weight
from .rewards import RewardConfig, RewardPipeline, TrainingSessions, load_reward_judge
from .rollout import Rollout, choose_parents, grouped_rollout

TRAIN_SEED_OFFSET = 7_919          # training sessions: sample_session(seed + offset, step * B + i)
BRANCHES = ("none", "success", "random")   # TrainConfig.branch
EVAL_SEED = 2_024_000              # held-out sessions for periodic evaluation (never trained on)


@dataclass
class TrainConfig:
    algorithm: str = "nft"              # nft | grpo
    init: str = "tiny"                  # editor to post-train: tiny (shipped) | tiny:PATH | flux-kontext | qwen-edit (model.path)
    model: ModelConfig = field(default_factory=ModelConfig)   # flux-kontext / qwen-edit: folder, LoRA, dtype, checkpointing
    seed: int = 0
    # rollouts
    sessions_per_step: int = 8          # B: sessions (groups) per step
    group: int = 8                      # G: trajectories per session
    turns: int = 3                      # K: turns per session (K = 1: single-turn training)
    form: str = "explicit"              # text the editor sees: explicit | in_context
    rollout_steps: int = 10             # T: denoising steps per edit
    solver: str = "ode"                 # NFT rollout solver (GRPO always samples with the SDE)
    noise_level: float = 0.7            # SDE noise level a (GRPO; NFT when solver = sde)
    branch: str = "none"                # none: each trajectory goes on from its own output | success: after every
                                        # turn all G go on from one of the group's outputs, a random successful one
                                        # (else any) | random: from a random one. Later turns' groups then compare
                                        # G edits of one input (needs adv.assignment=per_turn; editrl/rl/rollout.py)
    window: int = 0                     # GRPO: SDE window length (0 = every step but the last)
    constraint_share: float = 0.3       # grammar: share of sessions with a global rule
    pronoun_prob: float = 0.6           # grammar: chance of a pronoun where one is possible
    suite: str = "shapes"               # training sessions: shapes (fresh grammar sessions every step) | a sessions
                                        # file (editrl JSONL, MICE-Bench, EdiVal; shuffled passes; needs a vlm reward
                                        # unless its sessions carry ShapesWorld scenes)
    image_size: int = 0                 # file suites: bring every source to N x N (shorter side, centre crop); 0 = keep
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)   # task: draw sessions toward the task
                                        # types whose groups still train (editrl/rl/curriculum.py); none: as drawn
    reward: RewardConfig = field(default_factory=RewardConfig)   # the judge behind the rewards and its options
    # optimisation
    lr: float = 3e-5
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    minibatch: int = 64                 # samples per forward/backward (gradients are accumulated)
    epochs: int = 1                     # optimiser steps per rollout batch (each over all its samples)
    max_steps: int = 100
    max_minutes: float = 0.0            # stop after this wall time (0 = no limit)
    threads: int = 0                    # torch threads (0 = all cores)
    session_rng: bool = False           # one random stream per (step, session): results independent of how sessions
                                        # are spread over processes (always on under a multi-process launch)
    # rewards -> advantages
    adv: AdvantageConfig = field(default_factory=AdvantageConfig)
    # session-intent reconstruction: who writes the editor's text, and joint text RL (Edit-R2)
    intent: IntentConfig = field(default_factory=IntentConfig)
    # Flow-GRPO
    clip_range: float = 1e-3            # PPO clip on the per-step likelihood ratio
    kl_beta: float = 0.0                # KL to the initial policy (reference)
    # DiffusionNFT
    nft_beta: float = 1.0               # implicit-policy mixing β
    nft_adaptive: bool = True           # x0-space errors with the stop-gradient adaptive weight
    nft_sigma_min: float = 0.05         # re-noising σ ~ U(nft_sigma_min, 1)
    nft_shared_noise: bool = True       # one re-noising (σ, ε) per group and turn (common random numbers)
    nft_ref_weight: float = 0.0         # λ_ref·‖v_θ − v_ref‖²
    nft_negatives: bool = True          # also train on samples with A < 0 (false: only A > 0 enter the loss, a
                                        # filtered self-imitation that pulls toward good samples and pushes nothing)
    old_decay_max: float = 0.5          # old policy = EMA of θ with decay ramped up to this ...
    old_decay_ramp: float = 20.0        # ... over this many steps
    ema_decay: float = 0.0              # held-out evaluations and DIR/final use an EMA of θ with this decay,
                                        # updated after every optimiser step (0 = θ itself; e.g. 0.9-0.99)
    # evaluation and checkpoints
    eval_every: int = 0                 # benchmark the policy every N steps (0 = only at the end)
    eval_sessions: int = 64
    eval_steps: int = 10
    eval_suite: str = "shapes"          # held-out suite: shapes | shapes-long (exact judge, eval_sessions fresh sessions) |
                                        # a sessions file (judged by the reward's judge, every session)
    final_eval: bool = True
    ckpt_every: int = 5
    log_every: int = 1
    track: str = ""                     # mirror metrics to: tensorboard, wandb (comma-separated; optional extras)
    track_project: str = "editrl"       # W&B project
    track_strips_every: int = 10        # sample session strips to the trackers every N steps (0 = never)
    track_strips: int = 4               # sessions per strip set (first trajectory of each)

    def __post_init__(self) -> None:
        if self.algorithm not in ("nft", "grpo"):
            raise ValueError(f"algorithm must be nft or grpo, got {self.algorithm!r}")
        if self.form not in ("explicit", "in_context"):
            raise ValueError(f"form must be explicit or in_context, got {self.form!r}")
        if self.solver not in ("ode", "sde"):
            raise ValueError(f"solver must be ode or sde, got {self.solver!r}")
        for name in ("sessions_per_step", "group", "turns", "rollout_steps", "minibatch", "max_steps", "epochs",
                     "ckpt_every", "log_every", "eval_sessions", "eval_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.group < 2:
            raise ValueError("group must be at least 2 (advantages compare trajectories within a group)")
        if self.branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {self.branch!r}")
        if self.branch != "none" and self.adv.assignment != "per_turn":
            raise ValueError(f"branch={self.branch} needs adv.assignment=per_turn (branched rows are no trajectories "
                             f"to broadcast an advantage over)")
        if not 0 <= self.window <= self.rollout_steps - 1:
            raise ValueError(f"window must be in 0..rollout_steps-1 = {self.rollout_steps - 1}")
        if not 0 < self.nft_sigma_min < 1:
            raise ValueError("nft_sigma_min must be in (0, 1)")
        if self.lr <= 0 or self.clip_range <= 0 or self.nft_beta <= 0:
            raise ValueError("lr, clip_range and nft_beta must be positive")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


# ----------------------------------------------------------------------------- helpers

def session_source(cfg: TrainConfig) -> TrainingSessions:
    return TrainingSessions(cfg.suite, cfg.seed, cfg.turns, cfg.constraint_share, cfg.pronoun_prob, cfg.image_size)


def training_sessions(cfg: TrainConfig, step: int, source: TrainingSessions | None = None,
                      curriculum: TaskCurriculum | None = None) -> list:
    """The B sessions of `step`: a pure function of (seed, step) and the curriculum's state;
    ShapesWorld sessions are disjoint from evaluation. With an active curriculum B are kept
    out of a pool of `curriculum.pool × B` drawn the same way."""
    src = source or session_source(cfg)
    if curriculum is None or not curriculum.active:
        return src.sessions(step, cfg.sessions_per_step, TRAIN_SEED_OFFSET)
    pool = src.sessions(step, cfg.sessions_per_step * curriculum.cfg.pool, TRAIN_SEED_OFFSET)
    return curriculum.select(pool, cfg.sessions_per_step, step)


def step_generator(cfg: TrainConfig, step: int, stream: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([cfg.seed, step, stream]).generate_state(1)[0]))


def judge_rollout(judge, sessions, ro: Rollout) -> list[list[list]]:
    """verdicts[b][g][k] for every turn the session has, judged after the rollout (the same
    requests `RewardPipeline` sends during one)."""
    pipe = RewardPipeline(judge, overlap=False)
    pipe.begin(sessions, ro.G, explicit=False)
    for k in range(1, ro.K + 1):
        pipe.turn_done(k, [(b, g, imgs) for b, groups in enumerate(ro.images) for g, imgs in enumerate(groups)
                           if len(imgs) > k])
    return pipe.verdicts()[0]


def _work_items(rows: list[tuple[int, Any]], minibatch: int) -> list[tuple[int, list]]:
    """(k, payload) rows -> micro-batches (turn k, [payloads]): `minibatch` rows per chunk, split by turn."""
    items: list[tuple[int, list]] = []
    for start in range(0, len(rows), minibatch):
        by_turn: dict[int, list] = {}
        for k, x in rows[start: start + minibatch]:
            by_turn.setdefault(k, []).append(x)
        items += list(by_turn.items())
    return items


def _padded(items: list[tuple[int, list]], filler: tuple[int, list], lockstep: bool) -> list[tuple[int, list, float]]:
    """(k, payload, weight) micro-batches. In lockstep (FSDP) every rank runs as many as the rank
    with the most, the extra ones a copy of `filler` with weight 0: each forward and backward of
    a sharded module is a collective that every rank must join."""
    out = [(k, xs, 1.0) for k, xs in items]
    if lockstep:
        out += [(filler[0], filler[1], 0.0)] * (D.pad_count(len(items)) - len(items))
    return out


def nft_update(cfg: TrainConfig, policy, old, ref, ro: Rollout, A: torch.Tensor, mask: torch.Tensor,
               gen: torch.Generator, draws_fn: Callable | None = None, scale_fn: Callable[[int], float] | None = None,
               lockstep: bool = False) -> dict[str, float]:
    """Accumulate the DiffusionNFT gradient over every trained (b, g, k) sample.

    `scale_fn(n)` (multi-process FSDP) multiplies the loss before backward; `lockstep` pads the
    micro-batches to the largest per-rank count (see `_padded`)."""
    B, G, K = A.shape
    r_all = optimality_weight(A, cfg.adv.adv_clip or 5.0)                             # [B, G, K]
    keep = mask if cfg.nft_negatives else mask & (A > 0)                             # [B, G, K]
    rows = [(k, i) for k in range(K) for i in range(B * G) if bool(keep.reshape(B * G, K)[i, k])]
    n = len(rows)
    stats: dict[str, float] = {"nft/samples": float(n)}
    scale = scale_fn(n) if scale_fn is not None else 1.0
    work = _padded(_work_items(rows, cfg.minibatch), (0, [0]), lockstep)
    if not work:
        return stats
    # Re-noising draws: one (σ, ε) per (session, turn) shared by the G trajectories of the group
    # (common random numbers), or one per sample. Shared draws cancel the part of the
    # flow-matching gradient the group's samples have in common (the copied background, the
    # noise itself) against the zero-mean advantages, leaving their differences.
    shape = policy.encode_image(ro.turns[0].outputs[:1]).shape[1:]                # model space: [C, H, W] (latent editors: [C, h, w])
    if draws_fn is not None:                     # per-session streams (distributed.nft_draws), same layout
        sig_tab, eps_tab = draws_fn(shape)
    else:
        n_draw = B if cfg.nft_shared_noise else B * G
        sig_tab = cfg.nft_sigma_min + (1 - cfg.nft_sigma_min) * torch.rand(n_draw, K, generator=gen)   # [B or BG, K]
        eps_tab = torch.randn((n_draw, K, *shape), generator=gen)                                      # [B or BG, K, C, H, W]
    sums: dict[str, float] = {}
    for k, ids, weight in work:
        tb = ro.turns[k]
        sel = torch.tensor(ids)
        x0 = policy.encode_image(tb.outputs[sel])                                  # [n, C, H, W] (latent editors: VAE latents)
        src = tb.inputs[sel]
        texts = [tb.texts[i] for i in ids]
        ctxs = [tb.contexts[i] for i in ids]
        dev = x0.device                                                            # the draws and rewards live on the CPU
        r = r_all.view(B * G, K)[sel, k].to(dev)                                   # [n]
        draw = sel // G if cfg.nft_shared_noise else sel
        sigma = sig_tab[draw, k].to(dev)                                           # [n]
        eps = eps_tab[draw, k].to(dev)                                             # [n, C, H, W]
        s = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s) * x0 + s * eps
        with torch.no_grad():
            v_old = old.velocity(x_sigma, sigma, old.encode(src, texts, ctxs))
            v_ref = (ref.velocity(x_sigma, sigma, ref.encode(src, texts, ctxs))
                     if ref is not None and cfg.nft_ref_weight > 0 else None)
        v_theta = policy.velocity(x_sigma, sigma, policy.encode(src, texts, ctxs))
        loss, st = nft_loss(v_theta, v_old, x_sigma, sigma, x0, eps, r, cfg.nft_beta, cfg.nft_adaptive,
                            v_ref=v_ref, ref_weight=cfg.nft_ref_weight)
        (loss * (weight * scale * len(ids) / max(n, 1))).backward()
        if weight:
            for key, val in st.items():
                sums[key] = sums.get(key, 0.0) + float(val) * len(ids)
    stats.update({f"nft/{k}": v / n for k, v in sums.items() if k != "n_active"})
    return stats


def grpo_update(cfg: TrainConfig, policy, ref, ro: Rollout, A: torch.Tensor, mask: torch.Tensor,
                scale_fn: Callable[[int], float] | None = None, lockstep: bool = False) -> dict[str, float]:
    """Accumulate the Flow-GRPO gradient over every stored in-window transition of every trained
    turn (`scale_fn`, `lockstep`: as in `nft_update`)."""
    B, G, K = A.shape
    items = []  # (k, row, step index s)
    for k in range(K):
        tr = ro.turns[k].transitions
        if tr is None:
            continue
        for i in range(B * G):
            if not bool(mask.view(B * G, K)[i, k]):
                continue
            for s in range(tr.x.shape[1]):
                if bool(tr.in_window[i, s]):
                    items.append((k, i, s))
    n = len(items)
    stats: dict[str, float] = {"grpo/transitions": float(n)}
    scale = scale_fn(n) if scale_fn is not None else 1.0
    first_k = next((k for k in range(K) if ro.turns[k].transitions is not None), 0)
    work = _padded(_work_items([(k, (i, s)) for k, i, s in items], cfg.minibatch), (first_k, [(0, 0)]), lockstep)
    if not work:
        return stats
    sums: dict[str, float] = {}
    for k, pairs, weight in work:
        tb, tr = ro.turns[k], ro.turns[k].transitions
        ri = torch.tensor([p[0] for p in pairs])
        si = torch.tensor([p[1] for p in pairs])
        x, x_next = tr.x[ri, si], tr.x_next[ri, si]                               # [n, C, H, W]
        sigma, sigma_next = tr.sigma[ri, si], tr.sigma_next[ri, si]               # [n]
        texts = [tb.texts[i] for i in ri.tolist()]
        ctxs = [tb.contexts[i] for i in ri.tolist()]
        src = tb.inputs[ri]
        cond = policy.encode(src, texts, ctxs)
        sig1 = policy.sigmas(cfg.rollout_steps, cond)[1]
        v = policy.velocity(x, sigma, cond)
        st = sde_step_with_logprob(x, v, sigma, sigma_next, noise_level=cfg.noise_level, prev_sample=x_next,
                                   sigma_max_fallback=sig1)
        adv = A.view(B * G, K)[ri, k].to(st.log_prob.device)                     # [n]
        kl = None
        if ref is not None and cfg.kl_beta > 0:
            with torch.no_grad():
                v_ref = ref.velocity(x, sigma, ref.encode(src, texts, ctxs))
                ref_mean = sde_step_with_logprob(x, v_ref, sigma, sigma_next, noise_level=cfg.noise_level,
                                                 prev_sample=x_next, sigma_max_fallback=sig1).mean
            kl = transition_kl(st.mean, ref_mean, st.std)
        loss, stt = grpo_loss(st.log_prob, tr.log_prob[ri, si], adv, cfg.clip_range, cfg.adv.adv_clip or 5.0,
                              kl=kl, beta=cfg.kl_beta)
        (loss * (weight * scale * len(pairs) / max(n, 1))).backward()
        for key, val in (stt.items() if weight else ()):
            if key in ("ratio_max",):
                sums[key] = max(sums.get(key, 0.0), float(val))
            else:
                sums[key] = sums.get(key, 0.0) + float(val) * len(pairs)
    stats.update({f"grpo/{k}": (v if k == "ratio_max" else v / n) for k, v in sums.items() if k != "n_active"})
    return stats


# ------------------------------------------------------------------------------ recipe

def train(cfg: TrainConfig, out: str | os.PathLike, log: Callable[[str], None] = print,
          progress: Callable[[int, int, dict], None] | None = None, stop_at: int | None = None) -> dict[str, Any]:
    """Run (or resume) RL post-training in `out`; returns a summary."""
    from ..editors import load_editor

    out = Path(out)
    # multi-process (accelerate launch / torchrun): each rank rolls out and judges a contiguous
    # block of whole sessions; verdicts are gathered so every rank computes the global
    # advantages; gradients are scaled by the rank's share of trained samples and all-reduced;
    # rank 0 alone writes metrics, checkpoints and the final weights.
    D.init_from_env()
    W, R = D.world_size(), D.rank()
    main = D.is_main()
    per_session = cfg.session_rng or W > 1
    if per_session and cfg.intent.spec != "none":
        raise EditrlInputError("intent.spec needs one process and session_rng=false (its texts are written batch-wide)")
    if cfg.branch != "none" and cfg.intent.spec != "none":
        raise EditrlInputError(f"branch={cfg.branch} does not combine with intent.spec (each trajectory's rewritten "
                               f"texts follow its own history, its images would follow its parents')")
    if cfg.branch != "none" and per_session:
        raise EditrlInputError(f"branch={cfg.branch} needs one process and session_rng=false (parents are chosen "
                               f"batch-wide from the judged turn)")
    if main:
        out.mkdir(parents=True, exist_ok=True)
    D.barrier()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mode = "in_context" if cfg.form == "in_context" else "explicit"

    # 1. setup
    spec = editor_spec(cfg)
    policy = load_editor(spec, mode=mode, model=cfg.model)
    if not isinstance(policy, FlowEditor) or not list(policy.trainable_parameters()):
        raise EditrlInputError(f"editor {spec!r} has no trainable parameters")
    old = policy.policy_copy() if cfg.algorithm == "nft" else None
    needs_ref = cfg.kl_beta > 0 or cfg.nft_ref_weight > 0
    ref = policy.reference_policy() if needs_ref else None
    params = [p for p in policy.trainable_parameters() if p.requires_grad]
    sessions_src = session_source(cfg)
    judge = load_reward_judge(cfg.reward)
    if getattr(judge, "judge_id", "") == "program" and sessions_src.suite is not None:
        from ..bench.harness import check_judge_inputs
        check_judge_inputs(judge, sessions_src.suite)
    rewards = RewardPipeline(judge, overlap=cfg.reward.overlap)
    curriculum = TaskCurriculum(cfg.curriculum, cfg.seed, cfg.turns)
    intent = IntentActor(cfg.intent) if cfg.intent.spec != "none" else None
    if intent is not None and mode != "explicit":
        raise EditrlInputError("intent.spec writes explicit instructions: use form=explicit with it")
    step, elapsed = 0, 0.0
    state_path, metrics_path = out / "state.safetensors", out / "metrics.jsonl"
    resumed = None
    if state_path.exists():
        tensors, meta = load_state(state_path)
        if _resumable(meta.get("config")) != _resumable(to_dict(cfg)):
            raise EditrlInputError(f"{out} holds a run with a different config; use a new --out or the same settings")
        policy.load_state_dict(unprefixed(tensors, "model"))
        if old is not None:
            old.load_state_dict(unprefixed(tensors, "old"))
        resumed = (tensors, meta)
        if intent is not None and intent.cfg.train:
            intent.policy.load_state_dict(unprefixed(tensors, "intent"))
            unflatten_optimizer(intent.opt, unprefixed(tensors, "intent_opt"), meta["intent_optimizer"])
        step, elapsed = int(meta["step"]), float(meta["elapsed"])
        curriculum.load_state(meta.get("curriculum"))
        truncate_metrics(metrics_path, step)
        log(f"resumed from step {step}")
    if main:
        atomic_write_text(out / "config.json", json.dumps(to_dict(cfg), indent=2) + "\n")
    D.broadcast_params_(params)
    # FSDP: shard the editor's blocks over the ranks (after every rank holds the same weights);
    # the optimizer is built on the sharded parameters, and its resumed state sharded alike
    fsdp = D.fsdp_requested()
    if fsdp:
        n_sharded = D.fsdp_shard(policy.fsdp_modules())
        params = [p for p in policy.trainable_parameters() if p.requires_grad]
        if main:
            log(f"FSDP: {n_sharded} modules sharded over {W} processes")
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.999))

    def live_weights() -> dict[str, torch.Tensor]:
        """θ's full weights (under FSDP every rank gathers its shards)."""
        return D.full_state(policy.state_dict()) if fsdp else policy.state_dict()

    ema = ema_init(live_weights()) if cfg.ema_decay > 0 else None         # evaluation / export average of θ
    if resumed is not None and ema is not None:
        ema = ema_init(unprefixed(resumed[0], "ema"))
    if resumed is not None:
        unflatten_optimizer(opt, resumed[0], resumed[1]["optimizer"])
        if fsdp:
            D.shard_optimizer_state_(opt)
        resumed = None

    def save() -> None:
        """Every rank calls it under FSDP (sharded weights and optimizer states are gathered);
        rank 0 writes."""
        opt_t, opt_meta = flatten_optimizer(opt)
        tensors = {**D.full_state(prefixed(policy.state_dict(), "model")), **D.full_state(opt_t)}
        if old is not None:
            tensors.update(D.full_state(prefixed(old.state_dict(), "old")))
        if ema is not None:
            tensors.update(prefixed(ema, "ema"))
        if not main:
            return
        meta = {"step": step, "elapsed": elapsed, "config": to_dict(cfg), "optimizer": opt_meta,
                "curriculum": curriculum.state()}
        if intent is not None and intent.cfg.train:
            iopt_t, meta["intent_optimizer"] = flatten_optimizer(intent.opt)
            tensors.update(prefixed(intent.policy.state_dict(), "intent"))
            tensors.update(prefixed(iopt_t, "intent_opt"))
        save_state(state_path, tensors, meta)

    def export_weights() -> dict[str, torch.Tensor] | None:
        """What evaluations and DIR/final hold: the EMA when there is one, else θ's gathered FSDP
        weights, else None (the policy's own state_dict)."""
        if ema is not None:
            return ema_export(ema, live_weights())
        return D.full_state(policy.state_dict()) if fsdp else None

    from .tracking import Tracker, session_strip
    tracker = Tracker(cfg.track if main else "", out, to_dict(cfg), project=cfg.track_project)
    t_start = time.time() - elapsed
    last: dict[str, Any] = {}
    evals: dict[int, Any] = {}
    while step < cfg.max_steps and (stop_at is None or step < stop_at):
        over = bool(cfg.max_minutes) and (time.time() - t_start) / 60 >= cfg.max_minutes
        if D.global_count(int(over)) > 0:                      # every rank stops at the same step
            log(f"max_minutes={cfg.max_minutes} reached at step {step}")
            break
        row: dict[str, Any] = {"step": step + 1}
        # 2. rollout
        t0 = time.time()
        all_sessions = training_sessions(cfg, step, sessions_src, curriculum)
        a, b = D.shard_bounds(len(all_sessions), R, W)                 # this rank's whole sessions
        sessions = all_sessions[a:b]
        sources = [sessions_src.source(s) for s in sessions]
        rewards.begin(sessions, cfg.group, explicit=cfg.form == "explicit")
        actor = old if cfg.algorithm == "nft" else policy
        actor.set_training(False)
        grpo = cfg.algorithm == "grpo"
        batch_text_fn = None
        if intent is not None:
            intent.reset(sessions, cfg.group)
            text_gen = step_generator(cfg, step, 99)
            batch_text_fn = lambda k: intent.texts(k, text_gen)      # noqa: E731
        sample_kw = dict(form=cfg.form, steps=cfg.rollout_steps, solver="sde" if grpo else cfg.solver,
                         noise_level=cfg.noise_level, window=(cfg.window or None) if grpo else None, store=grpo)
        if per_session:
            ro = D.rollout_sessions(actor, sessions, sources, cfg.group, cfg.turns, range(a, b),
                                    lambda gi: D.session_generator(cfg.seed, step, 0, gi), on_turn=rewards.turn_done,
                                    **sample_kw)
            if fsdp and D.has_sharded(actor.trainable_parameters()):
                # the sharded actor's forwards are collectives: a rank with fewer sessions rolls out
                # (and discards) copies of its first one until it has made as many calls as the others
                for _ in range(-(-len(all_sessions) // W) - len(sessions)):     # the largest shard's size
                    grouped_rollout(actor, sessions[:1], sources[:1], cfg.group, cfg.turns,
                                    generator=torch.Generator().manual_seed(0), **sample_kw)
        else:
            branch_fn = None
            if cfg.branch != "none":
                branch_gen = step_generator(cfg, step, 98)
                live_all = torch.ones(len(sessions), cfg.group, dtype=torch.bool)         # [B, G]

                def branch_fn(k: int) -> torch.Tensor:                                     # [B] parents of turn k
                    ok = (torch.tensor(rewards.turn_success(k), dtype=torch.bool) if cfg.branch == "success"
                          else torch.zeros_like(live_all))                                   # [B, G]
                    return choose_parents(ok, live_all, branch_gen)
            ro = grouped_rollout(actor, sessions, sources, cfg.group, cfg.turns, generator=step_generator(cfg, step, 0),
                                 batch_text_fn=batch_text_fn, on_turn=rewards.turn_done, branch=branch_fn,
                                 **sample_kw)
        t1 = time.time()
        # 3. rewards (judged turn by turn during the rollout; what is left is waited for here)
        verdicts, wait = rewards.verdicts()
        row["time/reward_wait_s"] = round(wait, 3)
        row["reward/judge_calls"] = int(D.global_count(rewards.calls)) if W > 1 else rewards.calls
        t2 = time.time()
        # 4. advantages (on the whole batch: every rank gathers every verdict)
        parents = None if ro.parents is None else ro.parents[:, :max(s.n_turns for s in sessions)]   # [B, K]
        adv = compute_advantages(D.gather_verdicts(verdicts) if W > 1 else verdicts, cfg.adv, parents=parents)
        row.update(adv.stats)
        row.update(curriculum.update(all_sessions, adv.mask))   # every rank holds the whole mask: same state
        A_loc = D.local_slice(adv.A, len(all_sessions), R, W) if W > 1 else adv.A           # [B_rank, G, K]
        M_loc = D.local_slice(adv.mask, len(all_sessions), R, W) if W > 1 else adv.mask
        # 5. loss and update: `epochs` optimiser steps on this rollout (NFT: fresh re-noising
        # each epoch; GRPO: PPO-style, the clipped ratio moves away from 1 after the first)
        t_loss, t_opt = 0.0, 0.0
        policy.set_training(True)
        if not torch.isfinite(adv.A).all():
            row["skipped"] = "non-finite advantage"
        for epoch in range(cfg.epochs if "skipped" not in row else 0):
            opt.zero_grad(set_to_none=True)
            ta = time.time()
            lock = dict(scale_fn=D.grad_scale, lockstep=True) if fsdp else {}
            if grpo:
                st = grpo_update(cfg, policy, ref, ro, A_loc, M_loc, **lock)
            else:
                draws_fn = None
                if per_session:
                    def draws_fn(shape, e=epoch):
                        return D.nft_draws(lambda gi: D.session_generator(cfg.seed, step, 1 + e, gi), range(a, b),
                                           cfg.group, cfg.turns, shape, cfg.nft_sigma_min, cfg.nft_shared_noise)
                st = nft_update(cfg, policy, old, ref, ro, A_loc, M_loc, step_generator(cfg, step, 1 + epoch), draws_fn,
                                **lock)
            if W > 1:   # each rank's loss is a mean over its samples: weight by its share, then all-reduce
                n_loc = st.get("grpo/transitions", st.get("nft/samples", 0.0))
                n_all = D.global_count(n_loc)
                if fsdp:   # already weighted before backward; FSDP reduced the sharded ones
                    D.sync_gradients_([p for p in params if not D.is_dtensor(p)])
                else:
                    D.scale_grads_(params, D.grad_scale(n_loc, n_all))
                    D.sync_gradients_(params)
                st = {k: (n_all if k in ("nft/samples", "grpo/transitions") else
                          v if k.endswith("ratio_max") else D.global_mean(v, n_loc)) for k, v in st.items()}
            if epoch == 0:
                row.update(st)
            else:
                row.update({f"{k}@last_epoch": v for k, v in st.items() if k.endswith(("loss", "ratio_mean", "clip_frac"))})
            tb = time.time()
            t_loss += tb - ta
            grads = [D.local_tensor(p.grad) for p in params if p.grad is not None]
            bad = not all(torch.isfinite(g).all() for g in grads)
            if D.global_count(len(grads)) == 0:                  # decided alike on every rank
                row["skipped"] = "no trained sample (all masked)"
            elif D.global_count(int(bad)) > 0:
                row["skipped"] = "non-finite gradient"
            else:
                gn = D.clip_grad_norm_(params, cfg.grad_clip)
                row.setdefault("grad_norm", gn)
                opt.step()
            t_opt += time.time() - tb
            if "skipped" in row:
                break
        if intent is not None:
            row.update(intent.text_stats())
            if "skipped" not in row:
                row.update(intent.update(adv.A, adv.mask))
        tc = time.time()
        if old is not None and "skipped" not in row:
            ema_update_(old.trainable_parameters(), policy.trainable_parameters(),
                        old_policy_decay(step, cfg.old_decay_max, cfg.old_decay_ramp))
        if ema is not None and "skipped" not in row:
            ema_state_update_(ema, live_weights(), cfg.ema_decay)
        opt.zero_grad(set_to_none=True)
        policy.set_training(False)
        t3 = time.time()
        row["time/loss_s"] = round(t_loss, 3)                  # forward + backward of the objective
        row["time/optim_s"] = round(t_opt + (t3 - tc), 3)      # clipping, AdamW, old-policy and evaluation EMAs
        if "skipped" in row:
            log(f"step {step + 1}: skipped ({row['skipped']})")
        step += 1
        elapsed = time.time() - t_start
        row.update({"time/rollout_s": round(t1 - t0, 3), "time/reward_s": round(t2 - t1, 3),
                    "time/update_s": round(t3 - t2, 3), "elapsed_min": round(elapsed / 60, 3)})
        # 6. evaluate, log, checkpoint
        if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
            weights = export_weights()                 # FSDP: every rank gathers its shards
            if main:                                   # rank 0 evaluates the full weights
                res = evaluate(policy, cfg, out / "eval" / f"step_{step:06d}", log, intent, state=weights)
                evals[step] = res
                row.update({f"eval/success_all@{r['turn']}": r["success_all"] for r in res["per_turn"]})
        if main and (step % cfg.log_every == 0 or step == cfg.max_steps):
            append_metrics(metrics_path, row)
            if tracker.active:
                tracker.scalars(step, row)
        if tracker.active and cfg.track_strips_every and step % cfg.track_strips_every == 0:
            strips = []
            for b, sess in enumerate(sessions[: cfg.track_strips]):
                ok = [bool(v.success) if v is not None else None for v in verdicts[b][0]]
                strips.append((f"session_{b}", session_strip(ro.images[b][0], ok)))
            tracker.strips(step, strips)
        last = row
        if progress:
            progress(step, cfg.max_steps, row)
        if step % cfg.ckpt_every == 0 and (main or fsdp):
            save()
        D.barrier()
    if main or fsdp:
        save()
    rewards.close()
    tracker.close()
    final = out / "final"
    summary: dict[str, Any] = {"out": str(out), "steps": step, "rank": R}
    weights = export_weights()                 # FSDP: every rank gathers its shards
    if main:                           # rank 0 writes the final (full) weights and evaluates
        final.mkdir(exist_ok=True)
        policy.save(final / policy.checkpoint_file, extra_meta={
            "rl_steps": str(step), "rl_algorithm": cfg.algorithm, "rl_minutes": f"{elapsed / 60:.1f}", "rl_init": spec,
            "rl_ema_decay": str(cfg.ema_decay)},
            state=weights)
        if intent is not None and intent.cfg.train:
            from ..intent.tiny import save_policy
            save_policy(intent.policy, final / "intent.safetensors", {"rl_steps": str(step), "rl_init": cfg.intent.spec})
        summary = {"out": str(out), "steps": step, "minutes": round(elapsed / 60, 2), "final": str(final), "last": last}
        if cfg.final_eval and (stop_at is None or step >= cfg.max_steps):
            summary["eval"] = evaluate(policy, cfg, out / "eval" / "final", log, intent, state=weights)
    D.barrier()
    return summary


def editor_spec(cfg: TrainConfig) -> str:
    """`init` as a load_editor spec: `flux-kontext` / `qwen-edit` take their folder from `model.path`."""
    if cfg.init in REAL_EDITORS:
        if not cfg.model.path:
            raise EditrlInputError(f"init={cfg.init} needs model.path=PATH (a diffusers pipeline folder)")
        return f"{cfg.init}:{cfg.model.path}"
    return cfg.init


def evaluate(policy, cfg: TrainConfig, out: Path, log: Callable[[str], None], intent: IntentActor | None = None,
             state: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Benchmark the current policy (and intent policy) on held-out sessions through the benchmark
    harness, which loads the weights saved here (`state`: gathered FSDP weights to save instead)."""
    from ..bench import BenchConfig, run_bench

    tmp = out / policy.checkpoint_file
    if out.exists():        # an earlier evaluation here (a run resumed with more steps): replaced, not resumed
        shutil.rmtree(out)
    out.mkdir(parents=True)
    policy.save(tmp, state=state)
    spec = "none"
    if intent is not None:
        spec = cfg.intent.spec
        if intent.cfg.train:
            from ..intent.tiny import save_policy
            save_policy(intent.policy, out / "intent.safetensors")
            spec = f"tiny:{out / 'intent.safetensors'}"
    from ..bench.harness import JUDGE_OPTIONS
    from ..bench.suites import SHAPES_SUITES

    shapes = cfg.eval_suite in SHAPES_SUITES        # ShapesWorld: the exact judge; a sessions file: the reward's judge
    judge = "program" if shapes else cfg.reward.judge
    options = {} if shapes else {k: v for k, v in cfg.reward.options().items() if k in JUDGE_OPTIONS}
    bc = BenchConfig(suite=cfg.eval_suite, editor=f"{policy.name}:{tmp}", judge=judge, judge_options=options, out=out,
                     sessions=cfg.eval_sessions if shapes else None, turns=cfg.turns, seed=EVAL_SEED + cfg.seed,
                     form="auto" if intent is not None else cfg.form, steps=cfg.eval_steps, no_cache=True,
                     bootstrap=200, strips=8, intent=spec)
    run_bench(bc, log=lambda m: None)
    return json.loads((out / "results.json").read_text())


def _resumable(cfg: dict[str, Any] | None) -> dict[str, Any] | None:
    """Settings a resumed run must share with its start (all but the wall-clock budget and step cap)."""
    return None if cfg is None else {k: v for k, v in cfg.items()
                                     if k not in ("max_minutes", "max_steps") and not k.startswith("track")}
