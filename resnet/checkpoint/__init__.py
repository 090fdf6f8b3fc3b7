"""Checkpointing: writing, mirroring, finding and resuming a run's checkpoints.

From the bottom up (each module imports only those above it in this list, and nothing from
resnet.train):

    errors.py     CheckpointError, and ResumeError: a checkpoint this run cannot continue
    files.py      atomic writes, fsync of a tree, unique temporary names
    diskspace.py  a full disk: what a checkpoint needs, what is free
    dswrites.py   DeepSpeed's checkpoint writes failing in step on every rank
    mirror.py     the S3 (or any storage URL) mirror both ways: background uploads with
                  completion markers, and restores of its newest checkpoint
    manager.py    CheckpointManager: atomic save, keep-k, `latest`, the checkpoint every rank
                  agrees on at start (calls the mirror)
    universal.py  ZeRO-1/2 checkpoints converted for another world size
    resume.py     resume(): prepare, check, load (plain or universal), same point on every
                  rank; local_resume_point(): preflight's look at the newest local checkpoint

The run folder's names (checkpoints/, step-NNNNNNNNN, latest, trainer_state.json) and finding
the newest checkpoint are resnet.runfolder's.
"""
