"""CPU threads vs machine load: why the CLI sets a passive OpenMP wait policy and fewer threads.

``python -m ecospa_deploy.bench.threads_load --out bench/results/threads_load.json`` times a
matmul loop (a SmolLM2-sized MLP, 128 tokens, 300 steps; each setting in a fresh process,
since OpenMP reads its variables once) on an idle machine and with ``--busy`` spinning
processes running, for 1 and all threads and both wait policies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

_WORK = """
import time, torch
x = torch.randn(128, 576); w1 = torch.randn(576, 1536); w2 = torch.randn(1536, 576)
t = time.perf_counter()
for _ in range(300):
    x = torch.tanh((x @ w1) @ w2 * 1e-3)
print(time.perf_counter() - t)
"""


def _time(threads: int, policy: str | None) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    env.pop("OMP_WAIT_POLICY", None)
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    out = subprocess.run([sys.executable, "-c", _WORK], env=env, capture_output=True, text=True,
                         check=True, timeout=600)
    return round(float(out.stdout.strip().splitlines()[-1]), 3)


def main(argv=None) -> int:
    from ecospa_deploy.threads import cores

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--busy", type=int, default=4, help="spinning processes for the load")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    n = cores()
    settings = [(1, None), (n, None), (n, "PASSIVE")]
    result = {"cores": n, "busy_processes": args.busy, "idle": {}, "loaded": {}}
    for threads, policy in settings:
        result["idle"][f"{threads} threads, {policy or 'default'} wait"] = _time(threads, policy)
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"])
                for _ in range(args.busy)]
    try:
        time.sleep(3)
        result["load_average_1min"] = os.getloadavg()[0]
        for threads, policy in settings:
            key = f"{threads} threads, {policy or 'default'} wait"
            result["loaded"][key] = _time(threads, policy)
    finally:
        for p in spinners:
            p.kill()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
