import subprocess
import sys

from resnet.cli import main


def test_help_lists_subcommands(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "env" in out


def test_env_prints_versions_and_devices():
    import importlib.metadata

    import torch

    out = subprocess.run([sys.executable, "-m", "resnet", "env"], capture_output=True,
                         text=True, check=True).stdout
    lines = out.splitlines()
    for name in ("torch", "torchvision", "accelerate", "deepspeed", "webdataset", "wandb"):
        assert f"{name:<12} {importlib.metadata.version(name)}" in lines, out
    assert f"cuda build   {torch.version.cuda or 'none'}" in lines
    devices = [line for line in lines if line.startswith(("cuda:", "devices "))]
    assert len(devices) == max(1, torch.cuda.device_count()), out


def test_console_script_help():
    out = subprocess.run(["resnet", "--help"], capture_output=True, text=True, check=True).stdout
    assert "COMMAND" in out


def test_datasets_folder_is_not_a_package():
    from pathlib import Path

    root = Path(__file__).parent.parent / "datasets"
    assert root.is_dir()
    assert not list(root.rglob("__init__.py"))
