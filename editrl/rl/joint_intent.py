"""Intent reconstruction inside RL rollouts, and Edit-R2's unified text + image objective.

With `intent.spec` set, the text the editor sees at turn k of trajectory g is written by a
reconstructor from that trajectory's own history (its earlier texts), not taken from the
session's gold explicit form:

* `rules` / a frozen `tiny` policy (greedy): deterministic texts, the image policy alone learns;
* `tiny` with `intent.train = true`: the policy *samples* each text (temperature
  `intent.temperature`) and keeps every token's log-probability; after the rewards, each
  text gets the advantage of its turn, the same A[b, g, k] the image samples of that turn
  get, and the token-level GRPO loss (`text_grpo.text_grpo_loss`) trains it:
  L = L_image + λ_text·L_text (λ_text = `intent.weight`; its own AdamW, learning rate
  `intent.lr`).

`IntentActor` holds the per-rollout state (each trajectory's texts so far, the sampled
token ids and log-probs) and the text-side metrics: ratio, clip fraction, and how often
the sampled text is the session's gold explicit instruction (exact) or names its referent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ..intent.base import query_for
from ..session import EditrlInputError, Session
from .text_grpo import text_grpo_loss


@dataclass
class IntentConfig:
    spec: str = "none"            # who writes the editor's text: none (the `form`) | rules | tiny | tiny:PATH
    train: bool = False           # token-level GRPO on the tiny policy, jointly with the image policy
    weight: float = 1.0           # λ_text in L = L_image + λ_text·L_text
    lr: float = 1e-4              # the text policy's AdamW learning rate
    temperature: float = 1.0      # sampling temperature of the trained policy's texts
    clip_range: float = 0.2       # PPO clip of the per-token ratio
    kl_beta: float = 0.0          # KL (k3) of the text policy to its initial weights

    def __post_init__(self) -> None:
        if self.train and not (self.spec == "tiny" or self.spec.startswith("tiny:")):
            raise ValueError("intent.train needs a learned policy: intent.spec=tiny or tiny:PATH")
        if self.temperature <= 0 or self.lr <= 0 or self.clip_range <= 0:
            raise ValueError("intent.temperature, intent.lr and intent.clip_range must be positive")


class IntentActor:
    """Writes the texts of a grouped rollout and, when training, computes the text loss."""

    def __init__(self, cfg: IntentConfig) -> None:
        from ..intent import load_reconstructor

        self.cfg = cfg
        self.reconstructor = load_reconstructor(cfg.spec)
        if self.reconstructor is None:
            raise EditrlInputError("intent.spec=none: no actor needed")
        self.policy = getattr(self.reconstructor, "policy", None)
        self.ref = None
        if cfg.train:
            import copy
            self.policy.train()
            self.opt = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=0.0)
            if cfg.kl_beta > 0:
                self.ref = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.reset([], 1)

    # -- rollout -------------------------------------------------------------------------
    def reset(self, sessions: Sequence[Session], G: int) -> None:
        self.sessions, self.G = list(sessions), G
        self.history: list[list[str]] = [[] for _ in range(len(sessions) * G)]     # [B*G] texts so far
        self.samples: dict[int, dict[str, Any]] = {}                                  # turn -> sampled tensors

    @torch.no_grad()
    def texts(self, k: int, generator: torch.Generator | None = None) -> list[tuple[str, list[str]]]:
        """(text, context) of turn k for every row b*G + g (rows whose session has ended repeat
        their last text; they are never trained)."""
        from ..intent.tiny import query_text

        rows = []
        for b, s in enumerate(self.sessions):
            for g in range(self.G):
                kk = min(k, s.n_turns)
                prev = self.history[b * self.G + g][: kk - 1]
                rows.append(query_for(s, kk, prev))
        if self.cfg.train:
            src, mask = self.policy.encode_inputs([query_text(q) for q in rows])
            ids, lp = self.policy.generate(src, mask, temperature=self.cfg.temperature, generator=generator)
            texts = [self.policy.tok.text(r) or q.instruction for r, q in zip(ids.tolist(), rows)]
            self.samples[k] = {"src": src, "mask": mask, "ids": ids, "logp": lp}
        else:
            texts = [r.explicit for r in self.reconstructor.reconstruct(rows)]
        for i, t in enumerate(texts):
            b = i // self.G
            if self.sessions[b].n_turns >= k:
                self.history[i].append(t)
        return [(t, []) for t in texts]

    # -- metrics and loss ---------------------------------------------------------------
    def text_stats(self) -> dict[str, float]:
        """Share of this rollout's texts equal to the gold explicit instruction / naming its referent."""
        from ..intent.evaluate import gold_referent, names, norm

        exact, ref_ok = [], []
        for b, s in enumerate(self.sessions):
            for g in range(self.G):
                for k, text in enumerate(self.history[b * self.G + g], start=1):
                    gold = s.turns[k - 1].explicit
                    if gold:
                        exact.append(norm(text) == norm(gold))
                    ref = gold_referent(s, k, None)
                    if ref is not None:
                        ref_ok.append(names(text, ref))
        out = {}
        if exact:
            out["text/exact"] = sum(exact) / len(exact)
        if ref_ok:
            out["text/referent_acc"] = sum(ref_ok) / len(ref_ok)
        return out

    def update(self, A: Tensor, mask: Tensor) -> dict[str, float]:
        """One token-level GRPO step of the text policy with the image samples' advantages
        A [B, G, K] (mask [B, G, K]: the trained samples)."""
        if not self.cfg.train or not self.samples:
            return {}
        B, G, K = A.shape
        lps, olds, advs, masks = [], [], [], []
        self.opt.zero_grad(set_to_none=True)
        total_tokens = 0
        per_turn = []
        for k, smp in sorted(self.samples.items()):
            m_rows = mask[:, :, k - 1].reshape(B * G)                                      # [B*G]
            tok = (smp["ids"] != self.policy.tok.pad) & m_rows[:, None]                   # [B*G, T]
            per_turn.append((k, smp, tok))
            total_tokens += int(tok.sum())
        if total_tokens == 0:
            return {"text/tokens": 0.0}
        stats: dict[str, float] = {}
        for k, smp, tok in per_turn:
            if not bool(tok.any()):
                continue
            lp = self.policy.token_logprobs(smp["src"], smp["mask"], smp["ids"], self.cfg.temperature)   # [B*G, T]
            ref_lp = None
            if self.ref is not None:
                with torch.no_grad():
                    ref_lp = self.ref.token_logprobs(smp["src"], smp["mask"], smp["ids"], self.cfg.temperature)
            loss, st = text_grpo_loss(lp, smp["logp"], A[:, :, k - 1].reshape(B * G), tok.float(),
                                      self.cfg.clip_range, logp_ref=ref_lp, beta=self.cfg.kl_beta)
            share = int(tok.sum()) / total_tokens
            (self.cfg.weight * loss * share).backward()
            for key, v in st.items():
                if key == "ratio_max":
                    stats["text/ratio_max"] = max(stats.get("text/ratio_max", 0.0), v)
                elif key != "n_tokens":
                    stats[f"text/{key}"] = stats.get(f"text/{key}", 0.0) + v * share
        grads = [p.grad for p in self.policy.parameters() if p.grad is not None]
        if grads and all(torch.isfinite(g).all() for g in grads):
            stats["text/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(list(self.policy.parameters()), 1.0))
            self.opt.step()
        else:
            stats["text/skipped"] = 1.0
        self.opt.zero_grad(set_to_none=True)
        stats["text/tokens"] = float(total_tokens)
        return stats
