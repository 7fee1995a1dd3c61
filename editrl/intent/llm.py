"""`llm`: session-intent reconstruction by a language model (ALGORITHMS §8).

The model is asked to do two things to the current instruction of a session, and nothing
else: *coreference resolution* (a pronoun that points at an object becomes that object's
name, in square brackets, spelled as in the list of visible objects) and *constraint
injection* (a persistent session rule is added, briefly, to a turn it governs). It answers
with the rewritten instruction on one line (with `think`, after one short reasoning line).

Two backends, chosen by the spec that follows `llm:` in `--intent`:

* `hf:PATH` — a transformers causal LM and its tokenizer saved with `save_pretrained` in a
  local folder (loaded offline). The prompt goes through the folder's chat template when
  there is one, else it is given as plain text ending in an answer cue. Generation is batched
  with left padding, greedy unless `temperature` > 0, and bounded by `max_tokens`.
* `URL#MODEL` — an OpenAI-compatible chat-completions endpoint (a vLLM server, say:
  `http://127.0.0.1:8000/v1#Qwen/Qwen2.5-7B-Instruct`), through the judges' HTTP client
  (bounded concurrency, retries with backoff, timeouts). `#MODEL` may be left out: the
  server's first listed model is used.

Options follow the spec after `?` as `key=value` pairs joined by `&` (a path or model name
containing `?` is not supported), or as keyword arguments of `load_llm_reconstructor`:
`think`, `temperature`, `max_tokens` for both backends; `timeout`, `retries`, `backoff`,
`concurrency`, `api_key`, `seed` for HTTP; `device`, `dtype`, `batch_size`, `threads`,
`seed` for `hf:`. Example: `llm:hf:/models/qwen2.5-1.5b-instruct?think=1&max_tokens=200`.

The model sees text only (the current image is not sent): the objects visible in it, when
the query carries them (real records: the object list of the turn's input image;
ShapesWorld: the objects of the session's first image, whose later changes the model must
follow through the earlier turns), the raw and the explicit instructions of the earlier
turns, and the session rule if one was stated.

Parsing is strict and never invents text: the instruction line is taken (a label such as
"Explicit instruction:" and wrapping quotes are stripped, whitespace is collapsed); an empty,
refused, cut-off (the token budget ran out) or otherwise unreadable reply, or a transport
failure after the client's retries, gives the raw instruction with `error` set and the raw
reply (or the failure) as the trace.

The prompt's wording is versioned (`PROMPT_VERSION`): changing it means bumping the version,
which is part of `params()` so that a pinned run notices.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from ..judges.clients import OpenAIClient, Sample, _first_line, read_chat_template, weights_fingerprint
from ..judges.prompts import strip_think
from ..session import EditrlInputError
from .base import IntentQuery, Reconstruction, constraint_of
from .rules import _PROTECT_PATTERNS, _RULE_PATTERNS

PROMPT_VERSION = "v1"
SPEC_FORMS = "llm:hf:PATH or llm:URL#MODEL (e.g. llm:http://127.0.0.1:8000/v1#my-model), options after '?'"
MAX_TOKENS_CAP = 2048          # the most new tokens a reply may take, whatever the option says

COMMON_OPTS = {"think": bool, "temperature": float, "max_tokens": int}
HTTP_OPTS = {"timeout": float, "retries": int, "backoff": float, "concurrency": int, "api_key": str, "seed": int}
HF_OPTS = {"device": str, "dtype": str, "batch_size": int, "threads": int, "seed": int}
DTYPES = ("float32", "float16", "bfloat16")


# =============================================================================== options

@dataclass
class LLMOptions:
    """What changes the model's reply, validated before any model loads."""
    think: bool = False
    temperature: float = 0.0
    max_tokens: int | None = None     # new tokens per reply; default 96, or 320 with think

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise EditrlInputError(f"--intent llm: temperature must be >= 0, got {self.temperature}")
        if self.max_tokens is None:
            self.max_tokens = 320 if self.think else 96
        if not 1 <= self.max_tokens <= MAX_TOKENS_CAP:
            raise EditrlInputError(f"--intent llm: max_tokens must be in 1..{MAX_TOKENS_CAP}, got {self.max_tokens}")


def _convert(key: str, value: Any, kind: type) -> Any:
    """An option value of the declared type (strings from a spec are converted)."""
    if not isinstance(value, str) or kind is str:
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind is not str and not isinstance(value, kind):
            raise EditrlInputError(f"--intent llm: option {key} must be a {kind.__name__}, got {value!r}")
        return value
    if kind is bool:
        low = value.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise EditrlInputError(f"--intent llm: option {key} must be true or false, got {value!r}")
    try:
        return kind(value)
    except ValueError:
        raise EditrlInputError(f"--intent llm: option {key} must be a {kind.__name__}, got {value!r}") from None


def parse_options(query: str, allowed: dict[str, type], given: dict[str, Any]) -> dict[str, Any]:
    """`key=value&key=value` from the spec, then the keyword options (these win), typed and
    checked against the backend's option names."""
    raw: dict[str, Any] = {}
    for item in filter(None, query.split("&")):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise EditrlInputError(f"--intent llm: option {item!r} is not key=value")
        raw[key.strip()] = value
    raw.update({k: v for k, v in given.items() if v is not None})
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise EditrlInputError(f"--intent llm: unknown option(s) {', '.join(unknown)} "
                               f"(this backend takes {', '.join(sorted(allowed))})")
    return {k: _convert(k, v, allowed[k]) for k, v in raw.items()}


# =============================================================================== the prompt

def session_rule(query: IntentQuery) -> tuple[str, int] | None:
    """(rule text, turn that stated it) for the first persistent rule in the raw instructions:
    the real-record phrasings (`constraint_of`), then the ShapesWorld ones."""
    rule = constraint_of(query)
    if rule is not None:
        return rule.text, rule.from_turn
    for k, text in enumerate(query.instructions, start=1):
        for pat in _RULE_PATTERNS + _PROTECT_PATTERNS:
            m = pat.match(text)
            if m:
                return m.group(0).strip(), k
    return None


def objects_block(query: IntentQuery) -> str:
    """What the query says about the objects in the image, in words the model can copy."""
    if query.objects:
        names = [n for n in query.objects[-1] if n.strip()]
        if names:
            return "Objects visible in the current image (the input of this turn):\n" + \
                "\n".join(f"- {n}" for n in names)
        return "Objects visible in the current image: none listed."
    if query.source_scene is not None:
        from ..world.scene import Scene

        scene = Scene.from_dict(query.source_scene)
        lines = [f"- [{o.describe()}] ({o.size}, {o.fill})" for o in scene.sorted_objects()]
        return ("Objects in the session's first image, before turn 1, on a " + scene.background + " background "
                "(the earlier turns may have added, removed, moved or changed some; follow them):\n"
                + ("\n".join(lines) if lines else "- (none)"))
    return "Objects visible in the current image: not known."


def history_block(query: IntentQuery) -> str:
    """The earlier turns: what the user wrote and the explicit instruction used for it."""
    if query.turn <= 1:
        return "Earlier turns: none (this is the first turn)."
    lines = ["Earlier turns:"]
    for j in range(query.turn - 1):
        used = query.previous[j] if j < len(query.previous) else query.instructions[j]
        lines.append(f"Turn {j + 1}: user wrote: {query.instructions[j]}")
        lines.append(f"        explicit instruction used: {used}")
    return "\n".join(lines)


TASK = """\
You prepare instructions for an image editor that cannot see the conversation. Rewrite the \
current instruction of a multi-turn editing session into one explicit, self-contained instruction.

Do exactly this:
1. Resolve references. Replace each pronoun that stands for an object (it, its, they, them, \
their) with that object's specific name in square brackets, spelled as in the list of objects \
(e.g. "Remove it" -> "Remove [paper yellow sign]"). Find the object through the earlier turns; \
an object that was recoloured, moved or replaced goes by its current name.
2. Inject the session rule. If a persistent rule is in force and this turn adds or changes an \
object, add the rule briefly at the end (e.g. ", using [yellow] color only on the edited object"; \
for a rule that protects an object: " and keep [that object] unchanged"). Do not add it to a \
removal or a background change. Leave out the sentence that states the rule itself.
3. Keep everything else as the user wrote it. Do not add, drop or reorder edits."""

OUTPUT_PLAIN = "Answer with ONLY the rewritten instruction, on one line, with no quotes and no explanation."
OUTPUT_THINK = ("First write one short line that starts with \"Reasoning:\" (which object each pronoun means, "
                "which rule applies), then the rewritten instruction alone on the last line.")


def build_prompt(query: IntentQuery, think: bool = False) -> str:
    """The whole request as one user message (text only, so that any chat template takes it)."""
    rule = session_rule(query)
    rule_line = (f"Session rule (stated in turn {rule[1]}): {rule[0]}" if rule is not None
                 else "Session rule: none.")
    return "\n\n".join([
        TASK,
        objects_block(query),
        rule_line,
        history_block(query),
        f"Current instruction (turn {query.turn}): {query.instruction}",
        OUTPUT_THINK if think else OUTPUT_PLAIN,
    ])


# =============================================================================== parsing

_LABEL = re.compile(r"^\s*(?:(?:the\s+)?(?:explicit|rewritten|final|new|resolved)\s+)?"
                    r"(?:instruction|answer|output|rewrite|result)\s*(?:\(turn\s*\d+\))?\s*:\s*", re.IGNORECASE)
_REASONING = re.compile(r"^\s*(?:reasoning|thought|thinking|analysis)\s*:", re.IGNORECASE)
_REFUSAL = re.compile(r"^\s*(?:i'?m sorry|i am sorry|sorry,|i\s*(?:can(?:no|')t|cannot|am unable|'m unable|won't)\b|"
                      r"as an ai\b|unfortunately,? i\b)", re.IGNORECASE)
_QUOTES = {'"': '"', "'": "'", "`": "`", "\u201c": "\u201d", "\u2018": "\u2019"}
_FENCE = re.compile(r"^\s*```\w*\s*$")


def _unwrap(line: str) -> str:
    """Strip bold markers, a list marker, a leading label and one pair of wrapping quotes."""
    s = re.sub(r"^\s*(?:[-*•]\s+|\d+[.)]\s+)", "", line.replace("**", "")).strip()
    s = _LABEL.sub("", s, count=1).strip()
    if len(s) >= 2 and s[0] in _QUOTES and s[-1] == _QUOTES[s[0]] and s[0] not in s[1:-1]:
        s = s[1:-1].strip()
    return " ".join(s.split())


def parse_reply(text: str, think: bool = False, finish_reason: str | None = None) -> tuple[str | None, str | None]:
    """(explicit instruction, None) or (None, why the reply cannot be used)."""
    if finish_reason == "length":
        return None, "the reply was cut off at max_tokens"
    body, unclosed = strip_think(text or "")
    if unclosed:
        return None, unclosed
    # a code fence or a label alone on its line ("Explicit instruction:") is not content
    lines = [ln for ln in body.splitlines() if not _FENCE.match(ln) and _unwrap(ln)]
    if not lines:
        return None, "empty reply"
    if think:       # reasoning first, the instruction on the last line
        line = lines[-1]
        if _REASONING.match(line):
            return None, "no instruction after the reasoning line"
    else:
        if len(lines) != 1:
            return None, f"the reply has {len(lines)} lines (expected the instruction alone on one line)"
        line = lines[0]
    explicit = _unwrap(line)
    if _REFUSAL.match(explicit) or _REASONING.match(explicit):
        return None, "the model refused or did not answer with an instruction"
    if any(ord(c) < 32 or c == "\ufffd" for c in explicit):
        return None, "the instruction holds unprintable characters"
    return explicit, None


def reconstruction_of(query: IntentQuery, sample: Sample, think: bool) -> Reconstruction:
    """The reconstruction of one reply: the parsed instruction, or the raw instruction with the error."""
    if sample.error is not None:
        return Reconstruction(explicit=query.instruction, trace=sample.error, error=sample.error)
    explicit, why = parse_reply(sample.text, think, sample.finish_reason)
    raw = sample.text.strip()
    if why is not None:
        return Reconstruction(explicit=query.instruction, trace=raw or why, error=why)
    return Reconstruction(explicit=explicit, trace=raw)


# =============================================================================== backends

class ChatEndpoint(OpenAIClient):
    """The judges' OpenAI-compatible client, sending each prompt as one text-only user message."""

    def complete_texts(self, prompts: Sequence[str], temperature: float, max_tokens: int,
                       think: bool = False) -> list[Sample]:
        """One reply per prompt, `concurrency` requests in flight (`think` is in the prompt already)."""
        def one(text: str) -> Sample:
            return self._complete_one([{"role": "user", "content": text}], 1, temperature, max_tokens, 0)[0]

        if self.concurrency == 1 or len(prompts) <= 1:
            return [one(p) for p in prompts]
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(one, prompts))


def _stop_token_ids(model, tokenizer) -> set[int]:
    """End-of-reply token ids: the generation config's, the tokenizer's, and the usual chat ends."""
    ids: set[int] = set()
    eos = model.generation_config.eos_token_id
    ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    vocab = tokenizer.get_vocab()
    for t in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>"):
        if t in vocab:
            ids.add(int(vocab[t]))
    return ids


class LocalCausalLM:
    """A transformers causal LM and its tokenizer from a local folder, generating in batches
    with left padding (the same loading approach as the judges' local client)."""

    def __init__(self, path: str | os.PathLike, device: str = "cpu", dtype: str = "float32", batch_size: int = 8,
                 threads: int | None = None, seed: int = 0) -> None:
        self.path = Path(path).expanduser().resolve()
        if not self.path.is_dir():
            raise EditrlInputError(f"--intent llm:hf:{path}: no such folder")
        if not (self.path / "config.json").is_file():
            raise EditrlInputError(f"--intent llm:hf:{path}: not a model folder (no config.json)")
        if batch_size < 1:
            raise EditrlInputError(f"--intent llm: batch_size must be at least 1, got {batch_size}")
        if dtype not in DTYPES:
            raise EditrlInputError(f"--intent llm: dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
        self.device, self.batch_size, self.seed = device, int(batch_size), int(seed)
        self.calls = 0
        self._load(path, dtype, threads)
        self.stop_ids = _stop_token_ids(self.model, self.tokenizer)
        if self.tokenizer.pad_token_id is None:   # padding with an end token is harmless under the attention mask
            if not self.stop_ids:
                raise EditrlInputError(f"--intent llm:hf:{path}: the tokenizer has neither a pad nor an end token")
            self.tokenizer.pad_token = self.tokenizer.convert_ids_to_tokens(min(self.stop_ids))
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 0) or 0)
        self.backend_id = f"hf:{self.path}#{weights_fingerprint(self.path)}"

    def _load(self, path, dtype: str, threads: int | None) -> None:
        import torch

        if threads or not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(max(1, threads or min(8, os.cpu_count() or 1)))
        try:
            from transformers import AutoModelForCausalLM, AutoTokenizer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()
            self.model = AutoModelForCausalLM.from_pretrained(
                self.path, local_files_only=True, dtype=getattr(torch, dtype)).to(self.device).eval()
            self.tokenizer = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        except ImportError as e:
            raise EditrlInputError(f"--intent llm:hf needs transformers ({_first_line(e)}); pip install 'editrl[hf]'") from None
        except (OSError, ValueError, TypeError, KeyError, AttributeError, RuntimeError) as e:
            raise EditrlInputError(f"--intent llm:hf:{path}: not a loadable causal language model ({_first_line(e)})") from None
        self.tokenizer.padding_side = "left"
        self.template = read_chat_template(self.path, self.tokenizer)

    def cue(self, think: bool = False) -> str:
        """Without a chat template the plain prompt ends in an answer cue, which then counts as
        the start of the reply (so that "Reasoning:" keeps marking the reasoning line)."""
        return "" if self.template else ("Reasoning:" if think else "Rewritten instruction:")

    def render(self, prompt: str, think: bool = False) -> str:
        """The text the model continues: the chat-templated user message, or the plain prompt
        and its cue when the folder has no chat template."""
        if self.template:
            return self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}], chat_template=self.template,
                                                      tokenize=False, add_generation_prompt=True, enable_thinking=think)
        return f"{prompt}\n\n{self.cue(think)}"

    def _generate(self, texts: Sequence[str], temperature: float, max_tokens: int, prefill: str = "") -> list[Sample]:
        import torch

        enc = self.tokenizer(list(texts), return_tensors="pt", padding=True, add_special_tokens=not self.template)
        enc = enc.to(self.device)
        n_in = enc["input_ids"].shape[1]
        if self.max_positions and n_in + max_tokens > self.max_positions:
            why = f"the prompt ({n_in} tokens) and max_tokens exceed the model's {self.max_positions} positions"
            return [Sample(error=why) for _ in texts]
        sampling = temperature > 0
        kw: dict[str, Any] = dict(max_new_tokens=max_tokens, do_sample=sampling, pad_token_id=self.tokenizer.pad_token_id,
                                  eos_token_id=sorted(self.stop_ids) or None)
        if sampling:
            kw.update(temperature=temperature, top_k=0, top_p=1.0)
        else:   # greedy: unset the sampling defaults a generation config may carry
            kw.update(temperature=None, top_k=None, top_p=None)
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(self.seed + self.calls)
            out = self.model.generate(**enc, **kw)
        self.calls += len(texts)
        samples = []
        for r in range(len(texts)):
            ids = out[r, n_in:].tolist()
            stop = next((j for j, t in enumerate(ids) if t in self.stop_ids), None)
            gen = ids if stop is None else ids[:stop]
            samples.append(Sample(text=prefill + self.tokenizer.decode(gen, skip_special_tokens=True),
                                  finish_reason="stop" if stop is not None else "length"))
        return samples

    def complete_texts(self, prompts: Sequence[str], temperature: float, max_tokens: int,
                       think: bool = False) -> list[Sample]:
        """One reply per prompt, `batch_size` rows at a time; a model-side failure becomes an
        error sample for its batch, not an exception."""
        out: list[Sample] = []
        texts = [self.render(p, think) for p in prompts]
        for start in range(0, len(texts), self.batch_size):
            chunk = texts[start: start + self.batch_size]
            try:
                out += self._generate(chunk, temperature, max_tokens, prefill=self.cue(think))
            except (RuntimeError, ValueError, IndexError) as e:
                out += [Sample(error=f"local model error ({_first_line(e)})") for _ in chunk]
        return out


# =============================================================================== reconstructor

class LLMReconstructor:
    """A language model behind the Reconstructor protocol; `backend` is a `ChatEndpoint` or a
    `LocalCausalLM`."""

    name = "llm"
    prompt_version = PROMPT_VERSION
    weights_sha256 = None     # no sha256 of the weights: `reconstructor_id` carries the model's identity

    def __init__(self, backend: Any, options: LLMOptions, backend_id: str) -> None:
        self.backend, self.options, self.backend_id = backend, options, backend_id

    @property
    def reconstructor_id(self) -> str:
        """Names the model (URL and model, or folder and a fingerprint of its weights) and prompt version."""
        return f"llm:{self.backend_id}@prompt-{PROMPT_VERSION}"

    @property
    def calls(self) -> int:
        return self.backend.calls

    def params(self) -> dict[str, Any]:
        """Every setting the reconstructions depend on (for pinning a run)."""
        out: dict[str, Any] = {"prompt_version": PROMPT_VERSION, **asdict(self.options)}
        seed = getattr(self.backend, "seed", None)
        if self.options.temperature > 0 and seed is not None:
            out["seed"] = seed
        return out

    def close(self) -> None:
        """Release the HTTP connections; a no-op for a local model."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def reconstruct(self, queries: Sequence[IntentQuery]) -> list[Reconstruction]:
        prompts = [build_prompt(q, self.options.think) for q in queries]
        o = self.options
        samples = self.backend.complete_texts(prompts, o.temperature, o.max_tokens, think=o.think)
        if len(samples) != len(queries):   # a backend bug, not a model reply: never paper over it
            raise RuntimeError(f"llm backend returned {len(samples)} replies for {len(queries)} prompts")
        return [reconstruction_of(q, s, o.think) for q, s in zip(queries, samples)]


# =============================================================================== loading

def _split(opts: dict[str, Any], names: dict[str, type]) -> dict[str, Any]:
    return {k: v for k, v in opts.items() if k in names}


def _endpoint_message(msg: str) -> str:
    """The HTTP client's load-time message, reworded: it speaks of a judge and its CLI options."""
    msg = re.sub(r";\s*(?:start it or )?pass --judge-model", "; name the model as URL#MODEL", msg)
    return re.sub(r"\bjudge (server|options|URL)\b", r"\1", msg)


def load_llm_reconstructor(spec: str, **options: Any) -> LLMReconstructor:
    """`hf:PATH[?opts]` or `URL[#MODEL][?opts]` (the part of `--intent` after `llm:`) -> a
    reconstructor. Keyword options override those in the spec; None values are ignored."""
    spec = (spec or "").strip()
    target, _, query = spec.partition("?")
    if not target:
        raise EditrlInputError(f"--intent llm: needs a model: {SPEC_FORMS}")
    if target.startswith("hf:"):
        path = target[len("hf:"):]
        if not path:
            raise EditrlInputError(f"--intent llm:hf: needs a folder: {SPEC_FORMS}")
        opts = parse_options(query, COMMON_OPTS | HF_OPTS, options)
        llm_opts = LLMOptions(**_split(opts, COMMON_OPTS))
        backend = LocalCausalLM(path, **_split(opts, HF_OPTS))
        return LLMReconstructor(backend, llm_opts, backend.backend_id)
    if target.startswith(("http://", "https://")):
        url, hash_, model = target.partition("#")
        if hash_ and not model.strip():
            raise EditrlInputError(f"--intent llm:{target}: empty model name after '#'")
        if not url.split("://", 1)[1].split("/", 1)[0]:
            raise EditrlInputError(f"--intent llm:{target}: no host in the URL")
        opts = parse_options(query, COMMON_OPTS | HTTP_OPTS, options)
        llm_opts = LLMOptions(**_split(opts, COMMON_OPTS))
        try:
            client = ChatEndpoint(url, model=model.strip() or None, **_split(opts, HTTP_OPTS))
        except EditrlInputError as e:
            raise EditrlInputError(f"--intent llm:{target}: {_endpoint_message(str(e))}") from None
        return LLMReconstructor(client, llm_opts, f"{client.base_url}#{client.model}")
    raise EditrlInputError(f"--intent llm:{spec}: unknown model spec; expected {SPEC_FORMS}")


__all__ = ["PROMPT_VERSION", "LLMOptions", "LLMReconstructor", "ChatEndpoint", "LocalCausalLM", "build_prompt",
           "parse_reply", "session_rule", "load_llm_reconstructor"]
