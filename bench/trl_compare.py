"""Our GRPO loop against TRL's GRPOTrainer: same model, prompts, grader and settings, side by side.

    python bench/trl_compare.py [--steps 10] [--tokens 16] [--configs lora,full] [--frameworks ours,trl]
                                [--engine torch|vllm] [--trl-bf16] [--json-out r.json]
    python bench/trl_compare.py --smoke      # tiny random Llama, 2 steps, seconds

Each (framework, lora|full) pair runs in its own subprocess (so peak RSS is its own) and reports
completions trained per second over the training steps only, peak RSS, the validation reward of the
untouched and of the trained model (greedy decoding of the validation prompts, graded by the same
compiled grader, one evaluation function for both), and the time split of a step into sampling,
scoring and update. The update's model FLOPs are counted from the shapes that really run through
the transformer (forward hooks) and set against the machine's fp32 GEMM peak, measured first.

What is matched: model and tokenizer (our registry), the training prompts of every step (TRL gets
our `batch_for_step` order with shuffling off), the grader (our engine, sandboxed python grader),
group size, prompts per step, micro-batch, completion length, sampling temperature, learning rate
(constant, AdamW, no weight decay), gradient clipping, beta with the k3 KL estimator (TRL without its
`use_bias_correction_kl`, which changes the KL gradient), token-mean
loss aggregation over the whole step (TRL `loss_type="dapo"`), clip range 0.2/0.28, group-std
advantages with +1e-4, masking of truncated completions, fp32, no gradient checkpointing, LoRA
shape and targets. What differs is listed in bench/README.md.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, cast

import torch

from service.core.settings import Settings
from service.graders.engine import Compiled, compile_grader, grade_batch
from service.graders.schemas import parse_grader
from service.graders.templates import Sample
from service.models.engines import EngineName
from service.models.registry import load_fresh, resolve
from workers.rl.config import RLConfig, with_engine
from workers.rl.config import resolve as resolve_config
from workers.rl.data import Example, batch_for_step, load_examples
from workers.rl.rollout import Rollout, sample

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "arithmetic"


@dataclass(frozen=True)
class Bench:
    model: str = "smollm2-135m-instruct"
    steps: int = 10
    batch_size: int = 8
    group_size: int = 4
    max_completion_tokens: int = 16
    temperature: float = 0.7
    learning_rate_multiplier: float = 3.0  # full: 3e-5, LoRA: 3e-4 (our base rates 1e-5 / 1e-4)
    beta: float = 0.02
    lora_rank: int = 16
    refill_rounds: int = 0  # TRL has no refill of zero-variance groups, so ours runs without it
    trl_bf16: bool = False  # TRL autocasts to bf16 by default; matched runs are fp32 (ours: RFT_TRAINING_PRECISION)
    mask_truncated: bool = True
    valid_limit: int = 64
    seed: int = 42
    micro_batch_size: int | str = "auto"  # ours: 16 here (whole groups); trl_replay.py's control run uses 8
    engine: str = "torch"  # ours: the rollout engine (`--engine vllm`: `make vllm`, then importance-corrected)


# A random model rarely ends an answer: keep truncated completions in the loss so the update runs.
SMOKE = Bench(
    model="tiny-random-llama",
    steps=2,
    batch_size=2,
    group_size=2,
    max_completion_tokens=8,
    valid_limit=4,
    mask_truncated=False,
)


def hyperparameters(bench: Bench, lora: bool) -> dict[str, Any]:
    """The job hyperparameters our loop resolves; TRL's config is derived from the resolved values."""
    return {
        "batch_size": bench.batch_size,
        "compute_multiplier": bench.group_size / 4,
        "learning_rate_multiplier": bench.learning_rate_multiplier,
        "max_completion_tokens": bench.max_completion_tokens,
        "temperature": bench.temperature,
        "beta": bench.beta,
        "kl_estimator": "k3",
        "epsilon_low": 0.2,
        "epsilon_high": 0.28,
        "loss_aggregation": "token_mean",
        "importance_sampling": "token",
        "advantage_std": "group",
        "mask_truncated_completions": bench.mask_truncated,
        "refill_rounds": bench.refill_rounds,
        "max_grad_norm": 1.0,
        "warmup_steps": 0,
        "lora_rank": bench.lora_rank if lora else 0,
        "micro_batch_size": bench.micro_batch_size,
    }


def resolved(bench: Bench, lora: bool, n_train: int) -> RLConfig:
    cfg = resolve_config(hyperparameters(bench, lora), n_train)
    assert cfg.group_size == bench.group_size, f"group size {bench.group_size} is not 4 x a compute multiplier"
    # As the job runs with: torch's sampler is the trainer (no importance correction), vLLM's is not.
    from workers.rl.engine import engine_class

    engine = cast(EngineName, bench.engine)
    cfg = replace(cfg, total_steps=bench.steps, eval_interval=bench.steps)
    return with_engine(cfg, engine, engine_class(engine).same_as_trainer)


def settings() -> Settings:
    vllm = os.environ.get("RFT_VLLM_PYTHON") or str(ROOT / ".venv-vllm" / "bin" / "python")
    return Settings(data_dir=Path(os.environ.get("RFT_DATA_DIR", "~/.rft")).expanduser(), vllm_python=vllm)


def validation(bench: Bench) -> list[Example]:
    return load_examples(EXAMPLE / "valid.jsonl")[: bench.valid_limit]


def arithmetic(bench: Bench) -> tuple[list[Example], list[Example], Compiled]:
    train, valid = load_examples(EXAMPLE / "train.jsonl"), validation(bench)
    grader = compile_grader(parse_grader(json.loads((EXAMPLE / "grader.json").read_text())), settings())
    return train, valid, grader


def completion_ids(rollout: Rollout) -> list[list[int]]:
    """Each row's completion tokens, through EOS (what the loop trains on and TRL's generation returns)."""
    p = rollout.prompt_len
    return [ids[p:][mask.bool()].tolist() for ids, mask in zip(rollout.input_ids, rollout.completion_mask, strict=True)]


def evaluate(model: Any, tokenizer: Any, valid: list[Example], grader: Compiled, max_tokens: int) -> float:
    """Mean reward of greedy answers to the validation prompts: the one yardstick for both frameworks."""
    prompts = [e.messages for e in valid]
    rollout = sample(
        model, tokenizer, prompts, 1, max_new_tokens=max_tokens, temperature=1.0, top_p=1.0, seed=0, greedy=True
    )
    grades = grade_batch(grader, [Sample.from_text(t) for t in rollout.texts], [e.item for e in valid])
    return sum(grades.rewards) / len(grades.rewards)


class Profile:
    """Wall time per phase, and the (sequences x positions) the update pushes through the transformer.

    A forward pre-hook on the backbone records every call made while counting is on, split by whether
    autograd records it (policy forward, later also run backward) or not (reference, old policy).
    Ours runs the policy's prompt pass while sampling and its backward in the update: while sampling,
    only passes under autograd are counted, as "prefix" (backward only)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.positions = {"grad": 0, "no_grad": 0, "prefix": 0}  # sum of n * L over forward calls
        self.attention = {"grad": 0, "no_grad": 0, "prefix": 0}  # sum of n * L * (L + cached positions)
        self.counting: str | None = None  # "all" | "prefix" (autograd passes only) | None
        self.machine: dict[str, float] = {}

    @contextmanager
    def training(self) -> Iterator[None]:
        """Process CPU time over wall time (2.0 = both cores ours) and the load average: other work on the
        machine shows up as utilisation under the thread count and load above it."""
        cpu, wall, load = time.process_time(), time.perf_counter(), os.getloadavg()[0]
        yield
        wall = time.perf_counter() - wall
        self.machine = {
            "cpu_per_wall": (time.process_time() - cpu) / wall,
            "load_before": load,
            "load_after": os.getloadavg()[0],
        }

    def attach(self, backbone: torch.nn.Module) -> None:
        def on_forward(_: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            ids = kwargs.get("input_ids")
            ids = ids if ids is not None else (args[0] if args else kwargs["inputs_embeds"])
            if self.counting == "all" or (self.counting == "prefix" and torch.is_grad_enabled()):
                key = "prefix" if self.counting == "prefix" else "grad" if torch.is_grad_enabled() else "no_grad"
                cache = kwargs.get("past_key_values", kwargs.get("cache"))  # a shared prompt's KV cache
                seq_length = getattr(cache, "get_seq_length", None)
                past = int(seq_length()) if callable(seq_length) else 0
                n, length = ids.shape[0], ids.shape[1]
                self.positions[key] += n * length
                self.attention[key] += n * length * (length + past)

        backbone.register_forward_pre_hook(on_forward, with_kwargs=True)

    def wrap(self, owner: Any, method: str, phase: str, count: str | None) -> None:
        """Time `owner.method` as `phase`, counting forward passes inside it ("all", "prefix") or not."""
        inner: Callable[..., Any] = getattr(owner, method)

        def timed(*args: Any, **kwargs: Any) -> Any:
            before, self.counting = self.counting, count
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.seconds[phase] += time.perf_counter() - started
                self.counting = before

        setattr(owner, method, timed)


def backbone_of(model: Any) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return cast(torch.nn.Module, base.model)


def update_flops(model: Any, profile: Profile, lora: bool) -> float:
    """Model FLOPs of the update (recomputation not counted), from the positions that ran.

    forward F = 2 * P * sum(n * L) + 4 * d * layers * sum(n * L * (L + cached))   (P: linear weights + LM head;
    the LM head counted at every position: exact for TRL on CPU, an upper bound where only completions are scored)
    full: 3F over the policy passes (forward, backward to activations, backward to weights) + F for the reference
    LoRA: 2F over the policy passes (the backward still runs through every frozen weight, but computes no weight
          gradient for them) + 6 * P_lora * positions + F for the reference (adapters off)
    prefix (ours: the prompt pass sampling ran under autograd): its backward only, 2F (full) or F + 4 * P_lora *
          positions (LoRA)
    """
    config = model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    linear = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    params = sum(m.weight.numel() for m in linear)
    lora_params = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)

    def forward(key: str) -> float:
        return 2.0 * params * profile.positions[key] + 4.0 * d * layers * profile.attention[key]

    if lora:
        policy = 2 * forward("grad") + 6.0 * lora_params * profile.positions["grad"]
        prefix = forward("prefix") + 4.0 * lora_params * profile.positions["prefix"]
    else:
        policy, prefix = 3 * forward("grad"), 2 * forward("prefix")
    return policy + prefix + forward("no_grad")


def peak_rss_mib(pid: int | str = "self") -> float:
    """A process's peak RSS (this one's by default). VmHWM, not getrusage: Linux carries ru_maxrss over
    exec() from the parent, and a child's is only known once it has been waited for."""
    status = Path(f"/proc/{pid}/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class BenchContext:
    """The slice of JobContext that `loop.set_up` and `Loop.train_step` touch: the job's row (the
    arithmetic example's files, its grader, the bench's hyperparameters), events printed, no
    checkpoint to resume from or roll back to."""

    def __init__(self, bench: Bench, lora: bool) -> None:
        folder = Path(tempfile.mkdtemp(prefix="trl-compare-"))
        atexit.register(shutil.rmtree, folder, True)
        valid = folder / "valid.jsonl"
        valid.write_text("".join(json.dumps(e.item) + "\n" for e in validation(bench)))
        grader = json.loads((EXAMPLE / "grader.json").read_text())
        hp = {**hyperparameters(bench, lora), "rollout_engine": bench.engine}
        self.job = {
            "id": "bench",
            "seed": bench.seed,
            "model": bench.model,
            "project_id": None,
            "training_path": EXAMPLE / "train.jsonl",
            "validation_path": valid,
            "method": {"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp}},
        }
        self.settings = settings()
        self.events: list[str] = []

    def event(self, message: str, **_: Any) -> None:
        self.events.append(message)
        print(f"  event: {message}", flush=True)

    def update_job(self, **_: Any) -> None:
        pass

    def latest_checkpoint(self) -> None:
        return None


@dataclass
class Ours:
    """Our loop, built by the worker's own `workers.rl.loop.set_up`."""

    cfg: RLConfig
    loop: Any  # workers.rl.loop.Loop
    parts: Any  # workers.rl.loop.Parts
    grader: Compiled

    @property
    def model(self) -> Any:
        return self.parts.model

    @property
    def tokenizer(self) -> Any:
        return self.parts.tokenizer

    @property
    def valid(self) -> list[Example]:
        return list(self.parts.valid)


def build_ours(bench: Bench, lora: bool) -> Ours:
    from workers.context import JobContext
    from workers.rl.launch import RankContext
    from workers.rl.loop import Loop, set_up
    from workers.rl.ranks import SINGLE

    ctx = RankContext.of(cast(JobContext, BenchContext(bench, lora)), SINGLE)
    parts = set_up(ctx)
    expected = resolved(bench, lora, len(parts.train))
    assert (parts.cfg.group_size, parts.cfg.rollout_engine) == (expected.group_size, expected.rollout_engine)
    grader = parts.compile_grader()
    return Ours(parts.cfg, Loop(ctx, parts, grader), parts, grader)


def run_ours(bench: Bench, lora: bool) -> dict[str, Any]:
    """Build the loop's parts as `run_training` does, then call `Loop.train_step` for each step.

    Evaluation, checkpoints and database writes are left out: they are not training."""
    ours = build_ours(bench, lora)
    cfg, loop, model, tokenizer, valid = ours.cfg, ours.loop, ours.model, ours.tokenizer, ours.valid
    with ours.grader as grader, contextlib.closing(ours.parts):
        before = evaluate(model, tokenizer, valid, grader, cfg.max_completion_tokens)
        profile = Profile()
        for network in (model, loop.reference.copy):  # the full-fine-tuning reference is a second network
            if network is not None:
                profile.attach(backbone_of(network))
        profile.wrap(loop, "update", "update", count="all")
        profile.wrap(loop, "sample_and_grade", "sampling", count="prefix")
        steps = []
        with profile.training():
            for step in range(1, bench.steps + 1):
                metrics = loop.train_step(step)
                steps.append(step_record(metrics))
                print(f"  ours step {step}: {json.dumps(steps[-1])}", flush=True)
        after = evaluate(model, tokenizer, valid, grader, cfg.max_completion_tokens)
        sidecar = getattr(loop.engine, "pid", None)  # vLLM's process holds its own copy of the weights
        sidecar_peak = peak_rss_mib(sidecar) if sidecar is not None else None
    result = summary(bench, cfg, steps, profile, update_flops(model, profile, lora), before, after)
    return {**result, "sidecar_peak_rss_mib": sidecar_peak}


def step_record(metrics: dict[str, Any]) -> dict[str, Any]:
    timing = metrics["timing"]["step"]
    return {
        "seconds": timing["full_iteration"],
        "sampling": timing["sampling"],
        "scoring": timing["scoring"],
        "weight_sync": timing["weight_sync"],
        "train_reward": metrics["train_reward_mean"],
        "kl": metrics["kl"],
        "completion_tokens_mean": metrics["completion_tokens_mean"],
        "skipped": metrics["update_skipped"],
    }


def summary(
    bench: Bench,
    cfg: RLConfig,
    steps: list[dict[str, Any]],
    profile: Profile,
    flops: float,
    before: float,
    after: float,
) -> dict[str, Any]:
    seconds = sum(s["seconds"] for s in steps)
    split = {k: sum(s[k] for s in steps) / len(steps) for k in ("sampling", "scoring")}
    split["update"] = profile.seconds["update"] / len(steps)
    split["other"] = seconds / len(steps) - sum(split.values())
    split["weight_sync"] = sum(s.get("weight_sync", 0.0) for s in steps) / len(steps)  # a part of the update
    sampled = sum(s["completion_tokens_mean"] for s in steps) * cfg.batch_size * cfg.group_size
    return {
        "sampling_tokens_per_second": sampled / max(sum(s["sampling"] for s in steps), 1e-9),
        "completions": len(steps) * cfg.batch_size * cfg.group_size,
        "train_seconds": seconds,
        "completions_per_second": len(steps) * cfg.batch_size * cfg.group_size / seconds,
        "seconds_per_step": seconds / len(steps),
        "seconds_per_step_after_first": sum(s["seconds"] for s in steps[1:]) / max(len(steps) - 1, 1),
        "split": split,
        "update_flops_per_step": flops / len(steps),
        "update_gflops_per_second": flops / 1e9 / profile.seconds["update"],
        "positions": profile.positions,
        "valid_before": before,
        "valid_after": after,
        "peak_rss_mib": peak_rss_mib(),
        "machine": profile.machine,
        "learning_rate": cfg.learning_rate,
        "steps": steps,
    }


def trl_trainer(bench: Bench, lora: bool, out: str, callbacks: list[Any]) -> tuple[Any, RLConfig, Any, Compiled]:
    """TRL's GRPOTrainer on the same prompts in the same order, with our grader as its reward function.
    Returns the trainer, the resolved config, the tokenizer and the grader (the caller enters it)."""
    from datasets import Dataset
    from transformers.trainer_callback import PrinterCallback
    from trl import GRPOTrainer

    train, _, grader = arithmetic(bench)
    cfg = resolved(bench, lora, len(train))
    order = [i for step in range(bench.steps) for i in batch_for_step(len(train), cfg.batch_size, step, bench.seed)]
    rows = [{"prompt": train[i].messages, "item": json.dumps(train[i].item)} for i in order]
    model, tokenizer = trl_model(bench)
    torch.manual_seed(bench.seed)  # LoRA's A matrices are drawn when the trainer wraps the model
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward_function(grader),
        args=trl_config(cfg, bench, out),
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
        peft_config=lora_config(cfg) if lora else None,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # our callbacks print what is needed
    return trainer, cfg, tokenizer, grader


def trl_logs(trainer: Any) -> list[dict[str, Any]]:
    """TRL's per-step log entries (one per optimizer step with `logging_steps=1`)."""
    return [entry for entry in trainer.state.log_history if "reward" in entry]


def run_trl(bench: Bench, lora: bool) -> dict[str, Any]:
    profile, steps = Profile(), cast(list[dict[str, Any]], [])
    valid = validation(bench)
    with tempfile.TemporaryDirectory() as out:
        trainer, cfg, tokenizer, compiled = trl_trainer(bench, lora, out, [step_timer(profile, steps)])
        with compiled as grader:
            # The untouched model: LoRA's B matrices start at zero, so the wrapped model is the base model.
            before = evaluate(trainer.model, tokenizer, valid, grader, cfg.max_completion_tokens)
            for network in (trainer.model, trainer.ref_model):  # the full-fine-tuning reference is a second network
                if network is not None:
                    profile.attach(backbone_of(network))
            profile.wrap(trainer, "_generate", "sampling", count=None)
            profile.wrap(trainer, "_calculate_rewards", "scoring", count=None)
            profile.counting = "all"  # everything in a step that is not sampling or scoring is the update
            with profile.training():
                trainer.train()
            profile.counting = None
            after = evaluate(trainer.model, tokenizer, valid, grader, cfg.max_completion_tokens)
    for step, log in zip(steps, trl_logs(trainer), strict=True):
        step.update(train_reward=log["reward"], kl=log.get("kl"), completion_tokens_mean=log["completions/mean_length"])
        print(f"  trl step: {json.dumps(step)}", flush=True)
    # The rest of TRL's step (reference forward, advantages, policy passes, optimizer) is its update.
    profile.seconds["update"] = sum(s["seconds"] - s["sampling"] - s["scoring"] for s in steps)
    return summary(bench, cfg, steps, profile, update_flops(trainer.model, profile, lora), before, after)


def step_timer(profile: Profile, steps: list[dict[str, Any]]) -> Any:
    """A callback that appends each optimizer step's wall time and its sampling and scoring seconds."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):  # type: ignore[misc]
        def on_step_begin(self, *_: Any, **__: Any) -> None:
            self.started, self.mark = time.perf_counter(), dict(profile.seconds)

        def on_step_end(self, *_: Any, **__: Any) -> None:
            phases = {k: profile.seconds[k] - self.mark.get(k, 0.0) for k in ("sampling", "scoring")}
            steps.append({"seconds": time.perf_counter() - self.started, **phases})

    return StepTimer()


def trl_model(bench: Bench) -> tuple[Any, Any]:
    """Our registry's model; TRL builds its full-fine-tuning reference from `config._name_or_path`, so the
    model must live in a folder (the tiny model is written to one)."""
    model, tokenizer = load_fresh(resolve(bench.model), settings())
    if not Path(model.config._name_or_path or "/nonexistent").is_dir():
        folder = Path(tempfile.mkdtemp(prefix="trl-compare-model-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        model.config._name_or_path = str(folder)
    return model, tokenizer


def reward_function(grader: Compiled) -> Callable[..., list[float | None]]:
    """TRL's reward function: our compiled grader on the whole JSONL line, as our loop grades."""

    def sum_correct(prompts: list[Any], completions: list[Any], item: list[str], **_: Any) -> list[float | None]:
        texts = [c if isinstance(c, str) else c[0]["content"] for c in completions]
        return list(grade_batch(grader, [Sample.from_text(t) for t in texts], [json.loads(i) for i in item]).rewards)

    return sum_correct


def lora_config(cfg: RLConfig) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,  # type: ignore[arg-type]  # peft accepts floats
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def trl_config(cfg: RLConfig, bench: Bench, out: str) -> Any:
    from trl import GRPOConfig

    per_step = cfg.batch_size * cfg.group_size
    return GRPOConfig(
        output_dir=out,
        max_steps=bench.steps,
        per_device_train_batch_size=cfg.micro_batch_size,
        gradient_accumulation_steps=per_step // cfg.micro_batch_size,
        num_generations=cfg.group_size,
        max_completion_length=cfg.max_completion_tokens,
        # Ours scores log-probs at temperature 1 and samples at `temperature`; TRL divides the logits by
        # `temperature` for both, so it gets 1.0 and the sampling temperature goes to generate() only.
        temperature=1.0,
        generation_kwargs={"temperature": cfg.temperature},
        top_p=cfg.top_p,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=cfg.max_grad_norm,
        beta=cfg.beta,
        # TRL 1.16 multiplies the k3 term by the (value-1, differentiable) importance ratio by default, which adds
        # kl * grad(logp) to the KL gradient once the policy has left the reference; ours takes k3's own gradient.
        use_bias_correction_kl=False,
        loss_type="dapo",  # token mean over the whole step = our token_mean
        epsilon=cfg.epsilon_low,
        epsilon_high=cfg.epsilon_high,
        scale_rewards=cfg.advantage_std,
        importance_sampling_level=cfg.importance_sampling,
        mask_truncated_completions=cfg.mask_truncated_completions,
        num_iterations=1,
        shuffle_dataset=False,
        gradient_checkpointing=False,
        bf16=bench.trl_bf16,
        fp16=False,
        use_cpu=True,
        seed=bench.seed,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
    )


def gemm_peak(sizes: tuple[int, ...], tokens: int, hidden: int, inner: int, vocab: int) -> dict[str, Any]:
    """Best fp32 GEMM rate of several runs: large squares (the peak) and the update's own shapes."""

    def rate(m: int, k: int, n: int) -> float:
        a, b = torch.randn(m, k), torch.randn(k, n)
        torch.mm(a, b)
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            torch.mm(a, b)
            best = min(best, time.perf_counter() - started)
        return 2.0 * m * k * n / best / 1e9

    squares = {str(n): rate(n, n, n) for n in sizes}
    shapes = {f"{tokens}x{hidden}x{inner} (MLP)": rate(tokens, hidden, inner)}
    shapes[f"{tokens}x{hidden}x{vocab} (LM head)"] = rate(tokens, hidden, vocab)
    return {"threads": torch.get_num_threads(), "square": squares, "peak": max(squares.values()), "shapes": shapes}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Our GRPO loop vs TRL's GRPOTrainer on the arithmetic example.")
    p.add_argument("--steps", type=int, help=f"training steps (default {Bench.steps}; {SMOKE.steps} with --smoke)")
    p.add_argument("--configs", default="lora,full", help="comma-separated: lora, full")
    p.add_argument("--frameworks", default="ours,trl", help="comma-separated: ours, trl")
    p.add_argument("--json-out", type=Path, help="also write every result (and the GEMM peak) here")
    p.add_argument("--smoke", action="store_true", help="tiny random Llama, 2 steps, small batches: seconds")
    p.add_argument("--seed", type=int, help=f"seed of data order, sampling and LoRA init (default {Bench.seed})")
    p.add_argument("--engine", default="torch", help="our loop's rollout engine(s), comma-separated: torch, vllm")
    p.add_argument("--trl-bf16", action="store_true", help="run TRL with its default bf16 autocast (unmatched)")
    p.add_argument("--trl-precision", help="TRL's precision(s), comma-separated: fp32 (matched), bf16 (TRL's default)")
    p.add_argument("--tokens", type=int, help=f"max completion tokens (default {Bench.max_completion_tokens})")
    p.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["lora", "full"], help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_precision is None:
        args.trl_precision = "bf16" if args.trl_bf16 else "fp32"
    lists = {"configs": {"lora", "full"}, "frameworks": {"ours", "trl"}, "engine": {"torch", "vllm"}}
    lists["trl_precision"] = {"fp32", "bf16"}
    for name, allowed in lists.items():
        values = getattr(args, name).split(",")
        if not values or set(values) - allowed:
            flag = name.replace("_", "-")
            p.error(f"--{flag} takes a comma-separated subset of {sorted(allowed)}, got {getattr(args, name)!r}")
        setattr(args, name, values)
    for name in ("steps", "tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def bench_of(args: argparse.Namespace) -> Bench:
    base = SMOKE if args.smoke else Bench()
    seed = base.seed if args.seed is None else args.seed
    tokens = args.tokens or base.max_completion_tokens
    return replace(
        base,
        steps=args.steps or base.steps,
        seed=seed,
        trl_bf16=args.trl_precision == ["bf16"],
        engine=args.engine[0],
        max_completion_tokens=tokens,
    )


def run_worker(args: argparse.Namespace) -> None:
    import warnings

    import transformers

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers 5 renames (gradient -> activation ...)
    warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")  # peft, on the registry name
    bench, lora = bench_of(args), args.mode == "lora"
    result = run_ours(bench, lora) if args.worker == "ours" else run_trl(bench, lora)
    args.result.write_text(json.dumps(result))


def spawn(args: argparse.Namespace, framework: str, mode: str, variant: str) -> dict[str, Any]:
    """One worker: ours with the rollout engine `variant`, or TRL at the precision `variant`."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", framework, "--mode", mode, "--result", str(result)]
        command += ["--smoke"] if args.smoke else []
        command += ["--trl-bf16"] if framework == "trl" and variant == "bf16" else []
        command += ["--engine", variant if framework == "ours" else "torch"]
        command += ["--steps", str(args.steps)] if args.steps else []
        command += ["--tokens", str(args.tokens)] if args.tokens else []
        command += ["--seed", str(args.seed)] if args.seed is not None else []
        print(f"== {framework} {mode} {variant}", flush=True)
        started = time.perf_counter()
        done = subprocess.run(command, cwd=ROOT)
        if done.returncode != 0:
            return {"framework": framework, "mode": mode, "error": f"worker exited with {done.returncode}"}
        data: dict[str, Any] = json.loads(result.read_text())
    if framework == "trl" and variant == "bf16":
        framework += " (bf16)"
    if framework == "ours":  # how ours ran: its engine, and bf16 autocast where RFT_TRAINING_PRECISION asks
        framework += f" ({variant}{', bf16' if settings().training_precision == 'bf16' else ''})"
    return {"framework": framework, "mode": mode, "process_seconds": time.perf_counter() - started, **data}


def code_version() -> str:
    """The commit our loop was measured at, `+changes` when workers/ or service/ differ from it."""
    git = ["git", "-C", str(ROOT)]
    try:
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "workers", "service"], capture_output=True, text=True)
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+changes" if changed.stdout.strip() else "")


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    found = {"python": sys.version.split()[0], "rft": code_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "trl", "datasets"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = "not installed"
    return found


def table(results: list[dict[str, Any]], peak: float) -> str:
    head = (
        "| framework | mode | completions/s | s/step | sampling | sampling tok/s | scoring | update | weight sync "
        "| peak RSS | valid before -> after | update GFLOP/s | % of peak | CPU/wall, load |"
    )
    lines = [head, "|" + " --- |" * 2 + " ---: |" * 12]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['framework']} | {r['mode']} | {r['error']} |" + " |" * 11)
            continue
        s = r["split"]
        rss = f"{r['peak_rss_mib']:,.0f}"
        if r.get("sidecar_peak_rss_mib"):  # the trainer's and vLLM's peaks, each of its own process
            rss += f" + {r['sidecar_peak_rss_mib']:,.0f}"
        lines.append(
            f"| {r['framework']} | {r['mode']} | {r['completions_per_second']:.2f} | {r['seconds_per_step']:.2f} s | "
            f"{s['sampling']:.2f} s | {r.get('sampling_tokens_per_second', 0):.0f} | {s['scoring']:.3f} s | "
            f"{s['update']:.2f} s | {s.get('weight_sync', 0):.2f} s | {rss} MiB | "
            f"{r['valid_before']:.3f} -> {r['valid_after']:.3f} | {r['update_gflops_per_second']:.1f} | "
            f"{100 * r['update_gflops_per_second'] / peak:.0f}% | "
            f"{r['machine']['cpu_per_wall']:.2f}, {r['machine']['load_before']:.1f}-{r['machine']['load_after']:.1f} |"
        )
    return "\n".join(lines)


def speedups(results: list[dict[str, Any]]) -> list[str]:
    """Each of our runs against each of TRL's, configuration by configuration."""
    done = [r for r in results if "error" not in r]
    lines = []
    for mode in ("lora", "full"):
        for ours in (r for r in done if r["mode"] == mode and r["framework"].startswith("ours")):
            for trl in (r for r in done if r["mode"] == mode and r["framework"].startswith("trl")):
                ratio = ours["completions_per_second"] / trl["completions_per_second"]
                lines.append(
                    f"{mode}: {ours['framework']} / {trl['framework']} throughput = {ratio:.2f}x; validation "
                    f"reward after: {ours['valid_after']:.3f} against {trl['valid_after']:.3f}"
                )
    return lines


def main() -> None:
    args = parse_args()
    if args.worker:
        run_worker(args)
        return
    if "trl" in args.frameworks and versions()["trl"] == "not installed":
        sys.exit("TRL is not installed: pip install -e '.[bench]' (it pins trl and keeps torch as it is).")
    bench = bench_of(args)
    print(f"settings: {json.dumps(asdict(bench))}\nversions: {json.dumps(versions())}", flush=True)
    sizes = (256, 512) if args.smoke else (1024, 2048, 4096)
    tokens = 16 * 60  # a micro-batch of 16 sequences of about 44 prompt + 16 completion tokens
    gemm = gemm_peak(sizes, tokens, 576, 1536, 49152)
    print(f"fp32 GEMM: {json.dumps(gemm)}", flush=True)
    variants = {"ours": args.engine, "trl": args.trl_precision}
    results = [
        spawn(args, framework, mode, variant)
        for mode in args.configs
        for framework in args.frameworks
        for variant in variants[framework]
    ]
    print()
    print(table(results, gemm["peak"]))
    print("\n".join(speedups(results)))
    if args.json_out:
        report = {"settings": asdict(bench), "versions": versions(), "gemm": gemm, "results": results}
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
