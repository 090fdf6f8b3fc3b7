"""`resnet train` with deterministic GPU kernels, for bitwise resume checks on a GPU.

    torchrun --standalone --nproc-per-node 1 benchmarks/deterministic_train.py --config ... k=v

cuDNN picks non-deterministic convolution algorithms by default (and autotuning may pick
different ones per process), so two identical GPU runs differ in the last bits and a bitwise
comparison of a resumed run with an uninterrupted one would say nothing. This wrapper pins
deterministic algorithms before the trainer starts; the product itself does not (it costs
speed). It also seeds the initial weights (see below). Arguments are those of `resnet train`.
"""
from __future__ import annotations

import os
import sys

# cuBLAS needs a fixed workspace for deterministic results; must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

import torch  # noqa: E402

torch.backends.cudnn.deterministic = True
torch.backends.cudnn.benchmark = False
# warn_only: an op without a deterministic CUDA kernel warns (the warning names it) instead
# of stopping the run; the bitwise comparison afterwards shows whether it mattered.
torch.use_deterministic_algorithms(True, warn_only=True)
# The trainer does not seed the model's initialisation (config `seed` only orders the data),
# so two runs of one command start from different weights. Seeding the global generator here,
# before the trainer's identical sequence of calls, gives every run the same initial weights.
torch.manual_seed(0)

from resnet.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
