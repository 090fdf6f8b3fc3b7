"""Elastic across nodes: any world size at the exact global batch, nodes lost, replaced and
added under launch/elastic.sh in one story whose nodes share a run.dir or have their own,
with an S3 mirror as the truth, and nodes that see different checkpoints without a mirror
stopping with an error.

A node joining a shared run.dir without any mirror (the mirror-less path of the checkpoint
manager's agreement) is tests/test_silent_node.py's rejoin of the thawed node.

Several torchrun agents on localhost play the nodes. Training is held at known steps by the
test-only gates of tests/fault_shim (RESNET_TEST_FAULT_GATES), so each membership change
happens mid-epoch at a step the test chose, however slow the machine.
"""
from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

import trainutil as tu
from resnet.config import load_config
from resnet.data import storage
from resnet.data.format import ClassInfo, Manifest, ShardInfo, SplitInfo, shard_name
from resnet.data.plan import MicroLayout, split_counts
from resnet.train.preflight import preflight

CONFIGS = sorted((tu.REPO / "configs").glob("*.yaml"))
WORLD_SIZES = (1, 2, 4, 8, 16, 32, 64)
ELASTIC = tu.REPO / "launch" / "elastic.sh"


# ------------------------------------------------------------------------------ layouts


@pytest.fixture(scope="module")
def imagenet_sized(tmp_path_factory) -> Path:
    """A manifest of ImageNet's size (1,281,167 train samples, 1,282 shards): preflight reads
    only the manifest, so no shard needs to exist."""
    root = tmp_path_factory.mktemp("imagenet-manifest")
    shards = tuple(ShardInfo(shard_name("train", i), n, n * 110_000, "0" * 64)
                   for i, n in enumerate(split_counts(1_281_167, 1_282)))
    classes = tuple(ClassInfo(i, f"n{i:08d}", f"class {i}") for i in range(1000))
    manifest = Manifest("imagenet", classes, {"train": SplitInfo(shards)})
    (root / "manifest.json").write_text(manifest.to_json())
    return root


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_every_shipped_config_starts_on_1_to_64_devices(config, imagenet_sized, tmp_path):
    for world in WORLD_SIZES:
        cfg = load_config([config], [f"data.train={imagenet_sized}", "data.val=",
                                     f"run.dir={tmp_path / 'run'}"])
        plan = preflight(cfg, world_size=world)
        expected = cfg.train.global_batch_size or cfg.train.batch_size * world
        sizes = [plan.layout.micro_sizes(r) for r in range(world)]
        assert plan.global_batch == sum(map(sum, sizes)) == expected, (config.name, world)
        assert max(map(max, sizes)) <= cfg.train.batch_size
        assert max(map(max, sizes)) - min(map(min, sizes)) <= 1


@pytest.mark.parametrize("world", [1, 2, 3])
def test_weighted_micro_batch_losses_give_the_mean_gradient_of_the_global_batch(world):
    """What DDP/DeepSpeed + Accelerate do with the trainer's summed, weighted losses: each
    micro-step's loss divided by the accumulation, gradients averaged over ranks. At W = 3 the
    24 samples split 3/2 over 3 micro-steps, and the result is still the global mean."""
    torch.manual_seed(0)
    g = 24
    x, y = torch.randn(g, 5), torch.randint(0, 4, (g,))
    model = torch.nn.Linear(5, 4)

    def grad(loss: torch.Tensor) -> torch.Tensor:
        model.zero_grad()
        loss.backward()
        return model.weight.grad.clone()

    reference = grad(torch.nn.functional.cross_entropy(model(x), y))
    layout = MicroLayout.choose(g, world, 3)
    weighted, unweighted, start = [], [], 0
    for rank in range(world):
        mine, plain = torch.zeros_like(reference), torch.zeros_like(reference)
        for n in layout.micro_sizes(rank):
            xs, ys = x[start:start + n], y[start:start + n]
            start += n
            summed = torch.nn.functional.cross_entropy(model(xs), ys, reduction="sum")
            mine += grad(summed * layout.loss_weight / layout.accumulation)
            mean = torch.nn.functional.cross_entropy(model(xs), ys)
            plain += grad(mean / layout.accumulation)
        weighted.append(mine)
        unweighted.append(plain)
    assert start == g
    torch.testing.assert_close(sum(weighted) / world, reference, rtol=1e-5, atol=1e-6)
    if world == 3:  # a mean per unequal micro-batch would weight the smaller ones more
        assert not torch.allclose(sum(unweighted) / world, reference, atol=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return tu.shared_data(tmp_path_factory)


def _audit_ok(*run_dirs: Path) -> str:
    code, report = tu.audit_command(*run_dirs)
    assert code == 0, report
    return report


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 2, 3])
def test_any_world_size_trains_the_same_global_batch_exactly_once(world, data, tmp_path):
    """G = 24 with micro-batches of at most 3: 1 x 8 accumulation, 2 x 4, and 3 ranks of 2/3
    samples x 3 (unequal). Every step takes 24 samples, each epoch uses each sample once."""
    run_dir = tmp_path / "run"
    train = tu.overrides(data, run_dir, "train.epochs=2", "train.global_batch_size=24",
                         "train.batch_size=3", "checkpoint.every_steps=3", val=False)
    code, out = tu.run(tu.torchrun_cmd(world, *train), tmp_path / "log.txt")
    assert code == 0, out[-4000:]
    layout = MicroLayout.choose(24, world, 3)
    assert f"global batch {layout.describe()}" in out
    audit = tu.read_audit(run_dir)
    assert list(audit) == list(range(1, 13))  # 160 samples // 24 = 6 steps per epoch
    for step, records in audit.items():
        assert sum(len(r["keys"]) for r in records.values()) == 24, step
        assert sorted(records) == [(k, r) for k in range(layout.accumulation)
                                   for r in range(world)]
    report = _audit_ok(run_dir)
    assert report.count("0 used twice") == 2 and "AUDIT FAILED" not in report


# ------------------------------------------------------------------------------ nodes


class Agents:
    """torchrun agents started with launch/elastic.sh on localhost, one per "node"."""

    def __init__(self, tmp_path: Path, data: Path, gates: Path, epochs: int,
                 more: tuple[str, ...] = ()) -> None:
        self.tmp, self.data, self.gates, self.epochs = tmp_path, data, gates, epochs
        self.more = more  # overrides every agent gets
        self.port = tu.free_port()
        self.config = tmp_path / "elastic.yaml"
        self.config.write_text("seed: 0\n")
        self.launches: dict[str, tu.Launch] = {}
        self.empty_disk: dict[str, bool] = {}  # whether its run.dir held nothing at start

    def start(self, name: str, run_dir: Path) -> tu.Launch:
        self.empty_disk[name] = not (run_dir / "checkpoints").exists()
        train = tu.overrides(self.data, run_dir, f"train.epochs={self.epochs}",
                             "checkpoint.every_steps=2", tu.LOADER_WORKERS, *self.more,
                             val=False)
        launch = tu.Launch(["bash", str(ELASTIC), str(self.config), *train],
                           self.tmp / f"{name}.txt", MIN_NODES="1", MAX_NODES="3",
                           NPROC_PER_NODE="1", MAX_RESTARTS="3",
                           RDZV_ENDPOINT=f"127.0.0.1:{self.port}", RDZV_ID=f"t{self.port}",
                           RDZV_CONF="join_timeout=120,last_call_timeout=2,"
                                     "keep_alive_interval=1,keep_alive_max_attempt=3",
                           RESNET_TEST_FAULT_GATES=str(self.gates))
        self.launches[name] = launch
        if len(self.launches) == 1:  # the first agent hosts the c10d store
            tu.wait_for(lambda: _listening(self.port), 60, "the c10d store", [launch])
        return launch

    def output(self) -> str:
        return "\n".join(launch.output() for launch in self.launches.values())

    def running(self) -> list[tu.Launch]:
        return [launch for launch in self.launches.values() if launch.proc.poll() is None]

    def stop(self) -> None:
        for launch in self.launches.values():
            launch.stop()


def _listening(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _pause(gates: Path, step: int) -> None:
    (gates / f"pause-at-{step}").touch()


def _release(gates: Path, step: int) -> None:
    (gates / f"pause-at-{step}").unlink(missing_ok=True)


def _paused(gates: Path, step: int, ranks: int) -> bool:
    return len(list(gates.glob(f"paused-at-{step}-rank-*"))) >= ranks


def _wait_resumed(agents: Agents, step: int, world: int) -> float:
    """Seconds until some rank 0 says it resumed from `step` at world size `world`."""
    start = time.monotonic()
    line = f"resumed from step-{step:09d}: step {step}, epoch "
    tu.wait_for(lambda: re.search(re.escape(line) + r"\d+, world size " + str(world),
                                  agents.output()) is not None,
                tu.RUN_TIMEOUT_S, f"a resume from step {step} at world size {world}",
                agents.running())
    return time.monotonic() - start


def _lose_replace_grow(agents: Agents, run_dirs: dict[str, Path]) -> dict[str, float]:
    """A and B train; B (agent and worker) is SIGKILLed after step 3; A goes on alone from the
    step-2 checkpoint; C replaces B after step 12 (A saves 13 on torchrun's SIGTERM and both
    resume from it); D joins after step 22 as a scale-up: 3 ranks of 5/6 samples from 23."""
    gates, joins = agents.gates, {}
    for step in (3, 12, 22):
        _pause(gates, step)
    a = agents.start("A", run_dirs["A"])
    b = agents.start("B", run_dirs["B"])
    tu.wait_for(lambda: _paused(gates, 3, 2), tu.RUN_TIMEOUT_S, "both ranks at step 3", [a, b])
    tu.kill_tagged(b.tag)  # agent B and its worker: a lost node
    b.proc.wait(timeout=10)
    _release(gates, 3)  # A's next collective fails; its agent restarts it alone
    _wait_resumed(agents, 2, 1)
    tu.wait_for(lambda: _paused(gates, 12, 1), tu.RUN_TIMEOUT_S, "A alone at step 12", [a])
    started = time.monotonic()
    agents.start("C", run_dirs["C"])
    joins["replacement"] = time.monotonic() - started + _wait_resumed(agents, 13, 2)
    _release(gates, 12)
    tu.wait_for(lambda: _paused(gates, 22, 2), tu.RUN_TIMEOUT_S, "A and C at step 22",
                agents.running())
    started = time.monotonic()
    agents.start("D", run_dirs["D"])
    joins["scale-up"] = time.monotonic() - started + _wait_resumed(agents, 23, 3)
    _release(gates, 22)
    for name in ("A", "C", "D"):
        code = agents.launches[name].wait(tu.RUN_TIMEOUT_S)
        assert code == 0, agents.launches[name].tail()
    return joins


def _check_history(tmp_path: Path, data: Path, run_dirs, joins: dict[str, float]) -> None:
    audit = tu.read_audit(*run_dirs)
    assert list(audit) == list(range(1, 31))  # 3 epochs of 10 steps, each step once
    worlds = {step: len({rank for _, rank in records}) for step, records in audit.items()}
    # Rolled back to step 2, steps 3-13 ran alone; 14-23 on two nodes, 24-30 on three.
    assert [worlds[s] for s in (1, 2, 3, 13, 14, 23, 24, 30)] == [2, 2, 1, 1, 2, 2, 3, 3]
    for step in range(24, 31):  # 16 samples over 3 ranks: 6, 5, 5
        assert sorted(len(r["keys"]) for r in audit[step].values()) == [5, 5, 6], step
    report = _audit_ok(*run_dirs)
    assert report.count(f"{tu.TRAIN_SAMPLES} distinct of {tu.TRAIN_SAMPLES}, 0 left out, "
                        f"0 used twice") == 3, report
    for what, seconds in joins.items():  # bounded by the waits; benchmarks/elastic_join.py
        print(f"{what}: larger world size {seconds:.1f} s after the agent started")  # times it


def _rank0_agent(agents: Agents, step: int, world: int) -> str:
    """The agent whose worker was rank 0 of the round that resumed from `step` at world size
    `world` (only rank 0 logs the resume)."""
    line = re.compile(rf"resumed from step-{step:09d}: step {step}, epoch \d+, "
                      rf"world size {world}\b")
    names = [name for name, launch in agents.launches.items() if line.search(launch.output())]
    assert len(names) == 1, (step, world, names)
    return names[0]


def _restores(output: str) -> list[tuple[str, Path]]:
    """(checkpoint, run.dir) of each restore from the mirror the nodes logged, by step."""
    found = re.findall(r"\((\S+)\): restored (step-\d+) from s3://", output)
    return sorted((name, Path(checkpoints).parent) for checkpoints, name in found)


@pytest.mark.slow
def test_a_node_lost_replaced_and_added_on_shared_and_own_disks_behind_an_s3_mirror(
        data, tmp_path, s3_server):
    """The lose/replace/grow story with checkpoint.mirror on S3 (moto) and both kinds of
    run.dir: A and B share one (a shared disk, as EFS), C replaces B on its own empty disk and
    restores the mirror's step 13 before any rank loads, D scales up onto the shared run.dir
    and resumes from what it holds. Only rank 0's node writes checkpoints, so who restores 23
    depends on whether A or C was rank 0 (torchrun orders nodes by agent pid): the checks hold
    for both."""
    gates = tmp_path / "gates"
    gates.mkdir()
    mirror = f"s3://{s3_server.bucket}/runs/elastic"
    agents = Agents(tmp_path, data, gates, epochs=3, more=(f"checkpoint.mirror={mirror}",))
    shared, own = tmp_path / "shared", tmp_path / "node-C"
    run_dirs = {"A": shared, "B": shared, "C": own, "D": shared}
    try:
        joins = _lose_replace_grow(agents, run_dirs)
    finally:
        agents.stop()
    # B started beside A on the same disk, so its emptiness says nothing; D joined a shared
    # run.dir that already held the run.
    assert [agents.empty_disk[name] for name in "ACD"] == [True, True, False]
    # Who restores: A alone resumed from step 2 in the shared run.dir (nothing to restore).
    # A wrote and mirrored 13; C's empty disk restored it. Rank 0 of A and C wrote 14-23 into
    # its node's run.dir, so when D joined, the other run.dir restored 23, once: C's (D loaded
    # 23 from the shared run.dir as it found it), or the shared one (A and D take turns under
    # the restore lock; the second finds it there).
    writer = run_dirs[_rank0_agent(agents, 13, 2)]
    behind = own if writer == shared else shared
    assert _restores(agents.output()) == [("step-000000013", own), ("step-000000023", behind)]
    assert re.search(r"restored step-000000013 from s3://", agents.launches["C"].output())
    _check_history(tmp_path, data, [shared, own], joins)
    finals = [d for d in (shared, own) if (d / "final" / "model.safetensors").is_file()]
    assert finals == [run_dirs[_rank0_agent(agents, 23, 3)]]  # the last rank 0's node, once
    assert storage.read_bytes(f"{mirror}/latest") == b"step-000000030"


@pytest.mark.slow
def test_a_node_behind_the_others_is_an_error_not_a_fresh_start(data, tmp_path, tmp_path_factory):
    """Two agents, each with its own run.dir and no mirror: one holds checkpoints up to step
    20, the other only step 12. Both stop with the error naming the two; nothing trains."""
    _, baseline, code, out = tu.baseline_run(tmp_path_factory)
    assert code == 0, out[-4000:]
    ahead, behind = tmp_path / "ahead", tmp_path / "behind"
    for run_dir in (ahead, behind):
        shutil.copytree(baseline / "checkpoints", run_dir / "checkpoints")
    for name in ("step-000000016", "step-000000020"):
        shutil.rmtree(behind / "checkpoints" / name)
    (behind / "checkpoints" / "latest").write_text("step-000000012")
    port = tu.free_port()

    def agent(run_dir: Path) -> list[str]:
        return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2",
                "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"t{port}",
                "-m", "resnet", "train", *tu.overrides(data, run_dir, *tu.BASELINE)]

    first = tu.Launch(agent(ahead), tmp_path / "ahead.txt")
    second = None
    try:
        tu.wait_for(lambda: _listening(port), 60, "the c10d store", [first])
        second = tu.Launch(agent(behind), tmp_path / "behind.txt")
        codes = [first.wait(), second.wait()]
    finally:
        first.stop()
        if second is not None:
            second.stop()
    out = first.output() + second.output()
    assert codes[0] != 0 and codes[1] != 0
    assert "nodes see different checkpoints" in out, out[-4000:]
    assert re.search(r"\(\S*ahead/checkpoints\) has step-000000020", out), out[-4000:]
    assert re.search(r"\(\S*behind/checkpoints\) has step-000000012", out), out[-4000:]
    assert "run.dir must be storage every node shares" in out
    for run_dir in (ahead, behind):
        assert tu.read_audit(run_dir) == {} and not (run_dir / "final").exists()
    assert tu.checkpoints(ahead) == ["step-000000012", "step-000000016", "step-000000020"]
    assert tu.checkpoints(behind) == ["step-000000012"]
