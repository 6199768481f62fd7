"""Evidence for the converters, written as JSON into bench/results/ (convert_*.json).

  python bench/convert_evidence.py padding   # vLLM padding overhead, paper-like shapes
  python bench/convert_evidence.py speed     # ONNX Runtime vs PyTorch tokens/s on CPU
  python bench/convert_evidence.py onnx-kv   # KV overhead of each ONNX --target layout
  python bench/convert_evidence.py parity --vllm-python .venv-vllm/bin/python

Each JSON records the command, the machine and the library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def _env() -> dict:
    import transformers

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "transformers": transformers.__version__, "cpu_count": os.cpu_count(),
           "machine": platform.machine(), "load_average_1m_5m_15m": os.getloadavg(),
           "command": " ".join(["bench/convert_evidence.py", *sys.argv[1:]])}
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    return env


def _write(name: str, payload: dict) -> None:
    path = RESULTS / f"convert_{name}.json"
    path.write_text(json.dumps({"environment": _env(), **payload}, indent=2) + "\n")
    print(f"wrote {path}")


# -- padding overhead ------------------------------------------------------------------------
def _on_meta(config) -> torch.nn.Module:
    """The family's model class built on the meta device: every shape, no memory."""
    from ecospa_deploy.benchmark.shapes import construct
    from ecospa_deploy.families import family_of

    cls = family_of(config.model_type).load("model_class")
    return construct(cls, config, torch.float32, "meta")


def _non_layer_params(model: torch.nn.Module) -> int:
    """Embeddings, positions, final norm and an untied head: what the vLLM padding never touches."""
    layer_ids = {id(p) for layer in model.decoder_layers for p in layer.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in layer_ids)


def padding(args: argparse.Namespace) -> None:
    from ecospa_deploy.benchmark.shapes import hf_config, load_shape, pruned_spec
    from ecospa_deploy.converters.vllm.plan import ACCEPTED_HEAD_SIZES, plan_vllm
    from ecospa_deploy.padding import padded_layer
    from ecospa_deploy.modeling import config_from_dense

    rows = []
    for name in args.shapes:
        if name.startswith("tiny-pruned-"):   # the tests' pruned model (testing.tiny_pruned)
            from ecospa_deploy.testing import tiny_pruned

            model = tiny_pruned(name.removeprefix("tiny-pruned-"), 0)
            spec, vocab = model.config.ecospa_spec, model.config.vocab_size
            embedding = _non_layer_params(model)
            shape = {"pruned": {"derivation": "testing.tiny_pruned(family, 0): random tiny "
                                              "pruned model of the test suite"}}
        else:
            shape = load_shape(name)
            config = config_from_dense(hf_config(shape))      # shapes only: no weights needed
            spec = pruned_spec(config.ecospa_spec, shape["pruned"]["layers"])
            vocab = config.vocab_size
            config.set_spec(spec)
            embedding = _non_layer_params(_on_meta(config))
        for tp in args.tp:
            for backend in args.backends:
                plan = plan_vllm(spec, tp, attention_backend=backend, vocab_size=vocab)
                # Earlier layouts, for the before/after table: (1) one head size for the whole
                # model, the smallest of 64/128/256 that fits every layer, padded into the
                # weights; (2) per-layer head sizes, padded into the weights.
                widest = max(max(l.qk_head_dim, l.v_head_dim) for l in spec.layers)
                one = min(s for s in ACCEPTED_HEAD_SIZES["portable"] if s >= widest)
                old = plan_vllm(spec, tp, head_size=one, attention_backend="portable",
                                vocab_size=vocab)
                earlier = {"one_head_size_in_weights": (old, [one] * spec.num_layers),
                           "per_layer_head_sizes_in_weights": (plan, list(plan.head_sizes))}
                layouts = {}
                for label, (p, sizes) in earlier.items():
                    after = sum(spec.layer_params(padded_layer(
                        l, spec.rope_head_dim, qk_head_dim=size, v_head_dim=size, index=i))
                        for i, (l, size) in enumerate(zip(p.padded.layers, sizes)))
                    layouts[label] = {
                        "head_sizes": sorted(set(sizes)),
                        "model_weight_overhead_pct": round(
                            100 * (after - p.layer_params_before) /
                            (p.layer_params_before + embedding), 3),
                        "kv_cache_overhead_pct": round(p.kv_overhead_pct, 3)}
                rows.append({"shape": name, "tensor_parallel_size": tp,
                             "derivation": shape["pruned"].get("derivation", ""),
                             "params_before": plan.layer_params_before + embedding,
                             "params_after": plan.layer_params_after + embedding,
                             "earlier_layouts": layouts,
                             **{k: v for k, v in plan.as_dict(embedding).items() if k != "layers"}})
                print(f"{name:16s} tp={tp} {backend:10s} " + " | ".join(
                    f"{label}: +{d['model_weight_overhead_pct']:.2f}% model, "
                    f"+{d['kv_cache_overhead_pct']:.2f}% KV" for label, d in layouts.items())
                    + f" | now (run-time padding, {sorted(set(plan.head_sizes))}): "
                      f"+{plan.overhead_pct(embedding):.2f}% model, +{plan.kv_overhead_pct:.2f}% KV")
    _write("vllm_padding", {"results": rows})


# -- KV-cache overhead of the ONNX export targets -------------------------------------------
def onnx_kv(args: argparse.Namespace) -> None:
    from ecospa_deploy.benchmark.shapes import hf_config, load_shape, pruned_spec
    from ecospa_deploy.converters.onnx.layout import TARGETS, plan_layout
    from ecospa_deploy.modeling import config_from_dense

    rows = []
    for name in args.shapes:
        shape = load_shape(name)
        dense = config_from_dense(hf_config(shape)).ecospa_spec   # shapes only: no weights
        spec = pruned_spec(dense, shape["pruned"]["layers"])
        dense_kv = sum(l.num_key_value_heads * (l.qk_head_dim + l.v_head_dim)
                       for l in dense.layers)
        own = plan_layout(spec, "ort").elements_per_token
        for target in TARGETS:
            layout = plan_layout(spec, target)
            rows.append({"shape": name, "target": target,
                         "kv_elements_per_token": layout.elements_per_token,
                         "kv_elements_per_token_pruned_own": own,
                         "kv_elements_per_token_dense": dense_kv,
                         "kv_overhead_pct": round(layout.overhead_pct(spec), 3),
                         "kv_pct_of_dense": round(100.0 * layout.elements_per_token / dense_kv,
                                                  3),
                         "cache_shapes": sorted({(c.num_key_value_heads, c.qk_head_dim,
                                                  c.v_head_dim) for c in layout.cache})})
            print(f"{name:12s} {target:8s} +{layout.overhead_pct(spec):6.2f}% KV vs own shapes, "
                  f"{rows[-1]['kv_pct_of_dense']:6.2f}% of dense")
    _write("onnx_kv", {"note": "KV elements per token summed over layers (K + V); bytes = "
                               "elements x dtype size. ort: each layer's own shapes; genai: "
                               "K and V of max(qk, v) per layer; optimum: one shape "
                               "[max kv heads, P] for every layer.", "results": rows})


# -- ONNX Runtime vs PyTorch speed ----------------------------------------------------------
def _torch_generate(model, prompt: list[int], new: int) -> None:
    from transformers import DynamicCache

    from ecospa_deploy.modeling.kv_cache import cache_kwargs

    cache = DynamicCache()
    with torch.no_grad():
        logits = model(torch.tensor([prompt]), use_cache=True, **cache_kwargs(cache)).logits
        for _ in range(new):
            nxt = logits[:, -1:].argmax(-1)
            logits = model(nxt, use_cache=True, **cache_kwargs(cache)).logits


def _timed(fn, repeats: int) -> float:
    fn()                                   # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def speed(args: argparse.Namespace) -> None:
    from ecospa_deploy.benchmark.shapes import build_model, load_shape
    from ecospa_deploy.converters.onnx import OrtGenerator, export_onnx
    from ecospa_deploy.engine.sampling import SamplingParams
    from ecospa_deploy.testing import tiny_dense, tiny_pruned

    models = {"tiny-llama": (lambda: tiny_dense("llama", attn="sdpa"),
                             lambda: tiny_pruned("llama", attn="sdpa"))}
    for name in args.shapes:
        shape = load_shape(name)
        models[name] = tuple((lambda p=p: build_model(shape, p, torch.float32,
                                                      torch.device("cpu")))
                             for p in (False, True))
    # One thread each by default: this machine is shared, and OpenMP/ORT thread pools that
    # spin-wait degrade badly when the cores are oversubscribed.
    torch.set_num_threads(args.threads)
    prompt = list(range(3, 3 + args.prompt))
    params = SamplingParams(max_new_tokens=args.new_tokens)
    rows = []
    for name, builders in models.items():
        for variant, build in zip(("dense", "pruned"), builders):
            model = build()
            n_params = sum(p.numel() for p in model.parameters())
            # PyTorch first: onnxruntime's worker threads spin after a run and would steal
            # the cores from a PyTorch run timed while its session is alive.
            t_pt = _timed(lambda: _torch_generate(model, prompt, args.new_tokens), args.repeats)
            with tempfile.TemporaryDirectory() as tmp:
                report = export_onnx(model, Path(tmp) / "onnx", exporter="legacy")
                gen = OrtGenerator(Path(tmp) / "onnx", providers=["CPUExecutionProvider"],
                                   threads=args.threads)
                t_ort = _timed(lambda: gen.generate([prompt], params), args.repeats)
                del gen
            row = {"model": name, "variant": variant, "params": n_params,
                   "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
                   "onnxruntime_tok_s": round(args.new_tokens / t_ort, 2),
                   "pytorch_tok_s": round(args.new_tokens / t_pt, 2),
                   "onnx_max_abs_error": report.verification.worst}
            rows.append(row)
            print(row)
            del model
    _write("onnx_speed", {"device": f"CPU, {args.threads} thread(s) each, fp32, batch 1, "
                                    "greedy; prompt + new tokens timed end to end, median of "
                                    "repeats", "results": rows})


# -- vLLM parity ------------------------------------------------------------------------------
def parity(args: argparse.Namespace) -> None:
    from ecospa_deploy.converters.vllm.convert import convert_vllm
    from ecospa_deploy.converters.vllm.parity import reference_greedy
    from ecospa_deploy.testing import tiny_pruned

    overrides = {"llama": {"head_dim": 64}, "qwen2": {"hidden_size": 256},
                 "mistral": {"hidden_size": 256}, "gpt2": {"n_embd": 256}}
    prompts = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46]]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for tp, families in ((1, sorted(overrides)), (2, ["llama", "gpt2"])):
            paths, refs, shapes = [], {}, {}
            for family in families:
                model = tiny_pruned(family, 0, **overrides[family])
                path = Path(tmp) / f"{family}-tp{tp}"
                conv = convert_vllm(model, path, tensor_parallel_size=tp)
                paths.append(str(path))
                refs[str(path)] = reference_greedy(model, prompts, 8)
                shapes[str(path)] = {
                    "layers (heads, kv heads, qk dim, v dim, ffn)": [
                        [l.num_attention_heads, l.num_key_value_heads, l.qk_head_dim,
                         l.v_head_dim, l.intermediate_size] for l in model.config.ecospa_spec.layers],
                    "padding": conv.as_dict()["model_weight_overhead_pct"]}
            env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND="|".join(map(str, range(tp))))
            cmd = [args.vllm_python, "-m", "ecospa_deploy.converters.vllm.parity", *paths,
                   "--prompts", json.dumps(prompts), "--max-tokens", "8",
                   "--tensor-parallel-size", str(tp)]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            line = [l for l in proc.stdout.splitlines() if l.startswith("ECOSPA_RESULT ")]
            if proc.returncode or not line:
                raise SystemExit(proc.stdout[-3000:] + proc.stderr[-3000:])
            got = json.loads(line[0].removeprefix("ECOSPA_RESULT "))
            for path in paths:
                family = Path(path).name
                runs.append({"model": family, "tensor_parallel_size": tp,
                             **shapes[path], "hf_tokens": refs[path],
                             "vllm_tokens": got[path]["tokens"],
                             "equal": got[path]["tokens"] == refs[path],
                             "vllm_load_seconds": got[path]["load_seconds"]})
                print(family, "equal" if runs[-1]["equal"] else "DIFFERENT")
    _write("vllm_parity", {"vllm": "vllm-cpu 0.32.0 (separate venv), dtype float32, "
                                   "enforce_eager", "prompts": prompts, "results": runs})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("padding")
    p.add_argument("--shapes", nargs="+", default=["tiny-pruned-gpt2", "gpt2-small", "gpt2-medium",
                                                    "llama-1b"])
    p.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    p.add_argument("--backends", nargs="+", default=["flash_attn", "cpu", "portable"])
    s = sub.add_parser("speed")
    s.add_argument("--shapes", nargs="*", default=["gpt2-small"])
    s.add_argument("--prompt", type=int, default=32)
    s.add_argument("--new-tokens", type=int, default=32)
    s.add_argument("--repeats", type=int, default=3)
    s.add_argument("--threads", type=int, default=1, help="torch and onnxruntime threads")
    v = sub.add_parser("parity")
    v.add_argument("--vllm-python", default=".venv-vllm/bin/python")
    k = sub.add_parser("onnx-kv")
    k.add_argument("--shapes", nargs="+", default=["gpt2-small", "gpt2-medium", "llama-1b"])
    args = parser.parse_args()
    {"padding": padding, "speed": speed, "parity": parity, "onnx-kv": onnx_kv}[args.what](args)


if __name__ == "__main__":
    main()
