"""The `llm` reconstructor: an OpenAI-compatible endpoint (the loopback server replaying
scripted replies) and a local transformers causal LM (a tiny random Qwen2 built from a config
and saved to disk). A reply is used only when it parses as one instruction; every failure
(empty, refused, several lines, cut off, HTTP 500, timeout) falls back to the raw instruction
with `error` set, and nothing is ever made up."""

from __future__ import annotations

import re
import socket

import pytest

from editrl.intent import load_reconstructor
from editrl.intent.base import IntentQuery, Reconstruction, query_for
from editrl.intent.llm import PROMPT_VERSION, LLMReconstructor, build_prompt, load_llm_reconstructor, parse_reply
from editrl.session import EditrlInputError
from editrl.world.grammar import GrammarConfig, sample_session

RULE = ("From now on, every edit must use navy color only on the object that is being added or changed. "
        "With this rule active, Add a hat on the dog")


def record_query() -> IntentQuery:
    """Turn 2 of a real-record-like session: "it" is the sign recoloured in turn 1."""
    return IntentQuery(session_id="r", turn=2,
                       instructions=("Change the color of paper blue sign to yellow", "Remove it"),
                       previous=("Change the color of [paper blue sign] to [yellow]",),
                       objects=(("wood brown board", "paper blue sign"), ("wood brown board", "paper yellow sign")))


def rule_query() -> IntentQuery:
    """Turn 2 under a persistent colour rule, a possessive pronoun."""
    return IntentQuery(session_id="d", turn=2, instructions=(RULE, "Change the material of their strap to leather"),
                       previous=("Add [hat] on [dog], using [navy] color only on the edited object",),
                       objects=(("dog", "fabric black strap"), ("dog", "hat", "fabric black strap")))


def shapes_query() -> IntentQuery:
    s = sample_session(0, 0, GrammarConfig(turns=3, constraint_share=1.0, pronoun_prob=1.0))
    return query_for(s, 2, [s.turns[0].explicit])


def http_spec(server, options: str = "") -> str:
    return f"{server.url}#{server.model}" + (f"?{options}" if options else "")


# ------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("reply, think, want", [
    ("  Remove   [paper yellow sign] \n", False, "Remove [paper yellow sign]"),
    ('Explicit instruction: "Remove [paper yellow sign]"', False, "Remove [paper yellow sign]"),
    ("**Rewritten instruction:** Remove [x]", False, "Remove [x]"),
    ("Explicit instruction:\n  Remove [x]", False, "Remove [x]"),
    ("```\nRemove [x]\n```", False, "Remove [x]"),
    ("<think>the sign was recoloured</think>\nRemove [x]", False, "Remove [x]"),
    ("Reasoning: it = the sign.\nRemove [x]", True, "Remove [x]"),
])
def test_a_well_formed_reply_is_taken_verbatim_up_to_labels_quotes_and_spacing(reply, think, want):
    assert parse_reply(reply, think) == (want, None)


@pytest.mark.parametrize("reply, think, finish, why", [
    ("", False, "stop", "empty reply"),
    ("   \n\n", False, "stop", "empty reply"),
    ("I'm sorry, but I can't help with that.", False, "stop", "refused"),
    ("Reasoning: it is the sign.\nRemove [x]", False, "stop", "2 lines"),
    ("Reasoning: it is the sign.", True, "stop", "no instruction after the reasoning"),
    ("<think>still thinking", False, "stop", "inside <think>"),
    ("Remove [paper yel", False, "length", "cut off"),
    ("Remove \x07[x]", False, "stop", "unprintable"),
])
def test_an_unusable_reply_is_an_error_never_a_guess(reply, think, finish, why):
    explicit, error = parse_reply(reply, think, finish)
    assert explicit is None and why in error


def test_the_prompt_carries_objects_history_rule_and_current_turn():
    text = build_prompt(rule_query())
    assert "- fabric black strap" in text and "- hat" in text                  # the current image's objects
    assert RULE in text and "Add [hat] on [dog], using [navy]" in text           # raw and explicit history
    assert "Session rule (stated in turn 1): From now on, every edit must use navy color" in text
    assert text.count("Current instruction (turn 2): Change the material of their strap to leather") == 1
    shapes = build_prompt(shapes_query())
    assert "Objects in the session's first image" in shapes and re.search(r"- \[\w+ \w+ at [a-z ]+\] \(", shapes)
    assert "Session rule (stated in turn 1)" in shapes                           # ShapesWorld phrasing found too
    first = build_prompt(IntentQuery("x", 1, ("Add a cat",)))
    assert "Earlier turns: none" in first and "Session rule: none." in first and "not known" in first


# ------------------------------------------------------------------------------ HTTP backend

def test_http_good_reply_is_used_and_the_request_is_what_the_model_needs(judge_server):
    rec = load_reconstructor("llm:" + http_spec(judge_server, "max_tokens=40"))
    assert isinstance(rec, LLMReconstructor) and rec.name == "llm"
    assert rec.reconstructor_id == f"llm:{judge_server.url}#{judge_server.model}@prompt-{PROMPT_VERSION}"
    assert rec.params() == {"prompt_version": PROMPT_VERSION, "think": False, "temperature": 0.0, "max_tokens": 40}
    judge_server.script.append({"kind": "text", "text": "  Remove   [paper yellow sign] \n"})
    out = rec.reconstruct([record_query()])
    assert out == [Reconstruction(explicit="Remove [paper yellow sign]", trace="Remove   [paper yellow sign]")]
    body = judge_server.requests[-1]
    assert body["model"] == judge_server.model and body["temperature"] == 0.0 and body["max_tokens"] == 40
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    text = body["messages"][0]["content"]
    objects = text.split("Objects visible in the current image")[1].split("\n\n")[0]
    assert "- paper yellow sign" in objects and "- wood brown board" in objects and "paper blue sign" not in objects
    assert "user wrote: Change the color of paper blue sign to yellow" in text
    assert "explicit instruction used: Change the color of [paper blue sign] to [yellow]" in text
    assert "Current instruction (turn 2): Remove it" in text and "Session rule: none." in text
    rec.close()
    first = load_llm_reconstructor(judge_server.url)                  # no #MODEL: the server's first model
    assert first.backend_id == f"{judge_server.url}#{judge_server.model}"
    first.close()


def test_http_failures_fall_back_to_the_raw_instruction(judge_server):
    rec = load_llm_reconstructor(http_spec(judge_server, "retries=1&backoff=0.01&timeout=0.5&concurrency=1"))
    judge_server.script.extend([
        {"kind": "text", "text": "The edit looks fine to me.\nNothing else to add."},   # malformed: two lines
        {"kind": "text", "text": ""},                                                   # empty
        {"kind": "fault", "fault": "refusal"},
        {"kind": "http", "status": 500}, {"kind": "http", "status": 500},              # first try and the retry
        {"kind": "stall", "seconds": 5}, {"kind": "stall", "seconds": 5},
    ])
    queries = [IntentQuery(f"s{i}", 1, (f"Remove the cup number {i}",)) for i in range(5)]
    out = rec.reconstruct(queries)
    for q, r in zip(queries, out):
        assert r.error and r.explicit == q.instruction and r.trace
    assert "2 lines" in out[0].error and out[0].trace.startswith("The edit looks fine")
    assert out[1].error == "empty reply"
    assert "refused" in out[2].error and "I'm sorry" in out[2].trace
    assert "HTTP 500" in out[3].error and "2 tries" in out[3].error and out[3].trace == out[3].error
    assert "timeout after 0.5s" in out[4].error
    assert judge_server.n_requests == 7 and rec.calls == 7
    rec.close()


def echo_server(**settings):
    """A loopback server whose reply is the request's current instruction, marked as rewritten."""
    from loopback_judge_server import LoopbackJudgeServer

    class EchoServer(LoopbackJudgeServer):
        def well_formed(self, body, value=None):
            m = re.search(r"Current instruction \(turn \d+\): (.+)", self.prompt_text(body))
            return f"{m.group(1)} (rewritten)"

    return EchoServer(model="echo-llm", **settings)


def test_http_batches_keep_their_order_and_overlap():
    with echo_server(delay=0.1) as srv:
        rec = load_llm_reconstructor(f"{srv.url}#echo-llm?concurrency=4")
        queries = [IntentQuery(f"s{i}", 1, (f"Remove cup {i}",)) for i in range(8)]
        out = rec.reconstruct(queries)
        assert [r.explicit for r in out] == [f"Remove cup {i} (rewritten)" for i in range(8)]
        assert all(r.error is None for r in out) and srv.max_in_flight >= 2
        rec.close()


def test_sessions_feed_each_turn_the_explicit_instructions_written_before_it():
    from editrl.intent import reconstruct_sessions

    sessions = [sample_session(3, i, GrammarConfig(turns=3)) for i in range(2)]
    with echo_server() as srv:
        rec = load_reconstructor(f"llm:{srv.url}#echo-llm")
        recs = reconstruct_sessions(rec, sessions)
        rec.close()
    assert len(recs) == 6 and all(r.error is None for r in recs.values())
    s = sessions[0]
    assert recs[(s.id, 3)].explicit == f"{s.turns[2].instruction} (rewritten)"
    [prompt] = [srv.prompt_text(b) for b in srv.requests
                if f"Current instruction (turn 3): {s.turns[2].instruction}" in srv.prompt_text(b)
                and f"user wrote: {s.turns[0].instruction}" in srv.prompt_text(b)]
    assert f"explicit instruction used: {s.turns[1].instruction} (rewritten)" in prompt


def test_http_think_takes_the_last_line_and_keeps_the_reasoning(judge_server):
    rec = load_llm_reconstructor(http_spec(judge_server), think=True)
    reply = "Reasoning: 'their' is the dog's; the navy rule governs this change.\nChange the material of " \
            "[fabric black strap] to leather, using [navy] color only on the edited object"
    judge_server.script.append({"kind": "text", "text": reply})
    [r] = rec.reconstruct([rule_query()])
    assert r.error is None and r.explicit.startswith("Change the material of [fabric black strap]")
    assert r.trace == reply and "Reasoning:" in judge_server.requests[-1]["messages"][0]["content"]
    assert judge_server.requests[-1]["max_tokens"] == 320                # the larger default budget with think
    rec.close()


# ------------------------------------------------------------------------------ local causal LM

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """Folders with a random Qwen2ForCausalLM (hidden 32, 2 layers) and a byte-level Qwen2
    tokenizer: `chat` has a chat template, `plain` has none."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    from tiny_vlm import build_tokenizer

    torch.set_num_threads(1)
    out = {}
    for kind in ("chat", "plain"):
        tok = build_tokenizer()
        if kind == "plain":
            tok.chat_template = None
        end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                             max_position_embeddings=4096, bos_token_id=None, eos_token_id=end,
                                             pad_token_id=pad)).eval()
        model.generation_config.eos_token_id = [end, pad]
        path = tmp_path_factory.mktemp(f"tiny-qwen2-{kind}")
        model.save_pretrained(path)
        tok.save_pretrained(path)
        out[kind] = path
    return out


def test_hf_backend_returns_one_reconstruction_per_query(tiny_lm):
    rec = load_reconstructor(f"llm:hf:{tiny_lm['chat']}?max_tokens=6&batch_size=2&threads=1")
    assert rec.reconstructor_id.startswith(f"llm:hf:{tiny_lm['chat'].resolve()}#")
    chat = rec.backend.render("hi")
    assert chat.startswith("<|im_start|>user") and "hi<|im_end|>" in chat and chat.endswith("<|im_start|>assistant")
    queries = [record_query(), rule_query(), shapes_query()]
    out = rec.reconstruct(queries)
    assert len(out) == 3 and rec.calls == 3
    for q, r in zip(queries, out):      # random weights write garbage: it must come back as an error or one line
        if r.error is not None:
            assert r.explicit == q.instruction and r.trace
        else:
            assert r.explicit and "\n" not in r.explicit and r.explicit == " ".join(r.explicit.split())
    assert any(r.error == "the reply was cut off at max_tokens" for r in out)     # 6 tokens of noise never end
    # batched generation with left padding gives each row what it gets alone (greedy)
    rec.backend.batch_size = 1
    assert [r.trace for r in rec.reconstruct(queries)] == [r.trace for r in out]


def test_hf_decoding_stops_at_the_end_token_and_reports_empties(tiny_lm, monkeypatch):
    """A scripted `generate` (the real tokenizer, padding and decoding around it): a reply, an
    immediate end token, and a reply that never ends."""
    import torch

    rec = load_llm_reconstructor(f"hf:{tiny_lm['chat']}", max_tokens=30, threads=1)
    tok, model = rec.backend.tokenizer, rec.backend.model
    end, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]             # noqa: E731
    long = ids("Remove [paper yellow sign] and also the board")[:30]           # all 30 tokens, no end
    rows = [ids("Remove [paper yellow sign]") + [end], [end], long]

    def scripted(input_ids, attention_mask=None, **kw):
        """What generate returns: the prompts, then each row's tokens, finished rows padded."""
        assert kw["max_new_tokens"] == 30 and kw["do_sample"] is False and end in kw["eos_token_id"]
        assert (attention_mask[:, -1] == 1).all()                                    # left padding
        new = torch.tensor([r + [pad] * (30 - len(r)) for r in rows[: input_ids.shape[0]]])
        return torch.cat([input_ids, new], dim=1)

    monkeypatch.setattr(model, "generate", scripted)
    out = rec.reconstruct([record_query(), record_query(), record_query()])
    assert out[0] == Reconstruction("Remove [paper yellow sign]", trace="Remove [paper yellow sign]")
    assert out[1].error == "empty reply" and out[1].explicit == "Remove it"
    assert out[2].error == "the reply was cut off at max_tokens" and out[2].trace == tok.decode(long)


def test_hf_plain_prompt_without_a_chat_template(tiny_lm):
    rec = load_llm_reconstructor(f"hf:{tiny_lm['plain']}?max_tokens=4&threads=1")
    assert rec.backend.template is None
    text = rec.backend.render(build_prompt(record_query()))
    assert text.endswith("\n\nRewritten instruction:") and "<|im_start|>" not in text
    [r] = rec.reconstruct([record_query()])
    assert r.error is not None and r.explicit == "Remove it"
    assert r.trace.startswith("Rewritten instruction:")            # the cue is the start of the reply


# ------------------------------------------------------------------------------ bad specs

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("spec, message", [
    ("llm:", "needs a model"),
    ("llm:hf:", "needs a folder"),
    ("llm:hf:{tmp}/missing", "no such folder"),
    ("llm:hf:{tmp}", "no config.json"),
    ("llm:hf:{junk}", "not a loadable causal language model"),
    ("llm:hf:{junk}?dtype=int8", "dtype must be one of"),
    ("llm:hf:{junk}?timeout=3", "unknown option(s) timeout"),
    ("llm:ftp://host/v1#m", "unknown model spec"),
    ("llm:http://#m", "no host"),
    ("llm:http://127.0.0.1:9/v1#", "empty model name"),
    ("llm:http://127.0.0.1:9/v1#m?bogus=1", "unknown option(s) bogus"),
    ("llm:http://127.0.0.1:9/v1#m?timeout=abc", "timeout must be a float"),
    ("llm:http://127.0.0.1:9/v1#m?think=maybe", "true or false"),
    ("llm:http://127.0.0.1:9/v1#m?max_tokens=0", "max_tokens must be in"),
    ("llm:http://127.0.0.1:9/v1#m?temperature=-1", "temperature must be >= 0"),
    ("llm:http://127.0.0.1:9/v1#m?concurrency", "not key=value"),
    ("llm:http://127.0.0.1:{port}/v1#m?retries=0&timeout=2", "unreachable"),
])
def test_bad_specs_are_one_line_input_errors(spec, message, tmp_path):
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "config.json").write_text('{"model_type": "no-such-model"}')
    spec = spec.format(tmp=tmp_path, junk=junk, port=_closed_port())
    with pytest.raises(EditrlInputError) as e:
        load_reconstructor(spec)
    assert message in str(e.value) and "\n" not in str(e.value)
