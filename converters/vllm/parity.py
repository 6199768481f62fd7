"""Greedy tokens from vLLM (with our plugin) for a converted checkpoint, as JSON on stdout.

Runs in vLLM's environment, in its own process (vLLM starts worker processes, hence the
``__main__`` guard):

  python -m ecospa_deploy.converters.vllm.parity OUT [OUT2 ...] --prompts '[[5,6,7],[9,10]]' \
      --max-tokens 8 [--tensor-parallel-size 2] [--dtype float32]

Several checkpoints run one after another in one process (vLLM's start-up cost is paid once).

Prompts are token ids, so no tokenizer is needed; the parity tests compare the output with
``reference_greedy`` (our transformers modeling, no EOS handling, like ``ignore_eos``).
"""

from __future__ import annotations

import argparse
import json
import time


def reference_greedy(model, prompts: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Greedy tokens from our transformers modeling, one cached step at a time."""
    import torch
    from transformers import DynamicCache

    from ecospa_deploy.modeling.kv_cache import cache_kwargs

    results = []
    with torch.no_grad():
        for prompt in prompts:
            cache, out = DynamicCache(), []
            logits = model(torch.tensor([prompt]), use_cache=True, **cache_kwargs(cache)).logits
            for _ in range(max_tokens):
                out.append(int(logits[0, -1].argmax()))
                logits = model(torch.tensor([[out[-1]]]), use_cache=True,
                               **cache_kwargs(cache)).logits
            results.append(out)
    return results


def greedy_tokens(path: str, prompts: list[list[int]], max_tokens: int,
                  tensor_parallel_size: int = 1, dtype: str = "float32") -> dict:
    import gc

    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    start = time.perf_counter()
    llm = LLM(model=path, tokenizer=None, skip_tokenizer_init=True, dtype=dtype,
              tensor_parallel_size=tensor_parallel_size, enforce_eager=True,
              max_model_len=128, max_num_seqs=8, seed=0,
              kv_cache_memory_bytes=64 << 20, gpu_memory_utilization=0.3)
    load_s = time.perf_counter() - start
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True,
                            detokenize=False)
    start = time.perf_counter()
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    gen_s = time.perf_counter() - start
    result = {"tokens": [list(o.outputs[0].token_ids) for o in outputs],
              "load_seconds": round(load_s, 2), "generate_seconds": round(gen_s, 3),
              "tensor_parallel_size": tensor_parallel_size, "dtype": dtype}
    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="+")
    parser.add_argument("--prompts", required=True, help="JSON list of token-id lists")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    prompts = json.loads(args.prompts)
    results = {}
    for path in args.paths:
        results[path] = greedy_tokens(path, prompts, args.max_tokens, args.tensor_parallel_size,
                                      args.dtype)
    print("ECOSPA_RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
