"""`resnet train`: fit -> train_step -> evaluate, with checkpoints that resume mid-epoch.

Read top to bottom: `train()` wires the parts, `Trainer.fit()` is the loop. Every schedule is
a function of the optimizer step and the data order a function of the loader's state, so a
restart (torchrun elastic, SLURM requeue, spot replacement) continues exactly.
"""
from __future__ import annotations

import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from resnet.checkpoint import universal
from resnet.checkpoint.manager import CheckpointManager
from resnet.checkpoint.resume import PROGRESS, RunIdentity, resume
from resnet.config import Config, save_config, to_dict
from resnet.data.cache import ShardCache
from resnet.data.device import DeviceFeed, normalize
from resnet.data.iostats import IOCounts
from resnet.data.storage import set_io_timeout_s
from resnet.data.stream import AugmentParams, ShardLoader
from resnet.logs import RateLimitedLogger, rank_from_env, write_unlocked
from resnet.model import build_model
from resnet.progress import ProgressBar
from resnet.runfolder import CONFIG_FILE, FINAL_DIR
from resnet.train import autobatch
from resnet.train.agreement import Agreement
from resnet.train.audit import AuditLog, new_start_id
from resnet.train.engine import Engine, create_engine, describe_running, settle
from resnet.train.evaluate import evaluate
from resnet.train.finite import NonFiniteWatch
from resnet.train.metrics import RunLogger, restart_count, system_metrics
from resnet.train.optim import Schedule, build_optimizer, peak_lr, set_lr
from resnet.train.preflight import RunSetup, preflight
from resnet.train.window import LogWindow
from resnet.weights import export_final


class TrainingError(RuntimeError):
    """Training cannot continue (non-finite loss, ...); the last good checkpoint stays."""


@dataclass
class TrainerState:
    """The trainer's own resumable state, checkpointed as JSON next to the loader's (under
    PROGRESS, the name checkpoints have always used for it)."""

    step: int = 0  # optimizer steps done
    samples_seen: int = 0
    global_batch: int = 0
    world_size: int = 0
    zero_stage: int = 0
    fingerprint: str = ""

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]
        self.samples_seen = state["samples_seen"]


class StopFlag:
    """SIGTERM/SIGINT set a flag; the loop checkpoints at the next step and exits. After the
    first, Ctrl-C has the system's default action again: a second one exits at once."""

    def __init__(self) -> None:
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if not self.signum:
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            # Lock-free: a logging call here could wait for ever on a lock that the
            # interrupted code (this same thread) holds.
            write_unlocked(rank_from_env(), "WARNING", f"signal {signum}: checkpointing at "
                           f"the end of this step, then exiting; Ctrl-C again exits at once, "
                           f"without that checkpoint")
        self.signum = signum


class Trainer:
    def __init__(self, cfg: Config, plan: RunSetup, engine: Engine) -> None:
        self.cfg, self.plan, self.engine = cfg, plan, engine
        self.run_dir = Path(cfg.run.dir)
        self.log = RateLimitedLogger(engine.rank)
        common = dict(rank=engine.rank, world_size=engine.world_size, seed=cfg.seed,
                      workers=cfg.data.workers, decode=cfg.data.decode,
                      prefetch_factor=cfg.data.prefetch_factor,
                      pin_memory=engine.device.type == "cuda",
                      worker_timeout_s=cfg.data.worker_timeout_s,
                      cache=(ShardCache(cfg.data.cache_dir, cfg.data.cache_limit_gb)
                             if cfg.data.cache_dir else None))
        self.loader = ShardLoader(cfg.data.train, "train", batch_size=cfg.train.batch_size,
                                  global_batch=plan.global_batch, train=True,
                                  # the train size is a function of the epoch (progressive
                                  # resizing): run_epoch sets it again for each epoch
                                  augment=AugmentParams.for_epoch(cfg.data, 0), **common)
        self.val_loader = None
        if cfg.data.val:
            self.val_loader = ShardLoader(cfg.data.val, "val", batch_size=cfg.train.batch_size,
                                          global_batch=cfg.train.batch_size, train=False,
                                          augment=AugmentParams.for_eval(cfg.data), **common)
        # Batches reach the device through the feed (copied on a side stream on CUDA); it
        # stands in for the loader in checkpoints (its state as of the trained steps).
        self.feed = DeviceFeed(self.loader, engine.device)
        self.accum = plan.accumulation
        self.steps_per_epoch = self.loader.batches_per_epoch // self.accum
        self.log.info(f"global batch {plan.layout.describe()}")
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        if cfg.train.max_steps:
            self.total_steps = min(self.total_steps, cfg.train.max_steps)
        self.schedule = Schedule(cfg.optim, peak_lr(cfg.optim, plan.global_batch),
                                 self.total_steps, self.steps_per_epoch)
        self.progress = TrainerState(global_batch=plan.global_batch,
                                     world_size=engine.world_size,
                                     zero_stage=cfg.deepspeed.zero_stage,
                                     fingerprint=plan.train_manifest.fingerprint)
        torch.manual_seed(cfg.seed)  # the initial weights: a function of the seed, per run
        model = build_model(cfg.model.arch, plan.num_classes,
                            zero_init_residual=cfg.model.zero_init_residual)
        if engine.channels_last_weights:
            model = model.to(memory_format=torch.channels_last)
        if cfg.train.compile:
            # In place (nn.Module.compile), so state-dict keys stay torchvision's and DeepSpeed
            # wraps the compiled module as it is.
            model.compile(backend=cfg.train.compile_backend)
            self.log.info(f"model compiled (torch.compile backend {cfg.train.compile_backend})")
        universal.declare(model)  # its ZeRO-1/2 checkpoints convert to another world size
        optimizer = build_optimizer(model, cfg.optim, plan.global_batch)
        self.model, self.optimizer = engine.accelerator.prepare(model, optimizer)
        self.log.info(describe_running(self.model, engine))
        # Summed, then scaled so that the gradient (averaged over ranks and micro-steps by
        # DDP/DeepSpeed) is the mean over exactly the global batch, whatever the split.
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing,
                                             reduction="sum")
        self.loss_scale = plan.layout.loss_weight
        self.checkpoints = CheckpointManager(
            engine.accelerator, self.run_dir, {PROGRESS: self.progress, "loader": self.feed},
            keep=cfg.checkpoint.keep, mirror=cfg.checkpoint.mirror, gather=engine.gather,
            mirror_wait_s=cfg.checkpoint.mirror_wait_s, resume=cfg.checkpoint.resume,
            fence=engine.fence)
        self.logger = RunLogger(engine.accelerator, cfg, self.run_dir)
        self.restart = restart_count()
        self.audit = (AuditLog(self.run_dir, engine.rank, self._agreed_start_id())
                      if cfg.audit.sample_keys else None)
        self.stop = StopFlag()
        self.agreement = Agreement(engine)
        self.skipped = 0
        self.evaluated_at = -1  # the step of the last evaluation

    def _agreed_start_id(self) -> str:
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([new_start_id(self.restart, self.run_dir)],
                                     from_process=0)[0]

    # -- resume ---------------------------------------------------------------------------
    def resume(self) -> None:
        latest = resume(self.checkpoints, self.model,
                        RunIdentity(self.progress.fingerprint, self.plan.global_batch,
                                    self.engine.world_size),
                        resumed_at=lambda: (self.progress.step, self.loader.epoch,
                                            self.loader.manifest.fingerprint))
        if latest is not None:
            self.log.info(f"resumed from {latest.name}: step {self.progress.step}, "
                          f"epoch {self.loader.epoch}, world size {self.engine.world_size}")

    # -- the loop -------------------------------------------------------------------------
    def fit(self) -> Path:
        self.resume()
        if self.engine.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.run_dir / CONFIG_FILE)
        self.logger.start(to_dict(self.cfg))
        self.bar = ProgressBar(self.total_steps, self.progress.step, enabled=self.engine.is_main,
                               every=self.cfg.train.log_every_steps)
        self.last_save = time.monotonic()
        self.nonfinite = NonFiniteWatch(self.engine.device)
        self.params = list(self.model.parameters())
        self.compiling = time.monotonic() if self.cfg.train.compile else None
        if self.compiling is not None:  # (a resumed run compiles again: say why it waits)
            self.log.info(f"step {self.progress.step + 1} compiles the model first (torch.compile "
                          f"warm-up: a minute or more on a GPU)")
        while self.progress.step < self.total_steps and self.loader.epoch < self.cfg.train.epochs:
            if self.run_epoch():  # False: max_steps reached inside the epoch
                self._log_epoch_io(self.loader.epoch - 1, self.loader.io_finished)
                self.save()
                self.run_eval()
            elif self.loader.batches_remaining == 0:  # the budget ended with the epoch
                self._log_epoch_io(self.loader.epoch, self.loader.io)
        return self.finish()

    def run_epoch(self) -> bool:
        """Train until the loader's epoch ends (True) or the step budget is spent (False)."""
        epoch = self.loader.epoch
        # Set before the epoch's workers start; a resumed run recomputes it from the epoch.
        self.loader.augment = AugmentParams.for_epoch(self.cfg.data, epoch)
        batches = iter(self.feed)
        window = self.window = LogWindow()
        every = self.cfg.checkpoint.every_steps
        while self.progress.step < self.total_steps:
            if self.stop.signum:  # read the agreement now: a stop needs no more data
                self._act_on_agreement(window)
            window.start_wait()
            micro = [b for _, b in zip(range(self.accum), batches)]
            window.end_wait()
            self._act_on_agreement(window)  # the last step's flags, agreed while data came
            if not micro:
                return True
            loss = self.train_step(micro, epoch)
            self.feed.mark()  # a checkpoint from here on records these batches as used
            if self.compiling is not None:
                self.log.info(f"compile warm-up done: the first step took "
                              f"{time.monotonic() - self.compiling:.0f} s")
                self.compiling = None
            self.progress.step += 1
            step = self.progress.step
            self._note_nonfinite(loss)
            self.progress.samples_seen += self.plan.global_batch
            window.add(loss.detach(), self.plan.global_batch, sum(b.skipped for b in micro))
            due = (self.cfg.checkpoint.every_minutes > 0 and
                   time.monotonic() - self.last_save > 60 * self.cfg.checkpoint.every_minutes)
            if step % self.cfg.train.log_every_steps == 0:
                self._log_train(window)
            self.bar.update(step)  # off a terminal: a plain line if a minute passed unlogged
            if every and step % every == 0:
                self.save()
            if self.cfg.train.eval_every_steps and step % self.cfg.train.eval_every_steps == 0:
                self.run_eval()
            # Stop/save agreement without a per-step barrier: started now, read (and acted on
            # at this step) once the next step's batches are fetched.
            self.agreement.start(float(self.stop.signum), float(due))
        self._act_on_agreement(window)
        return False

    def _act_on_agreement(self, window: LogWindow) -> None:
        """Save and/or stop at the last finished step if the ranks agreed to (same step on
        every rank: each reads the same all-reduce at the same point of the loop)."""
        stop, save_now = self.agreement.result()
        step = self.progress.step
        if stop and window.steps:
            self._log_train(window)
        if save_now or stop:
            self.save()
        if stop:
            self.log.warning(f"stopped by signal {int(stop)} at step {step}; "
                             f"checkpoint saved, run again to resume")
            self.checkpoints.close()
            self._close_outputs(exit_code=128 + int(stop))
            raise SystemExit(128 + int(stop))

    def save(self) -> None:
        self._check_finite()  # never checkpoint weights that a NaN already reached
        self.checkpoints.save(self.progress.step)
        self.last_save = time.monotonic()

    def train_step(self, micro: list, epoch: int) -> torch.Tensor:
        """One optimizer step over `accum` micro-batches; returns the mean loss (on device)."""
        acc, device = self.engine.accelerator, self.engine.device
        set_lr(self.optimizer, self.schedule(self.progress.step))
        total = torch.zeros((), device=device)
        for i, batch in enumerate(micro):
            if self.audit:
                self.audit.write(self.progress.step + 1, i, epoch, batch.keys)
            # The feed put them on the device (decoded there with data.decode=device).
            images = normalize(batch.images, self.engine.channels_last_input)
            labels = batch.labels
            with acc.accumulate(self.model):
                loss, logits = self._loss(images, labels)
                acc.backward(loss)
                if acc.sync_gradients and self.cfg.train.grad_clip and \
                        not self.engine.uses_deepspeed:
                    acc.clip_grad_norm_(self.model.parameters(), self.cfg.train.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            total += loss.detach()
            self.window.add_hits(logits.detach(), labels)
        return total / len(micro)

    def _loss(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.numel():
            logits = self.model(images).float()
            return self.criterion(logits, labels) * self.loss_scale, logits
        # Every sample of this micro-batch was corrupt. The rank must still join the gradient
        # all-reduce (others would hang): an eval-mode forward of the empty batch gives zero
        # gradients for every parameter and leaves BatchNorm's running statistics untouched.
        self.model.eval()
        try:
            logits = self.model(images).float()
            return logits.sum() * 0.0, logits
        finally:
            self.model.train()

    def run_eval(self) -> dict | None:
        if self.val_loader is None or self.evaluated_at == self.progress.step:
            return None  # (eval_every_steps can land on an epoch end: evaluate once)
        model = self.engine.accelerator.unwrap_model(self.model)
        if self.engine.world_size > 1:
            # DeepSpeed never syncs buffers: each rank's BatchNorm statistics saw only its own
            # batches. Rank 0's are the ones checkpointed and exported, so every rank evaluates
            # with those: the val metrics are the exported model's.
            for buffer in model.buffers():
                torch.distributed.broadcast(buffer, src=0)
        shown: list = []

        def keep_examples(batch, images, logits):
            if self.engine.is_main and len(shown) < 1:
                shown.append((images[:32].cpu(), batch.labels[:32].cpu(),
                              logits[:32].topk(min(5, logits.shape[1]), dim=1).indices.cpu()))

        result = evaluate(model, self.val_loader, self.engine.device, self.engine.autocast,
                          lambda t: self.engine.accelerator.reduce(t, "sum"),
                          self.engine.channels_last_input, keep_examples)
        self.evaluated_at = self.progress.step
        self.engine.fence("logging the evaluation")
        self.logger.log(result, step=self.progress.step)
        if shown:
            names = [c.name for c in self.plan.train_manifest.classes]
            self.logger.log_predictions(self.progress.step, *shown[0], names)
        self.log.info(f"step {self.progress.step}: val top-1 {result['val_top1']:.4f} "
                      f"top-5 {result['val_top5']:.4f} on {result['val_samples']} samples")
        return result

    def finish(self) -> Path:
        self.save()
        self.run_eval()  # unless already done at this step: the last epoch ends on the budget
        self.checkpoints.close()
        final = self.run_dir / FINAL_DIR
        self.engine.fence("writing final/")
        if self.engine.is_main:
            export_final(self.engine.accelerator.unwrap_model(self.model),
                         self.plan.train_manifest, final)
            self.log.info(f"final weights: {final}")
        self._close_outputs()
        self.engine.accelerator.wait_for_everyone()
        self.engine.finish()
        return final

    def _close_outputs(self, exit_code: int = 0) -> None:
        """The progress bar, the audit file and W&B (told the exit code)."""
        self.bar.close()
        if self.audit:
            self.audit.close()
        self.logger.finish(exit_code)

    # -- helpers --------------------------------------------------------------------------
    def _note_nonfinite(self, loss: torch.Tensor) -> None:
        """Remember the first step with a non-finite loss or weights, on the device: no GPU
        sync per step."""
        self.nonfinite.note(self.progress.step, loss, self.params)

    def _check_finite(self) -> None:
        found = self.nonfinite.earliest(lambda t: self.engine.accelerator.reduce(t, "max"))
        if found:
            advice = "lower optim.lr" + ("" if self.cfg.train.precision == "fp32" else
                                         " or use train.precision=fp32")
            raise TrainingError(f"{found}; stopping. The last good "
                                f"checkpoint is kept in {self.checkpoints.dir}; {advice}")

    def _log_epoch_io(self, epoch: int, counts: IOCounts | None) -> None:
        """What a finished epoch read from S3 and from the shard caches, all ranks summed
        (since the resume, for an epoch resumed mid-way)."""
        counts = counts or IOCounts()
        summed = self.engine.accelerator.reduce(
            torch.tensor(counts.as_list(), dtype=torch.int64, device=self.engine.device), "sum")
        total = IOCounts.from_list(summed.tolist())
        self.logger.log({"data_epoch": epoch, **total.metrics()}, step=self.progress.step)
        self.log.info(f"epoch {epoch} read {total.s3_bytes / 1e6:,.1f} MB in "
                      f"{total.s3_requests} requests from S3, {total.cache_bytes / 1e6:,.1f} MB "
                      f"from shard caches")

    def _log_train(self, window: LogWindow) -> None:
        figures = window.summarise(lambda t: self.engine.accelerator.reduce(t, "sum"),
                                   self.engine.world_size, self.engine.device)
        self.skipped += figures.pop("skipped")
        metrics = {
            **figures, "lr": self.schedule(self.progress.step - 1),
            "epoch": self.loader.epoch, "samples_seen": self.progress.samples_seen,
            "image_size": self.loader.augment.image_size,
            "skipped_samples": self.skipped,
            **self.checkpoints.mirror_metrics(),
            **system_metrics(self.engine.device),
        }
        self._check_finite()
        self.engine.fence("logging metrics")
        self.logger.log(metrics, step=self.progress.step)
        self.bar.update(self.progress.step, loss=figures["loss"], img_per_s=figures["img_per_s"],
                        epoch=self.progress.step / max(self.steps_per_epoch, 1))


def train(cfg: Config) -> Path:
    set_io_timeout_s(cfg.data.io_timeout_s)  # every read's retry deadline, workers included
    setup = preflight(cfg)  # bad input fails here, before any process group
    # precision, stage, clipping: what runs, from the config and the DeepSpeed JSON (read once)
    settled = settle(cfg)
    engine = create_engine(settled, setup.layout, setup.load_universal)
    if cfg.train.auto_batch_size:  # (needs the process group; before the engine wraps)
        settled, setup = autobatch.fit(settled, setup, engine, RateLimitedLogger(engine.rank))
    return Trainer(settled.cfg, setup, engine).fit()
