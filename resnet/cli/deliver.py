"""The commands that hand trained weights on: `resnet export`, `resnet predict`,
`resnet demo`."""
from __future__ import annotations

import argparse
from pathlib import Path

from resnet.cli.command import Command


def _export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="RUN_DIR_OR_WEIGHTS",
                   help="a run dir, its final/, a checkpoint folder or a .safetensors file")
    p.add_argument("out", metavar="OUT", help="the folder to write")
    p.add_argument("--format", default="hf", choices=["hf", "torchvision", "onnx"])
    p.add_argument("--push-to-hub", default="", metavar="ORG/NAME",
                   help="then upload OUT to this Hugging Face model repo (hf format)")
    p.add_argument("--private", action="store_true", help="create the repo private")
    p.add_argument("--revision", default="", help="branch to push to")
    p.add_argument("--create-pr", action="store_true", help="push as a pull request")


def _export(args: argparse.Namespace) -> int:
    from resnet.deliver.export import export
    from resnet.deliver.hub import push_to_hub
    from resnet.deliver.source import resolve

    out = export(resolve(args.weights), Path(args.out), args.format, args.push_to_hub)
    print(f"exported ({args.format}): {out}")
    if args.push_to_hub:
        url = push_to_hub(Path(args.out), args.push_to_hub, private=args.private,
                          revision=args.revision, create_pr=args.create_pr)
        print(f"pushed: {url}")
    return 0


def _weights_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("weights", metavar="WEIGHTS",
                   help="a run dir, checkpoint, exported folder or hf-hub:ORG/NAME")


def _predict_arguments(p: argparse.ArgumentParser) -> None:
    _weights_argument(p)
    p.add_argument("images", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--topk", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _predict(args: argparse.Namespace) -> int:
    from resnet.deliver.predict import run_predict

    return run_predict(args.weights, args.images, topk=args.topk, as_json=args.json,
                       batch_size=args.batch_size, device=args.device)


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    _weights_argument(p)
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="a public gradio.live link too")
    p.add_argument("--device", default="cpu")


def _demo(args: argparse.Namespace) -> int:
    from resnet.deliver.demo import launch

    launch(args.weights, port=args.port, share=args.share, device=args.device)
    return 0


EXPORT = Command("export", "weights -> timm's Hub format (+ push), torchvision or ONNX",
                 _export_arguments, _export)
PREDICT = Command("predict", "top-k classes of images, prepared as the run evaluated",
                  _predict_arguments, _predict)
DEMO = Command("demo", "a Gradio web app: upload an image, see the top-5 classes",
               _demo_arguments, _demo)
