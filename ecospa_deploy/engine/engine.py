"""``Engine``: fast generation for our per-layer-shaped models and stock HF Llama/GPT-2.

Static per-layer KV cache, exact zero padding, fused projections, batched prefill and a decode
step that replays as one CUDA graph per (batch bucket, KV-length bucket, greedy/sampled); on
CUDA prefill replays graphs too (``warmup()`` captures them all up front, so a first-seen prompt
length costs what a repeated one does): prompts prefilled together run packed end to end, one
graph per packed-token bucket (``packing.py``, flash varlen attention: fp16/bf16), else as rows
padded to a (rows, prompt-length bucket) graph. On
CUDA the decode step of batch 1 is built from the Triton kernels of ``engine/fused.py`` (five
launches per layer); larger batches run the PyTorch step (cuBLAS linears, whose model part
``compile=`` may pass through ``torch.compile(fullgraph=True)``) with the Triton decode attention;
``kernels=False`` keeps plain PyTorch (SDPA) throughout. Two ways to use it:

- ``generate(prompts, params)``: whole batches, no host sync between decode steps except every
  ``sync_every`` steps to look for stop tokens;
- the slot API for continuous batching: ``add(slot, prompt, params)`` prefills one request into a
  free slot (it joins the running batch at the next step), or ``add_chunk`` does so a chunk at a
  time between steps (chunked prefill); ``step()`` decodes one token for every running slot,
  ``free(slot)`` releases it.
"""

from __future__ import annotations

import contextlib
import functools
import random
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from ecospa_deploy.errors import UnsupportedError
from ecospa_deploy.padding import round_up

from . import varlen
from .cache import KVCache
from .forward import Forward
from .fused import FusedDecode, unsupported_reason
from .packing import (packed_bucket, packed_groups, packed_inputs, packed_max_len,
                      warmup_lengths)
from .kernels import runtime as kernel_runtime
from .sampling import SamplingParams, sample_tokens
from .staging import copy_in, to_device
from .weights import ModelWeights, build_weights

# Decode attention: cuDNN runs q/k dim != v dim at the bytes floor (docs/DESIGN.md §5); flash
# refuses it; the default dispatch may fall to the slower mem-efficient kernel. cuDNN builds a
# graph per new shape, which a captured decode graph (fixed shapes) pays once per bucket.
_DECODE_SDPA = ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")
# Prefill sees a new length on nearly every request: never cuDNN there (a build per length cost
# 0.1-0.7 s per first-seen prompt length on the H200), flash first (q/k padded to v, forward.py).
_PREFILL_SDPA = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "MATH")


def _sdpa_context(device: torch.device, backends: tuple[str, ...] = _DECODE_SDPA):
    if device.type != "cuda":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([getattr(SDPBackend, n) for n in backends], set_priority=True)


def resolve_device(device: str | torch.device | None, model: nn.Module) -> torch.device:
    """The device to run on; a clear error when CUDA is asked for but absent."""
    if device is None:
        return next(model.parameters()).device
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedError(f"device={str(device)!r} but CUDA is not available on this "
                               "machine; expected one of ['cpu'] (or run on a CUDA machine)")
    if dev.type not in ("cpu", "cuda"):
        raise UnsupportedError(f"device={str(device)!r} is not supported; expected cpu or cuda")
    return dev


FUSED_MAX_BATCH = 1     # batch buckets decoded by the fused kernels unless kernels=True


def kv_bucket(n: int, max_seq: int) -> int:
    """Smallest bucket >= ``n``: multiples of max(128, 2^floor(log2 n)/8) (<= 12.5% extra)."""
    step = max(128, (1 << max(n - 1, 1).bit_length()) // 16)
    return min(round_up(n, step), max_seq)


def prefill_bucket(n: int, max_seq: int, rows: int = 1) -> int:
    """Padded prompt length of a captured prefill. One row: multiples of
    max(16, 2^ceil(log2 n)/16) (< 12.5% extra above 128 tokens; 40 buckets up to 2048).
    Several rows: the next power of two >= 16, since each row count needs its own graphs and
    a batch of several rows holds short prompts whose prefill is launch-bound, so padding
    them costs little while a server's start captures 18 graphs for rows 2/4/8 instead of 72
    (widths up to 1024/512/256 within a 2048-token step)."""
    pow2 = 1 << max(n - 1, 1).bit_length()
    width = max(16, pow2) if rows > 1 else round_up(n, max(16, pow2 // 16))
    return min(width, max_seq)


def prefill_buckets(max_len: int, max_seq: int, rows: int = 1) -> list[int]:
    """Every ``prefill_bucket`` a prompt of 1..``max_len`` tokens can land in."""
    out, n = [], 1
    while n <= max_len:
        out.append(prefill_bucket(n, max_seq, rows))
        n = out[-1] + 1
    return out


def prefill_groups(lengths: Sequence[int], max_rows: int, max_tokens: int, pow2: bool,
                   width=lambda t: t) -> list[tuple[int, int]]:
    """Split prompts (in order) into prefill batches ``[start, end)``: at most ``max_rows``
    rows and ``max_tokens`` padded tokens (``rows * width(longest)``) each, a single over-long
    prompt alone; with ``pow2`` every batch has a power-of-two row count, so captured prefill
    graphs of rows 1, 2, 4, ... cover every batch (a group of 7 runs as 4 + 2 + 1)."""
    out, start, n = [], 0, len(lengths)
    while start < n:
        end, longest = start + 1, lengths[start]
        while end < n and end - start < max_rows:
            t = max(longest, lengths[end])
            if width(t) * (end - start + 1) > max_tokens:
                break
            longest, end = t, end + 1
        if pow2:
            end = start + (1 << ((end - start).bit_length() - 1))
        out.append((start, end))
        start = end
    return out


def prefill_layout(lengths: Sequence[int], max_rows: int, max_tokens: int, max_seq: int,
                   graphs: bool) -> list[tuple[int, int, int]]:
    """``[(start, end, width)]``: the prefill batches of prompts of ``lengths`` (in order) and
    each one's padded length. With ``graphs``: power-of-two row counts, each padded to the
    ``prefill_bucket`` ``warmup`` captured for its rows (a group grows row by row, so its token
    budget counts the several-row width); eager: padded to its longest prompt."""
    def width(longest: int, rows: int) -> int:
        return prefill_bucket(longest, max_seq, rows) if graphs else longest

    return [(start, end, width(max(lengths[start:end]), end - start))
            for start, end in prefill_groups(lengths, max_rows, max_tokens, graphs,
                                             lambda t: width(t, 2))]


def batch_bucket(n: int, max_batch: int) -> int:
    b = 1
    while b < n:
        b *= 2
    return min(b, max_batch)


@dataclass
class Launched:
    """Decode steps in flight (``Engine.launch``): their tokens, host-side once ``event``
    completes (``[nb, n]``), and the slot states they ran for."""

    nb: int
    states: list
    table: torch.Tensor
    event: object = None


@dataclass
class _Slot:
    params: SamplingParams
    prompt_len: int
    position: int                 # position of the token the next step consumes
    generated: int                # tokens emitted so far
    finished: bool = False


class Engine:
    """Generation engine; see the module docstring. ``model``: ours or stock HF Llama/GPT-2."""

    def __init__(self, model: nn.Module, max_batch_size: int = 8, max_seq_len: int = 2048,
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 pad_multiple: int = 64, cuda_graphs: bool = True, compile: bool | str = False,
                 head_multiple: int = 8, max_prefill_tokens: int = 16384, sync_every: int = 16,
                 compile_prefill: bool = False, kernels: bool | None = None,
                 prefill_graphs: bool | None = None, max_prefill_rows: int = 8,
                 packed_prefill: bool | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r}; expected an int >= 1")
        if not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len={max_seq_len!r}; expected an int >= 2")
        if not isinstance(max_prefill_rows, int) or max_prefill_rows < 1:
            raise ValueError(f"max_prefill_rows={max_prefill_rows!r}; expected an int >= 1")
        for name, value in (("pad_multiple", pad_multiple), ("head_multiple", head_multiple)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r}; expected an int >= 1 (1 = no padding)")
        self.device = resolve_device(device, model)
        self.dtype = dtype or next(model.parameters()).dtype
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        self.weights: ModelWeights = build_weights(model, dtype=self.dtype, device=self.device,
                                                   head_multiple=head_multiple,
                                                   pad_multiple=pad_multiple)
        if self.weights.pos_embed is not None and max_seq_len > self.weights.max_positions:
            raise ValueError(f"max_seq_len={max_seq_len} exceeds the model's learned positions "
                             f"({self.weights.max_positions}); expected <= that")
        self.cache = KVCache(self.weights.layers, max_batch_size, max_seq_len, self.dtype,
                             self.device)
        self.forward = Forward(self.weights, self.cache, self.dtype, self.device)
        self.max_prefill_tokens, self.sync_every = max_prefill_tokens, sync_every
        # Prompts prefilled together run in batches of power-of-two rows up to this many (the
        # row counts ``warmup`` captures: ``prefill_row_counts``).
        self.max_prefill_rows = max_prefill_rows
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        kw = dict(device=self.device)
        self._tokens = torch.zeros(max_batch_size, dtype=torch.long, **kw)
        self._positions = torch.zeros(max_batch_size, dtype=torch.long, **kw)
        self._history = torch.zeros(max_batch_size, max_seq_len, dtype=torch.long, **kw)
        self._temperature = torch.zeros(max_batch_size, dtype=torch.float32, **kw)
        self._top_k = torch.zeros(max_batch_size, dtype=torch.long, **kw)
        self._top_p = torch.ones(max_batch_size, dtype=torch.float32, **kw)
        self._seeds = torch.zeros(max_batch_size, dtype=torch.long, **kw)
        self._slots: dict[int, _Slot] = {}
        self._partial: dict[int, tuple[list[int], SamplingParams, int]] = {}  # chunked prefill
        self._graphs: dict[tuple[int, int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        # Prefill replays one graph per (rows, padded length): eager prefill is launch-bound
        # (~1200 small launches, 33 ms flat from 97 to 513 tokens on the H200).
        self.prefill_graphs = self.cuda_graphs if prefill_graphs is None else \
            bool(prefill_graphs) and self.cuda_graphs
        self._prefill_graphs: dict[tuple[int, int], tuple] = {}
        # Prompts prefilled together run packed end to end, no padding rows (varlen.py): on
        # CUDA in half precision through flash varlen, one graph per packed-token bucket; eager
        # (CPU) one SDPA per prompt. Else rows padded to a (rows, length) bucket, as captured.
        flash = varlen.available(self.device, self.dtype) and varlen.head_dims_fit(
            [max(lw.qk_head_dim, lw.v_head_dim) for lw in self.weights.layers])
        can_pack = flash or not self.prefill_graphs
        if packed_prefill and not can_pack:
            raise UnsupportedError(
                f"packed_prefill=True needs flash varlen attention (CUDA, fp16/bf16, torch >= "
                f"2.11, head dims multiples of 8 up to 256) to capture it; here device="
                f"{self.device}, dtype={self.dtype}: pass prefill_graphs=False to pack eagerly, "
                "or packed_prefill=None")
        self.packed_prefill = can_pack if packed_prefill is None else bool(packed_prefill)
        self._flash = flash
        self._packed_graphs: dict[int, tuple] = {}
        self._pool = None
        self.timing: list | None = None   # set to [] to record a mark per token (bench)
        self._decode = self.forward.decode
        self._prefill = self.forward.prefill
        self._prefill_packed = self.forward.prefill_packed
        self.kernels = self._use_kernels(kernels)
        self._force_kernels = bool(kernels)
        self._fused = FusedDecode(self.forward).decode if self.kernels else None
        # Above the fused step's batches the PyTorch step still attends with the Triton kernel.
        self.forward.kernel_attention = kernels is not False and kernel_runtime.available(
            self.device, interpreter=bool(kernels))
        if compile:
            mode = compile if isinstance(compile, str) else None
            # Dynamo caches compiled code per code object: every engine in a process (each
            # with its own weights) adds entries to Forward.decode_logits' cache (its batch and
            # KV-length ints turn symbolic after the second shape, so a few per engine), and
            # the default limit of 8 is reached by a process that builds a few engines (bench,
            # tests). Raise it; each entry is a real, distinct specialisation.
            dynamo = torch._dynamo.config
            dynamo.recompile_limit = max(dynamo.recompile_limit, 256)
            dynamo.accumulated_recompile_limit = max(dynamo.accumulated_recompile_limit, 4096)
            self._decode = functools.partial(self.forward.decode, logits_fn=torch.compile(
                self.forward.decode_logits, fullgraph=True, mode=mode))
            if compile_prefill:
                self._prefill = torch.compile(self.forward.prefill, fullgraph=True)
                # packed: Dynamo makes the token count symbolic at the second bucket, so two
                # compiles serve every bucket (each then captured); Inductor fuses the norms,
                # RoPE and SiLU-mul the eager graph runs as separate kernels over the tokens
                self._prefill_packed = torch.compile(self.forward.prefill_packed)

    def _step_fn(self, nb: int):
        """The decode step for a batch bucket: the fused kernels at batch 1 (or always when
        forced), PyTorch/cuBLAS above, where the kernels' 16-row MMA path measured slower
        (bench/results/kernel_roofline_llama-1b.json: 0.7-1.8 vs 1.9-4.0 TB/s at 32 rows)."""
        if self._fused is not None and (nb <= FUSED_MAX_BATCH or self._force_kernels):
            return self._fused
        return self._decode

    def _use_kernels(self, kernels: bool | None) -> bool:
        """Fused Triton decode: on by default where it can run; a clear error if forced."""
        if kernels is False:
            return False
        reason = None
        if not kernel_runtime.available(self.device, interpreter=bool(kernels)):
            reason = (f"the fused decode kernels need Triton and a CUDA device (or "
                      f"TRITON_INTERPRET=1 on the CPU); device is {self.device}")
        reason = reason or unsupported_reason(self.weights, self.max_batch_size)
        if reason and kernels:
            raise UnsupportedError(f"kernels=True: {reason}; pass kernels=False or None")
        return reason is None

    # -- introspection --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.weights.vocab_size

    def kv_bytes_per_token(self) -> int:
        return self.cache.bytes_per_token()

    def weight_bytes(self) -> int:
        return self.weights.weight_bytes()

    @property
    def active_slots(self) -> list[int]:
        return sorted(s for s, st in self._slots.items() if not st.finished)

    # -- validation -----------------------------------------------------------------------
    def _check_prompt(self, prompt: Sequence[int], params: SamplingParams, where: str) -> None:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"{where}: params is {type(params).__name__}; expected SamplingParams")
        if len(prompt) == 0:
            raise ValueError(f"{where}: the prompt is empty; expected at least one token id")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if bad:
            raise ValueError(f"{where}: token ids {bad[:5]} are out of range; expected ints in "
                             f"[0, {self.vocab_size})")
        need = len(prompt) + params.max_new_tokens
        if need > self.max_seq_len:
            raise ValueError(f"{where}: prompt length {len(prompt)} + max_new_tokens "
                             f"{params.max_new_tokens} = {need} exceeds max_seq_len="
                             f"{self.max_seq_len}; shorten the request or build the engine "
                             "with a larger max_seq_len")

    def _check_slot(self, slot: int) -> None:
        if not isinstance(slot, int) or not 0 <= slot < self.max_batch_size:
            raise ValueError(f"slot={slot!r}; expected an int in [0, {self.max_batch_size})")

    # -- state ----------------------------------------------------------------------------
    def _set_params(self, slot: int, params: SamplingParams) -> None:
        seed = params.seed if params.seed is not None else random.getrandbits(62)
        self._temperature[slot] = float(params.temperature)
        self._top_k[slot] = int(params.top_k)
        self._top_p[slot] = float(params.top_p)
        self._seeds[slot] = int(seed)

    @torch.no_grad()
    def _prefill_rows(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """Prefill ``prompts`` into ``slots`` (params already set); returns first tokens [n]."""
        firsts = []
        lens = [len(p) for p in prompts]
        if self.packed_prefill:
            for start, end in packed_groups(lens, self.max_prefill_tokens):
                firsts.append(self._run_packed(slots[start:end], prompts[start:end]))
            return torch.cat(firsts)
        for start, end, width in prefill_layout(lens, self.max_prefill_rows,
                                                self.max_prefill_tokens, self.max_seq_len,
                                                self.prefill_graphs):
            batch = torch.zeros(end - start, width, dtype=torch.long)
            for j, p in enumerate(prompts[start:end]):
                batch[j, :len(p)] = torch.tensor(p, dtype=torch.long)
            firsts.append(self._run_prefill(batch, torch.tensor(lens[start:end]),
                                            torch.tensor(slots[start:end])))
        return torch.cat(firsts)

    def _prefill_step(self, tokens: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor
                      ) -> torch.Tensor:
        """Prefill rows ``idx`` and pick their first tokens; device tensors in, no host sync."""
        with _sdpa_context(self.device, _PREFILL_SDPA):
            logits = self._prefill(tokens, lengths, idx)
        return self._first_tokens(logits, lengths, idx)

    def _first_tokens(self, logits: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor
                      ) -> torch.Tensor:
        """Pick each prefilled row's first token and start its decode state."""
        nxt = sample_tokens(logits, self._temperature[idx], self._top_k[idx],
                            self._top_p[idx], self._seeds[idx], lengths)
        self._tokens[idx] = nxt
        self._positions[idx] = lengths
        self._history[idx, lengths] = nxt
        return nxt

    def _run_prefill(self, batch: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor
                     ) -> torch.Tensor:
        """``_prefill_step`` on host tensors: eager, or the graph of (rows, padded length).

        Right padding to the bucket is exact: a real token never attends to a later position,
        and the padding's K/V land at positions decode overwrites before it reads them."""
        dev = self.device
        if not self.prefill_graphs:
            return self._prefill_step(to_device(batch, dev), to_device(lengths, dev),
                                      to_device(idx, dev))
        key = tuple(batch.shape)
        if key not in self._prefill_graphs:
            self._prefill_graphs[key] = self._capture_prefill(batch, lengths, idx)
        graph, tokens, lens, rows, out = self._prefill_graphs[key]
        copy_in(tokens, batch)
        copy_in(lens, lengths)
        copy_in(rows, idx)
        graph.replay()
        return out.clone()      # the next replay of this graph overwrites ``out``

    def _run_packed(self, slots: list[int], prompts: list[list[int]]) -> torch.Tensor:
        """One packed prefill (``Forward.prefill_packed``) and its first tokens. With graphs
        the tokens pad to ``packed_bucket`` and the offsets to ``max_batch_size`` + 1
        sequences (``packing.packed_inputs``), so one graph per bucket serves any number of
        prompts; the first tokens are sampled after it, for the real prompts only."""
        dev, n = self.device, len(prompts)
        lens = [len(p) for p in prompts]
        width = packed_bucket(sum(lens)) if self.prefill_graphs else sum(lens)
        rows = self.max_batch_size + 1 if self.prefill_graphs else n     # + the padding's
        args = packed_inputs(slots, prompts, width, rows, self.max_seq_len)
        with _sdpa_context(dev, _PREFILL_SDPA):
            if not self.prefill_graphs:
                inputs = [to_device(a, dev) for a in args]
                if self._flash:
                    logits = self._prefill_packed(*inputs, max(lens))
                else:       # one SDPA per prompt, host lengths: never compiled
                    logits = self.forward.prefill_packed(*inputs, max(lens), lens)
            else:
                if width not in self._packed_graphs:
                    self._packed_graphs[width] = self._capture_packed(args)
                graph, static, logits = self._packed_graphs[width]
                for buf, a in zip(static, args):
                    copy_in(buf, a)
                graph.replay()
        return self._first_tokens(logits[:n], to_device(lens, dev), to_device(slots, dev))

    def _capture_packed(self, args: tuple[torch.Tensor, ...]):
        """Capture ``Forward.prefill_packed`` for ``args``' token bucket (warmed up twice on
        a side stream first, ``_graph_of``); the graph reads its inputs from and
        writes its logits to static buffers."""
        static = [a.to(self.device) for a in args]
        max_len = packed_max_len(static[0].shape[0], self.max_seq_len)
        graph, logits = self._graph_of(lambda: self._prefill_packed(*static, max_len))
        return graph, static, logits

    def _capture_prefill(self, batch: torch.Tensor, lengths: torch.Tensor, idx: torch.Tensor):
        """Warm up and capture ``_prefill_step`` on these very rows and tokens: the warm-up
        writes only what the replay that follows writes again."""
        tokens, lens, rows = (t.to(self.device) for t in (batch, lengths, idx))
        graph, out = self._graph_of(lambda: self._prefill_step(tokens, lens, rows))
        return graph, tokens, lens, rows, out

    def _graph_of(self, fn):
        """``(graph, fn's output)``: ``fn`` run twice on a side stream (lazy init, compiles,
        autotuning, the allocator's first blocks), then captured into the engine's one
        memory pool; replaying the graph rewrites that output."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            out = fn()
        return graph, out

    @torch.no_grad()
    def warmup(self, batch_sizes: Sequence[int] = (1,), max_prompt_len: int | None = None,
               decode: bool = False,
               progress: Callable[[int, int, str], None] | None = None) -> int:
        """Capture the prefill graphs of every length bucket up to ``max_prompt_len`` (default:
        ``max_seq_len - 1``) for each row count in ``batch_sizes`` (packed: of every packed-token
        bucket a prefill of such prompts can reach, ``batch_sizes`` unused), so that no request
        pays a capture at a first-seen length; with ``decode``, also the decode graph of every (batch
        bucket, KV bucket, greedy/sampled), which autotunes the Triton kernels of each batch
        bucket too (a server's first burst otherwise pays both mid-stream). ``progress(done,
        total, what)`` is called after each graph: a compiled warm-up takes minutes, and a
        server reports where it is. Needs every slot free; returns the graphs captured."""
        if not self.cuda_graphs:
            return 0
        if self._busy():
            raise UnsupportedError(f"warmup() needs every slot free; slots {self._busy()} are "
                                   "in use")
        jobs = self._warmup_jobs(batch_sizes, max_prompt_len, decode)
        saved = [b.clone() for b in self._buffers()]
        before = len(self._prefill_graphs) + len(self._packed_graphs) + len(self._graphs)
        if decode:
            self._positions.zero_()   # every row writes position 0 of a free slot
        for done, (what, run) in enumerate(jobs, 1):
            run()
            if progress is not None:
                progress(done, len(jobs), what)
        for buf, old in zip(self._buffers(), saved):
            buf.copy_(old)
        torch.cuda.synchronize(self.device)
        return len(self._prefill_graphs) + len(self._packed_graphs) + len(self._graphs) - before

    def _warmup_jobs(self, batch_sizes: Sequence[int], max_prompt_len: int | None,
                     decode: bool) -> list[tuple[str, Callable[[], object]]]:
        """``warmup``'s graphs in its order, each a label and the call that captures it."""
        max_len = min(max_prompt_len or self.max_seq_len - 1, self.max_seq_len - 1)
        jobs: list[tuple[str, Callable[[], object]]] = []
        if decode:
            jobs += [(f"decode batch {nb} kv {kv}{' sampled' if s else ''}",
                      functools.partial(self._run_decode, nb, kv, s))
                     for nb, kv, s in self._decode_keys()]
        if not self.prefill_graphs or self.packed_prefill:
            batch_sizes = ()
        if self.prefill_graphs and self.packed_prefill:
            # the most tokens one packed prefill holds: a step's budget of prompts of at most
            # max_len tokens in distinct slots, or one prompt alone
            most = max(min(self.max_prefill_tokens, self.max_batch_size * max_len), max_len)
            jobs += [(f"packed prefill {width} tokens",
                      functools.partial(self._run_packed, list(range(len(lens))),
                                        [[0] * k for k in lens]))
                     for width, lens in warmup_lengths(most, max_len).items()
                     if width not in self._packed_graphs]
        for n in batch_sizes:
            if not 1 <= n <= self.max_batch_size:
                raise ValueError(f"warmup batch size {n!r}; expected ints in "
                                 f"[1, {self.max_batch_size}]")
            for width in prefill_buckets(max_len, self.max_seq_len, n):
                if n > 1 and n * width > self.max_prefill_tokens:
                    break
                if (n, width) not in self._prefill_graphs:
                    jobs.append((f"prefill {n} x {width}", functools.partial(
                        self._run_prefill, torch.zeros(n, width, dtype=torch.long),
                        torch.full((n,), min(width, self.max_seq_len - 1)), torch.arange(n))))
        return jobs

    def _decode_keys(self) -> list[tuple[int, int, bool]]:
        """Every (batch bucket, KV bucket, greedy/sampled) decode graph, in warm-up order. Dynamo
        turns an int symbolic once a second call changes it: the compiled step's second shape
        changes both the batch and the KV length, so one recompile covers every bucket (two
        compiles in all, not three)."""
        nbs = sorted({batch_bucket(n, self.max_batch_size)
                      for n in range(1, self.max_batch_size + 1)})
        kvs = sorted({kv_bucket(n, self.max_seq_len) for n in range(1, self.max_seq_len + 1)})
        keys = [(nb, kv, s) for nb in nbs for kv in kvs for s in (False, True)]
        compiled = [nb for nb in nbs if self._step_fn(nb) is self._decode]
        if len(compiled) > 1 and len(kvs) > 1:
            second = (compiled[1], kvs[1], False)
            keys.remove(second)
            keys.insert(keys.index((compiled[0], kvs[0], False)) + 1, second)
        return keys

    # -- decode ---------------------------------------------------------------------------
    def _buffers(self):
        return (self._tokens, self._positions, self._history, self._temperature, self._top_k,
                self._top_p, self._seeds)

    def _capture(self, nb: int, kv_len: int, sample: bool):
        """Warm up (compile) and capture the decode step; buffers are restored afterwards."""
        saved = [b.clone() for b in self._buffers()]
        step = self._step_fn(nb)
        graph, out = self._graph_of(lambda: step(nb, kv_len, sample, *self._buffers()))
        for buf, old in zip(self._buffers(), saved):
            buf.copy_(old)
        return graph, out

    @torch.no_grad()
    def _run_decode(self, nb: int, kv_len: int, sample: bool) -> torch.Tensor:
        with _sdpa_context(self.device):
            if not self.cuda_graphs:
                return self._step_fn(nb)(nb, kv_len, sample, *self._buffers())
            key = (nb, kv_len, sample)
            if key not in self._graphs:
                self._graphs[key] = self._capture(nb, kv_len, sample)
            graph, out = self._graphs[key]
            graph.replay()
            return out

    def _mark(self) -> None:
        """Append a CUDA event (no sync) or a host time to ``self.timing`` when recording."""
        if self.timing is None:
            return
        if self.device.type == "cuda":
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.timing.append(event)
        else:
            self.timing.append(time.perf_counter())

    # -- slot API (continuous batching) ---------------------------------------------------
    def add(self, slot: int, prompt_ids: list[int], params: SamplingParams) -> int:
        """Prefill ``prompt_ids`` into a free ``slot``; returns the first generated token."""
        return self.add_many([slot], [prompt_ids], [params])[0]

    def add_many(self, slots: Sequence[int], prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[int]:
        """``add`` for several free slots at once: the prompts prefill together (batches of
        power-of-two rows, ``prefill_groups``) with one host sync for all their first tokens.
        Every slot and prompt is checked before anything runs, so a refusal changes nothing."""
        if not len(slots) == len(prompts) == len(params):
            raise ValueError(f"add_many: {len(slots)} slots, {len(prompts)} prompts and "
                             f"{len(params)} params; expected one of each per sequence")
        if len(set(slots)) != len(slots):
            raise ValueError(f"add_many: slots {list(slots)} repeat a slot")
        claimed = [self._claim(s, p, q) for s, p, q in zip(slots, prompts, params)]
        for s, q in zip(slots, params):
            self._set_params(s, q)
        firsts = self._prefill_rows(list(slots), claimed).tolist()
        return [self._start(s, p, q, t) for s, p, q, t in zip(slots, claimed, params, firsts)]

    @property
    def prefill_row_counts(self) -> list[int]:
        """The row counts of prefill batches (``add_many``, ``generate``): powers of two up
        to ``max_prefill_rows``; warm these up to keep every prefill on a captured graph."""
        top = min(self.max_prefill_rows, self.max_batch_size)
        return [1 << k for k in range(top.bit_length())]

    def _busy(self) -> list[int]:
        """Slots holding a request: decoding (``_slots``) or part-prefilled (``_partial``)."""
        return sorted(set(self._slots) | set(self._partial))

    def _claim(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams) -> list[int]:
        self._check_slot(slot)
        busy = self._busy()
        if slot in busy:
            raise ValueError(f"slot {slot} is in use; free it first (free slots: "
                             f"{[s for s in range(self.max_batch_size) if s not in busy]})")
        prompt = list(prompt_ids)
        self._check_prompt(prompt, params, f"slot {slot}")
        return prompt

    def _start(self, slot: int, prompt: list[int], params: SamplingParams, first: int) -> int:
        state = _Slot(params, len(prompt), len(prompt), 1)
        state.finished = first in params.stop_token_ids or params.max_new_tokens <= 1
        self._slots[slot] = state
        return first

    @torch.no_grad()
    def add_chunk(self, slot: int, prompt_ids: Sequence[int], params: SamplingParams,
                  end: int) -> int | None:
        """Chunked prefill: cache ``prompt_ids[:end]`` in ``slot``, continuing where the last
        call for this slot stopped; returns the first generated token once ``end`` reaches the
        prompt's length (the slot then runs like one from ``add``), else None.

        A long prompt thus enters between decode steps a chunk at a time instead of stalling
        every running stream for its whole prefill. Until its last chunk the slot does not
        decode: its row is parked at the first uncached position, which the next chunk
        overwrites, so the steps that run meanwhile never touch its cached prefix."""
        if slot in self._partial:
            prompt, params, done = self._partial[slot]
            if list(prompt_ids) != prompt:
                raise ValueError(f"slot {slot}: add_chunk continues a different prompt; free "
                                 "the slot first")
        else:
            prompt, done = self._claim(slot, prompt_ids, params), 0
            self._set_params(slot, params)
        if not isinstance(end, int) or not done < end <= len(prompt):
            raise ValueError(f"slot {slot}: end={end!r}; expected an int in "
                             f"({done}, {len(prompt)}] (tokens cached so far: {done})")
        dev = self.device
        idx = to_device([slot], dev)
        lengths = to_device([end - done], dev)
        with _sdpa_context(dev, _PREFILL_SDPA):
            logits = self.forward.prefill(to_device([prompt[done:end]], dev), lengths,
                                          idx, start=done)
        if end < len(prompt):
            self._partial[slot] = (prompt, params, end)
            self._positions[slot] = end
            return None
        self._partial.pop(slot, None)
        first = self._first_tokens(logits, to_device([end], dev), idx)
        return self._start(slot, prompt, params, int(first[0]))

    def step(self) -> dict[int, int]:
        """One decode step for every running slot: ``{slot: token}``.

        A slot stops running (and stops appearing here) once it emitted a stop token or its
        ``max_new_tokens``; it keeps its place until ``free(slot)``.
        """
        return {s: toks[0] for s, toks in self.steps(1).items()}

    def steps(self, n: int) -> dict[int, list[int]]:
        """``n`` decode steps with one host sync: ``{slot: tokens}`` for every running slot.

        The steps replay back to back and their tokens come back together, so the host work
        of a step (the sync, bookkeeping, the server's per-token fan-out) is paid once per
        ``n`` tokens. A slot that stops (stop token, ``max_new_tokens``) during the ``n``
        steps gets its tokens up to that one; the steps it ran past it are discarded (its row
        wrote only its own cache row, at positions nothing reads).
        """
        return self.collect(self.launch(n))

    @torch.no_grad()
    def launch(self, n: int = 1) -> "Launched | None":
        """Enqueue ``n`` decode steps for every running slot and return at once (on CUDA the
        tokens come back to pinned host memory behind an event); ``collect`` reads them.

        Between the two the host may do anything, including launching the next steps: a
        server that launches step N+1 before it processes step N's tokens keeps the GPU busy
        while it streams (vLLM's async scheduling). A slot that stops or is freed meanwhile
        still runs in the steps already launched; ``collect`` drops those tokens."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"launch n={n!r}; expected an int >= 1")
        running = self.active_slots
        if not running:
            return None
        nb = batch_bucket(max(running) + 1, self.max_batch_size)
        first = max(self._slots[s].position for s in running) + 1
        sample = any(not self._slots[s].params.greedy for s in running)
        outs = []
        for i in range(n):
            out = self._run_decode(nb, kv_bucket(min(first + i, self.max_seq_len),
                                                 self.max_seq_len), sample)
            # a graph's output buffer is overwritten by its next replay: keep a copy
            outs.append(out[:nb].clone())
        table = torch.stack(outs, 1)
        event = None
        if table.is_cuda:
            host = torch.empty(table.shape, dtype=table.dtype, pin_memory=True)
            table = host.copy_(table, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        states = [(s, self._slots[s]) for s in running]
        for _, st in states:        # where the device's rows are once these steps have run
            st.position += n
        return Launched(nb, states, table, event)

    @torch.no_grad()
    def collect(self, launched: "Launched | None") -> dict[int, list[int]]:
        """``{slot: tokens}`` of launched steps for the slots that ran them and still run
        (a slot freed or stopped since gets nothing); waits for them on the device only."""
        if launched is None:
            return {}
        if launched.event is not None:
            launched.event.synchronize()
        table = launched.table.tolist()
        result = {}
        for s, st in launched.states:
            if self._slots.get(s) is not st or st.finished:
                continue
            toks = []
            for tok in table[s]:
                toks.append(tok)
                st.generated += 1
                if tok in st.params.stop_token_ids or st.generated >= st.params.max_new_tokens:
                    st.finished = True
                    break
            result[s] = toks
        # Rows inside the bucket that do not decode (free, finished, still prefilling) advanced
        # too: park them (one write) where their next decode touches nothing they will read.
        # A slot prefilled since the launch is running: its row is left alone. Queued behind
        # the step launched ahead, not waited for (``staging``): this runs every step.
        parked = [s for s in range(launched.nb)
                  if s not in self._slots or self._slots[s].finished]
        if parked:
            where = [self._partial[s][2] if s in self._partial else 0 for s in parked]
            self._positions[to_device(parked, self.device)] = to_device(where, self.device)
        return result

    def free(self, slot: int) -> None:
        """Release ``slot`` (its cache rows are overwritten by the next ``add``)."""
        self._check_slot(slot)
        self._slots.pop(slot, None)
        self._partial.pop(slot, None)

    # -- whole batches --------------------------------------------------------------------
    def generate(self, prompts: list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[list[int]]:
        """Generated token ids (prompt excluded, stop token included) for each prompt."""
        if self._busy():
            raise UnsupportedError(f"generate() needs every slot free; slots {self._busy()}"
                                   " are in use by the slot API (free them first)")
        params = params if params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} SamplingParams for {len(prompts)} prompts; "
                             "expected one, or one per prompt")
        prompts = [list(p) for p in prompts]
        for i, (p, sp) in enumerate(zip(prompts, params)):
            self._check_prompt(p, sp, f"prompt {i}")
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.max_batch_size):
            end = start + self.max_batch_size
            out += self._generate_batch(prompts[start:end], params[start:end])
        return out

    @torch.no_grad()
    def _generate_batch(self, prompts: list[list[int]], params: list[SamplingParams]
                        ) -> list[list[int]]:
        n = len(prompts)
        for slot, sp in enumerate(params):
            self._set_params(slot, sp)
        self._prefill_rows(list(range(n)), prompts)
        self._mark()
        lengths = [len(p) for p in prompts]
        max_new = max(sp.max_new_tokens for sp in params)
        stops = any(sp.stop_token_ids for sp in params)
        nb = batch_bucket(n, self.max_batch_size)
        sample = any(not sp.greedy for sp in params)
        for s in range(n, nb):
            self._positions[s] = 0
        step = 1
        while step < max_new:
            kv_len = kv_bucket(max(lengths) + step, self.max_seq_len)
            self._run_decode(nb, kv_len, sample)
            self._mark()
            step += 1
            if stops and step % self.sync_every == 0 and \
                    self._all_stopped(prompts, params, step):
                break
        hist = self._history[:n].cpu()
        results = []
        for r, (length, sp) in enumerate(zip(lengths, params)):
            toks = hist[r, length:length + min(step, sp.max_new_tokens)].tolist()
            for j, t in enumerate(toks):
                if t in sp.stop_token_ids:
                    toks = toks[:j + 1]
                    break
            results.append(toks)
        return results

    def _all_stopped(self, prompts, params, step: int) -> bool:
        hist = self._history[:len(prompts)].cpu()
        for r, (p, sp) in enumerate(zip(prompts, params)):
            if step >= sp.max_new_tokens:
                continue
            toks = hist[r, len(p):len(p) + step].tolist()
            if not any(t in sp.stop_token_ids for t in toks):
                return False
        return True
