"""How much memory a training job needs, from the model's config alone: no torch, no weights loaded.

`fit` finds the first plan that fits a worker's memory. The API asks it of a job's lower bound (its
smallest micro-batch, prompts of one token) and refuses at creation a job that cannot fit any
worker; the worker, which knows the prompts' lengths in its tokenizer, asks it of the real job and
takes its micro-batch and gradient checkpointing where the job left them at `auto`. Both answer
from `estimate`, whose parts are:

- weights: every parameter, fp32 (a LoRA job's frozen base in bf16 under bf16 autocast);
- gradients and AdamW's two moments: 4 + 8 bytes per trained parameter (fused AdamW keeps no more);
- reference: full fine-tuning with beta > 0 keeps an fp32 copy of the model (LoRA disables its
  adapters instead);
- activations: what autograd keeps per token and layer for the backward pass, counted from the
  layer's shapes (`_layer_activations`; measured with saved-tensor hooks on Llama/Qwen2 layers),
  for one micro-batch, plus the prompt pass sampling keeps for the update (`Rollout.prefix`);
  under gradient checkpointing, each layer's input and one layer's activations;
- logits: three fp32 (tokens x vocabulary) tensors, of one 256 MiB chunk where the head is chunked
  (`workers.rl.chunked`), of every token where it is not;
- sampling: the KV cache of every sequence of the step (the torch engine), or the vLLM sidecar's
  copy of the weights and its KV cache (`RFT_VLLM_KV_CACHE_GIB`), which share the worker's memory;
- checkpoint: writing the weights through safetensors holds one serialised copy of what is saved;
- several devices (one process each, the plan is one rank's): each samples its share of the prompts;
  full fine-tuning shards the decoder layers (FSDP2), so a rank holds its share of their weights,
  gradients, moments and reference copy, the embeddings and head whole, and gathers the other
  layers' weights while it samples (`gathered_weights`); a CPU's rank 0 gathers the whole weights and
  moments into its own memory to write a checkpoint;
- baseline: the worker process itself (the interpreter, torch, transformers), measured on CPU;
  on CUDA the context and the caching allocator's slack.

- allocator: what the layers' temporaries cost the process beyond the activations' bytes
  (`ACTIVATION_OVERHEAD`).

The peak is what stays (weights, gradients, moments, reference, the sidecar) plus the largest of
what comes and goes (the update's activations, logits and allocator overhead, sampling's cache, a
checkpoint write).
`bench/memory_planner.py` compares the estimate with the measured peak of real jobs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from service.core.errors import InvalidRequest
from service.core.settings import Settings

GIB = 2**30
CHUNK_BYTES = 256 << 20  # workers.rl.chunked.CHUNK_BYTES, without importing torch here
# Model types whose loss is computed in chunks (workers.rl.chunked.CHUNKED_TYPES; a test keeps them equal).
CHUNKED_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "gemma", "gemma2", "gemma3_text", "phi3"}
    | {"smollm3"}
)
CPU_BASELINE = int(0.75 * GIB)  # a training worker's resident memory before it loads a model (measured)
CUDA_BASELINE = int(0.75 * GIB)  # the CUDA context, cuBLAS workspaces and allocator slack
HEADROOM = 0.9  # the share of a worker's memory a plan may fill
# What the layers' activations cost the process beyond the bytes autograd keeps. On CPU, glibc's heap
# (kept, not unmapped: workers.rl.memory) does not hand the temporaries one layer or micro-batch
# frees back to the next in full: the body's resident rise measured 1.5x-1.9x its saved tensors
# (SmolLM2-shaped LoRA jobs at two shapes and a Qwen2-0.5B-shaped one, bench/memory_planner.py),
# while the logits' chunks, large buffers of one size, rose by exactly their bytes; 1.7 is the
# middle. On CUDA the caching allocator's overhead is not measured yet (no GPU lent): 1.0, the CUDA
# baseline's slack aside.
ACTIVATION_OVERHEAD = {"cpu": 1.7, "cuda": 1.0}
LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PLAN_PARAM = "method.reinforcement.hyperparameters"
STAYING = ("baseline", "weights", "reference", "gradients", "optimizer", "sampler")  # held for the whole job

# The built-in models' shapes (service.models.registry), so that planning never loads them.
BUILTIN_CONFIGS: dict[str, dict[str, Any]] = {
    "smollm2-135m-instruct": {
        "model_type": "llama",
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    },
    "tiny-random-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 259,
        "tie_word_embeddings": True,
    },
}


@dataclass(frozen=True)
class Shape:
    """The parts of a decoder-only transformer's config that set its memory."""

    model_type: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool
    norms: int = 2  # RMSNorms per layer (Gemma 2 and 3 norm after attention and the MLP too)
    qk_norm: bool = False  # Qwen3 and Gemma 3 normalise queries and keys per head

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Shape:
        config = config.get("text_config") or config  # multimodal wrappers keep the decoder's config apart
        hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
        model_type = str(config.get("model_type", ""))
        if "moe" in model_type or config.get("num_experts") or config.get("num_local_experts"):
            raise ValueError(f"{model_type}: mixture-of-experts layers are not counted")
        return cls(
            model_type=model_type,
            hidden=hidden,
            intermediate=int(config["intermediate_size"]),
            layers=int(config["num_hidden_layers"]),
            heads=heads,
            kv_heads=int(config.get("num_key_value_heads") or heads),
            head_dim=int(config.get("head_dim") or hidden // heads),
            vocab=int(config["vocab_size"]),
            tied=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=model_type == "qwen2" or bool(config.get("attention_bias", False)),
            norms=4 if model_type in ("gemma2", "gemma3_text") else 2,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
        )

    def linears(self) -> dict[str, tuple[int, int]]:
        """Each layer's projections: name -> (in, out) features."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    @property
    def layer_params(self) -> int:
        """One decoder layer's parameters."""
        per_layer = sum(a * b for a, b in self.linears().values()) + self.norms * self.hidden
        if self.qkv_bias:
            per_layer += (self.heads + 2 * self.kv_heads) * self.head_dim
        if self.qk_norm:
            per_layer += 2 * self.head_dim
        return per_layer

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.layer_params + self.hidden

    def adapter_params(self, rank: int, targets: Any) -> int:
        """LoRA's trained parameters: rank x (in + out) for each adapted projection of each layer."""
        names = LINEARS if targets == "all-linear" else [n for n in LINEARS if n in set(targets)]
        return self.layers * sum(rank * sum(self.linears()[n]) for n in names)


@dataclass(frozen=True)
class Workload:
    """What one training step holds, as the worker will run it."""

    prompts: int  # prompts per step (batch_size)
    group_size: int
    prompt_tokens: int  # the longest prompt, in tokens
    completion_tokens: int  # max_completion_tokens
    micro_batch_size: int
    gradient_checkpointing: bool
    lora_rank: int = 0
    lora_targets: Any = "all-linear"
    beta: float = 0.04
    device: Literal["cpu", "cuda"] = "cpu"
    bf16: bool = False  # forward passes under bf16 autocast
    engine: Literal["torch", "vllm"] = "torch"
    vllm_kv_cache_gib: float = 1.0
    vllm_bf16: bool = False
    keeps_prefix: bool = True  # the update reuses sampling's prompt pass (no dropout, no checkpointing)
    devices: int = 1  # ranks, one process a device; the plan is one rank's
    sharded: bool = False  # FSDP2 over the decoder layers (full fine-tuning on several devices)

    @property
    def sequences(self) -> int:
        """The sequences this rank samples: its share of the prompts, the largest."""
        return -(-self.prompts // self.devices) * self.group_size

    @property
    def rows(self) -> int:
        """The sequences of one micro-batch: no more than this rank trains (its share of the groups)."""
        return min(self.micro_batch_size, self.sequences)


@dataclass(frozen=True)
class Estimate:
    """Peak bytes of a training job, part by part."""

    parts: dict[str, int]  # name -> bytes
    peak: int
    workload: Workload
    parameters: int

    def describe(self) -> str:
        """The peak and its parts. The parts that come and go are listed apart: only the largest of
        the update (activations, logits and allocator together), sampling (the KV cache and the
        gathered weights) and a checkpoint write counts towards the peak (all of them, for ranks of
        a sharded job on a CPU: see `estimate`)."""

        def listed(names: Any) -> str:
            return ", ".join(f"{n} {gib(self.parts[n])}" for n in names if self.parts[n] >= 0.01 * GIB)

        w = self.workload
        checkpointing = "on" if w.gradient_checkpointing else "off"
        setup = f"micro_batch_size {w.micro_batch_size}, gradient checkpointing {checkpointing}"
        passing = listed(n for n in self.parts if n not in STAYING)
        summed = w.sharded and w.device == "cpu"
        how = "all" if summed else "the largest"
        then = f"; plus {how} of the update, sampling and checkpoint_write: {passing}" if passing else ""
        return f"{gib(self.peak)} at {setup} ({listed(STAYING)}{then})"


def gib(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def estimate(shape: Shape, work: Workload) -> Estimate:
    """The peak memory of a job of `shape` running `work`, with its parts."""
    P = shape.params
    # What a rank holds of each full-size tensor: all of it, or under FSDP2 its share of the layers.
    held = P - (shape.layers * shape.layer_params * (work.devices - 1) // work.devices if work.sharded else 0)
    trained = shape.adapter_params(work.lora_rank, work.lora_targets) if work.lora_rank else held
    base_bytes = 2 if work.lora_rank and work.bf16 else 4
    weights = P * base_bytes + 4 * trained if work.lora_rank else 4 * held
    staying = {
        "baseline": CUDA_BASELINE if work.device == "cuda" else CPU_BASELINE,
        "weights": weights,
        "reference": 4 * held if work.beta > 0 and not work.lora_rank else 0,
        "gradients": 4 * trained,
        "optimizer": 8 * trained,
        "sampler": _sidecar(shape, work),
    }
    gathered_on_cpu = work.sharded and work.device == "cpu"  # rank 0 gathers weights and moments to save them
    passing = {
        "activations": _activations(shape, work),
        "logits": _logits(shape, work),
        "kv_cache": _kv_cache(shape, work) if work.engine == "torch" else 0,
        "gathered_weights": 4 * (P - held),
        "checkpoint_write": 12 * P if gathered_on_cpu else 4 * trained,
    }
    passing["allocator"] = int(passing["activations"] * (ACTIVATION_OVERHEAD[work.device] - 1))
    update = passing["activations"] + passing["logits"] + passing["allocator"]
    sampling = passing["kv_cache"] + passing["gathered_weights"]
    if gathered_on_cpu:
        # Measured (bench/distributed_bench.py, 135M, 2 gloo ranks): the ranks' resident memory rises
        # step after step to about the parts that come and go added up, not their largest, and stays
        # (live tensors flat): the heap does not hand one phase's freed pages to the next here.
        peak = sum(staying.values()) + update + sampling + passing["checkpoint_write"]
    else:
        peak = sum(staying.values()) + max(update, sampling, passing["checkpoint_write"])
    return Estimate({**staying, **passing}, peak, work, P)


def _act_bytes(work: Workload) -> int:
    return 2 if work.bf16 else 4


def _layer_activations(shape: Shape) -> int:
    """Elements autograd keeps per token for one decoder layer's backward pass: the two norms'
    inputs and outputs and the residual stream (6 h), queries before and after rotation (2 q), keys
    and values (2 kv; 2 q more where grouped-query attention repeats them for a masked attention),
    and the MLP's gate, up, activation and product (4 i)."""
    q, kv = shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    repeated = 2 * q if shape.kv_heads < shape.heads else 0
    return 6 * shape.hidden + 2 * q + 2 * kv + repeated + 4 * shape.intermediate


def _activations(shape: Shape, work: Workload) -> int:
    size = _act_bytes(work)
    micro_len = work.completion_tokens if work.keeps_prefix else work.prompt_tokens + work.completion_tokens
    tokens = work.rows * micro_len
    prefix = work.prompts * work.prompt_tokens if work.keeps_prefix else 0  # kept from sampling until the update ends
    per_layer = _layer_activations(shape) * size
    if work.gradient_checkpointing:  # each layer's input, and one layer replayed at a time
        kept = tokens * shape.layers * shape.hidden * size + tokens * per_layer
    else:
        kept = tokens * shape.layers * per_layer
    mask = 4 * work.rows * (work.prompt_tokens + work.completion_tokens) ** 2
    return kept + prefix * shape.layers * per_layer + mask + 2 * tokens * shape.hidden * size


def _logits(shape: Shape, work: Workload) -> int:
    micro_len = work.completion_tokens if work.keeps_prefix else work.prompt_tokens + work.completion_tokens
    tokens = work.rows * micro_len
    if shape.model_type in CHUNKED_TYPES:
        tokens = min(tokens, max(1, CHUNK_BYTES // (4 * shape.vocab)))
    return 3 * 4 * tokens * shape.vocab


def _kv_cache(shape: Shape, work: Workload) -> int:
    length = work.prompt_tokens + work.completion_tokens
    per_token = 2 * shape.layers * shape.kv_heads * shape.head_dim * _act_bytes(work)
    return work.sequences * length * per_token + work.sequences * shape.vocab * 4 * 2  # cache, a step's logits


def _sidecar(shape: Shape, work: Workload) -> int:
    if work.engine != "vllm":
        return 0
    return shape.params * (2 if work.vllm_bf16 else 4) + int(work.vllm_kv_cache_gib * GIB)


def fit(shape: Shape, work: Workload, budget: int, *, micro_batch_auto: bool, checkpointing_auto: bool) -> Estimate:
    """The first plan that fits `budget` bytes (times `HEADROOM`): the asked-for micro-batch without
    checkpointing, then smaller micro-batches (halving), then the same with checkpointing on; only
    what the job left at `auto` varies. Where none fits, a 400 naming what the smallest would need
    and what to change."""
    sizes = [work.micro_batch_size]
    while micro_batch_auto and sizes[-1] > 1:
        sizes.append(sizes[-1] // 2)
    switches = [False, True] if checkpointing_auto else [work.gradient_checkpointing]
    plan = None
    for checkpointing in switches:
        for size in sizes:
            candidate = replace(
                work,
                micro_batch_size=size,
                gradient_checkpointing=checkpointing,
                keeps_prefix=work.keeps_prefix and not checkpointing,
            )
            plan = estimate(shape, candidate)
            if plan.peak <= HEADROOM * budget:
                return plan
    assert plan is not None  # the last candidate is the smallest
    raise InvalidRequest(
        f"This job needs at least {plan.describe()}, more than {HEADROOM:.0%} of the {gib(budget)} a worker "
        f"has. To fit: {advice(plan)}.",
        param=PLAN_PARAM,
        code="job_too_large",
    )


def advice(plan: Estimate) -> str:
    """What would shrink the parts that dominate `plan`."""
    parts, w, tips = plan.parts, plan.workload, []
    if not w.lora_rank:
        tips.append("train LoRA adapters (lora_rank, e.g. 16) instead of every weight")
    if parts["reference"]:
        tips.append("set beta to 0 (no reference copy of the model)")
    if parts["activations"] + parts["logits"] + parts["allocator"] > 0.2 * plan.peak:
        tips.append("lower max_completion_tokens or micro_batch_size, or set gradient_checkpointing to true")
    if parts["sampler"]:
        tips.append("lower RFT_VLLM_KV_CACHE_GIB or use rollout_engine 'torch'")
    tips.append("use a smaller model, or workers with more memory (RFT_WORKER_MEMORY_GIB)")
    return "; ".join(tips)


def refuse_if_too_large(
    model: str,
    hyperparameters: dict[str, Any],
    group_size: int,
    engine: str,
    settings: Settings,
    location: str | None = None,
    budget: int | None = None,
    devices: int = 1,
) -> Estimate | None:
    """The API's check at job creation: a 400 where even the job's smallest plan (one-token prompts,
    the smallest micro-batch and checkpointing its `auto`s allow, a bf16 LoRA base where training
    may autocast; one rank's share where it asks for `devices`) exceeds `budget` bytes, else
    `RFT_WORKER_MEMORY_GIB`, else this machine's memory. Returns that plan (what a worker needs at
    least); None for a model whose config is not on this machine, which passes: its worker plans it."""
    shape = shape_of(model, location)
    if shape is None:
        return None
    hp = hyperparameters
    auto_mb, auto_ckpt = (
        hp.get("micro_batch_size", "auto") == "auto",
        hp.get("gradient_checkpointing", "auto") == "auto",
    )
    batch = 1 if hp.get("batch_size", "auto") == "auto" else int(hp["batch_size"])
    bf16 = settings.training_precision != "fp32"
    work = Workload(
        prompts=batch,
        group_size=group_size,
        prompt_tokens=1,
        completion_tokens=int(hp.get("max_completion_tokens", 64)),
        micro_batch_size=1 if auto_mb else int(hp["micro_batch_size"]),
        gradient_checkpointing=True if auto_ckpt else bool(hp["gradient_checkpointing"]),
        lora_rank=int(hp.get("lora_rank", 0)),
        lora_targets=hp.get("lora_target_modules", "all-linear"),
        beta=float(hp.get("beta", 0.04)),
        bf16=bf16,
        engine="vllm" if engine == "vllm" else "torch",
        vllm_kv_cache_gib=settings.vllm_kv_cache_gib,
        vllm_bf16=settings.vllm_dtype != "float32",
        keeps_prefix=False,
        devices=devices,
        sharded=devices > 1 and not int(hp.get("lora_rank", 0)),
    )
    if budget is None:
        budget = int(settings.worker_memory_gib * GIB) if settings.worker_memory_gib else host_memory()
    return fit(shape, work, budget, micro_batch_auto=False, checkpointing_auto=False)


def host_memory() -> int:
    """This machine's physical memory, bytes."""
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def config_of(name: str, location: str | None = None) -> dict[str, Any] | None:
    """A model's config.json as a dict, without loading it: the built-in models' shapes, a local
    folder's file (a LoRA folder's base model's), or a hub id's file in the local Hugging Face cache;
    None where it is nowhere on this machine."""
    if name in BUILTIN_CONFIGS:
        return BUILTIN_CONFIGS[name]
    folder = Path(location or name).expanduser()
    if (folder / "config.json").is_file():
        return dict(json.loads((folder / "config.json").read_text()))
    adapter = folder / "adapter_config.json"
    if adapter.is_file():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        return config_of(base) if isinstance(base, str) and base != name else None
    if name.count("/") == 1 and not name.startswith(("/", ".", "~")):
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(name, "config.json")
        if isinstance(cached, str):
            return dict(json.loads(Path(cached).read_text()))
    return None


def shape_of(name: str, location: str | None = None) -> Shape | None:
    """The model's `Shape`, or None where its config is unknown here or not a decoder we can count."""
    config = config_of(name, location)
    if config is None:
        return None
    try:
        return Shape.from_config(config)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):
        return None
