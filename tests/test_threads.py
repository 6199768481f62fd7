"""OpenMP settings chosen before torch loads (``ecospa_deploy.threads``)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ecospa_deploy import threads


def test_a_busy_machine_gets_fewer_threads_and_a_passive_wait(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    env: dict[str, str] = {}
    assert threads.configure(env, load=3.4) == 1
    assert env == {"OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1"}
    env = {}
    assert threads.configure(env, load=0.9) is None          # idle: torch's default stands
    assert env == {"OMP_WAIT_POLICY": "PASSIVE"}
    monkeypatch.setattr(threads, "cores", lambda: 8)
    env = {}
    assert threads.configure(env, load=3.0) == 5


def test_the_users_settings_win(monkeypatch):
    monkeypatch.setattr(threads, "cores", lambda: 2)
    env = {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    assert threads.configure(env, load=9.0) is None
    assert env == {"OMP_WAIT_POLICY": "ACTIVE", "OMP_NUM_THREADS": "2"}
    env = {"ECOSPA_THREADS": "3", "OMP_NUM_THREADS": "2"}
    assert threads.configure(env, load=9.0) == 3 and env["OMP_NUM_THREADS"] == "3"
    with pytest.raises(ValueError, match="ECOSPA_THREADS"):
        threads.configure({"ECOSPA_THREADS": "zero"})


def test_the_cli_sets_them_before_torch_loads():
    code = ("import os, sys; os.environ.pop('OMP_WAIT_POLICY', None); "
            "os.environ['ECOSPA_THREADS'] = '1'; from ecospa_deploy.cli import main; "
            "rc = main(['inspect', '/nonexistent']); import torch; "
            "print(rc, os.environ['OMP_WAIT_POLICY'], torch.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["2", "PASSIVE", "1"], out.stderr


def test_progress_bars_redraw_rarely_into_a_log():
    code = ("import os; os.environ.pop('TQDM_MININTERVAL', None); "
            "from ecospa_deploy.cli import main; main(['inspect', '/nonexistent']); "
            "print(os.environ.get('TQDM_MININTERVAL'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)     # stderr is a pipe here, as in a log
    assert out.stdout.split() == ["30"], out.stderr
