"""`resnet quickstart`: the whole product in about two minutes on a CPU, with no download.

Generates a small labelled image set, packs it with `resnet pack`, trains with two processes
through Accelerate + DeepSpeed (gloo on CPU), evaluates, exports the final weights, and says
where everything went. Each step is the same command a user would type, printed first.
"""
from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

from resnet.data import synthetic
from resnet.data.format import MANIFEST_NAME

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"


def _run(command: list[str]) -> None:
    print(f"\n$ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True)


def quickstart(out: Path, processes: int = 2, classes: int = 10, per_class: int = 120,
               overrides: list[str] = ()) -> Path:
    import torch

    gpus = torch.cuda.device_count()
    if gpus and processes > gpus:  # one process per GPU; on CPUs, as many as asked
        print(f"{gpus} GPU(s) visible: training with {gpus} process(es), one per GPU")
        processes = gpus
    out = out.resolve()
    source, packed, run_dir = out / "source", out / "data", out / "run"
    if not (packed / MANIFEST_NAME).is_file():
        print(f"generating {classes} classes x {per_class} training images in {source}")
        synthetic.write_imagefolder(source, classes, {"train": per_class, "val": per_class // 4},
                                    size=(80, 64), seed=0)
        _run([sys.executable, "-m", "resnet", "pack", str(source), str(packed),
              "--layout", "imagefolder", "--samples-per-shard", "200"])
    # --use_deepspeed is what makes `accelerate launch` start N processes on a CPU-only machine;
    # the DeepSpeed settings themselves come from our config (resnet/train/engine.py).
    _run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed",
          "--num_processes", str(processes),
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
          "-m", "resnet", "train", "--config", str(CONFIG),
          f"data.train={packed}", f"data.val={packed}", f"run.dir={run_dir}", *overrides])
    final = run_dir / "final"
    _run([sys.executable, "-m", "resnet", "eval", "--weights", str(final), "--data", str(packed)])
    exported = out / "export"
    _run([sys.executable, "-m", "resnet", "export", str(run_dir), str(exported)])
    print(f"\ndone.\n  packed shards:  {packed}\n  run directory:  {run_dir}"
          f"\n  checkpoints:    {run_dir / 'checkpoints'}\n  metrics:        "
          f"{run_dir / 'metrics.jsonl'}\n  final weights:  {final / 'model.safetensors'}"
          f"\n  report:         resnet report {run_dir}\n  exported (hf):  {exported}"
          f"\n\ntry next:\n  resnet predict {exported} {source / 'val'}\n"
          f"  resnet demo {exported}    (pip install -e \".[demo]\")")
    return final
