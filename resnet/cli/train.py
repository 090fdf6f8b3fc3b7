"""The training commands: `resnet train`, `resnet eval`, `resnet audit`, `resnet report` and
`resnet bench train`."""
from __future__ import annotations

import argparse
import json
import logging
import os

from resnet.cli.command import Command
from resnet.train import bench  # (stdlib only: its names and defaults, for the arguments)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file(s), applied in order over the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=3 optim.lr=0.2")


def _train(args: argparse.Namespace) -> int:
    from tqdm.contrib.logging import logging_redirect_tqdm

    from resnet.config import explicit_keys, load_config
    from resnet.logs import RateLimitedLogger, rank_from_env
    from resnet.train.launcher import adopt
    from resnet.train.trainer import train

    cfg = load_config(args.config, args.overrides)
    cfg, from_launcher = adopt(cfg, explicit_keys(args.config, args.overrides))
    if from_launcher:  # the first line says which settings the launcher chose
        RateLimitedLogger(rank_from_env()).info("from the launcher: " + "; ".join(from_launcher))
    # Library log lines print above the progress bar, not glued to its line.
    with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("DeepSpeed")]):
        final = train(cfg)
    if rank_from_env() == 0:
        print(f"final weights: {final}")
    return 0


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="final weights (.safetensors or run.dir/final) or a checkpoint folder")
    p.add_argument("--data", required=True, help="a packed data set (path or s3://)")
    p.add_argument("--split", default="val")
    p.add_argument("--arch", default="", help="default: from the run's config.yaml, else resnet50")
    p.add_argument("--image-size", type=int, default=0, help="default: from the run's config")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)


def _eval(args: argparse.Namespace) -> int:
    from resnet.logs import rank_from_env
    from resnet.train.evaluate import evaluate_weights

    result = evaluate_weights(args.weights, args.data, arch=args.arch,
                              image_size=args.image_size, batch_size=args.batch_size,
                              workers=args.workers, split=args.split)
    if rank_from_env() == 0:
        print(json.dumps(result))
    return 0


def _audit_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with audit.sample_keys=true")
    p.add_argument("more_run_dirs", nargs="*", metavar="MORE_RUN_DIRS",
                   help="the same run's run.dir on other nodes (node-local disks): each node "
                        "keeps its own ranks' audit files")


def _audit(args: argparse.Namespace) -> int:
    from resnet.train.audit import check_run

    lines, ok = check_run(args.run_dir, *args.more_run_dirs)
    print("\n".join(lines))
    print("every sample used at most once per epoch" if ok else "AUDIT FAILED")
    return 0 if ok else 1


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run.dir) of a run")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/report.png)")


def _report(args: argparse.Namespace) -> int:
    from resnet.report import write_report

    print(write_report(args.run_dir, args.out))
    return 0


def _bench_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", metavar="SHARDS", help="a packed data set: adds the end-to-end "
                   "rows (--e2e)")
    p.add_argument("--arch", default="resnet50")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--num-classes", type=int, default=1000, help="synthetic labels (with "
                   "--data: the data set's classes)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--configs", default=",".join(bench.DEFAULT_CONFIGS),
                   help=f"comma-separated synthetic ones, of: "
                        f"{', '.join(c for c in bench.CONFIGS if not c.startswith('e2e_'))}")
    p.add_argument("--compile", action="store_true", help=f"add {', '.join(bench.COMPILED)}")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend "
                   "(eager: a quick check that the compiled configurations build)")
    p.add_argument("--e2e", default="cpu,device", help="with --data: the data.decode modes "
                   "to run end to end (empty: none)")
    p.add_argument("--e2e-engine", default="deepspeed",
                   choices=sorted(set(bench.ENGINES.values())),
                   help="the engine of the end-to-end rows (resnet train's default: deepspeed)")
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 3) - 2),
                   help="loader workers end to end")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=int, default=900, help="seconds per configuration")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--child", metavar="CONFIG", help=argparse.SUPPRESS)


TRAIN = Command("train", "train (single process, accelerate launch or torchrun)",
                _train_arguments, _train)
EVAL = Command("eval", "top-1/top-5 of weights on a packed split", _eval_arguments, _eval)
AUDIT = Command("audit", "prove from run.dir/audit/ that each epoch used every sample exactly "
                "once, across restarts and world-size changes", _audit_arguments, _audit)
REPORT = Command("report", "draw a run's metrics.jsonl (loss, accuracy, lr, img/s) to a PNG",
                 _report_arguments, _report)
BENCH_TRAIN = Command("train", "training img/s: the model step per engine/precision/compile "
                      "on synthetic tensors, and end to end from shards",
                      _bench_train_arguments, bench.run)
