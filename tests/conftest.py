"""Shared test fixtures. Tests never reach a hub: HF_HUB_OFFLINE makes a stray model id fail
at once instead of retrying."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def judge_server():
    """A real OpenAI-compatible judge server on 127.0.0.1 (tests/loopback_judge_server.py),
    started fresh for the test and stopped after it. Steer it with `.script`, `.fault_rate`,
    `.delay`; read `.url`, `.model`, `.n_requests`, `.requests`, `.faults`."""
    from loopback_judge_server import LoopbackJudgeServer

    srv = LoopbackJudgeServer().start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="session")
def small_ckpt(tmp_path_factory):
    """A small random tiny editor (16-32-32 channels, 32-wide 1-layer text encoder) saved as
    safetensors, its output layer randomised so that its edits differ from the source: the
    editor the RL tests train."""
    import torch

    from editrl.editors.tiny import TinyConfig, TinyEditor

    torch.manual_seed(0)
    ed = TinyEditor(TinyConfig(channels=(16, 32, 32), blocks=(1, 1, 1), text_dim=32, text_layers=1, heads=2))
    torch.nn.init.normal_(ed.net.out.weight, std=0.05)
    path = tmp_path_factory.mktemp("small") / "model.safetensors"
    ed.save(path)
    return path
