"""Zero host-device syncs in steady training steps: a threshold check for gpu_check.sh.

    python benchmarks/sync_check.py RUN_DIR key=value ...   (the `resnet train` overrides)

Runs tests/sync_count_helper.py (the counting harness of tests/test_sync_free.py) with these
overrides: steps 3 up to the next log step counted, every `.item()`, `.tolist()`, `.cpu()`,
`bool()`, `torch.tensor(..., device=...)`, `torch.cuda.synchronize` and DeepSpeed accelerator
`synchronize` call. On CUDA it also runs under `torch.cuda.set_sync_debug_mode("warn")`, which
names any other synchronising CUDA call (an implicit one inside a library). Prints one line,
`steady-state syncs: ...`, and exits 1 unless there were none.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HELPER = Path(__file__).resolve().parents[1] / "tests" / "sync_count_helper.py"
CUDA_WARNING = "called a synchronizing CUDA operation"


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    # The helper turns it on only where CUDA is, and says whether it did: this process need
    # not import torch (1.8 CPU-s) to find out.
    env = dict(os.environ, SYNC_DEBUG_MODE="warn")
    proc = subprocess.run([sys.executable, "-W", "always", str(HELPER), *argv], env=env,
                          capture_output=True, text=True)
    sys.stderr.write(proc.stderr[-4000:])
    lines = [x for x in proc.stdout.splitlines() if x.startswith("SYNC_CALLS ")]
    if proc.returncode != 0 or not lines:
        print(f"steady-state syncs: not determined (the run exited {proc.returncode})")
        return 1
    result = json.loads(lines[0].split(" ", 1)[1])
    steps = (result["counted_to"] or 2) - 2
    calls = result["calls"] + [x for x in proc.stderr.splitlines() if CUDA_WARNING in x]
    verdict = "ok" if not calls and steps > 0 else "FAILED"
    print(f"steady-state syncs: {len(calls)} in {steps} steps "
          f"({'CUDA sync debug mode on' if result['sync_debug'] else 'CPU: counted calls'})"
          f", none allowed: {verdict}")
    for call in calls[:20]:
        print(f"  {call}")
    return 0 if verdict == "ok" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
