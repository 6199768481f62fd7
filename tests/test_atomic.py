"""Outputs are written whole or not at all, readable like any `mkdir` (umask, not 0700),
replaced by --overwrite only when they are ours (or empty), never the input, a file or a link,
and SIGTERM mid-write leaves no hidden temp directory behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from ecospa_deploy.atomic import MARKER, atomic_directory, check_output, write_text_atomic
from ecospa_deploy.cli import main
from ecospa_deploy.errors import EcospaError


@pytest.fixture
def umask_027():
    old = os.umask(0o027)
    try:
        yield 0o027
    finally:
        os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)) or ".": stat.S_IMODE(p.stat().st_mode)
            for p in [root, *root.rglob("*")]}


def _assert_umask_modes(root: Path, umask: int) -> None:
    for name, mode in _modes(root).items():
        expected = (0o777 if (root / name).is_dir() else 0o666) & ~umask
        assert mode & ~0o111 == expected & ~0o111, f"{name}: {oct(mode)} != {oct(expected)}"
    assert stat.S_IMODE(root.stat().st_mode) == 0o777 & ~umask   # not the temp dir's 0700


def _hidden_tmp(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_atomic_directory_gets_umask_permissions_and_a_marker(tmp_path, umask_027):
    with atomic_directory(tmp_path / "out") as tmp:
        (tmp / "a.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.bin").write_bytes(b"x")
    _assert_umask_modes(tmp_path / "out", umask_027)
    assert json.loads((tmp_path / "out" / MARKER).read_text())["written_by"] == "ecospa-deploy"
    assert _hidden_tmp(tmp_path) == []


def test_cli_outputs_get_umask_permissions(tmp_path, umask_027):
    from ecospa_deploy.testing import tiny_dense, tiny_tokenizer, write_foreign_checkpoint

    src, _ = write_foreign_checkpoint(tmp_path / "flap", "llama", 1, biases=True)
    assert main(["convert", "native", str(src), "-o", str(tmp_path / "native")]) == 0
    _assert_umask_modes(tmp_path / "native", umask_027)
    dense = tmp_path / "dense"
    tiny_dense("llama").save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    (tmp_path / "calib.txt").write_text("To be, or not to be, that is the question. " * 40)
    assert main(["prune", str(dense), "-o", str(tmp_path / "pruned"), "--calib",
                 str(tmp_path / "calib.txt"), "--samples", "2", "--seq-len", "24",
                 "--device", "cpu", "--method", "magnitude"]) == 0
    _assert_umask_modes(tmp_path / "pruned", umask_027)
    from ecospa_deploy.testing import tiny_pruned

    tiny_pruned("gpt2", 0, n_embd=256).save_pretrained(tmp_path / "gpt2")
    assert main(["convert", "vllm", str(tmp_path / "gpt2"), "-o", str(tmp_path / "v")]) == 0
    _assert_umask_modes(tmp_path / "v", umask_027)


def test_overwrite_replaces_only_empty_dirs_and_our_outputs(tmp_path):
    target = tmp_path / "out"
    target.mkdir()                                     # empty: replaced
    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "one").write_text("1")
    with atomic_directory(target, overwrite=True) as tmp:   # ours: replaced
        (tmp / "two").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "two"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(EcospaError, match="not an earlier output"):
        with atomic_directory(mine, overwrite=True) as tmp:
            (tmp / "x").write_text("x")
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert _hidden_tmp(tmp_path) == []
    with pytest.raises(EcospaError, match="already exists"):
        check_output(target)


def test_a_file_or_a_symlink_is_never_replaced(tmp_path):
    (tmp_path / "file").write_text("data")
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    for overwrite in (False, True):
        with pytest.raises(EcospaError, match="not a directory"):
            check_output(tmp_path / "file", overwrite)
        with pytest.raises(EcospaError, match="symbolic link"):
            check_output(tmp_path / "link", overwrite)
    assert (tmp_path / "file").read_text() == "data" and (tmp_path / "link").is_symlink()


def test_the_input_is_never_the_output(tmp_path):
    src = tmp_path / "models" / "src"
    with atomic_directory(src) as tmp:                 # an earlier output of ours
        (tmp / "config.json").write_text("{}")
    for out in (src, tmp_path / "models", tmp_path / "models" / "." / "src"):
        with pytest.raises(EcospaError, match="is the input"):
            check_output(out, overwrite=True, sources=[src])
    check_output(src / "sub", overwrite=True, sources=[src])      # inside the input: fine


@pytest.mark.parametrize("kind", ["file", "symlink", "source", "unrelated"])
def test_cli_overwrite_refusals_are_one_line(tmp_path, capsys, kind):
    from ecospa_deploy.testing import write_foreign_checkpoint

    src, _ = write_foreign_checkpoint(tmp_path / "src", "llama", 1)
    before = sorted(p.name for p in src.iterdir())
    out = {"file": tmp_path / "f", "symlink": tmp_path / "l", "source": src,
           "unrelated": tmp_path / "u"}[kind]
    if kind == "file":
        out.write_text("x")
    elif kind == "symlink":
        out.symlink_to(tmp_path / "elsewhere")
    elif kind == "unrelated":
        out.mkdir()
        (out / "keep.txt").write_text("x")
    assert main(["convert", "native", str(src), "-o", str(out), "--overwrite"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:")
    assert sorted(p.name for p in src.iterdir()) == before
    assert _hidden_tmp(tmp_path) == []


def test_write_text_atomic_leaves_no_temp_file(tmp_path):
    write_text_atomic(tmp_path / "r.json", "{}")
    write_text_atomic(tmp_path / "r.json", '{"a": 1}')
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def _wait_for(predicate, proc, timeout=300.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("timed out")


def test_sigterm_while_writing_leaves_no_temp_dir(tmp_path):
    code = textwrap.dedent(f"""
        import time
        from ecospa_deploy.atomic import atomic_directory
        with atomic_directory({str(tmp_path / "out")!r}) as tmp:
            (tmp / "weights").write_bytes(b"0" * 1000)
            print("writing", flush=True)
            time.sleep(120)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    assert len(_hidden_tmp(tmp_path)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM              # died of it, as by default
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_sigterm_during_convert_onnx_leaves_nothing(tmp_path):
    pytest.importorskip("onnxscript")
    from ecospa_deploy.testing import tiny_pruned

    tiny_pruned("llama", 1).save_pretrained(tmp_path / "m")
    proc = subprocess.Popen([sys.executable, "-m", "ecospa_deploy.cli", "convert", "onnx",
                             str(tmp_path / "m"), "-o", str(tmp_path / "o")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(lambda: _hidden_tmp(tmp_path), proc)     # the export has started writing
    proc.send_signal(signal.SIGTERM)
    # the handler raises nothing into the exporter's native code (that ended in SIGABRT or
    # SIGSEGV): it removes the temp dir and the process dies of SIGTERM
    assert proc.wait(timeout=300) == -signal.SIGTERM, proc.stderr.read()[-2000:]
    assert _hidden_tmp(tmp_path) == [] and not (tmp_path / "o").exists()


def _python(code: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigterm_runs_the_callbacks_then_removes_the_paths_in_flight_then_dies(tmp_path):
    proc = _python(f"""
        import time
        from pathlib import Path
        from ecospa_deploy import atomic
        root = Path({str(tmp_path)!r})
        def callback():
            assert (root / ".half.tmp").exists()          # before the paths go
            (root / "callback-ran").write_text("yes")
        with atomic.atomic_directory(root / "out") as tmp:
            (tmp / "w.bin").write_bytes(b"x" * 10)
            with atomic.in_flight(root / ".half.tmp"), atomic.on_terminate(callback):
                (root / ".half.tmp").write_text("half")
                print("writing", flush=True)
                time.sleep(120)
        print("never here", flush=True)
    """)
    assert proc.stdout.readline().strip() == "writing"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == -signal.SIGTERM
    assert "never here" not in proc.stdout.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["callback-ran"]


def test_sigterm_during_the_swap_waits_until_the_new_output_is_in(tmp_path):
    """Between the renames the old output is aside and the new one not yet in: a SIGTERM
    there is held until the swap is done, then the process dies of it."""
    _earlier_output(tmp_path / "out")
    proc = _python(f"""
        import os, signal
        from pathlib import Path
        from ecospa_deploy import atomic
        real_replace = os.replace
        def replace(src, dst):
            if Path(dst).name == "out":
                os.kill(os.getpid(), signal.SIGTERM)     # arrives mid-swap
            real_replace(src, dst)
        atomic.os.replace = replace
        with atomic.atomic_directory({str(tmp_path / "out")!r}, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
        print("never here", flush=True)
    """)
    assert proc.wait(timeout=60) == -signal.SIGTERM, proc.stderr.read()
    assert "never here" not in proc.stdout.read()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [MARKER, "new.txt"]


def test_a_server_s_own_sigterm_handler_is_kept(tmp_path):
    proc = _python(f"""
        import signal
        from ecospa_deploy import atomic
        mine = lambda signum, frame: None
        signal.signal(signal.SIGTERM, mine)
        with atomic.atomic_directory({str(tmp_path / "out")!r}) as tmp:
            assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGTERM) is mine
        with atomic.terminate_cleans_up():
            pass
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        with atomic.terminate_cleans_up():
            assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm
            with atomic.terminate_cleans_up():                  # nested: still ours
                assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm
            assert signal.getsignal(signal.SIGTERM) is atomic._on_sigterm
        assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
        print("ok", flush=True)
    """)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and out.strip() == "ok", err


def _earlier_output(path: Path) -> None:
    with atomic_directory(path) as tmp:
        (tmp / "config.json").write_text("{}")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "w.bin").write_bytes(b"x" * 10)


def test_overwrite_keeps_an_output_holding_files_we_did_not_write(tmp_path):
    out = tmp_path / "out"
    _earlier_output(out)
    manifest = json.loads((out / MARKER).read_text())["files"]
    assert manifest == {"config.json": 2, "sub/w.bin": 10}
    (out / "NOTES.txt").write_text("mine")
    with pytest.raises(EcospaError, match="did not write .*NOTES.txt"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new").write_text("n")
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "config.json").exists()
    (out / "NOTES.txt").unlink()
    (out / "sub" / "w.bin").write_bytes(b"changed")           # edited since: not ours now
    with pytest.raises(EcospaError, match="sub/w.bin"):
        check_output(out, overwrite=True)
    (out / "sub" / "w.bin").write_bytes(b"y" * 10)
    with atomic_directory(out, overwrite=True) as tmp:        # as written: replaced
        (tmp / "new").write_text("n")
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "new"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no leftovers


def test_a_forged_marker_does_not_let_overwrite_delete_a_directory(tmp_path):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "thesis.tex").write_text("years of work")
    (victim / MARKER).write_text("")
    with pytest.raises(EcospaError, match="no manifest"):
        check_output(victim, overwrite=True)
    assert (victim / "thesis.tex").exists()


def test_overwrite_refuses_the_current_directory(tmp_path, monkeypatch):
    """`ecospa convert native SRC -o . --overwrite` inside an earlier output once deleted it
    and wrote nothing (rmtree('.') fails half way)."""
    out = tmp_path / "out"
    _earlier_output(out)
    monkeypatch.chdir(out)
    with pytest.raises(EcospaError, match="current directory"):
        check_output(".", overwrite=True)
    monkeypatch.chdir(out / "sub")
    with pytest.raises(EcospaError, match="current directory"):
        check_output(out, overwrite=True)
    assert (out / "config.json").exists() and (out / "sub" / "w.bin").exists()


def test_a_failed_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _earlier_output(out)
    real_replace = os.replace

    def flaky(src, dst):
        if Path(src).name.startswith(".out.") and ".old." not in Path(src).name \
                and Path(dst) == out:
            raise OSError("disk trouble")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises(OSError, match="disk trouble"):
        with atomic_directory(out, overwrite=True) as tmp:
            (tmp / "new").write_text("n")
    monkeypatch.setattr(os, "replace", real_replace)
    assert (out / "config.json").exists() and not (out / "new").exists()
