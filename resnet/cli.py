"""The `resnet` command: each subcommand parses its arguments and calls one function.

Imports of heavy modules happen inside the handlers so that `resnet --help` stays fast.
To add a subcommand: write `_add_<name>(sub)` that registers its parser with
`set_defaults(handler=...)`, and list it in `COMMANDS`.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys


def _env(args: argparse.Namespace) -> int:
    from resnet.envinfo import environment_report

    print(environment_report())
    return 0


def _add_env(sub) -> None:
    p = sub.add_parser("env", help="print library versions and the visible accelerators")
    p.set_defaults(handler=_env)


def _report(args: argparse.Namespace) -> int:
    from resnet.report import ReportError, write_report

    try:
        out = write_report(args.run_dir, args.out)
    except ReportError as exc:
        print(f"resnet report: error: {exc}", file=sys.stderr)
        return 1
    print(out)
    return 0


def _add_report(sub) -> None:
    p = sub.add_parser(
        "report", help="draw a run's metrics.jsonl (loss, accuracy, lr, img/s) to a PNG"
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run.dir) of a run")
    p.add_argument("--out", metavar="PNG", help="output file (default: RUN_DIR/report.png)")
    p.set_defaults(handler=_report)


def _pack(args: argparse.Namespace) -> int:
    from resnet.data.layouts import LayoutError
    from resnet.data.pack import PackError, PackOptions, pack
    from resnet.data.storage import StorageError

    splits = tuple(s for s in (args.splits or "").split(",") if s)
    opts = PackOptions(samples_per_shard=args.samples_per_shard, max_side=args.max_side,
                       quality=args.quality, workers=args.workers, seed=args.seed,
                       splits=splits, strict=args.strict, fresh=args.fresh)
    try:
        result = pack(args.src, args.dest, args.layout, opts, progress=not args.quiet)
    except (LayoutError, PackError, StorageError, ValueError) as exc:
        print(f"resnet pack: error: {exc}", file=sys.stderr)
        return 1
    m = result.manifest
    for s in m.skipped:
        print(f"skipped {s['split']}/{s['path']}: {s['reason']}", file=sys.stderr)
    rate = result.files / max(result.seconds, 1e-9)
    mbps = result.in_bytes / 1e6 / max(result.seconds, 1e-9)
    counts = ", ".join(f"{n} {info.samples} samples in {len(info.shards)} shards"
                       for n, info in m.splits.items())
    print(f"packed {args.dest}: {counts}; {len(m.skipped)} skipped; "
          f"{result.shards_written} shards written, {result.shards_kept} kept; "
          f"{rate:.0f} img/s, {mbps:.1f} MB/s; fingerprint {m.fingerprint[:16]}")
    return 0


def _add_pack(sub) -> None:
    p = sub.add_parser("pack", help="pack an image data set into WebDataset shards + manifest")
    p.add_argument("src", help="the downloaded source tree")
    p.add_argument("dest", help="output: a local directory or s3://bucket/prefix")
    p.add_argument("--layout", required=True, choices=["imagenet", "tinyimagenet", "imagefolder"])
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--max-side", type=int, default=0,
                   help="downscale so the longer side is at most N px (0: keep)")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded images")
    p.add_argument("--workers", type=int, default=0, help="processes (0: one per CPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample-to-shard order")
    p.add_argument("--splits", default="", help="comma-separated, e.g. train,val "
                   "(default: train,val; imagefolder: every folder)")
    p.add_argument("--strict", action="store_true", help="fail if any source file is skipped")
    p.add_argument("--fresh", action="store_true",
                   help="rewrite every shard, ignoring those an earlier run completed")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_pack)


def _verify(args: argparse.Namespace) -> int:
    from resnet.data.format import ManifestError
    from resnet.data.storage import StorageError
    from resnet.data.verify import verify

    try:
        report = verify(args.dest, decode=args.decode, workers=args.workers,
                        progress=not args.quiet)
    except (ManifestError, StorageError) as exc:
        print(f"resnet verify: error: {exc}", file=sys.stderr)
        return 1
    for line in report.warnings:
        print(f"warning: {line}", file=sys.stderr)
    for line in report.problems:
        print(f"MISMATCH {line}", file=sys.stderr)
    verdict = "OK" if report.ok else f"FAILED: {len(report.problems)} problem(s)"
    print(f"verify {args.dest}: {report.shards} shards, {report.samples} samples: {verdict}")
    return 0 if report.ok else 1


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check every shard of a packed data set against its manifest")
    p.add_argument("dest", help="a packed data set: local directory, s3:// or http(s)://")
    p.add_argument("--decode", action="store_true", help="also decode every image")
    p.add_argument("--workers", type=int, default=4, help="shards checked in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=_verify)


def _train(args: argparse.Namespace) -> int:
    from resnet.checkpoint.errors import CheckpointError, ResumeError
    from resnet.config import ConfigError, explicit_keys, load_config
    from resnet.logs import RateLimitedLogger, rank_from_env
    from resnet.train.engine import SetupError
    from resnet.train.launcher import adopt

    try:
        cfg = load_config(args.config, args.overrides)
        cfg, from_launcher = adopt(cfg, explicit_keys(args.config, args.overrides))
        if from_launcher:  # the first line says which settings the launcher chose
            RateLimitedLogger(rank_from_env()).info("from the launcher: "
                                                    + "; ".join(from_launcher))
        from resnet.checkpoint.diskspace import CheckpointSpaceError
        from tqdm.contrib.logging import logging_redirect_tqdm

        from resnet.train.trainer import TrainingError, train

        # Library log lines print above the progress bar, not glued to its line.
        with logging_redirect_tqdm(loggers=[logging.root, logging.getLogger("DeepSpeed")]):
            final = train(cfg)
    except (ConfigError, SetupError, ResumeError) as exc:  # bad input (before CheckpointError)
        print(f"resnet train: error: {exc}", file=sys.stderr)
        return 2
    except (TrainingError, CheckpointError, CheckpointSpaceError) as exc:
        print(f"resnet train: {exc}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"final weights: {final}")
    return 0


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train (single process, accelerate launch or torchrun)")
    p.add_argument("--config", action="append", default=[], metavar="YAML",
                   help="config file(s), applied in order over the defaults")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted overrides, e.g. train.epochs=3 optim.lr=0.2")
    p.set_defaults(handler=_train)


def _eval(args: argparse.Namespace) -> int:
    import json

    from resnet.data.format import ManifestError
    from resnet.train.evaluate import evaluate_weights

    try:
        result = evaluate_weights(args.weights, args.data, arch=args.arch,
                                  image_size=args.image_size, batch_size=args.batch_size,
                                  workers=args.workers, split=args.split)
    except (FileNotFoundError, ManifestError, ValueError) as exc:
        print(f"resnet eval: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result))
    return 0


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="top-1/top-5 of weights on a packed split")
    p.add_argument("--weights", required=True,
                   help="final weights (.safetensors or run.dir/final) or a checkpoint folder")
    p.add_argument("--data", required=True, help="a packed data set (path or s3://)")
    p.add_argument("--split", default="val")
    p.add_argument("--arch", default="", help="default: from the run's config.yaml, else resnet50")
    p.add_argument("--image-size", type=int, default=0, help="default: from the run's config")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=2)
    p.set_defaults(handler=_eval)


def _quickstart(args: argparse.Namespace) -> int:
    import shlex
    import subprocess
    from pathlib import Path

    from resnet.quickstart import quickstart

    try:
        quickstart(Path(args.dir), processes=args.processes, overrides=args.overrides,
                   verbose=args.verbose)
    except subprocess.CalledProcessError as exc:
        print(f"resnet quickstart: `{shlex.join(exc.cmd)}` failed (exit status "
              f"{exc.returncode})", file=sys.stderr)
        return 1
    return 0


def _add_quickstart(sub) -> None:
    p = sub.add_parser("quickstart", help="generate data, pack, train 2 processes "
                       "(DeepSpeed on CPU), evaluate: the whole product in ~2 minutes")
    p.add_argument("--dir", default="runs/quickstart", help="where everything goes")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="show the libraries' output too "
                   "(also RESNET_LOG_LEVEL=debug); it always goes to RUN_DIR/console.log")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides")
    p.set_defaults(handler=_quickstart)


def _bench_data(args: argparse.Namespace) -> int:
    from resnet.data.bench import run

    return run(args)


def _bench_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from resnet.train.bench import check_arguments, run

    check_arguments(parser, args)
    return run(args)


def _add_bench(sub) -> None:
    from resnet.train.bench import add_arguments

    p = sub.add_parser("bench", help="benchmarks (`resnet bench data SHARDS`, "
                       "`resnet bench train [--data SHARDS]`)")
    kinds = p.add_subparsers(dest="bench", metavar="KIND")
    t = kinds.add_parser("train", help="training img/s: the model step per engine/precision/"
                         "compile on synthetic tensors, and end to end from shards")
    add_arguments(t)
    t.set_defaults(handler=lambda args: _bench_train(t, args))
    d = kinds.add_parser("data", help="shard loader img/s vs ImageFolder + PIL, or resume cost")
    d.add_argument("shards", metavar="SHARDS", help="a packed data set (local, s3://, http(s)://)")
    d.add_argument("--split", default="train")
    d.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    d.add_argument("--batch-size", type=int, default=64)
    d.add_argument("--steps", type=int, default=40, help="timed batches")
    d.add_argument("--warmup", type=int, default=4, help="batches before timing starts")
    d.add_argument("--image-size", type=int, default=224)
    d.add_argument("--no-baseline", action="store_true", help="time the shard loader only")
    d.add_argument("--repeats", type=int, default=1,
                   help="run every pipeline this many times in turn; report medians")
    d.add_argument("--compare-decode-jpeg", action="store_true",
                   help="also time the loader decoding with torchvision.io.decode_jpeg only")
    d.add_argument("--resume-cost", action="store_true",
                   help="time to the first batch: fresh vs resumed at 50%% of the epoch")
    d.add_argument("--cache-dir", default="", help="a node-local shard cache for a remote "
                   "SHARDS (data.cache_dir); the S3 bytes and requests are printed either way")
    d.set_defaults(handler=_bench_data)


def _audit(args: argparse.Namespace) -> int:
    from resnet.config import ConfigError
    from resnet.data.format import ManifestError
    from resnet.train.audit import check_run

    try:
        lines, ok = check_run(args.run_dir, *args.more_run_dirs)
    except (FileNotFoundError, ConfigError, ManifestError) as exc:
        print(f"resnet audit: error: {exc}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    print("every sample used at most once per epoch" if ok else "AUDIT FAILED")
    return 0 if ok else 1


def _add_audit(sub) -> None:
    p = sub.add_parser("audit", help="prove from run.dir/audit/ that each epoch used every "
                       "sample exactly once, across restarts and world-size changes")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run trained with audit.sample_keys=true")
    p.add_argument("more_run_dirs", nargs="*", metavar="MORE_RUN_DIRS",
                   help="the same run's run.dir on other nodes (node-local disks): each node "
                        "keeps its own ranks' audit files")
    p.set_defaults(handler=_audit)


def _export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resnet.deliver.export import export
    from resnet.deliver.hub import PushError, push_to_hub
    from resnet.deliver.source import resolve

    try:
        out = export(resolve(args.weights), Path(args.out), args.format, args.push_to_hub)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"resnet export: error: {exc}", file=sys.stderr)
        return 2
    print(f"exported ({args.format}): {out}")
    if args.push_to_hub:
        try:
            url = push_to_hub(Path(args.out), args.push_to_hub, private=args.private,
                              revision=args.revision, create_pr=args.create_pr)
        except PushError as exc:
            print(f"resnet export: {exc}", file=sys.stderr)
            return 1
        print(f"pushed: {url}")
    return 0


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="weights -> timm's Hub format (+ push), torchvision or ONNX")
    p.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS",
                   help="a run dir, its final/, a checkpoint folder or a .safetensors file")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--format", default="hf", choices=["hf", "torchvision", "onnx"])
    p.add_argument("--push-to-hub", default="", metavar="ORG/NAME",
                   help="then upload OUT to this Hugging Face model repo (hf format)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default="", help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="push as a pull request")
    p.set_defaults(handler=_export)


def _add_weights(p) -> None:
    p.add_argument("weights", metavar="WEIGHTS",
                   help="a run dir, checkpoint, exported folder or hf-hub:ORG/NAME")


def _predict(args: argparse.Namespace) -> int:
    from resnet.deliver.predict import run_predict

    try:
        return run_predict(args.weights, args.images, topk=args.topk, as_json=args.json,
                           batch_size=args.batch_size, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"resnet predict: error: {exc}", file=sys.stderr)
        return 2


def _add_predict(sub) -> None:
    p = sub.add_parser("predict", help="top-k classes of images, prepared as the run evaluated")
    _add_weights(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.set_defaults(handler=_predict)


def _demo(args: argparse.Namespace) -> int:
    from resnet.deliver.demo import launch

    try:
        launch(args.weights, port=args.port, share=args.share, device=args.device)
    except (FileNotFoundError, ValueError) as exc:
        print(f"resnet demo: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="a Gradio web app: upload an image, see the top-5 classes")
    _add_weights(p)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link too")
    p.add_argument("--device", default="cpu")
    p.set_defaults(handler=_demo)


COMMANDS = [_add_env, _add_report, _add_pack, _add_verify, _add_train, _add_eval,
            _add_quickstart, _add_bench, _add_audit, _add_export, _add_predict, _add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="resnet",
        description="Pack ImageNet-style data sets into shards and train ResNets on them "
        "across GPUs and nodes.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in COMMANDS:
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from resnet.logs import configure

    configure()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
