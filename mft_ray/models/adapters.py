"""LoRA adapters as society members' weights (``finetune.adapter: lora``).

An agent of a LoRA society is a PEFT adapter directory: ``adapter_config.json`` (which names the base model
it was trained on) and ``adapter_model.safetensors``. ``split_weights`` turns any member's weights into
(base model, adapter or None), so that the members whose adapters share a base share one engine.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from mft_ray.config import BUILTIN_PREFIX
from mft_ray.errors import ConfigError
from mft_ray.models.builtin import builtin_model_dir
from mft_ray.run.files import partial_path

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_adapter(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a LoRA adapter directory (an agent of a ``finetune.adapter: lora`` society)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def adapter_base(path: str | os.PathLike) -> str:
    """The base model an adapter directory was trained on (its adapter_config.json says); ConfigError if
    the file cannot be read or names none."""
    try:
        base = json.loads((Path(path) / ADAPTER_CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError) as exc:
        raise ConfigError(f"{path}: unreadable {ADAPTER_CONFIG} ({exc})") from None
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: {ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    return base


def split_weights(path: str) -> tuple[str, str | None]:
    """A member's weights as (base model, LoRA adapter or None). A ``builtin:`` name becomes its cache
    directory (built or not), which is how an adapter trained on it names its base."""
    if path.startswith(BUILTIN_PREFIX):
        return str(builtin_model_dir(path[len(BUILTIN_PREFIX):])), None
    if is_adapter(path):
        return adapter_base(path), path
    return path, None


def merge_adapter(adapter: str | os.PathLike, out: str | os.PathLike, trust_remote_code: bool = False) -> Path:
    """Write the full Hugging Face checkpoint of one LoRA agent (its base with the adapter merged in) to
    ``out``, for use outside this project; returns ``out``. ConfigError for a bad adapter or output path."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if not is_adapter(adapter):
        raise ConfigError(f"{adapter} is not a LoRA adapter directory (no {ADAPTER_CONFIG})")
    base = adapter_base(adapter)
    target = Path(out).expanduser().absolute()
    if target.exists():
        raise ConfigError(f"{target} exists; give a new directory")
    try:
        model = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=trust_remote_code)
        tokenizer = AutoTokenizer.from_pretrained(base, trust_remote_code=trust_remote_code)
        merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot merge {adapter} into its base {base}: {exc}") from None
    tmp = partial_path(target)  # renamed into place whole, as a finetune's export is
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, target)
    return target
