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
