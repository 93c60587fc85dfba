"""The one staleness rule for what a process keeps loaded from a model directory, and the one
tokenizer cache.

`model_stamp` is the rule: the newest modification time of the model's files (a directory's
config, tokenizer and weight files, or a `.gguf` file itself) and of its adapter directory's
files. Every cache of models or tokenizers in a process keys on it, so a model prepared or an
adapter saved again on disk is loaded afresh, and an unchanged one is never loaded twice: the
tokenizer cache here, and the kept model session of `session.py` (the what-if re-scoring).

The web pages (prompt previews, trace pages), the training launch and every model session read
tokenizers through `cached_tokenizer`. Loading `transformers`' AutoTokenizer costs seconds on
first use; the web server warms this cache at start-up (`dailweb.warmup`). The module knows
nothing of Django or of which model is "the" base model.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any


def _newest_mtime_ns(path: Path) -> int | None:
    """A file's modification time, or the newest of a directory's files (not recursive)."""
    if path.is_file():
        return path.stat().st_mtime_ns
    if not path.is_dir():
        return None
    stamps = [p.stat().st_mtime_ns for p in path.iterdir() if p.is_file()]
    return max(stamps) if stamps else None


def model_stamp(model_path: str | Path, adapter: str | Path | None = None) -> int | None:
    """Newest modification time (ns) of the model's files and of the adapter directory's
    files; None when the model path holds no files."""
    model = _newest_mtime_ns(Path(model_path))
    if model is None:
        return None
    if adapter is None:
        return model
    return max(model, _newest_mtime_ns(Path(adapter)) or 0)


@functools.lru_cache(maxsize=4)
def _load(path: str, stamp: int) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def cached_tokenizer(model_dir: str | Path) -> Any | None:
    """The tokenizer of `model_dir` (cached per process, reloaded when `model_stamp` changes),
    or None when it has no tokenizer files. Loading errors (`OSError`, `ValueError`) reach the
    caller, who words them."""
    path = Path(model_dir)
    if not any(p.is_file() for p in path.glob("tokenizer*")):
        return None
    stamp = model_stamp(path)
    if stamp is None:
        return None
    return _load(str(path), stamp)
