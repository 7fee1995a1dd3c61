"""`tiny`: a small learned text policy that rewrites ShapesWorld instructions (Edit-R2's
reconstruction step, at the scale of the embedded world).

An encoder-decoder transformer over the ShapesWorld vocabulary. Its input is what the
query allows (`base.IntentQuery`), serialised as words:

    <scene> large red solid circle at top left ; small blue hollow square at center ; background white
    <hist> instruction 1 <sep> ... instruction k-1
    <prev> the explicit instruction used for turn k-1
    <now> instruction k

and its output is the bracketed explicit instruction, one word per step. It is trained by
supervised learning on grammar-made pairs (`train_policy`; the shipped weights come from
`editrl intent train --out runs/intent-tiny`, see docs/RESULTS.md), then optionally with
token-level GRPO jointly with the image policy (`rl/text_grpo.py`). Decoding is greedy for
benchmarks (`temperature=0`) and sampled for RL, which also returns each token's
log-probability under the sampling policy.
"""

from __future__ import annotations

import json
import math
import os
import re
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..editors.tiny import WORDS
from ..session import EditrlInputError, weights_sha256
from .base import IntentQuery, Reconstruction

SPECIALS = ("<pad>", "<bos>", "<eos>", "<sep>", "<scene>", "<hist>", "<prev>", "<now>", ";")
_TOKEN_RE = re.compile(r"<[a-z]+>|[a-z]+|\d+|[\[\].,';]|\S")
ASSET = Path(__file__).resolve().parent.parent / "assets" / "intent_tiny.safetensors"


class PolicyTokenizer:
    def __init__(self, words: Sequence[str] = WORDS) -> None:
        self.itos = list(SPECIALS) + [w for w in words if w not in SPECIALS]
        self.stoi = {w: i for i, w in enumerate(self.itos)}
        self.pad, self.bos, self.eos = 0, 1, 2

    def __len__(self) -> int:
        return len(self.itos)

    def ids(self, text: str) -> list[int] | None:
        """Token ids, or None when a word is outside the vocabulary."""
        out = []
        for w in _TOKEN_RE.findall(text.lower()):
            i = self.stoi.get(w)
            if i is None:
                return None
            out.append(i)
        return out

    def text(self, ids: Sequence[int]) -> str:
        words = [self.itos[i] for i in ids if i > 2]
        s = " ".join(words)
        s = re.sub(r"\[ ", "[", s)
        s = re.sub(r" \]", "]", s)
        s = re.sub(r" ([.,])", r"\1", s)
        return s[:1].upper() + s[1:]


def scene_words(scene: dict[str, Any] | None) -> str:
    if not scene:
        return ""
    objs = [f"{o['size']} {o['color']} {o['fill']} {o['shape']} at {o['cell']}" for o in scene.get("objects", [])]
    return " ; ".join(objs + [f"background {scene.get('background', '')}"])


def query_text(q: IntentQuery) -> str:
    parts = ["<scene>", scene_words(q.source_scene), "<hist>", " <sep> ".join(q.instructions[:-1]),
             "<prev>", q.previous[-1] if q.previous else "", "<now>", q.instruction]
    return " ".join(p for p in parts if p)


SCENE_TOKENS = ("words", "objects")


@dataclass
class PolicyConfig:
    dim: int = 128
    heads: int = 4
    enc_layers: int = 2
    dec_layers: int = 2
    max_in: int = 192
    max_out: int = 40
    vocab: tuple[str, ...] = WORDS
    # How the <scene> section enters the encoder. `words`: one position per word. `objects`:
    # one position per object ("small red solid circle at top left" -> the sum of its words'
    # embeddings), so naming an object's colour and cell is one attention hop to one position
    # rather than a lookup across seven. Weights saved before this option read as `words`.
    scene_tokens: str = "objects"

    def __post_init__(self) -> None:
        if self.scene_tokens not in SCENE_TOKENS:
            raise ValueError(f"scene_tokens must be one of {SCENE_TOKENS}, got {self.scene_tokens!r}")

    def to_json(self) -> str:
        d = asdict(self)
        d["vocab"] = list(self.vocab)
        return json.dumps(d)

    @staticmethod
    def from_json(s: str) -> "PolicyConfig":
        d = json.loads(s)
        d["vocab"] = tuple(d["vocab"])
        d.setdefault("scene_tokens", "words")
        return PolicyConfig(**d)


class TinyIntentPolicy(nn.Module):
    def __init__(self, cfg: PolicyConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg = cfg or PolicyConfig()
        self.tok = PolicyTokenizer(cfg.vocab)
        V, D = len(self.tok), cfg.dim
        self.emb = nn.Embedding(V, D)
        self.pos_in = nn.Parameter(torch.randn(cfg.max_in, D) * 0.02)
        self.pos_out = nn.Parameter(torch.randn(cfg.max_out + 1, D) * 0.02)
        with warnings.catch_warnings():  # pre-norm layers never take the nested-tensor path
            warnings.filterwarnings("ignore", message="enable_nested_tensor is True")
            self.net = nn.Transformer(D, cfg.heads, cfg.enc_layers, cfg.dec_layers, 4 * D,
                                      dropout=0.0, batch_first=True, norm_first=True)
        self.norm = nn.LayerNorm(D)
        self.head = nn.Linear(D, V)

    # -- tensors -----------------------------------------------------------------------
    def encode_inputs(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Source ids and their [B, L] validity mask (the last max_in positions kept): [B, L]
        with `scene_tokens: words`, [B, L, M] with `objects` (a position's word ids, 0-padded:
        M words for a scene object, one for every other position)."""
        seqs = []
        for t in texts:
            ids = self.tok.ids(t)
            if ids is None:
                raise EditrlInputError(f"the tiny intent policy reads only the ShapesWorld vocabulary: {t!r}")
            groups = self._group_scene(ids) if self.cfg.scene_tokens == "objects" else [[i] for i in ids]
            seqs.append(groups[-self.cfg.max_in:])
        L = max(1, max(len(s) for s in seqs))
        M = max([1] + [len(g) for s in seqs for g in s])
        ids = torch.zeros(len(seqs), L, M, dtype=torch.long)
        for i, s in enumerate(seqs):
            for j, g in enumerate(s):
                ids[i, j, : len(g)] = torch.tensor(g, dtype=torch.long)
        if self.cfg.scene_tokens == "words":
            ids = ids[:, :, 0]                                                        # [B, L]
            return ids, ids != self.tok.pad
        return ids, ids[:, :, 0] != self.tok.pad                                      # [B, L, M], [B, L]

    def _group_scene(self, ids: list[int]) -> list[list[int]]:
        """One group per position: each `;`-separated item of the <scene> section is one group
        (led by the <scene> marker), every other token its own."""
        scene, sep = self.tok.stoi["<scene>"], self.tok.stoi[";"]
        ends = {self.tok.stoi[m] for m in ("<hist>", "<prev>", "<now>")}
        out: list[list[int]] = []
        in_scene = False
        for i in ids:
            if i == scene:
                in_scene = True
                out.append([i])
                out.append([scene])
            elif in_scene and i in ends:
                in_scene = False
                if out[-1] == [scene]:
                    out.pop()
                out.append([i])
            elif in_scene and i == sep:
                out.append([scene])
            elif in_scene:
                out[-1].append(i)
            else:
                out.append([i])
        if in_scene and out[-1] == [scene]:
            out.pop()
        return out

    def memory(self, src: Tensor, src_mask: Tensor) -> Tensor:
        if src.dim() == 3:                                                            # [B, L, M] word groups
            e = self.emb(src) * (src != self.tok.pad).unsqueeze(-1)                   # [B, L, M, D]
            h = e.sum(2)
        else:
            h = self.emb(src)                                                         # [B, L, D]
        h = h + self.pos_in[: src.shape[1]]
        return self.net.encoder(h, src_key_padding_mask=~src_mask)

    def logits(self, memory: Tensor, src_mask: Tensor, dec_in: Tensor) -> Tensor:
        """[B, T, V] next-token logits for decoder inputs [B, T] (starting with <bos>)."""
        T = dec_in.shape[1]
        h = self.emb(dec_in) + self.pos_out[:T]
        causal = torch.triu(torch.ones(T, T, dtype=torch.bool, device=dec_in.device), 1)
        out = self.net.decoder(h, memory, tgt_mask=causal, memory_key_padding_mask=~src_mask,
                               tgt_is_causal=True)
        return self.head(self.norm(out))

    def token_logprobs(self, src: Tensor, src_mask: Tensor, out_ids: Tensor, temperature: float = 1.0) -> Tensor:
        """log π(y_t | y_<t, x) of every output token [B, T] (out_ids [B, T] ends with <eos>,
        then <pad>); padding positions are 0. `temperature` is the sampling temperature."""
        mem = self.memory(src, src_mask)
        dec_in = torch.cat([torch.full_like(out_ids[:, :1], self.tok.bos), out_ids[:, :-1]], 1)   # [B, T]
        logp = F.log_softmax(self._never(self.logits(mem, src_mask, dec_in).float()) / temperature, -1)   # [B, T, V]
        lp = logp.gather(-1, out_ids.unsqueeze(-1)).squeeze(-1)                                 # [B, T]
        return torch.where(out_ids != self.tok.pad, lp, torch.zeros_like(lp))

    def _never(self, logits: Tensor) -> Tensor:
        """Input-only tokens (<pad>, <bos>, the section markers, ';') are never emitted: they
        are out of the output distribution (sampling and scoring alike)."""
        logits = logits.clone()
        logits[..., [i for i, w in enumerate(SPECIALS) if w != "<eos>"]] = -math.inf
        return logits

    @torch.no_grad()
    def generate(self, src: Tensor, src_mask: Tensor, temperature: float = 0.0,
                 generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(out_ids [B, T] ending with <eos> then <pad>, per-token log-probs [B, T] under the
        sampling distribution). temperature 0 = greedy (log-probs at temperature 1)."""
        B = src.shape[0]
        mem = self.memory(src, src_mask)
        dec = torch.full((B, 1), self.tok.bos, dtype=torch.long)
        done = torch.zeros(B, dtype=torch.bool)
        outs, lps = [], []
        for step in range(self.cfg.max_out + 1):
            logits = self._never(self.logits(mem, src_mask, dec)[:, -1].float())    # [B, V]
            t = temperature if temperature > 0 else 1.0
            logp = F.log_softmax(logits / t, -1)
            if step == self.cfg.max_out:                  # length cap: the end token is forced
                nxt = torch.full((B,), self.tok.eos, dtype=torch.long)
            elif temperature > 0:
                nxt = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1)
            else:
                nxt = logp.argmax(-1)
            lp = logp.gather(-1, nxt[:, None]).squeeze(1)
            nxt = torch.where(done, torch.full_like(nxt, self.tok.pad), nxt)
            outs.append(nxt)
            lps.append(torch.where(done, torch.zeros_like(lp), lp))
            done = done | (nxt == self.tok.eos)
            dec = torch.cat([dec, nxt[:, None]], 1)
            if bool(done.all()):
                break
        return torch.stack(outs, 1), torch.stack(lps, 1)


class TinyPolicyReconstructor:
    """The learned policy as a Reconstructor (greedy decoding)."""

    name = "tiny"

    def __init__(self, policy: TinyIntentPolicy, weights_sha256: str | None = None, batch_size: int = 256) -> None:
        self.policy = policy.eval()
        self.weights_sha256 = weights_sha256
        self.batch_size = batch_size

    def reconstruct(self, queries: Sequence[IntentQuery]) -> list[Reconstruction]:
        out: list[Reconstruction | None] = [None] * len(queries)
        ok = []
        for i, q in enumerate(queries):
            if q.source_scene is None:
                out[i] = Reconstruction(q.instruction, error="the tiny intent policy reads ShapesWorld sessions only")
            elif self.policy.tok.ids(query_text(q)) is None:
                out[i] = Reconstruction(q.instruction, error="a word outside the ShapesWorld vocabulary")
            else:
                ok.append(i)
        for a in range(0, len(ok), self.batch_size):
            idx = ok[a:a + self.batch_size]
            src, mask = self.policy.encode_inputs([query_text(queries[i]) for i in idx])
            ids, _ = self.policy.generate(src, mask, temperature=0.0)
            for i, row in zip(idx, ids.tolist()):
                text = self.policy.tok.text(row)
                out[i] = Reconstruction(text, trace="tiny policy (greedy)") if text else \
                    Reconstruction(queries[i].instruction, error="the policy wrote nothing")
        return out  # type: ignore[return-value]


# ------------------------------------------------------------------------ save / load

def save_policy(policy: TinyIntentPolicy, path: str | os.PathLike, meta: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    from ..session import atomic_write_bytes
    tmp = Path(str(path) + ".tmp")
    save_file({k: v.contiguous() for k, v in policy.state_dict().items()}, str(tmp),
              metadata={"format": "editrl-intent-tiny", "config": policy.cfg.to_json(), **(meta or {})})
    atomic_write_bytes(Path(path), tmp.read_bytes())
    tmp.unlink()


def load_policy(path: str | os.PathLike) -> tuple[TinyIntentPolicy, str]:
    from safetensors import safe_open
    from safetensors.torch import load_file
    p = Path(path)
    if p.is_dir():
        p = p / "policy.safetensors"
    if not p.is_file():
        raise EditrlInputError(f"--intent tiny:{path}: no policy weights found (expected a .safetensors file or a run folder)")
    if p.suffix != ".safetensors":
        raise EditrlInputError(f"{p}: only .safetensors weights are read (pickle checkpoints are refused)")
    try:
        with safe_open(str(p), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("format") != "editrl-intent-tiny":
            raise EditrlInputError(f"{p}: not a tiny intent policy")
        policy = TinyIntentPolicy(PolicyConfig.from_json(meta["config"]))
        policy.load_state_dict(load_file(str(p)))
    except EditrlInputError:
        raise
    except Exception as e:
        raise EditrlInputError(f"{p}: cannot read the policy weights ({type(e).__name__}: {e})") from None
    return policy, weights_sha256(p)


def load_tiny_policy(spec: str) -> TinyPolicyReconstructor:
    path = ASSET if spec == "tiny" else Path(spec[len("tiny:"):])
    if spec == "tiny" and not ASSET.is_file():
        raise EditrlInputError("no shipped tiny intent policy in this install; train one with "
                               "`editrl intent train --out DIR` and pass --intent tiny:DIR")
    policy, sha = load_policy(path)
    return TinyPolicyReconstructor(policy, sha)


# ------------------------------------------------------------------------ supervised training

@dataclass
class IntentTrainConfig:
    seed: int = 0
    steps: int = 3000
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 200
    max_turns: int = 5
    constraint_share: float = 0.5
    pronoun_prob: float = 0.7
    eval_every: int = 500
    eval_sessions: int = 100
    threads: int = 0
    model: PolicyConfig = field(default_factory=PolicyConfig)


def _examples(cfg: IntentTrainConfig, step: int) -> list[tuple[str, str]]:
    """(query text, gold explicit) pairs of one batch: a pure function of (seed, step)."""
    from ..world.grammar import GrammarConfig, sample_session
    from .base import query_for

    rng = np.random.default_rng([cfg.seed, step])
    out = []
    for i in range(cfg.batch_size):
        turns = int(rng.integers(1, cfg.max_turns + 1))
        s = sample_session(cfg.seed + 104_729, step * cfg.batch_size + i,
                           GrammarConfig(turns=turns, constraint_share=cfg.constraint_share, pronoun_prob=cfg.pronoun_prob))
        k = int(rng.integers(1, turns + 1))
        q = query_for(s, k, [t.explicit for t in s.turns[: k - 1]])
        out.append((query_text(q), s.turns[k - 1].explicit))
    return out


def _targets(policy: TinyIntentPolicy, texts: Sequence[str]) -> Tensor:
    seqs = [policy.tok.ids(t)[: policy.cfg.max_out] + [policy.tok.eos] for t in texts]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
    return ids


def evaluate_policy(policy: TinyIntentPolicy, sessions: int, seed: int = 99, turns: int = 5) -> dict[str, float]:
    """Exact match and referent accuracy on held-out long ShapesWorld sessions."""
    from ..world.grammar import GrammarConfig, sample_session
    from .evaluate import evaluate_sessions

    ss = [sample_session(seed + 7_777_777, i, GrammarConfig(turns=turns, constraint_share=0.6, pronoun_prob=0.9))
          for i in range(sessions)]
    return evaluate_sessions(TinyPolicyReconstructor(policy), ss)["summary"]


def train_policy(cfg: IntentTrainConfig, out: str | os.PathLike, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Supervised training (teacher forcing, cross-entropy) on grammar-made pairs; writes
    DIR/policy.safetensors (atomic, also every eval) and DIR/metrics.jsonl."""
    from ..checkpoint import append_metrics

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    policy = TinyIntentPolicy(cfg.model)
    opt = torch.optim.AdamW(policy.parameters(), lr=cfg.lr, weight_decay=0.01)
    t0 = time.time()
    last: dict[str, Any] = {}
    for step in range(cfg.steps):
        lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        for g in opt.param_groups:
            g["lr"] = lr
        pairs = _examples(cfg, step)
        src, mask = policy.encode_inputs([a for a, _ in pairs])
        tgt = _targets(policy, [b for _, b in pairs])
        lp = policy.token_logprobs(src, mask, tgt)
        loss = -lp.sum() / (tgt != policy.tok.pad).sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        opt.step()
        if (step + 1) % 50 == 0:
            last = {"step": step + 1, "loss": loss.item(), "lr": lr, "elapsed_min": round((time.time() - t0) / 60, 2)}
            if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps):
                policy.eval()
                ev = evaluate_policy(policy, cfg.eval_sessions)
                policy.train()
                last.update({f"eval/{k}": v for k, v in ev.items() if isinstance(v, float)})
                save_policy(policy, out / "policy.safetensors", {"step": str(step + 1), "seed": str(cfg.seed)})
                log(json.dumps(last))
            append_metrics(out / "metrics.jsonl", last)
    save_policy(policy, out / "policy.safetensors", {"step": str(cfg.steps), "seed": str(cfg.seed),
                                                     "minutes": f"{(time.time() - t0) / 60:.1f}"})
    return {**last, "path": str(out / "policy.safetensors")}
