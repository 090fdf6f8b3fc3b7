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


# -- the exit-status table (README.md, "Exit status"): one case per row ----------------------
def _run(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    return code, capsys.readouterr().err


def test_a_bad_config_is_bad_input(capsys):
    code, err = _run(capsys, "train", "train.log_every_steps=0")
    assert code == 2 and "resnet train: error: train.log_every_steps=0: must be at least 1" in err
    code, err = _run(capsys, "train", "checkpoint.keep=0")
    assert code == 2 and "resnet train: error: checkpoint.keep=0: must be at least 1" in err
    assert "Traceback" not in err


def test_a_setup_error_is_bad_input(capsys, tmp_path):
    code, err = _run(capsys, "train", f"data.train={tmp_path / 'nowhere'}",
                     f"run.dir={tmp_path / 'run'}")
    assert code == 2 and "resnet train: error: data.train=" in err and "no such directory" in err


def test_a_missing_manifest_is_bad_input(capsys, tmp_path):
    code, err = _run(capsys, "verify", str(tmp_path), "--quiet")
    assert code == 2 and "resnet verify: error: no manifest.json" in err


def test_a_source_tree_of_another_layout_is_bad_input(capsys, tmp_path):
    (tmp_path / "src" / "train").mkdir(parents=True)
    code, err = _run(capsys, "pack", str(tmp_path / "src"), str(tmp_path / "out"), "--layout",
                     "tinyimagenet", "--quiet")
    assert code == 2 and "resnet pack: error:" in err and "wnids.txt" in err


def test_a_missing_file_is_bad_input(capsys, tmp_path):
    code, err = _run(capsys, "eval", "--weights", str(tmp_path / "nowhere"), "--data",
                     str(tmp_path))
    assert code == 2 and "resnet eval: error: --weights" in err


def test_a_bad_argument_is_bad_input(capsys):
    code, err = _run(capsys, "bench", "train", "--steps", "1", "--repeats", "1")
    assert code == 2 and "resnet bench train: error: --steps x --repeats" in err


def test_a_storage_failure_is_a_failure(capsys, s3_server, tiny_imagefolder):
    code, err = _run(capsys, "pack", str(tiny_imagefolder), "s3://no-such-bucket/x",
                     "--layout", "imagefolder", "--quiet")
    assert code == 1 and "resnet pack: error:" in err and "does not exist" in err


def test_a_report_failure_is_a_failure(capsys, tmp_path):
    code, err = _run(capsys, "report", str(tmp_path))
    assert code == 1 and "resnet report: error:" in err


def test_an_interrupt_is_128_plus_the_signal(capsys, monkeypatch):
    import resnet.envinfo

    def interrupted() -> str:
        raise KeyboardInterrupt

    monkeypatch.setattr(resnet.envinfo, "environment_report", interrupted)
    code, err = _run(capsys, "env")
    assert code == 130 and "resnet env: error: interrupted" in err


def test_each_product_error_has_its_row():
    from resnet.cli import exit_status
    from resnet.config import ConfigError
    from resnet.data.format import ManifestError
    from resnet.data.layouts import LayoutError
    from resnet.data.pack import PackError
    from resnet.data.storage import StorageError
    from resnet.deliver.hub import PushError
    from resnet.report import ReportError
    from resnet.checkpoint.diskspace import CheckpointSpaceError
    from resnet.checkpoint.errors import CheckpointError, ResumeError
    from resnet.train.engine import SetupError
    from resnet.train.trainer import TrainingError

    bad_input = [ConfigError, SetupError, ResumeError, ManifestError, LayoutError,
                 FileNotFoundError, ValueError]
    failure = [StorageError, TrainingError, CheckpointError, CheckpointSpaceError, ReportError,
               PackError, PushError]
    assert [exit_status(kind("x")) for kind in bad_input] == [2] * len(bad_input)
    assert [exit_status(kind("x")) for kind in failure] == [1] * len(failure)
    assert exit_status(subprocess.CalledProcessError(3, ["resnet", "pack"])) == 1
    assert exit_status(KeyboardInterrupt()) == 130
    assert exit_status(TypeError("a bug")) is None  # not a product error: its traceback shows


def test_a_failing_command_reports_without_loading_the_training_stack(tmp_path):
    """The exit table looks exceptions up among the loaded modules: a failing `resnet report`
    must not import torch (seconds, and an ImportError there would hide the real error)."""
    script = ("import sys\n"
              "from resnet.cli import main\n"
              f"code = main(['report', {str(tmp_path / 'no-run')!r}])\n"
              "print(code, 'torch' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.stdout.split() == ["1", "False"], result.stdout + result.stderr
    assert "resnet report: error:" in result.stderr
