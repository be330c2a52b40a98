# SPDX-License-Identifier: GPL-3.0-or-later
"""``./dev demo`` keeps working: our keygen, server and agent answer a real
systemd-ask-password request with the right password."""

from __future__ import annotations

import subprocess
import sys

import pytest

from peers.ours import REPO

pytestmark = pytest.mark.interop


def test_demo_answers_the_request_with_the_right_password() -> None:
    result = subprocess.run([sys.executable, "-m", "tests.demo"], cwd=REPO, capture_output=True,
                            text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo: OK, the request was answered with the right password" in result.stdout
    assert "MANDOS_EVENT=secret-sent" in result.stdout
