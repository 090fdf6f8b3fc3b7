"""What S3 costs, as a training run reports it: bytes and requests per epoch in metrics.jsonl and
W&B, from a real S3 API on loopback (moto), 2 processes x 2 loader workers sharing one node's
shard cache."""
from __future__ import annotations

import pytest

import trainutil as T
from resnet.data import format as fmt
from wandb_records import read_run, run_files

pytestmark = pytest.mark.slow


def upload(s3, local, prefix="ds"):
    client = s3.client()
    for path in sorted(p for p in local.iterdir() if p.is_file()):
        client.put_object(Bucket=s3.bucket, Key=f"{prefix}/{path.name}", Body=path.read_bytes())
    return f"{s3.url}/{prefix}"


def test_epoch_records_show_s3_bytes_and_a_warm_cache(s3_server, tmp_path_factory, tmp_path):
    data = T.shared_data(tmp_path_factory)
    url = upload(s3_server, data)
    train_bytes = fmt.load_manifest(str(data)).split("train").bytes
    run_dir = tmp_path / "run"
    code, out = T.run(T.torchrun_cmd(2, *T.overrides(
        url, run_dir, "train.epochs=2", "data.workers=2", "wandb.mode=offline",
        f"data.cache_dir={tmp_path / 'cache'}", val=False)), tmp_path / "log.txt",
        WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CONFIG_DIR=str(tmp_path / "wandb-cfg"),
        WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"), WANDB_BASE_URL="http://127.0.0.1:9")
    assert code == 0, out[-4000:]
    records = [r for r in T.metrics(run_dir) if "data_epoch" in r]
    assert [r["data_epoch"] for r in records] == [0, 1]
    first, second = records
    # Epoch 0: each shard crossed the network once for both ranks and their 4 workers.
    assert first["data_s3_bytes"] == train_bytes
    assert first["data_cache_fills"] == 8 and first["data_s3_requests"] >= 8
    # Epoch 1: everything from the node's cache, nothing from S3.
    assert (second["data_s3_bytes"], second["data_s3_requests"]) == (0, 0)
    assert second["data_cache_bytes"] > 0 and second["data_cache_hits"] >= 8
    assert "epoch 1 read 0.0 MB in 0 requests from S3" in out
    (segment,) = run_files(run_dir)
    history = [row for row in read_run(segment)["history"] if "data_s3_bytes" in row]
    assert [row["data_s3_bytes"] for row in history] == [train_bytes, 0]


def test_bench_data_prints_what_s3_and_the_cache_served(s3_server, tmp_path, capsys):
    from resnet.cli import main
    from shards_helper import make_shards

    local = make_shards(tmp_path / "local", [9, 6, 11, 4])
    url = upload(s3_server, local)
    args = ["bench", "data", url, "--no-baseline", "--workers", "0", "--batch-size", "5",
            "--steps", "12", "--warmup", "0", "--image-size", "16",
            "--cache-dir", str(tmp_path / "cache")]
    assert main(args) == 0
    total_mb = fmt.load_manifest(str(local)).split("train").bytes / 1e6
    out = capsys.readouterr().out
    # 12 batches of 5 are two epochs of 30: the first fills the cache, the second reads it.
    assert f"read {total_mb:,.1f} MB in 4 requests from S3 (0.50x the data set's bytes per " \
           f"image)" in out, out
    assert "4 filled" in out
