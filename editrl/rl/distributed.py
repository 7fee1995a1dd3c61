"""Multi-process RL training helpers over `torch.distributed` (any backend: gloo, nccl).

Launch with `accelerate launch` (or `torchrun`); every helper is a no-op single-process path
when no process group is initialised, so the same recipe runs with one process unchanged.

The contract that makes W processes reproduce 1 process on the same global batch:

* **Whole groups per rank.** `shard` gives each rank a contiguous, deterministic block of the
  B sessions (groups); all G trajectories of a session live on one rank, so group statistics
  (mean / std over the G trajectories) are local by construction.
* **Randomness keyed by the global session index**, never by the rank: `session_generator`
  seeds one generator per (seed, step, stream, global session), `rollout_sessions` rolls out
  each session with its own generator and `nft_draws` draws the NFT re-noising (σ, ε) per
  global session. A session's rollout and draws are then identical whatever the sharding.
* **Global advantages.** `gather_verdicts` all-gathers every rank's verdicts (in global
  session order), every rank runs `compute_advantages` on the global batch (identical
  result everywhere: batch-level stats and masked shares are global) and keeps its slice
  with `local_slice`.
* **Global sample mean.** Each rank's loss is a mean over its n_local trained samples;
  `grad_scale(n_local)` rescales it so that, after the gradient all-reduce (DDP's mean or
  `sync_gradients_`), the gradient is the mean over the N = Σ n_local global samples, i.e.
  exactly the 1-process gradient. `global_mean` does the same for logged values.
* **Rank 0 logs and checkpoints** (`is_main`); `all_reduce_mean` averages scalar stats.

FSDP (a launch with ACCELERATE_USE_FSDP, e.g. `recipes/accelerate/fsdp.yaml`): the editor's
`fsdp_modules()` (transformer blocks, then the root) are sharded with torch FSDP2
`fully_shard` over all ranks: each rank keeps 1/W of those parameters, their gradients and
optimizer states, and gathers one block at a time for each forward and backward. Every
gather is a collective, so every rank must make the same sequence of forward/backward calls
of the sharded modules: a rank with fewer sessions rolls out (and discards) copies of one
until it has as many as the largest shard, loss micro-batches are padded to the largest
per-rank count (`pad_count`; the fillers carry weight 0),
and each rank's loss is weighted by `grad_scale` *before* backward (FSDP averages gradients
while reducing them). Evaluation and saving gather full weights (`full_state`).
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor


# ------------------------------------------------------------------------ process info

def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def is_main() -> bool:
    return rank() == 0


def launched() -> bool:
    """True when started by a launcher (accelerate / torchrun) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group from launcher env vars (RANK, WORLD_SIZE, MASTER_*).

    Does nothing (returns False) without a multi-process launcher or when already initialised.
    Backend: nccl when CUDA is available and not forced to CPU (ACCELERATE_USE_CPU), else gloo.
    """
    if initialized():
        return True
    if not launched():
        return False
    if _env_flag("ACCELERATE_USE_DEEPSPEED"):
        from ..session import EditrlInputError
        raise EditrlInputError("this launch asks for DeepSpeed, which editrl train does not wire (every process would "
                               "hold a whole copy of the model); launch with recipes/accelerate/ddp.yaml or fsdp.yaml")
    if backend is None:
        cpu = _env_flag("ACCELERATE_USE_CPU")
        backend = "nccl" if torch.cuda.is_available() and not cpu else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return True


def _env_flag(var: str) -> bool:
    return os.environ.get(var, "").lower() in ("1", "true", "yes")


def fsdp_requested() -> bool:
    """A multi-process launch that asks for FSDP (accelerate's ACCELERATE_USE_FSDP)."""
    return launched() and _env_flag("ACCELERATE_USE_FSDP")


def barrier() -> None:
    if initialized():
        dist.barrier()


def _comm_device() -> torch.device:
    """Device collectives run on (nccl needs CUDA tensors)."""
    if initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# ------------------------------------------------------------------------------ sharding

def shard_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous block of n items; the first n % world ranks get one more."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} out of range for world size {world}")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def shard(items: Sequence, rank: int | None = None, world: int | None = None) -> list:
    """This rank's contiguous, deterministic block of whole items (sessions = groups)."""
    rank = globals()["rank"]() if rank is None else rank
    world = world_size() if world is None else world
    a, b = shard_bounds(len(items), rank, world)
    return list(items[a:b])


def local_slice(x: Tensor, n_global: int | None = None, rank: int | None = None, world: int | None = None) -> Tensor:
    """Rows of a global [B, ...] tensor that belong to this rank (same blocks as `shard`)."""
    rank = globals()["rank"]() if rank is None else rank
    world = world_size() if world is None else world
    a, b = shard_bounds(x.shape[0] if n_global is None else n_global, rank, world)
    return x[a:b]


# ------------------------------------------------------------------------- randomness

def session_generator(seed: int, step: int, stream: int, session: int) -> torch.Generator:
    """One generator per (seed, step, stream, global session index): independent of sharding."""
    s = int(np.random.SeedSequence([seed, step, stream, session]).generate_state(1)[0])
    return torch.Generator().manual_seed(s)


def rollout_sessions(editor, sessions: Sequence, sources: Sequence[np.ndarray], G: int, K: int,
                     global_indices: Sequence[int], gen_fn: Callable[[int], torch.Generator], **kw):
    """`grouped_rollout` of each session with its own generator `gen_fn(global_index)`, merged.

    Row b*G + g of the merged rollout is session b (local order), trajectory g, as in
    `grouped_rollout`. Costs batching (G rows per sampling call instead of B_local*G) for
    results that do not depend on how sessions are spread over ranks.
    """
    from .rollout import grouped_rollout

    if kw.get("batch_text_fn") is not None:
        raise ValueError("rollout_sessions does not support batch_text_fn (it is batch-wide)")
    on_turn = kw.pop("on_turn", None)
    parts = []
    for j, (s, src, gi) in enumerate(zip(sessions, sources, global_indices)):
        hook = None if on_turn is None else (lambda k, rows, j=j: on_turn(k, [(b + j, g, im) for b, g, im in rows]))
        parts.append(grouped_rollout(editor, [s], [src], G, K, generator=gen_fn(int(gi)), on_turn=hook, **kw))
    return merge_rollouts(parts)


def merge_rollouts(parts: Sequence):
    """Concatenate rollouts over sessions (same G and K): the inverse of splitting by session."""
    from ..editors.base import Transitions
    from .rollout import Rollout, TurnBatch

    if not parts:
        raise ValueError("nothing to merge")
    G, K = parts[0].G, parts[0].K
    if any(p.G != G or p.K != K for p in parts):
        raise ValueError("rollouts to merge need the same G and K")
    turns = []
    for k in range(K):
        tbs = [p.turns[k] for p in parts]
        tr = None
        if all(t.transitions is not None for t in tbs):
            fields = Transitions.__dataclass_fields__
            tr = Transitions(**{f: torch.cat([getattr(t.transitions, f) for t in tbs]) for f in fields})
        turns.append(TurnBatch(tbs[0].turn, torch.cat([t.inputs for t in tbs]), torch.cat([t.outputs for t in tbs]),
                               [x for t in tbs for x in t.texts], [x for t in tbs for x in t.contexts],
                               torch.cat([t.live for t in tbs]), tr))
    return Rollout([i for p in parts for i in p.session_ids], G, K, turns, [im for p in parts for im in p.images])


def nft_draws(gen_fn: Callable[[int], torch.Generator], global_indices: Sequence[int], G: int, K: int,
              shape: Sequence[int], sigma_min: float, shared: bool) -> tuple[Tensor, Tensor]:
    """NFT re-noising tables for this rank's sessions, drawn per global session.

    Returns (sig_tab [n, K], eps_tab [n, K, *shape]) with n = len(global_indices) when `shared`
    (one (σ, ε) per session and turn, shared by its G trajectories) else n = len·G (row b*G+g),
    the layout `train.nft_update` indexes.
    """
    sig, eps = [], []
    rows = 1 if shared else G
    for gi in global_indices:
        gen = gen_fn(int(gi))
        sig.append(sigma_min + (1 - sigma_min) * torch.rand(rows, K, generator=gen))
        eps.append(torch.randn((rows, K, *shape), generator=gen))
    return torch.cat(sig), torch.cat(eps)


# ---------------------------------------------------------------------------- gathering

def all_gather_objects(obj: Any) -> list[Any]:
    """[obj of rank 0, obj of rank 1, ...] on every rank (pickled; fine for verdicts and stats)."""
    if not initialized():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_verdicts(local: Sequence) -> list:
    """Global verdicts[b][g][k] in global session order from every rank's contiguous block."""
    return [v for part in all_gather_objects(list(local)) for v in part]


def all_gather_padded(x: Tensor, pad_value: float | bool = 0) -> Tensor:
    """Concatenate every rank's [n_r, ...] tensor along dim 0 (n_r may differ: padded, then trimmed).

    Trailing dims may differ too (e.g. K): each rank's tensor is padded to the max shape with
    `pad_value`, so pass masks alongside (padded mask entries are False).
    """
    if not initialized():
        return x
    dev = _comm_device()
    shapes = all_gather_objects(tuple(x.shape))
    if len({len(s) for s in shapes}) != 1:
        raise ValueError(f"ranks disagree on tensor rank: {shapes}")
    full = tuple(max(s[d] for s in shapes) for d in range(len(shapes[0])))
    padded = torch.full(full, pad_value, dtype=x.dtype, device=dev)
    padded[tuple(slice(0, n) for n in x.shape)] = x.to(dev)
    bufs = [torch.empty_like(padded) for _ in shapes]
    dist.all_gather(bufs, padded)
    cut = [b[tuple(slice(0, n) for n in (s[0],) + full[1:])] for b, s in zip(bufs, shapes)]
    return torch.cat(cut).to(x.device)


def gather_verdict_tensors(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """All-gather per-(b, g, k) reward tensors [B_local, G, K(, M)] and their masks to global [B, ...]."""
    return all_gather_padded(scores, float("nan") if scores.is_floating_point() else 0), \
        all_gather_padded(mask.bool(), False)


def all_reduce_sum(x: Tensor) -> Tensor:
    if not initialized():
        return x
    y = x.to(_comm_device()).clone()
    dist.all_reduce(y, op=dist.ReduceOp.SUM)
    return y.to(x.device)


def all_reduce_mean(stats: dict[str, float], weights: dict[str, float] | None = None) -> dict[str, float]:
    """Mean of each scalar over ranks (keys present on any rank; a rank without a key does not count).

    With `weights` (key -> this rank's weight, e.g. its sample count) the mean is weighted.
    """
    if not initialized():
        return dict(stats)
    keys = sorted({k for part in all_gather_objects(sorted(stats)) for k in part})
    num = torch.zeros(len(keys), dtype=torch.float64)
    den = torch.zeros(len(keys), dtype=torch.float64)
    for i, k in enumerate(keys):
        if k in stats and stats[k] is not None and np.isfinite(float(stats[k])):
            w = 1.0 if weights is None else float(weights.get(k, 1.0))
            num[i], den[i] = float(stats[k]) * w, w
    num, den = all_reduce_sum(num), all_reduce_sum(den)
    return {k: float(num[i] / den[i]) for i, k in enumerate(keys) if den[i] > 0}


def global_count(n_local: int | float) -> float:
    """Σ over ranks of a per-rank count (e.g. trained samples)."""
    return float(all_reduce_sum(torch.tensor([float(n_local)], dtype=torch.float64))[0])


def global_mean(mean_local: float, n_local: int | float) -> float:
    """Global sample mean from each rank's local mean over n_local samples."""
    t = all_reduce_sum(torch.tensor([float(mean_local) * n_local if n_local else 0.0, float(n_local)],
                                    dtype=torch.float64))
    return float(t[0] / t[1]) if t[1] > 0 else float("nan")


# ------------------------------------------------------------------------------ gradients

def grad_scale(n_local: int | float, n_global: float | None = None, reduce: str = "mean") -> float:
    """Factor for a loss (or its gradient) that is a mean over this rank's n_local samples, so the
    all-reduced gradient is the mean over all n_global samples: W·n_local/N after a mean all-reduce
    (DDP, `sync_gradients_(mean=True)`), n_local/N after a sum. 1.0 in a single process."""
    if reduce not in ("mean", "sum"):
        raise ValueError("reduce must be mean or sum")
    n_global = global_count(n_local) if n_global is None else n_global
    if n_global <= 0:
        return 0.0
    w = world_size() if reduce == "mean" else 1
    return w * float(n_local) / float(n_global)


@torch.no_grad()
def scale_grads_(params: Sequence[torch.nn.Parameter], factor: float) -> None:
    for p in params:
        if p.grad is not None:
            p.grad.mul_(factor)


@torch.no_grad()
def sync_gradients_(params: Sequence[torch.nn.Parameter], mean: bool = True) -> None:
    """All-reduce gradients in one flat bucket (what DDP does, without the wrapper): needed when the
    trained module is not wrapped in DDP. Parameters without a gradient on any rank take zeros, so
    every rank reduces the same list."""
    if not initialized():
        return
    params = [p for p in params if p.requires_grad]
    if not params:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    flat = torch.cat([p.grad.reshape(-1).to(_comm_device(), torch.float32) for p in params])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    if mean:
        flat /= world_size()
    i = 0
    for p in params:
        n = p.numel()
        p.grad.copy_(flat[i: i + n].view_as(p.grad))
        i += n


def broadcast_params_(params: Sequence[torch.nn.Parameter], src: int = 0) -> None:
    """Make every rank start from rank `src`'s weights (DDP does this at wrap time)."""
    if not initialized():
        return
    with torch.no_grad():
        for p in params:
            t = p.data.to(_comm_device())
            dist.broadcast(t, src)
            p.data.copy_(t)


# ----------------------------------------------------------------------------------- FSDP

def fsdp_shard(modules: Sequence[torch.nn.Module]) -> int:
    """Shard `modules` (inner blocks first, the root last) with FSDP2 `fully_shard` over every
    rank; returns how many were sharded. Parameters become DTensors: build the optimizer after."""
    if not initialized():
        return 0
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(_comm_device().type, (world_size(),))
    reshard = reshard_after_forward()
    for m in modules:
        for p in m.parameters():
            if not p.is_contiguous():          # e.g. channels-last convolution weights: FSDP needs contiguous
                p.data = p.data.contiguous()
        fully_shard(m, mesh=mesh, reshard_after_forward=reshard)
    return len(modules)


def reshard_after_forward() -> bool:
    """accelerate's fsdp_reshard_after_forward (FSDP_RESHARD_AFTER_FORWARD, default true)."""
    return os.environ.get("FSDP_RESHARD_AFTER_FORWARD", "true").lower() not in ("0", "false", "no")


def is_dtensor(t: Any) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def has_sharded(params) -> bool:
    return any(is_dtensor(p) for p in params)


@torch.no_grad()
def clip_grad_norm_(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """`torch.nn.utils.clip_grad_norm_` over a mix of sharded (DTensor) and replicated gradients:
    the total 2-norm counts each sharded gradient's shards once (summed over ranks) and each
    replicated gradient once; every gradient is scaled by min(1, max_norm / (norm + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not any(is_dtensor(g) for g in grads):
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
    sq_sh = sum((local_tensor(g).double().pow(2).sum() for g in grads if is_dtensor(g)), torch.zeros((), dtype=torch.float64))
    sq_rep = sum((g.double().pow(2).sum() for g in grads if not is_dtensor(g)), torch.zeros((), dtype=torch.float64))
    total = float((all_reduce_sum(sq_sh.reshape(1))[0] + sq_rep).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    if coef < 1.0:
        for g in grads:
            local_tensor(g).mul_(coef)
    return total


def full_tensor(t: Tensor) -> Tensor:
    """The whole tensor of a DTensor (a collective: every rank must call it), else `t`."""
    return t.full_tensor() if is_dtensor(t) else t


def local_tensor(t: Tensor) -> Tensor:
    """This rank's shard of a DTensor, else `t` (no communication)."""
    return t.to_local() if is_dtensor(t) else t


def full_state(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """A state dict with every DTensor gathered to a full CPU tensor (every rank must call it, in
    the same key order, which dicts built the same way have)."""
    return {k: full_tensor(v).detach().cpu() if torch.is_tensor(v) else v for k, v in sd.items()}


def shard_optimizer_state_(opt: torch.optim.Optimizer) -> None:
    """After loading a full (gathered) optimizer state: turn each state tensor shaped like its
    DTensor parameter into a DTensor sharded the same way (each rank keeps its own shard of its
    own copy; no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    for group in opt.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor) or p not in opt.state:
                continue
            st = opt.state[p]
            for k, v in list(st.items()):
                if torch.is_tensor(v) and not isinstance(v, DTensor) and tuple(v.shape) == tuple(p.shape):
                    st[k] = distribute_tensor(v.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)


def pad_count(n_local: int) -> int:
    """The largest per-rank count: how many calls every rank makes when ranks must match."""
    if not initialized():
        return n_local
    t = torch.tensor([n_local], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
