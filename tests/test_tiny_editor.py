"""The tiny editor, its sampler, configs, checkpoints and the pretraining recipe (all tiny sizes)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(1)

from editrl.config import load_config, parse_overrides  # noqa: E402
from editrl.editors.base import images_to_tensor, tensor_to_images  # noqa: E402
from editrl.editors.tiny import WORDS, TinyConfig, TinyEditor, Tokenizer, load_tiny  # noqa: E402
from editrl.pretrain import PretrainConfig, edit_region_mean, flow_matching_loss, make_batch, pretrain  # noqa: E402
from editrl.session import EditrlInputError  # noqa: E402
from editrl.world.grammar import GrammarConfig, sample_session, session_scenes  # noqa: E402
from editrl.world.render import render  # noqa: E402

SMALL = TinyConfig(channels=(16, 32, 32), blocks=(1, 1, 1), text_dim=32, text_layers=1, heads=2)


def small_editor(mode: str = "explicit", seed: int = 0) -> TinyEditor:
    torch.manual_seed(seed)
    ed = TinyEditor(SMALL, mode=mode)
    # the output layer starts at zero; give it weights so velocities depend on the input
    torch.nn.init.normal_(ed.net.out.weight, std=0.02)
    return ed


def test_grammar_words_are_all_in_the_vocabulary():
    tok = Tokenizer()
    for cs in (0.0, 1.0):
        for i in range(400):
            s = sample_session(5, i, GrammarConfig(turns=5, constraint_share=cs))
            for t in s.turns:
                tok.ids(t.instruction)
                tok.ids(t.explicit)


def test_unknown_word_is_a_clear_error():
    with pytest.raises(EditrlInputError, match="does not know the word 'pink'"):
        Tokenizer().ids("Make it pink")


def test_in_context_keeps_the_most_recent_tokens():
    tok = Tokenizer()
    hist = ["Make the red circle blue"] * 30
    ids = tok.encode("Remove it", hist, max_tokens=20)
    assert len(ids) == 20
    assert ids[-3:] == [tok.cur] + tok.ids("Remove it")


def test_image_tensor_round_trip():
    s = sample_session(0, 0)
    img = render(session_scenes(s)[0])
    x = images_to_tensor([img, img])
    assert x.shape == (2, 3, 64, 64) and x.min() >= -1 and x.max() <= 1
    assert np.array_equal(tensor_to_images(x)[0], img)


def test_edit_modes_and_shapes():
    ed = small_editor()
    s = sample_session(1, 2, GrammarConfig(turns=2))
    img = render(session_scenes(s)[0])
    out = ed.edit([img, img], [s.turns[0].explicit, s.turns[1].explicit], steps=3,
                  generator=torch.Generator().manual_seed(0))
    assert len(out) == 2 and out[0].shape == (64, 64, 3) and out[0].dtype == np.uint8
    ed_ic = small_editor("in_context")
    out2 = ed_ic.edit([img], [s.turns[1].instruction], [[s.turns[0].instruction]], steps=3)
    assert out2[0].shape == (64, 64, 3)
    with pytest.raises(EditrlInputError):
        TinyEditor(SMALL, mode="sideways")


def test_same_generator_same_output_and_ode_matches_sde_at_zero_noise():
    ed = small_editor()
    cond = ed.encode(torch.zeros(2, 3, 64, 64), ["Add [small red solid circle] at [center]"] * 2)
    a = ed.sample(cond, 4, generator=torch.Generator().manual_seed(3)).x0
    b = ed.sample(cond, 4, generator=torch.Generator().manual_seed(3)).x0
    assert torch.equal(a, b)
    c = ed.sample(cond, 4, solver="sde", noise_level=0.0, generator=torch.Generator().manual_seed(3)).x0
    assert torch.allclose(a, c, atol=0, rtol=0)


def test_sde_transitions_recompute_on_policy_ratio_one():
    from editrl.sampling import sde_step_with_logprob

    ed = small_editor()
    cond = ed.encode(torch.zeros(3, 3, 64, 64), ["Remove [red circle at center]"] * 3)
    res = ed.sample(cond, 5, solver="sde", window=2, generator=torch.Generator().manual_seed(0),
                    return_transitions=True)
    tr = res.transitions
    assert tr.x.shape[:2] == (3, tr.log_prob.shape[1])
    assert tr.in_window.sum(1).tolist() == [2, 2, 2]
    sig = ed.sigmas(5)
    for j in range(tr.step.shape[1]):
        i = int(tr.step[0, j])
        v = ed.velocity(tr.x[:, j], tr.sigma[:, j], cond)
        st = sde_step_with_logprob(tr.x[:, j], v, sig[i], sig[i + 1], noise_level=0.7,
                                   prev_sample=tr.x_next[:, j], sigma_max_fallback=sig[1])
        win = tr.in_window[:, j]
        ratio = torch.exp(st.log_prob - tr.log_prob[:, j])
        assert torch.equal(ratio[win], torch.ones_like(ratio[win]))


def test_windows_differ_between_samples_and_calls():
    ed = small_editor()
    cond = ed.encode(torch.zeros(16, 3, 64, 64), ["Remove [red circle at center]"] * 16)
    gen = torch.Generator().manual_seed(0)
    r1 = ed.sample(cond, 6, solver="sde", window=2, generator=gen, return_transitions=True)
    r2 = ed.sample(cond, 6, solver="sde", window=2, generator=gen, return_transitions=True)
    first = lambda r: (r.transitions.in_window.float().argmax(1) + r.transitions.step[0, 0]).tolist()  # noqa: E731
    assert len(set(first(r1))) > 1
    assert first(r1) != first(r2)


def test_save_load_round_trip_and_pickle_refused(tmp_path):
    ed = small_editor()
    ed.save(tmp_path / "m.safetensors")
    back = TinyEditor.load(tmp_path / "m.safetensors")
    for (k, a), (_, b) in zip(ed.net.state_dict().items(), back.net.state_dict().items()):
        assert torch.equal(a, b), k
    assert back.cfg == SMALL
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "m.safetensors").read_bytes())
    assert isinstance(load_tiny(f"tiny:{tmp_path}"), TinyEditor)
    for bad in ("x.pt", "x.ckpt", "x.bin"):
        with pytest.raises(EditrlInputError, match="pickle"):
            TinyEditor.load(tmp_path / bad)
    with pytest.raises(EditrlInputError, match="not found"):
        TinyEditor.load(tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(EditrlInputError):
        TinyEditor.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("extra", [dict(top_self_attn=False), dict(top_self_heads=1),
                                   dict(stem_hidden=24, head_hidden=40, top_self_heads=1),
                                   dict(head_skip="input"), dict(head_skip="source", head_hidden=40),
                                   dict(head_form="gated"), dict(head_form="gated", head_skip="source", head_hidden=40)])
def test_architecture_options_round_trip(tmp_path, extra):
    cfg = TinyConfig(**{**SMALL.__dict__, **extra})
    torch.manual_seed(0)
    ed = TinyEditor(cfg)
    for p in ed.net.parameters():  # zero-initialised output layers would hide a wiring bug
        torch.nn.init.normal_(p, std=0.05)
    ed.save(tmp_path / "m.safetensors")
    back = TinyEditor.load(tmp_path / "m.safetensors")
    assert back.cfg == cfg
    src = images_to_tensor([render(session_scenes(sample_session(1, 0, GrammarConfig(turns=1)))[0])])
    cond_a, cond_b = ed.encode(src, ["remove it"]), back.encode(src, ["remove it"])
    x, sigma = torch.randn_like(src), torch.tensor([0.7])
    va, vb = ed.velocity(x, sigma, cond_a), back.velocity(x, sigma, cond_b)
    assert va.shape == src.shape and torch.equal(va, vb)
    assert va.abs().sum() > 0


def test_config_overrides_and_errors():
    cfg = load_config(PretrainConfig, "tiny-smoke", ["lr=3e-4", "model.channels=[8,16,16]", "max_steps=5"])
    assert cfg.lr == 3e-4 and cfg.model.channels == (8, 16, 16) and cfg.max_steps == 5
    assert parse_overrides(["a.b=1"]) == {"a": {"b": "1"}}
    with pytest.raises(EditrlInputError, match="unknown config key 'lrr'"):
        load_config(PretrainConfig, None, ["lrr=1"])
    with pytest.raises(EditrlInputError, match="unknown config key 'model.width'"):
        load_config(PretrainConfig, None, ["model.width=3"])
    with pytest.raises(EditrlInputError, match="expected an integer"):
        load_config(PretrainConfig, None, ["max_steps=ten"])
    with pytest.raises(EditrlInputError, match="not found"):
        load_config(PretrainConfig, "no-such-preset")
    with pytest.raises(EditrlInputError, match="must be in"):
        load_config(PretrainConfig, None, ["degrade_prob=2"])
    with pytest.raises(EditrlInputError, match="key=value"):
        load_config(PretrainConfig, None, ["lr"])


def test_batches_are_a_pure_function_of_seed_and_step():
    cfg = load_config(PretrainConfig, "tiny-smoke")
    tok = Tokenizer()
    a, b, c = make_batch(cfg, 7, tok), make_batch(cfg, 7, tok), make_batch(cfg, 8, tok)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["target"], c["target"])


def test_edit_mask_marks_exactly_the_changed_pixels():
    cfg = load_config(PretrainConfig, "tiny-smoke", ["degrade_prob=0"])
    b = make_batch(cfg, 3, Tokenizer())
    diff = (b["source"] != b["target"]).any(1, keepdim=True).float()                  # [B, 1, H, W]
    assert torch.equal(b["changed"], diff)
    # degraded inputs differ from the target almost everywhere; the mask still marks the edit alone
    d = make_batch(load_config(PretrainConfig, "tiny-smoke", ["degrade_prob=1", "batch_size=16"]), 3, Tokenizer())
    ddiff = (d["source"] != d["target"]).any(1, keepdim=True).float()
    assert ddiff.mean() > 0.9 and d["changed"].mean() < 0.5
    assert (d["changed"] <= ddiff).all()


def test_edit_region_mean_closed_form():
    err = torch.zeros(2, 1, 5, 5)
    err[0, 0, 2, 2], err[0, 0, 0, 0] = 9.0, 100.0      # the far corner is outside the grown region
    changed = torch.zeros(2, 1, 5, 5)
    changed[0, 0, 2, 2] = 1.0                          # one pixel, grown to its 3x3 neighbourhood
    out = edit_region_mean(err, changed)
    assert out[0].item() == pytest.approx(9.0 / 9)     # 9 over the 9 pixels of the grown region
    assert out[1].item() == 0.0                        # nothing changed: no extra term


def test_edit_loss_weight_zero_is_the_plain_loss_and_positive_adds_the_region_term():
    cfg0 = load_config(PretrainConfig, "tiny-smoke", ["batch_size=8"])
    cfg1 = load_config(PretrainConfig, "tiny-smoke", ["batch_size=8", "edit_loss_weight=2"])
    ed = small_editor()
    batch = make_batch(cfg0, 0, Tokenizer())
    with torch.no_grad():
        l0 = flow_matching_loss(ed, batch, torch.Generator().manual_seed(0), cfg0)
        l1 = flow_matching_loss(ed, batch, torch.Generator().manual_seed(0), cfg1)
        # by hand: the same noise and σ draws as the loss makes
        g = torch.Generator().manual_seed(0)
        x0 = batch["target"]
        B = x0.shape[0]
        eps = torch.randn(x0.shape, generator=g)
        sigma = torch.sigmoid(cfg0.sigma_logit_mean + torch.randn(B, generator=g) * cfg0.sigma_logit_std)
        uni = torch.rand(B, generator=g)
        sigma = torch.where(torch.rand(B, generator=g) < cfg0.sigma_uniform_share, uni, sigma)
        s = sigma.view(B, 1, 1, 1)
        cond = ed.encode_tokens(batch["source"], batch["ids"], batch["mask"])
        err = ((ed.predict_x0((1 - s) * x0 + s * eps, sigma, cond) - x0) ** 2).mean(1, keepdim=True)
        w = 1.0 / sigma.clamp(min=cfg0.loss_sigma_floor) ** 2
    assert l0.item() == pytest.approx((w.view(B, 1, 1, 1) * err).mean().item(), rel=1e-5)
    extra = (w * 2 * edit_region_mean(err, batch["changed"])).mean()
    assert l1.item() == pytest.approx(l0.item() + extra.item(), rel=1e-5)
    assert extra.item() > 0


def test_flow_matching_loss_gradient_reduces_loss():
    cfg = load_config(PretrainConfig, "tiny-smoke", ["batch_size=8"])
    ed = small_editor()
    ed.net.train()
    batch = make_batch(cfg, 0, Tokenizer())
    opt = torch.optim.SGD(ed.net.parameters(), lr=0.05)
    l0 = flow_matching_loss(ed, batch, torch.Generator().manual_seed(0), cfg)
    opt.zero_grad()
    l0.backward()
    opt.step()
    l1 = flow_matching_loss(ed, batch, torch.Generator().manual_seed(0), cfg)
    assert l1.item() < l0.item()


def test_pretrain_smoke_and_exact_resume(tmp_path):
    cfg = load_config(PretrainConfig, "tiny-smoke", ["max_steps=4"])
    full = pretrain(cfg, tmp_path / "full", log=lambda m: None)
    assert full["steps"] == 4
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # stopped after 2 steps (as a kill after a checkpoint would), then resumed to 4
    run = tmp_path / "resumed"
    pretrain(cfg, run, log=lambda m: None, stop_at=2)
    pretrain(cfg, run, log=lambda m: None)
    a = TinyEditor.load(tmp_path / "full" / "model.safetensors").net.state_dict()
    b = TinyEditor.load(run / "model.safetensors").net.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # a longer wall-clock budget may be given on resume; any other change is refused, not mixed
    pretrain(load_config(PretrainConfig, "tiny-smoke", ["max_steps=4", "max_minutes=30"]), run, log=lambda m: None)
    with pytest.raises(EditrlInputError, match="different config"):
        pretrain(load_config(PretrainConfig, "tiny-smoke", ["max_steps=4", "lr=1e-3"]), run, log=lambda m: None)


def test_pretrain_cli_smoke(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "editrl.cli", "pretrain", "--config", "tiny-smoke", "--out",
                        str(tmp_path / "run"), "max_steps=2"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and (tmp_path / "run" / "model.safetensors").is_file()
    r = subprocess.run([sys.executable, "-m", "editrl.cli", "pretrain", "--out", str(tmp_path / "x"), "bogus=1"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2 and "unknown config key 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_rollout_feeds_each_turn_the_previous_output(tmp_path):
    from editrl.rollout import rollout, turn_texts

    class Recorder:
        """An editor that records its inputs and returns a fresh image per call."""
        def __init__(self):
            self.calls = []

        def edit(self, images, instructions, contexts=None, generator=None, steps=10):
            outs = [np.full_like(im, len(self.calls) * 10 + j) for j, im in enumerate(images)]
            self.calls.append((images, list(instructions), contexts, outs))
            return outs

    sessions = [sample_session(3, i, GrammarConfig(turns=3)) for i in range(2)]
    sources = [render(session_scenes(s)[0]) for s in sessions]
    rec = Recorder()
    outs = rollout(rec, sessions, sources, form="in_context", steps=2)
    assert len(rec.calls) == 3 and len(outs[0]) == 3
    assert all(np.array_equal(a, b) for a, b in zip(rec.calls[1][0], rec.calls[0][3]))   # turn 2 input = turn 1 output
    assert rec.calls[2][2][0] == [sessions[0].turns[0].instruction, sessions[0].turns[1].instruction]
    assert turn_texts(sessions[0], 2, "explicit") == (sessions[0].turns[1].explicit, [])
    with pytest.raises(EditrlInputError):
        turn_texts(sessions[0], 1, "sideways")


def test_quality_of_an_identity_editor_is_exactly_predictable(tmp_path):
    """An untrained tiny editor returns its input (x̂0 = source + 0): CC passes at turn 1,
    IF fails there, and success@k never exceeds success at any turn."""
    from editrl.quality import evaluate_editor

    ed = TinyEditor(SMALL)
    ed.save(tmp_path / "model.safetensors")
    r = evaluate_editor(f"tiny:{tmp_path}", 5, 2, 11, 2, ["explicit"], strips=1)
    t1, t2 = r["forms"]["explicit"]["per_turn"]
    assert t1["CC"] == 1.0 and t1["IF"] == 0.0 and t1["success"] == 0.0
    assert t2["success_all"] <= t1["success_all"] and t2["success_all"] <= t2["success"]
    assert len(r["strips"]) == 1


def test_pretrain_survives_sigkill_and_resumes_exactly(tmp_path):
    """Kill -9 a real `editrl pretrain` process mid-run; resuming ends with the same weights
    and the same metrics rows as a run that was never interrupted."""
    import signal
    import time

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["--config", "tiny-smoke", "max_steps=20"]
    cmd = lambda out: [sys.executable, "-m", "editrl.cli", "pretrain", "--out", str(out), *args]  # noqa: E731
    ref = subprocess.run(cmd(tmp_path / "ref"), capture_output=True, text=True, env=env, timeout=120)
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "killed"
    p = subprocess.Popen(cmd(run), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 60
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    if p.poll() is None:
        p.send_signal(signal.SIGKILL)
    p.wait(timeout=30)
    assert not (run / "model.safetensors").exists(), "the run finished before it could be killed"
    done = subprocess.run(cmd(run), capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    a = TinyEditor.load(tmp_path / "ref" / "model.safetensors").net.state_dict()
    b = TinyEditor.load(run / "model.safetensors").net.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time") and k != "elapsed_min"} for r in rows]  # noqa: E731
    ra = [json.loads(x) for x in (tmp_path / "ref" / "metrics.jsonl").read_text().splitlines()]
    rb = [json.loads(x) for x in metrics.read_text().splitlines()]
    assert strip(ra) == strip(rb)


def test_shipped_checkpoint_loads_and_edits():
    from editrl.editors.tiny import SHIPPED
    from safetensors import safe_open

    assert SHIPPED.is_file(), "the shipped tiny-editor weights are missing"
    assert SHIPPED.stat().st_size <= 25 * 2**20
    with safe_open(str(SHIPPED), framework="pt") as f:
        meta = f.metadata()
    assert int(meta["pretrain_steps"]) > 0 and "pretrain_minutes" in meta
    ed = load_tiny("tiny")
    s = sample_session(31, 0, GrammarConfig(turns=1))
    out = ed.edit([render(session_scenes(s)[0])], [s.turns[0].explicit], steps=2)
    assert out[0].shape == (64, 64, 3)


@pytest.mark.parametrize("extra", [dict(), dict(head_skip="input"), dict(head_skip="source"), dict(head_skip="input", stem_hidden=24, head_hidden=40),
                                   dict(head_skip="source", head_form="gated", head_hidden=40)])
def test_source_features_split_matches_the_concatenated_layers_and_the_cache_is_exact(extra):
    """The stem's and head's first 1x1 layers over [x patch, source patch] are computed as
    x part + cached source part: equal (to rounding) to the layer over the concatenation, and
    a cached forward equals an uncached one bit for bit."""
    import torch.nn.functional as F
    cfg = TinyConfig(**{**SMALL.__dict__, **extra})
    torch.manual_seed(0)
    net = TinyEditor(cfg).net
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    f, n, c0 = cfg.fold, 3 * cfg.fold ** 2, cfg.channels[0]
    src, x = torch.rand(2, 3, cfg.canvas, cfg.canvas) * 2 - 1, torch.randn(2, 3, cfg.canvas, cfg.canvas)
    stem_s, head_s = net.source_features(src)
    xp = F.pixel_unshuffle(x, f)
    both = F.pixel_unshuffle(torch.cat([x, src], 1), f)
    first = net._first(net.stem)
    torch.testing.assert_close(F.conv2d(xp, first.weight[:, :n]) + stem_s, first(both), rtol=1e-5, atol=1e-5)
    if cfg.head_skip != "none":
        h = torch.randn(2, c0, cfg.canvas // f, cfg.canvas // f)
        hd = net._first(net.out)
        split = F.conv2d(h, hd.weight[:, :c0]) + head_s
        if cfg.head_skip == "input":
            split = split + F.conv2d(xp, hd.weight[:, c0:c0 + n])
        patches = both if cfg.head_skip == "input" else F.pixel_unshuffle(src, f)
        torch.testing.assert_close(split, hd(torch.cat([h, patches], 1)), rtol=1e-5, atol=1e-5)
    else:
        assert head_s is None
    ids = torch.tensor([[3, 4, 5], [3, 6, 0]])
    mask = ids != 0
    text, pooled = net.encode_text(ids, mask)
    sigma = torch.tensor([0.3, 0.8])
    a = net(x, sigma, src, text, mask, pooled)
    b = net(x, sigma, src, net.text_cache(text), mask, pooled, (stem_s, head_s))
    assert torch.equal(a, b)


def test_gated_head_closed_form_and_initial_copy():
    """head_form=gated: x̂0 = source + sigmoid(g) ⊙ (c − source) with the head's outputs split
    into content (3f² per patch) and gate (f² per patch, shared by R, G, B); at initialisation
    it is nearly a copy of the source (gate sigmoid(−3) ≈ 0.047 towards c = 0)."""
    import torch.nn.functional as F
    from editrl.editors.tiny import GATE_INIT_BIAS
    cfg = TinyConfig(**{**SMALL.__dict__, "head_form": "gated", "head_hidden": 24})
    torch.manual_seed(0)
    net = TinyEditor(cfg).net
    f = cfg.fold
    src, x = torch.rand(2, 3, cfg.canvas, cfg.canvas) * 2 - 1, torch.randn(2, 3, cfg.canvas, cfg.canvas)
    ids = torch.tensor([[3, 4, 5], [3, 6, 0]])
    mask = ids != 0
    text, pooled = net.encode_text(ids, mask)
    sigma = torch.tensor([0.3, 0.8])
    g0 = torch.sigmoid(torch.tensor(GATE_INIT_BIAS))
    torch.testing.assert_close(net(x, sigma, src, text, mask, pooled), (1 - g0) * src)
    # with random weights: recompute the composite from the head's raw outputs
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.05)
    raw = {}
    hook = net.out[-1].register_forward_hook(lambda m, i, o: raw.update(out=o))   # returns None: output kept
    x0 = net(x, sigma, src, text, mask, pooled)
    hook.remove()
    out = raw["out"]                                                         # [B, 4f², 16, 16]
    assert out.shape[1] == 4 * f * f
    c = F.pixel_shuffle(out[:, : 3 * f * f], f)
    g = torch.sigmoid(F.pixel_shuffle(out[:, 3 * f * f:], f))
    torch.testing.assert_close(x0, src + g * (c - src))
    # where the gate is closed the output is the source exactly, whatever the content
    with torch.no_grad():
        net.out[-1].bias[3 * f * f:] = -1e4
    torch.testing.assert_close(net(x, sigma, src, text, mask, pooled), src, rtol=0, atol=1e-6)


def test_checkpoints_without_head_form_load_as_residual():
    d = json.loads(SMALL.to_json())
    d.pop("head_form")
    assert TinyConfig.from_json(json.dumps(d)).head_form == "residual"
    with pytest.raises(ValueError, match="head_form"):
        TinyConfig(**{**SMALL.__dict__, "head_form": "mixed"})
    for key in ("head_form", "head_skip"):
        with pytest.raises(EditrlInputError, match=key):
            load_config(PretrainConfig, "tiny-smoke", [f"model.{key}=mixed"])


def _edit_inputs(n: int = 3):
    s = [sample_session(41, i, GrammarConfig(turns=1)) for i in range(n)]
    return [render(session_scenes(x)[0]) for x in s], [x.turns[0].explicit for x in s]


def test_compile_failure_falls_back_to_the_same_eager_edit(monkeypatch, capsys):
    """A compile that fails (no C++ compiler, an unsupported op) costs one stderr line and
    nothing else: the editor runs eagerly and gives the eager images."""
    ed = small_editor()
    images, texts = _edit_inputs()
    want = ed.edit(images, texts, generator=torch.Generator().manual_seed(0), steps=3)

    def broken(*args, **kwargs):
        raise RuntimeError("Compiler: cc not found\nmore detail")

    monkeypatch.setattr(torch, "compile", lambda net, **kw: broken)
    ed.compile()
    got = ed.edit(images, texts, generator=torch.Generator().manual_seed(0), steps=3)
    assert all(np.array_equal(a, b) for a, b in zip(want, got))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "torch.compile failed (Compiler: cc not found)" in err
    assert ed._compiled is None


def test_compiled_forward_is_used_for_inference_only_and_never_copied(monkeypatch):
    """Training forwards (autograd on) stay eager; policy copies do not share the compiled net."""
    ed = small_editor()
    calls = []

    def fake_compile(net, **kw):
        def run(*args):
            calls.append(torch.is_grad_enabled())
            return net(*args)
        return run

    monkeypatch.setattr(torch, "compile", fake_compile)
    ed.compile()
    images, texts = _edit_inputs(2)
    cond = ed.encode(images_to_tensor(images), texts)
    x, sigma = torch.randn(2, 3, 64, 64), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        ed.velocity(x, sigma, cond)
    assert calls == [False]
    ed.velocity(x, sigma, cond).sum().backward()       # the training path: eager, gradients flow
    assert calls == [False] and ed.net.stem.weight.grad is not None
    copy = ed.policy_copy()
    assert copy._compiled is None and ed._compiled is not None


def test_frozen_compile_steps_aside_when_the_weights_change(monkeypatch, capsys):
    """A frozen compile bakes the weights in: after an optimizer step or load_state_dict the
    next inference forward says so in one line and recompiles reading the live weights."""
    ed = small_editor()
    compiles = []

    def fake_compile(net, **kw):
        compiles.append(kw.get("options"))
        return lambda *args: net(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    ed.compile(freeze=True)
    assert compiles == [{"freezing": True}]
    images, texts = _edit_inputs(2)
    cond = ed.encode(images_to_tensor(images), texts)
    x, sigma = torch.randn(2, 3, 64, 64), torch.tensor([0.4, 0.9])
    with torch.no_grad():
        ed.velocity(x, sigma, cond)
        ed.velocity(x, sigma, cond)
    assert len(compiles) == 1 and capsys.readouterr().err == ""
    opt = torch.optim.SGD(ed.trainable_parameters(), lr=1e-3)
    ed.velocity(x, sigma, cond).square().mean().backward()
    opt.step()
    with torch.no_grad():
        ed.velocity(x, sigma, cond)
        ed.velocity(x, sigma, cond)
    assert compiles == [{"freezing": True}, None]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "weights changed after a frozen compile" in err
    ed.compile(freeze=True)
    ed.load_state_dict(small_editor().state_dict())
    with torch.no_grad():
        ed.velocity(x, sigma, cond)
    assert compiles[-1] is None and len(compiles) == 4


@pytest.mark.skipif(not os.environ.get("EDITRL_COMPILE_TEST"), reason="compiles C++ kernels (~1 min); set EDITRL_COMPILE_TEST=1")
def test_real_torch_compile_matches_eager():
    ed = small_editor()
    images, texts = _edit_inputs()
    want = images_to_tensor(ed.edit(images, texts, generator=torch.Generator().manual_seed(0), steps=3))
    for freeze in (False, True):
        ed.compile(freeze=freeze)
        got = images_to_tensor(ed.edit(images, texts, generator=torch.Generator().manual_seed(0), steps=3))
        assert ed._compiled is not None
        assert (got - want).abs().max() <= 2 / 127.5      # uint8 images: at most a rounding step apart
