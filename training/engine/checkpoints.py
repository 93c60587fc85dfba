"""Atomic checkpoint and adapter writes: written aside, then renamed into place.

A worker killed (SIGKILL, out of memory, power cut) while `Trainer` writes `checkpoint-N`, or
a disk that fills up half-way, must never leave a directory that looks complete: the next
attempt resumes from the last checkpoint that was fully written. Everything is written into a
staging directory next to the target (same filesystem, so the rename is atomic), its files are
synced, and only then is it renamed to its final name. A staging directory left by a killed
attempt is removed by the next write.

This module knows nothing about DAIL's loss or data; it only wraps `Trainer._save_checkpoint`.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

STAGING_PREFIX = ".partial-"


def _fsync_tree(path: Path) -> None:
    for root, _dirs, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_directory(staging: Path, target: Path) -> None:
    """Sync `staging`, then put it at `target` by rename (an old `target` is replaced)."""
    _fsync_tree(staging)
    old = None
    if target.exists():
        old = target.with_name(f"{STAGING_PREFIX}old-{target.name}")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(staging, target)
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield a staging directory; when the block succeeds it becomes `target` atomically.

    When the block fails (e.g. the disk is full or read-only) the staging directory is
    removed and `target` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(f"{STAGING_PREFIX}{target.name}")
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed attempt
    staging.mkdir()
    try:
        yield staging
        publish_directory(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


class AtomicCheckpointMixin:
    """Mix into a `transformers.Trainer` subclass (before Trainer): each `checkpoint-N` is
    written into a staging directory beside it and renamed into place when complete."""

    _staging_run_dir: str | None = None

    def _get_output_dir(self, trial: Any) -> str:
        if self._staging_run_dir is not None:
            return self._staging_run_dir
        return super()._get_output_dir(trial)  # type: ignore[misc]

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        run_dir = Path(super()._get_output_dir(trial))  # type: ignore[misc]
        name = f"checkpoint-{self.state.global_step}"  # type: ignore[attr-defined]
        staging_root = run_dir / f"{STAGING_PREFIX}{name}"
        shutil.rmtree(staging_root, ignore_errors=True)
        staging_root.mkdir(parents=True)
        self._staging_run_dir = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)  # type: ignore[misc]  # writes staging/name
        except BaseException:
            shutil.rmtree(staging_root, ignore_errors=True)
            raise
        finally:
            self._staging_run_dir = None
        publish_directory(staging_root / name, run_dir / name)
        shutil.rmtree(staging_root, ignore_errors=True)
        # Trainer rotated old checkpoints inside the staging directory; rotate the real ones
        # (by step number: a rename does not change a directory's mtime order reliably).
        if self.args.should_save:  # type: ignore[attr-defined]
            from transformers.trainer_utils import rotate_checkpoints

            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,  # type: ignore[attr-defined]
                best_model_checkpoint=self.state.best_model_checkpoint,  # type: ignore[attr-defined]
                use_mtime=False,
            )
