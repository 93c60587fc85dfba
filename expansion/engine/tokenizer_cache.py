"""The one tokenizer cache of a process: a model directory's tokenizer, loaded on first use.

The web pages (prompt previews, trace pages) and the training launch all read tokenizers
through `cached_tokenizer`, under one staleness rule: the key is the directory and the newest
modification time of its `tokenizer*` files, so a tokenizer written again on disk (a model
prepared again) is loaded afresh, and an unchanged one is never loaded twice. Loading
`transformers`' AutoTokenizer costs seconds on first use; the web server warms this cache at
start-up (`dailweb.warmup`). The module knows nothing of Django or of which model is "the"
base model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def tokenizer_stamp(model_dir: str | Path) -> float | None:
    """Newest modification time of the directory's tokenizer files; None when it has none."""
    path = Path(model_dir)
    stamps = [p.stat().st_mtime for p in path.glob("tokenizer*") if p.is_file()]
    return max(stamps) if stamps else None


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: float) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cached_tokenizer(model_dir: str | Path) -> Any | None:
    """The tokenizer of `model_dir` (cached per process), or None when it has no tokenizer
    files. Loading errors (`OSError`, `ValueError`) reach the caller, who words them."""
    stamp = tokenizer_stamp(model_dir)
    if stamp is None:
        return None
    return _load(str(Path(model_dir)), stamp)
