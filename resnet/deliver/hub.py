"""timm's Hub format, and pushing a folder to the Hugging Face Hub.

The folder: model.safetensors (torchvision/timm key names), config.json (what timm's
`create_model("local-dir:...")` and transformers' timm wrapper read), README.md (model card),
examples/ (a few validation images), space/ (the Gradio app as a Space).
"""
from __future__ import annotations

import json
import shlex
import shutil
from pathlib import Path

from resnet.data.augment import AugmentParams
from resnet.data.device import MEAN, STD
from resnet.deliver import app as app_module
from resnet.deliver.source import HUB_CONFIG, Trained, data_on_this_machine

EXAMPLES = "examples"
SPACE = "space"
# What the Space installs; torch's CPU wheel is enough for a demo.
SPACE_REQUIREMENTS = ["torch", "timm>=1.0", "gradio>=5", "safetensors", "pillow", "pyyaml"]


class PushError(RuntimeError):
    """The push failed; the message says why and how to retry (the folder is kept)."""


def pretrained_cfg(arch: str, num_classes: int, augment: AugmentParams) -> dict:
    """The evaluation preprocessing of the run, in timm's terms: resize the shorter side to
    floor(size / crop_pct) (bilinear, antialiased), center crop `size`, ImageNet mean/std."""
    size = augment.image_size
    return {
        "architecture": arch, "custom_load": False,
        "input_size": [3, size, size], "fixed_input_size": False,
        "interpolation": "bilinear", "crop_pct": augment.eval_crop_ratio, "crop_mode": "center",
        "mean": [round(v, 6) for v in (MEAN / 255).tolist()],
        "std": [round(v, 6) for v in (STD / 255).tolist()],
        "num_classes": num_classes, "pool_size": [max(1, size // 32)] * 2,
        "first_conv": "conv1", "classifier": "fc",
    }


def hub_config(trained: Trained) -> dict:
    n = trained.num_classes
    return {
        "architecture": trained.arch,
        "num_classes": n,
        "num_features": trained.state["fc.weight"].shape[1],
        "global_pool": "avg",
        "label_names": trained.class_names,
        "pretrained_cfg": pretrained_cfg(trained.arch, n, trained.augment),
    }


def write_config(trained: Trained, out: Path) -> Path:
    path = out / HUB_CONFIG
    path.write_text(json.dumps(hub_config(trained), indent=2) + "\n")
    return path


def write_examples(trained: Trained, out: Path, count: int = 4) -> list[Path]:
    """A few validation images of distinct classes from the run's packed data set, named after
    their class; none if the data set is out of reach (the demo then shows none)."""
    from resnet.data import storage
    from resnet.data.format import ManifestError, load_manifest
    from resnet.data.shardio import ShardError, read_samples

    source = data_on_this_machine(
        (trained.cfg.data.val or trained.cfg.data.train) if trained.cfg else "")
    try:
        manifest = load_manifest(source) if source else None
        split = "val" if manifest and "val" in manifest.splits else "train"
        shard = manifest.split(split).shards[0] if manifest else None
    except (ManifestError, OSError, IndexError):
        return []
    written, seen = [], set()
    if shard is None:
        return written
    try:
        samples = read_samples(storage.join(source, shard.name), set(range(min(shard.samples, 64))),
                               shard_bytes=shard.bytes)
        for _, _, files in samples:
            label = int(files.get("cls", b"-1"))
            if label in seen or not 0 <= label < trained.num_classes or "jpg" not in files:
                continue
            seen.add(label)
            (out / EXAMPLES).mkdir(parents=True, exist_ok=True)
            path = out / EXAMPLES / f"{len(written):02d}-{_safe(trained.class_names[label])}.jpg"
            path.write_bytes(files["jpg"])
            written.append(path)
            if len(written) == count:
                break
    except (ShardError, OSError, ValueError):
        pass  # examples are a nicety: never fail an export for them
    return written


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:40]


def write_space(out: Path, repo_id: str = "") -> Path:
    """space/: app.py (this package's app module, copied as it is), requirements.txt, a Space
    README, and the examples; it runs on the folder above it or on the pushed repo."""
    space = out / SPACE
    space.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(app_module.__file__, space / "app.py")
    (space / "requirements.txt").write_text("\n".join(SPACE_REQUIREMENTS) + "\n")
    if repo_id:
        (space / "model_id.txt").write_text(repo_id + "\n")
    models = f"models:\n- {repo_id}\n" if repo_id else ""
    (space / "README.md").write_text(
        f"---\ntitle: {repo_id.split('/')[-1] or 'resnet demo'}\nsdk: gradio\n"
        f"app_file: app.py\n{models}---\n\nThe `resnet demo` app for "
        f"{repo_id or 'the model in the folder above'}.\n")
    if (out / EXAMPLES).is_dir():
        shutil.copytree(out / EXAMPLES, space / EXAMPLES, dirs_exist_ok=True)
    return space


def retry_command(folder: Path, repo_id: str, private: bool, revision: str,
                  create_pr: bool) -> str:
    """The `hf upload` command that pushes the same folder later (it creates the repo too)."""
    flags = (["--private"] if private else []) + (["--revision", revision] if revision else []) \
        + (["--create-pr"] if create_pr else [])
    return shlex.join(["hf", "upload", repo_id, str(folder), ".", *flags])


def push_to_hub(folder: Path, repo_id: str, *, private: bool = False, revision: str = "",
                create_pr: bool = False) -> str:
    """create_repo + upload_folder with the user's token; returns the commit's URL.

    Any failure (no token, no network, refused) becomes a PushError naming the retry command.
    """
    from huggingface_hub import HfApi, get_token

    retry = retry_command(folder, repo_id, private, revision, create_pr)
    if get_token() is None:
        raise PushError(f"no Hugging Face token (run `hf auth login` or set HF_TOKEN); the "
                        f"folder {folder} is complete; push it later with:\n  {retry}")
    api = HfApi()
    try:
        api.create_repo(repo_id, exist_ok=True, private=private)
        if revision and not create_pr:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                   revision=revision or None, create_pr=create_pr,
                                   commit_message=f"Upload {folder.name} (resnet export)")
    except Exception as exc:  # huggingface_hub and requests raise many types; all mean "retry"
        raise PushError(f"push to {repo_id} failed: {type(exc).__name__}: {exc}; the folder "
                        f"{folder} is complete; push it later with:\n  {retry}") from None
    return str(getattr(commit, "pr_url", None) or getattr(commit, "commit_url", commit))
