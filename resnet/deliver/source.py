"""Where trained weights come from, and everything needed to use them the way the run did.

WEIGHTS may be a run directory (its final/ weights, else its newest checkpoint), a final/
folder, a checkpoint folder, a .safetensors file, a folder in timm's Hub format (what
`resnet export` writes), or `hf-hub:ORG/NAME`. Each becomes one `Trained`: the state dict, the
architecture, class names and the evaluation preprocessing of the run.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from resnet.config import ARCHS
from resnet.data import storage
from resnet.data.augment import AugmentParams
from resnet.model import ResNet, build_model
from resnet.runfolder import (CLASSES_FILE, CONFIG_FILE, FINAL_DIR, METRICS_FILE, STATE_FILE,
                              WEIGHTS_FILE, latest_checkpoint, newest_weights, read_state,
                              run_dir_of)
from resnet.weights import load_weights, run_config

HUB_PREFIX = "hf-hub:"
HUB_CONFIG = "config.json"


@dataclass
class Trained:
    state: dict[str, torch.Tensor]
    arch: str
    class_names: list[str]
    augment: AugmentParams
    weights: Path  # the file or folder the state came from
    run_dir: Path | None = None
    cfg: object | None = None  # resnet.config.Config of the run, when known
    class_ids: list[str] = field(default_factory=list)
    layout: str = ""  # the packed data set's layout (imagenet, tinyimagenet, imagefolder)
    card: dict = field(default_factory=dict)  # an exported folder's headline (metrics, data)

    @property
    def num_classes(self) -> int:
        return self.state["fc.weight"].shape[0]

    def model(self) -> ResNet:
        """Our ResNet with the weights, in eval mode (BatchNorm uses its running statistics)."""
        model = build_model(self.arch, self.num_classes)
        model.load_state_dict(self.state, strict=True)
        return model.eval()

    def val_metrics(self) -> dict:
        """The run's last evaluation (val_top1, val_top5, step, ...) or {} if never evaluated."""
        return self.card.get("metrics") or last_val_metrics(self.run_dir)

    def trainer_state(self) -> dict:
        """The checkpoint's trainer_state.json (step, epoch, ...) when the weights are one."""
        folder = self.weights if self.weights.is_dir() else self.weights.parent
        if not (folder / STATE_FILE).is_file() and self.run_dir is not None:
            # final/ has none: the run's newest checkpoint holds the state it was written from
            folder = latest_checkpoint(self.run_dir) or folder
        return read_state(folder) if (folder / STATE_FILE).is_file() else {}


def infer_arch(state: dict[str, torch.Tensor]) -> str:
    """The architecture whose state-dict keys the weights have, for weights that travel
    without their run's config.yaml (each candidate is built on the meta device: no memory)."""
    with torch.device("meta"):
        for name in ARCHS:
            if build_model(name).state_dict().keys() == state.keys():
                return name
    raise ValueError(f"the weights are no ResNet this package builds ({len(state)} tensors, "
                     f"first {next(iter(state), 'none')!r})")


def last_val_metrics(run_dir: Path | None) -> dict:
    """The last line of run.dir/metrics.jsonl that carries val_top1, plus the world size seen
    in training lines (img_per_s / img_per_s_per_device) and whether a GPU was used."""
    path = run_dir / METRICS_FILE if run_dir else None
    if path is None or not path.is_file():
        return {}
    last, train = {}, {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
        if "val_top1" in record:
            last = record
        elif record.get("img_per_s_per_device"):
            train = record
    if train:
        last = {**last, "processes": round(train["img_per_s"] / train["img_per_s_per_device"]),
                "gpu": "gpu_mem_gb" in train}
    return last


def data_on_this_machine(location: str) -> str:
    """A data set named by a run's config.yaml, if it is a path on this machine ("" if it is a
    URL). Weights and their folder may come from anyone: following a URL from their config
    would send requests, with this machine's credentials, wherever its author chose."""
    return "" if storage.is_remote(location) else location


def _classes_of_run(weights: Path, run_dir: Path | None, cfg) -> tuple[list[dict], str]:
    """[{index, id, name}] and the layout: classes.json beside the weights or in the run's final/,
    else the packed data set's manifest (a checkpoint mid-run has no classes.json yet)."""
    from resnet.data.format import ManifestError, load_manifest

    folder = weights if weights.is_dir() else weights.parent
    layout = ""
    candidates = [folder / CLASSES_FILE] + ([run_dir / FINAL_DIR / CLASSES_FILE] if run_dir else [])
    classes = next((json.loads(p.read_text()) for p in candidates if p.is_file()), None)
    if cfg is not None and data_on_this_machine(cfg.data.train):
        try:
            manifest = load_manifest(cfg.data.train)
            layout = manifest.layout
            classes = classes or [{"index": c.index, "id": c.id, "name": c.name}
                                  for c in manifest.classes]
        except (ManifestError, OSError):
            pass  # the data set moved or is unreachable: the class list may still be known
    return classes or [], layout


def _from_run(path: Path) -> Trained:
    state = load_weights(path)
    folder = path if path.is_dir() else path.parent
    # The folder holding config.yaml above the weights, not cfg.run.dir: that is the path as
    # the run saw it (maybe relative, maybe on another machine).
    run_dir = run_dir_of(folder.resolve())
    cfg = run_config(folder.resolve())
    classes, layout = _classes_of_run(path, run_dir, cfg)
    n = state["fc.weight"].shape[0]
    names = [c["name"] for c in classes][:n] if len(classes) >= n else \
        [f"class {i}" for i in range(n)]
    ids = [c["id"] for c in classes][:n] if len(classes) >= n else names
    return Trained(state, cfg.model.arch if cfg else infer_arch(state), names,
                   AugmentParams.for_eval(cfg.data) if cfg else AugmentParams(), path,
                   run_dir, cfg, ids, layout)


def _from_hub_folder(path: Path, config: dict) -> Trained:
    """A folder `resnet export --format hf` wrote (or any timm ResNet in that format)."""
    from resnet.deliver.app import read_card_headline

    pre = config["pretrained_cfg"]
    augment = AugmentParams(image_size=int(pre["input_size"][-1]),
                            eval_crop_ratio=float(pre.get("crop_pct", 0.875)))
    state = load_weights(path)
    n = state["fc.weight"].shape[0]
    names = list(config.get("label_names") or [f"class {i}" for i in range(n)])
    return Trained(state, config["architecture"], names, augment, path,
                   class_ids=list(config.get("label_ids") or names),
                   card=read_card_headline(path))


def resolve(weights: str) -> Trained:
    """WEIGHTS as the commands accept it -> Trained. FileNotFoundError names what is missing."""
    if weights.startswith(HUB_PREFIX):
        from huggingface_hub import snapshot_download

        weights = snapshot_download(weights[len(HUB_PREFIX):])
    path = Path(weights)
    if not path.exists():
        raise FileNotFoundError(f"{weights}: no such file or folder")
    if path.is_dir() and (path / HUB_CONFIG).is_file():
        config = json.loads((path / HUB_CONFIG).read_text())
        if "pretrained_cfg" in config:
            return _from_hub_folder(path, config)
    if path.is_dir() and (path / CONFIG_FILE).is_file() and not (path / WEIGHTS_FILE).exists():
        path = newest_weights(path)
    return _from_run(path)
