"""`resnet export`: timm's Hub format (timm and transformers load it, same logits), the model
card, torchvision and ONNX formats, from final/, a checkpoint and a run dir, and the push to
the Hub against a recording stand-in for huggingface_hub.HfApi."""
from __future__ import annotations

import json
import os

import pytest
import torch
import yaml

import deliver_helper as dh
from deliver_helper import exported, run  # noqa: F401 (fixtures)
from resnet.cli import main
from resnet.deliver import app as app_module
from resnet.deliver.hub import hub_config
from resnet.deliver.source import resolve

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub


def _ours(run, x):
    with torch.no_grad():
        return resolve(str(run)).model()(x)


def test_timm_and_transformers_load_the_folder_with_our_logits(run, exported):
    timm = pytest.importorskip("timm")
    transformers = pytest.importorskip("transformers")
    x = torch.randn(3, 3, dh.SIZE, dh.SIZE, generator=torch.Generator().manual_seed(0))
    want = _ours(run, x)
    model = timm.create_model(f"local-dir:{exported}", pretrained=True).eval()
    hf = transformers.AutoModelForImageClassification.from_pretrained(str(exported)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, atol=1e-5, rtol=0)
        torch.testing.assert_close(hf(pixel_values=x).logits, want, atol=1e-5, rtol=0)
    assert [hf.config.id2label[i] for i in range(dh.CLASSES)] == \
        [f"class {i}" for i in range(dh.CLASSES)]
    # The processor prepares images as the run's evaluation did (to within a gray level).
    processor = transformers.AutoImageProcessor.from_pretrained(str(exported))
    paths = [p for p, _ in dh.class_images(exported.parent / "imgs")]
    from PIL import Image
    got = processor([Image.open(p) for p in paths], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(got, dh.reference_inputs(paths), atol=0.05, rtol=0)


def test_config_json_round_trips_and_card_carries_the_accuracy(run, exported):
    config = json.loads((exported / "config.json").read_text())
    assert config == json.loads(json.dumps(hub_config(resolve(str(run)))))
    assert config["architecture"] == "resnet18" and config["num_features"] == 512
    assert config["label_names"] == [f"class {i}" for i in range(dh.CLASSES)]
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [3, dh.SIZE, dh.SIZE] and pre["crop_pct"] == 0.875
    assert (pre["interpolation"], pre["crop_mode"], pre["first_conv"], pre["classifier"]) == \
        ("bilinear", "center", "conv1", "fc")
    assert pre["mean"] == [0.485, 0.456, 0.406] and pre["std"] == [0.229, 0.224, 0.225]
    text = (exported / "README.md").read_text()
    meta = yaml.safe_load(text.split("---\n")[1])
    assert meta["library_name"] == "timm" and meta["pipeline_tag"] == "image-classification"
    assert {"image-classification", "timm"} <= set(meta["tags"]) and meta["datasets"]
    metrics = meta["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [dh.VAL_TOP1, dh.VAL_TOP5]
    assert "Top-1 75.00%" in text and "## Limits" in text
    assert app_module.read_card_headline(exported)["metrics"] == \
        {"val_top1": dh.VAL_TOP1, "val_top5": dh.VAL_TOP5}
    # The Space runs this package's app module as it is, on the folder above it.
    assert (exported / "space" / "app.py").read_text() == open(app_module.__file__).read()
    assert "gradio" in (exported / "space" / "requirements.txt").read_text()
    assert len(app_module.examples_in(exported / "examples")) == 4


def test_exports_from_a_checkpoint_and_the_torchvision_format(run, tmp_path):
    torchvision = pytest.importorskip("torchvision")
    from safetensors.torch import load_file

    checkpoint = run / "checkpoints" / dh.CHECKPOINT
    assert main(["export", str(checkpoint), str(tmp_path / "tv"), "--format", "torchvision"]) == 0
    model = torchvision.models.resnet18(num_classes=dh.CLASSES).eval()
    model.load_state_dict(load_file(str(tmp_path / "tv" / "model.safetensors")), strict=True)
    x = torch.randn(2, 3, dh.SIZE, dh.SIZE)
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ours(run, x), atol=1e-5, rtol=0)
    classes = json.loads((tmp_path / "tv" / "classes.json").read_text())
    assert [c["name"] for c in classes] == [f"class {i}" for i in range(dh.CLASSES)]
    # A mid-run checkpoint: its class names come from the data set's manifest.
    assert main(["export", str(checkpoint), str(tmp_path / "hf")]) == 0
    assert "weights from optimizer step 4" in (tmp_path / "hf" / "README.md").read_text()


def test_onnx_matches_pytorch_with_a_dynamic_batch(run, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    assert main(["export", str(run / "final"), str(tmp_path), "--format", "onnx"]) == 0
    assert "max abs difference" in capsys.readouterr().out
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    for n in (1, 5):
        x = torch.randn(n, 3, dh.SIZE, dh.SIZE)
        got = session.run(None, {"pixel_values": x.numpy()})[0]
        torch.testing.assert_close(torch.from_numpy(got), _ours(run, x), atol=1e-4, rtol=0)


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records calls, optionally fails like a network."""
    calls: list = []
    fail: Exception | None = None

    def __getattr__(self, name):
        def record(*args, **kwargs):
            RecordingHfApi.calls.append((name, args, kwargs))
            if RecordingHfApi.fail is not None:
                raise RecordingHfApi.fail
            return type("Commit", (), {"commit_url": "https://hf.co/me/tiny/commit/1",
                                       "pr_url": None})()
        return record


@pytest.fixture
def hf_api(monkeypatch):
    import huggingface_hub

    RecordingHfApi.calls, RecordingHfApi.fail = [], None
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    return RecordingHfApi


def test_push_creates_the_repo_and_uploads_the_folder(run, tmp_path, hf_api, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--push-to-hub", "me/tiny", "--private",
                 "--revision", "v1"]) == 0
    names = [c[0] for c in hf_api.calls]
    assert names == ["create_repo", "create_branch", "upload_folder"]
    assert hf_api.calls[0][1:] == (("me/tiny",), {"exist_ok": True, "private": True})
    upload = hf_api.calls[2][2]
    assert (upload["repo_id"], upload["folder_path"], upload["revision"], upload["create_pr"]) \
        == ("me/tiny", str(out), "v1", False)
    assert "pushed: https://hf.co/me/tiny/commit/1" in capsys.readouterr().out
    assert (out / "space" / "model_id.txt").read_text().strip() == "me/tiny"
    assert 'timm.create_model("hf-hub:me/tiny"' in (out / "README.md").read_text()


def test_push_failures_keep_the_folder_and_print_the_retry(run, tmp_path, hf_api, monkeypatch,
                                                           capsys):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    out = tmp_path / "hf"
    assert main(["export", str(run), str(out), "--push-to-hub", "me/tiny", "--create-pr"]) == 1
    err = capsys.readouterr().err
    assert "no Hugging Face token" in err and f"hf upload me/tiny {out} . --create-pr" in err
    assert hf_api.calls == [] and (out / "model.safetensors").is_file()
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    hf_api.fail = ConnectionError("network is unreachable")
    assert main(["export", str(run), str(out), "--push-to-hub", "me/tiny"]) == 1
    err = capsys.readouterr().err
    assert "network is unreachable" in err and f"hf upload me/tiny {out} ." in err
    assert (out / "config.json").is_file()


@pytest.mark.slow
def test_export_of_a_real_training_run(tmp_path_factory, tmp_path):
    """The 2-process DeepSpeed run the training tests share (run once per session): its hf
    export loads in timm with our logits, carries its measured accuracy and classifies."""
    timm = pytest.importorskip("timm")
    import trainutil as tu

    _, run_dir, code, out = tu.baseline_run(tmp_path_factory)
    assert code == 0, out[-4000:]
    assert main(["export", str(run_dir), str(tmp_path / "hf")]) == 0
    x = torch.randn(2, 3, 32, 32)
    model = timm.create_model(f"local-dir:{tmp_path / 'hf'}", pretrained=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _ours(run_dir, x), atol=1e-5, rtol=0)
    val = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
           if "val_top1" in line][-1]
    headline = app_module.read_card_headline(tmp_path / "hf")["metrics"]
    assert headline["val_top1"] == round(val["val_top1"], 4)
    assert "hardware: 2 CPU process(es)" in (tmp_path / "hf" / "README.md").read_text()
