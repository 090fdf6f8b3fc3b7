"""Run by tests/test_compile_once.py in a process of its own (one Accelerator per process):
train with train.compile=true through a counting Dynamo backend (eager underneath: it runs on
a CPU in seconds) and print how often Dynamo compiled, up to the end of the training steps.

    python tests/compile_count_helper.py RUN_DIR key=value ...

Prints one line: COMPILE_COUNTS {"graphs": graphs handed to the backend, "graph_breaks": ...,
"frames": frames Dynamo compiled (a recompile after a failed guard is one more), "steps":
training steps run}.
"""
from __future__ import annotations

import json
import sys

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from resnet.config import load_config
from resnet.train import trainer as T

GRAPHS: list[int] = []  # node count of each graph handed to the backend


@torch._dynamo.register_backend(name="counting_eager")
def counting_eager(gm: torch.fx.GraphModule, example_inputs):
    GRAPHS.append(len(gm.graph.nodes))
    return gm.forward


def _counts(steps: int) -> dict:
    return {"graphs": len(GRAPHS), "graph_breaks": sum(counters["graph_break"].values()),
            "frames": counters["frames"]["ok"], "steps": steps}


def main(run_dir: str, *overrides: str) -> None:
    if "deepspeed.engine=ddp" in overrides:
        # DDP's optimizer splits the one compiled graph into a graph per gradient bucket (3
        # for ResNet-18) to overlap communication: not a recompile. Unsplit, one compile is
        # one graph, which is what this counts.
        torch._dynamo.config.optimize_ddp = False
    real_finish = T.Trainer.finish
    seen = {}

    def finish(self):  # the training steps are over; evaluation and export come next
        seen.update(_counts(self.progress.step))
        return real_finish(self)

    T.Trainer.finish = finish
    T.train(load_config([], [f"run.dir={run_dir}", "train.compile=true",
                             "train.compile_backend=counting_eager", *overrides]))
    print("COMPILE_COUNTS " + json.dumps(seen), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
