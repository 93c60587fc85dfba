"""A disk cache of the frozen reference views, so later epochs skip their forward passes.

PS and NR are the frozen base model on fixed prompts and a fixed response: their outputs are
the same in every epoch. This cache keeps, per trace, the final hidden states of both views at
the response positions (`(T, H)` each, in the model's dtype: exactly what the forward produced)
and the trainer applies the output layer to them again. Epoch 1 computes and stores; epochs 2+
read, which removes the two no-grad forwards from those steps. Storing hidden states instead of
logits keeps the cache H/V the size (896 vs 151,936 for Qwen2-0.5B): about
`2 views * T * H * bytes` per trace, 7 MB for T = 2048 on Qwen2-0.5B in bf16.

The cache knows nothing about models beyond an identity string: a directory made for another
model (or dtype) is emptied on open. Files are written atomically (temp file + rename), so a
crash leaves either a whole entry or none.

Departure from the release: the release recomputes both views every step; the values are the
same (the tests check cached against recomputed losses).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

IDENTITY_FILE = "cache.json"


def estimated_bytes(response_lengths: Sequence[int], hidden_size: int, dtype: torch.dtype) -> int:
    """Disk size of a full cache: both views' hidden states for every response token."""
    return 2 * sum(response_lengths) * hidden_size * torch.empty((), dtype=dtype).element_size()


class ReferenceCache:
    """Per-trace hidden states of the privileged and negative views, keyed by
    `TrainingExample.reference_key`."""

    def __init__(self, directory: Path, identity: dict[str, str]) -> None:
        self.directory = Path(directory)
        self.hits = 0  # batches read from the cache
        self.misses = 0  # batches computed (and stored)
        marker = self.directory / IDENTITY_FILE
        if marker.is_file() and json.loads(marker.read_text()) != identity:
            shutil.rmtree(self.directory)  # made for another model or dtype
        self.directory.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(identity, sort_keys=True) + "\n")

    def _path(self, key: str) -> Path:
        return self.directory / key[:2] / f"{key}.safetensors"

    def load(
        self, keys: Sequence[str], length: int, device: torch.device
    ) -> tuple[Tensor, Tensor] | None:
        """`(privileged, negative)` hidden states `(B, length, H)`, zero past each response;
        None unless every key is cached."""
        paths = [self._path(k) for k in keys]
        if not all(p.is_file() for p in paths):
            self.misses += 1
            return None
        entries = [load_file(p) for p in paths]
        views = []
        for view in ("privileged", "negative"):
            rows = [e[view] for e in entries]  # (T_i, H) each
            stacked = rows[0].new_zeros(len(rows), length, rows[0].shape[-1])  # (B, T, H)
            for i, row in enumerate(rows):
                stacked[i, : row.shape[0]] = row
            views.append(stacked.to(device, non_blocking=True))
        self.hits += 1
        return views[0], views[1]

    def store(
        self, keys: Sequence[str], lengths: Sequence[int], privileged: Tensor, negative: Tensor
    ) -> None:
        """Write each row's first `lengths[i]` hidden states `(B, T, H)` of both views."""
        for i, (key, size) in enumerate(zip(keys, lengths, strict=True)):
            path = self._path(key)
            if path.is_file():
                continue
            path.parent.mkdir(exist_ok=True)
            tensors = {
                "privileged": privileged[i, :size].detach().to("cpu").contiguous(),
                "negative": negative[i, :size].detach().to("cpu").contiguous(),
            }
            handle, temporary = tempfile.mkstemp(dir=path.parent, suffix=".partial")
            os.close(handle)
            save_file(tensors, temporary)
            os.replace(temporary, path)
