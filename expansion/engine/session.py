"""A model session: the one place that opens a model for work and closes it.

`open_model_session` checks the paths and the engine and returns a `ModelSession`, which owns
- the tokenizer, from the process's one cache (`tokenizer_cache.cached_tokenizer`; a `.gguf`
  file, or an adapter directory given as the model, has no tokenizer files: its tokenizer is
  the one `models.load_model` reads with the model);
- the transformers model (with the adapter as a PEFT learner view), loaded on first use, so a
  vLLM evaluation that needs only the tokenizer and the engine never loads it;
- the rollout or sampling backend of its engine: "fast" (`rollout_fast.TransformersBackend`),
  "reference" (`rollout_reference.ReferenceBackend`) or "vllm" (`VllmBackend` on its own
  engine, the adapter as the learner view), created on first use;
- the forbidden token ids (the thinking-end token when reasoning, so the thinking section is
  never closed during expansion);
- closing: a vLLM engine is shut down, the model let go; closing twice is harmless.

`kept_model_session` keeps one session per process for callers that re-use a model between
requests (the what-if re-scoring of a web process): it is replaced, the old one closed, when
the model, the adapter, the options or the files on disk (`tokenizer_cache.model_stamp`) change.

Loading errors are `models.ModelLoadError` / `models.ModelNotFoundError` with messages naming
the path; an unknown engine is a `ValueError`. The module knows nothing of Django, of jobs or
of where models are stored; vLLM is imported only when a vLLM backend is started.
"""

from __future__ import annotations

import threading
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

from expansion.engine.models import DTYPES, ModelLoadError, ModelNotFoundError, load_model
from expansion.engine.prompts import thinking_end_token_ids
from expansion.engine.tokenizer_cache import cached_tokenizer, model_stamp

ENGINES = ("fast", "reference", "vllm")


class ModelSession:
    """A model, its tokenizer and its engine's backend, loaded on first use (thread-safe) and
    released by `close()` (or by leaving a `with` block)."""

    def __init__(
        self,
        model_path: Path,
        *,
        adapter: Path | None,
        engine: str,
        device: str | torch.device | None,
        dtype: str | torch.dtype | None,
        reasoning: bool,
        vllm_options: dict[str, Any],
    ) -> None:
        self.model_path = model_path
        self.adapter = adapter
        self.engine = engine
        self.device = device
        self.dtype = dtype
        self.reasoning = reasoning
        self.vllm_options = vllm_options
        self._lock = threading.RLock()
        self._model: Any = None
        self._model_tokenizer: Any = None  # the tokenizer load_model read with the model
        self._tokenizer: Any = None
        self._backend: Any = None
        self._closed = False

    def __enter__(self) -> ModelSession:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer: the process's cached one when the model path has tokenizer
        files, else the one read with the model (a `.gguf` file)."""
        with self._lock:
            self._check_open()
            if self._tokenizer is None:
                self._tokenizer = self._cached_tokenizer()
            if self._tokenizer is None:
                if self.engine == "vllm":
                    raise ModelLoadError(f"{self.model_path} has no tokenizer files")
                self._load_model()
                self._tokenizer = self._model_tokenizer
            return self._tokenizer

    @property
    def model(self) -> Any:
        """The transformers model (a `PeftModel` with the adapter as the learner view when an
        adapter is given), loaded on first use."""
        with self._lock:
            self._check_open()
            self._load_model()
            return self._model

    @property
    def backend(self) -> Any:
        """The engine's rollout backend (for "vllm" also the evaluations' sampler), created on
        first use; the transformers engines run on `model`."""
        with self._lock:
            self._check_open()
            if self._backend is None:
                if self.engine == "vllm":
                    self._backend = self._start_vllm()
                elif self.engine == "fast":
                    from expansion.engine.rollout_fast import TransformersBackend

                    self._backend = TransformersBackend(self.model)
                else:
                    from expansion.engine.rollout_reference import ReferenceBackend

                    self._backend = ReferenceBackend(self.model)
            return self._backend

    @property
    def forbidden_token_ids(self) -> tuple[int, ...]:
        """Token ids the rollout must never emit: `</think>` when reasoning (and it is one
        token), else none."""
        return thinking_end_token_ids(self.tokenizer) if self.reasoning else ()

    def close(self) -> None:
        """Shut a vLLM engine down and let the model go; later uses raise, closing again does
        nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            backend, self._backend = self._backend, None
            self._model = self._model_tokenizer = self._tokenizer = None
            if backend is not None and self.engine == "vllm":
                backend.close()

    # -- internals --

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"the model session of {self.model_path} is closed")

    def _cached_tokenizer(self) -> Any | None:
        try:
            return cached_tokenizer(self.model_path)
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"Cannot load the tokenizer of {self.model_path}: {exc}") from exc

    def _load_model(self) -> None:
        if self._model is None:
            self._model, self._model_tokenizer = load_model(
                self.model_path, device=self.device, dtype=self.dtype, adapter=self.adapter
            )

    def _start_vllm(self) -> Any:
        options = dict(self.vllm_options)
        if self.dtype is not None and self.dtype != "auto":
            options.setdefault("dtype", _vllm_dtype_name(self.dtype))
        try:
            from expansion.engine.vllm_backend.backends import VllmBackend

            return VllmBackend.from_model(self.model_path, adapter=self.adapter, **options)
        except ImportError as exc:
            raise ModelLoadError(
                f"vLLM is not installed here, so it cannot run {self.model_path}: {exc}"
            ) from exc
        except Exception as exc:  # vLLM raises many types at start-up; name the model
            raise ModelLoadError(f"Cannot start vLLM on {self.model_path}: {exc}") from exc


def _vllm_dtype_name(dtype: str | torch.dtype) -> str:
    """vLLM's name of a dtype ("bfloat16" for our "bf16" or `torch.bfloat16`)."""
    resolved = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else dtype
    return str(resolved).removeprefix("torch.")


def open_model_session(
    model_path: str | Path,
    *,
    adapter: str | Path | None = None,
    engine: str = "fast",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    reasoning: bool = False,
    vllm_options: dict[str, Any] | None = None,
) -> ModelSession:
    """A session on `model_path` (a transformers directory or a `.gguf` file; with "vllm" a
    Hugging Face directory) with `adapter` as the learner view. Nothing is loaded yet; the
    paths and the engine are checked now. `vllm_options` go to the vLLM engine (`dtype`, when
    given, too)."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    path = Path(model_path)
    if not path.exists():
        raise ModelNotFoundError(f"No model at {path}: the path does not exist.")
    adapter_path = Path(adapter) if adapter else None
    if adapter_path is not None and not adapter_path.exists():
        raise ModelNotFoundError(f"No adapter at {adapter_path}: the path does not exist.")
    if engine == "vllm" and not (path / "config.json").is_file():
        raise ModelLoadError(
            f"vLLM needs a Hugging Face model directory (with config.json); {path} is not one. "
            "Use the transformers backend for GGUF files."
        )
    return ModelSession(
        path,
        adapter=adapter_path,
        engine=engine,
        device=device,
        dtype=dtype,
        reasoning=reasoning,
        vllm_options=dict(vllm_options or {}),
    )


_kept_lock = threading.Lock()
_kept: tuple[tuple[Any, ...], ModelSession] | None = None


def kept_model_session(
    model_path: str | Path,
    *,
    adapter: str | Path | None = None,
    engine: str = "fast",
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    reasoning: bool = False,
) -> ModelSession:
    """The process's one kept session: the same session while the model, adapter, options and
    `model_stamp` stay the same; otherwise a new one (the old one closed)."""
    global _kept
    key = (
        str(Path(model_path)),
        str(Path(adapter)) if adapter else "",
        engine,
        str(device),
        str(dtype),
        reasoning,
        model_stamp(model_path, adapter or None),
    )
    with _kept_lock:
        if _kept is not None and _kept[0] == key and not _kept[1].closed:
            return _kept[1]
        session = open_model_session(
            model_path,
            adapter=adapter,
            engine=engine,
            device=device,
            dtype=dtype,
            reasoning=reasoning,
        )
        if _kept is not None:
            _kept[1].close()
        _kept = (key, session)
        return session
