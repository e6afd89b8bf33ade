"""The RL fine-tuning loop (GRPO-family RLVR), called by the job runner with a JobContext.

Per step: take `batch_size` prompts (order fixed by (seed, epoch)), sample `group_size` completions
each with the KV cache, grade them with the job's grader, turn rewards into group-relative
advantages, and take one AdamW step on the clipped surrogate + beta * KL to the initial policy,
accumulated over micro-batches. A baseline evaluation runs before step 1, then every
`eval_interval` steps and at the end; every evaluation writes a checkpoint. The final model is the
checkpoint with the best validation reward whose KL from the initial policy stays under `kl_limit`.
Seeds derive from the job's seed and what they are for (`state.derive_seed`), so a resumed run
samples what the uninterrupted one would. Completions come from the job's rollout engine
(`engine.py`), which takes the new weights after every optimizer step (timed as
`timing.step.weight_sync`).

`set_up` builds a job's parts (the worker's and the benchmarks' one way to do it); `Loop` runs
them, its methods in the order a step calls them. A job on several devices runs this same loop in
one process a device (`ranks.py`: sampling split by prompt, rank 0 grading, gradients summed).
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from dataclasses import astuple, dataclass
from typing import Any

import torch

from service.core.settings import Settings
from service.graders.engine import BatchGrades, Compiled, compile_grader, grade_batch
from service.graders.schemas import parse_grader
from service.graders.templates import Sample
from service.models.engines import EngineUnavailable, choose_engine
from workers.context import JobContext, TrainingResult
from workers.rl import checkpoint, guards, plan, selection
from workers.rl.config import RLConfig, with_devices, with_engine
from workers.rl.config import resolve as resolve_config
from workers.rl.data import Example, batch_for_step, load_examples
from workers.rl.engine import RolloutEngine, engine_class, engine_message, model_problem, open_engine
from workers.rl.formats import check_tools, formatted
from workers.rl.judge import EngineJudge
from workers.rl.launch import RankContext, devices_for, ranks_of
from workers.rl.loss import Mismatch, advantages, policy_loss, token_logprobs
from workers.rl.memory import keep_freed_memory
from workers.rl.policy import (
    Reference,
    autocast_dtype,
    build_policy,
    checkpoint_activations,
    reuses_prefix,
    trainable,
)
from workers.rl.ranks import SINGLE, Ranks
from workers.rl.rollout import PrefixGrads, Rollout, concat, select_rows
from workers.rl.state import TrainerState, derive_seed

# Why a job on several devices samples with the torch engine (one vLLM a rank is not built yet).
SEVERAL_DEVICES = "a job on several devices samples with the torch engine for now"


def run_training(ctx: JobContext) -> TrainingResult:
    hyperparameters = ctx.job["method"]["reinforcement"]["hyperparameters"]
    world = devices_for(hyperparameters, ctx.settings)
    if world == 1:
        return train(RankContext.of(ctx, SINGLE))
    full = int(hyperparameters.get("lora_rank", 0)) == 0  # FSDP2 for full fine-tuning, data parallel for LoRA
    with ranks_of(ctx, world, sharded=full) as ranks:
        return train(RankContext.of(ctx, ranks))


def train(ctx: RankContext) -> TrainingResult:
    """The job on this rank (the only one, in one process)."""
    parts = set_up(ctx)
    try:
        with parts.compile_grader() as grader:
            return Loop(ctx, parts, grader).run()
    finally:
        parts.close()


@dataclass
class Parts:
    """What a job trains with, built by `set_up`."""

    cfg: RLConfig
    model: Any
    tokenizer: Any
    reference: Reference
    optimizer: Any
    scheduler: Any
    engine: RolloutEngine
    judge: EngineJudge
    train: list[Example]
    valid: list[Example]
    state: TrainerState
    grader_spec: Any  # the job's grader, parsed
    settings: Settings
    project_id: str | None
    ranks: Ranks

    def compile_grader(self) -> Any:
        """The job's grader, compiled (a context manager; None on ranks other than 0, which do not
        grade); model graders answer through `judge`."""
        if not self.ranks.leader:
            return contextlib.nullcontext(None)
        return compile_grader(self.grader_spec, self.settings, self.project_id, self.judge)

    def close(self) -> None:
        self.judge.close()
        self.engine.close()


def set_up(ctx: RankContext) -> Parts:
    """A job's parts from its row: resolved hyperparameters, the policy and its reference, the
    rollout engine, the memory plan, optimizer and scheduler, the state to resume from. Echoes the
    resolved values into the job and explains the engine and memory choices in events."""
    job, ranks = ctx.job, ctx.ranks
    reinforcement = job["method"]["reinforcement"]
    train = load_examples(job["training_path"])
    valid = load_examples(job["validation_path"]) if job.get("validation_path") else train
    cfg = with_devices(resolve_config(reinforcement["hyperparameters"], len(train)), ranks.world, ranks.sharded)
    keep_freed_memory()  # this process runs one job and exits: reuse freed pages instead of faulting them in
    torch.manual_seed(job["seed"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with ranks.leader_first():  # a GGUF model's first load converts it into a cache the ranks share
        model, tokenizer = build_policy(
            job["model"], cfg, ctx.settings, device, seed=job["seed"], project_id=job["project_id"]
        )
    requested = cfg.rollout_engine  # the job's own wish; `with_engine` below records the engine chosen
    engine_name = choose_engine(cfg.rollout_engine, ctx.settings, job["model"])
    problem = model_problem(engine_name, model.config) or (
        SEVERAL_DEVICES if ranks.distributed and engine_name == "vllm" else None
    )
    if problem is not None:
        if requested == "vllm" or ctx.settings.rollout_engine == "vllm":
            raise EngineUnavailable(engine_name, problem)
        engine_name = "torch"  # auto: the engine that runs every model
    cfg = with_engine(cfg, engine_name, engine_class(engine_name).same_as_trainer)
    budget = plan.device_memory(ctx.settings, device, ranks.world)
    work = plan.workload(cfg, model, tokenizer, train, ctx.settings, device)
    cfg, memory = plan.plan(cfg, reinforcement["hyperparameters"], model.config.to_dict(), work, budget)
    if cfg.gradient_checkpointing:
        checkpoint_activations(model)
    ranks.copy_from_leader(trainable(model))  # the same start on every rank, whatever each one's loading drew
    reference = Reference(model, cfg)  # after the plan: a full fine-tuning reference is a second model
    ranks.shard(model)
    ranks.shard(reference.copy)
    ctx.update_job(
        method={
            **job["method"],
            "reinforcement": {
                **reinforcement,
                "hyperparameters": {
                    **reinforcement["hyperparameters"],
                    **{k: v for k, v in cfg.echo().items() if k in reinforcement["hyperparameters"]},
                },
            },
        }
    )
    if memory is not None:
        message, data = plan.event(memory, budget)
        ctx.event(message, data=data, dedupe_key="memory_plan")
    ctx.event(
        engine_message(cfg, requested, ctx.settings, job["model"], problem),
        data={k: getattr(cfg, k) for k in ("rollout_engine", "importance_sampling_correction")},
        dedupe_key=f"rollout_engine:{engine_name}",
    )
    if ranks.distributed:
        ctx.event(ranks.describe(device), data={"n_devices": ranks.world, "fsdp2": ranks.sharded}, dedupe_key="devices")
    # fused: one kernel over all parameters (on CPU too); a quarter of a second a step at 135M. Not over
    # FSDP2's mix of sharded and whole parameters, which no one kernel takes.
    optimizer = torch.optim.AdamW(
        trainable(model), lr=cfg.learning_rate, weight_decay=0.0, fused=not ranks.sharded or None, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (cfg.warmup_steps + 1)))
    state = checkpoint.restore(ctx, model, optimizer, scheduler)
    check_tools(tokenizer, job["model"], train, valid)
    engine = open_engine(engine_name, model, tokenizer, ctx.settings)  # after restore: the weights it resumes
    engine = formatted(engine, reinforcement.get("response_format"))  # sampling held to it, if any
    try:
        judge = EngineJudge(engine_name, ctx.settings)  # model graders answer through the same kind of engine
        grader = parse_grader(reinforcement["grader"])
    except BaseException:
        engine.close()
        raise
    return Parts(
        cfg=cfg,
        model=model,
        tokenizer=tokenizer,
        reference=reference,
        optimizer=optimizer,
        scheduler=scheduler,
        engine=engine,
        judge=judge,
        train=train,
        valid=valid,
        state=state,
        grader_spec=grader,
        settings=ctx.settings,
        project_id=job.get("project_id"),
        ranks=ranks,
    )


class Loop:
    def __init__(self, ctx: RankContext, parts: Parts, grader: Compiled | None) -> None:
        self.ctx, self.cfg, self.grader, self.ranks = ctx, parts.cfg, grader, parts.ranks
        self.model, self.reference, self.tokenizer = parts.model, parts.reference, parts.tokenizer
        self.engine, self.optimizer, self.scheduler = parts.engine, parts.optimizer, parts.scheduler
        self.train, self.valid, self.state = parts.train, parts.valid, parts.state
        self.seed = int(ctx.job["seed"])
        model, cfg = self.model, self.cfg
        self.timing = {"sampling": 0.0, "scoring": 0.0, "weight_sync": 0.0}
        # What a rollback before the first checkpoint returns to (adapters only, under LoRA).
        self.initial = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        # The kept prompt pass does not travel between ranks, which may train on each other's samples.
        self.reuse_prefix = reuses_prefix(model, cfg) and not self.ranks.distributed
        self.share_prompts = not self.ranks.sharded  # FSDP2: the same passes on every rank

    def run(self) -> TrainingResult:
        if self.state.baseline is None:
            with self.precision():
                baseline = self.evaluate(0)
            self.state.baseline = baseline
            self.ctx.event(
                f"Baseline validation reward of the untouched model: {baseline['reward']:.4f}",
                data=baseline,
                dedupe_key="baseline",
            )
        started = time.time()
        for step in range(self.state.step + 1, self.cfg.total_steps + 1):
            metrics = self.train_step(step)  # backward runs outside autocast, inside update()
            stop = self.after_step(step, metrics, started)
            if stop is not None:
                return stop
        if self.ctx.inner is None:
            return TrainingResult("succeeded")  # rank 0 chooses and records the final model
        return selection.finish(self.ctx.inner, self.state, self.cfg)

    def train_step(self, step: int) -> dict[str, Any]:
        cfg, t0 = self.cfg, time.perf_counter()
        self.timing = {"sampling": 0.0, "scoring": 0.0, "weight_sync": 0.0}
        indexes = batch_for_step(len(self.train), cfg.batch_size, step - 1, self.seed)
        rollout, sampled = self.sample_and_grade(
            [self.train[i] for i in indexes], cfg.group_size, derive_seed(self.seed, "train", step)
        )
        zero_before = self.zero_std_groups(sampled)
        # Rewards are reported for the step's own prompts; refill only changes what is trained on.
        rollout, grades, refilled = self.refill(step, rollout, sampled, zero_before)
        t_grade = time.perf_counter()  # sampling and scoring were timed inside sample_and_grade
        rewards = torch.tensor(grades.rewards, dtype=torch.float32)  # (B*G,)
        adv, zero_std = advantages(rewards, cfg.group_size, cfg.advantage_std)
        self.engine.sleep()  # its memory goes to the update until the new weights are synced
        stats = self.update(step, rollout, adv.to(self.model.device))
        t_train = time.perf_counter()
        graders = [
            {"name": n, "type": t, "train_reward_mean": sampled.grader_means()[n]}
            for n, t in sampled.grader_types.items()
        ]
        return {
            "step": step,
            "total_steps": cfg.total_steps,
            "train_reward_mean": float(torch.tensor(sampled.rewards).mean()),
            "trained_reward_mean": float(rewards.mean()),  # after refill
            "completion_tokens_mean": rollout.completion_tokens / len(rollout.texts),
            "trained_tokens": int(rollout.attention_mask.sum()),  # prompt + completion tokens trained on
            "frac_zero_std_groups": len(zero_before) / cfg.batch_size,
            "frac_zero_std_groups_after_refill": float(zero_std.float().mean()),
            "refilled_groups": refilled,
            "frac_truncated": float(rollout.truncated.float().mean()),
            "scores": {"graders": graders},
            **sampled.error_rates(),
            **stats,
            "tokens_per_second": rollout.completion_tokens / max(t_train - t0, 1e-9),
            "timing": {
                "step": {
                    "sampling": self.timing["sampling"],
                    "scoring": self.timing["scoring"],
                    "training": t_train - t_grade - self.timing["weight_sync"],
                    "weight_sync": self.timing["weight_sync"],
                    "eval": 0.0,
                    "full_iteration": t_train - t0,
                }
            },
        }

    def sample_and_grade(
        self, examples: list[Example], n: int, seed: int, *, evaluation: bool = False
    ) -> tuple[Rollout, BatchGrades]:
        """`n` completions of each example's prompt, graded: training's samples (`temperature`,
        keeping the prompt pass for the update where it can) or evaluation's (`eval_temperature`,
        greedy at 0). Each rank samples its share of the prompts and gets the whole rollout back;
        rank 0 grades it for all. Time goes to the step's sampling and scoring."""
        cfg, ranks = self.cfg, self.ranks
        temperature = cfg.eval_temperature if evaluation else cfg.temperature
        t0 = time.perf_counter()
        mine = ranks.share(len(examples))
        with self.precision(), ranks.gathered(self.model):
            local = None
            if len(mine):
                local = self.engine.sample(
                    [examples[i].messages for i in mine],
                    n,
                    max_new_tokens=cfg.max_completion_tokens,
                    temperature=temperature,
                    top_p=cfg.top_p,
                    seed=seed,
                    first=mine.start,
                    greedy=evaluation and temperature == 0,
                    keep_prefix=self.reuse_prefix and not evaluation,
                    tools=[examples[i].item.get("tools") for i in mine],
                )
        rollout = ranks.gather_rollout(local, self.tokenizer.pad_token_id, self.model.device)
        t1 = time.perf_counter()
        grades = None
        if self.grader is not None:  # rank 0's
            items = [e.item for e in examples for _ in range(n)]
            samples = [Sample.from_completion(t, i.get("tools")) for t, i in zip(rollout.texts, items, strict=True)]
            grades = grade_batch(self.grader, samples, items)
        grades = ranks.broadcast(grades)
        self.timing["sampling"] += t1 - t0
        self.timing["scoring"] += time.perf_counter() - t1
        return rollout, grades

    def zero_std_groups(self, grades: BatchGrades) -> list[int]:
        rewards = torch.tensor(grades.rewards).view(-1, self.cfg.group_size)  # (B, G)
        return [int(g) for g in (rewards.std(dim=1) < 1e-8).nonzero().flatten()]

    def refill(
        self, step: int, rollout: Rollout, grades: BatchGrades, zero: list[int]
    ) -> tuple[Rollout, BatchGrades, int]:
        """Swap groups whose rewards are all equal (no learning signal) for groups of fresh prompts that
        have some, drawn deterministically from (seed, step, round); at most `refill_rounds` rounds."""
        G, refilled = self.cfg.group_size, 0
        for round_ in range(1, self.cfg.refill_rounds + 1):
            if not zero:
                break
            rng = random.Random(derive_seed(self.seed, "refill prompts", step, round_))
            extra_idx = rng.sample(range(len(self.train)), min(len(zero), len(self.train)))
            extra, extra_grades = self.sample_and_grade(
                [self.train[i] for i in extra_idx], G, derive_seed(self.seed, "refill", step, round_)
            )
            useful = [g for g in range(len(extra_idx)) if g not in self.zero_std_groups(extra_grades)]
            swaps = list(zip(zero, useful, strict=False))
            if not swaps:
                continue
            gone = {g for g, _ in swaps}
            keep = [r for g in range(len(grades.grades) // G) if g not in gone for r in range(g * G, (g + 1) * G)]
            new = [r for _, g in swaps for r in range(g * G, (g + 1) * G)]
            rollout = concat(select_rows(rollout, keep), select_rows(extra, new), self.tokenizer.pad_token_id)
            grades = BatchGrades(
                [grades.grades[r] for r in keep] + [extra_grades.grades[r] for r in new],
                grades.grader_types,
                grades.seconds + extra_grades.seconds,
            )
            refilled += len(swaps)
            zero = self.zero_std_groups(grades)
        return rollout, grades, refilled

    def update(self, step: int, rollout: Rollout, adv: torch.Tensor) -> dict[str, Any]:
        cfg = self.cfg
        mask = rollout.completion_mask
        if cfg.mask_truncated_completions:  # a cut-off answer's reward says little about its tokens
            mask = mask * (~rollout.truncated).long().unsqueeze(1)
        normaliser = float(mask.sum()) if cfg.loss_aggregation == "token_mean" else float((mask.sum(1) > 0).sum())
        self.optimizer.zero_grad(set_to_none=True)
        loss_total, kl_sum, clipped, entropy_sum = 0.0, 0.0, 0.0, 0.0
        mismatch = Mismatch(0.0, 0.0, 0.0) if rollout.sampler_logprobs is not None else None
        prefix = PrefixGrads(rollout.prefix) if rollout.prefix is not None else None
        mine, rounds = self.my_rows(mask.shape[0], cfg.group_size, cfg.micro_batch_size)
        order = longest_first(mask, mine, cfg.group_size)
        if normaliser > 0:
            for k in range(rounds):  # the same number of micro-batches on every rank
                part = order[k * cfg.micro_batch_size : (k + 1) * cfg.micro_batch_size]
                rows, width = live_part(mask, part)
                weight = 1.0
                if rows.numel() == 0:
                    if not self.ranks.sharded:
                        continue
                    rows, width, weight = torch.zeros(1, dtype=torch.long), 1, 0.0  # a pass that weighs nothing
                end = rollout.prompt_len + width
                ids, attn = rollout.input_ids[rows, :end], rollout.attention_mask[rows, :end]
                m = mask[rows, :width].float() * weight
                with self.precision():
                    shared = prefix.rows(rows) if prefix is not None else None
                    logp, entropy = token_logprobs(
                        self.model, ids, attn, rollout.prompt_len, shared, share_prompts=self.share_prompts
                    )  # (n, C) each
                ref_logp = None
                if self.reference.enabled:
                    with self.precision():
                        ref_logp = self.reference.logprobs(ids, attn, rollout.prompt_len, self.share_prompts)
                sampler = rollout.sampler_logprobs[rows, :width] if rollout.sampler_logprobs is not None else None
                parts = policy_loss(logp, ref_logp, adv[rows], m, cfg, normaliser, sampler)
                if mismatch is not None and parts.mismatch is not None:
                    mismatch = mismatch + parts.mismatch
                parts.loss.backward()
                loss_total += float(parts.loss.detach())
                kl_sum, clipped = kl_sum + parts.kl_sum, clipped + parts.clipped_tokens
                entropy_sum += float((entropy.detach() * m).sum())
            if prefix is not None:
                prefix.backward()  # the prompts' share of the gradient, once for all micro-batches
            self.ranks.reduce_gradients(trainable(self.model))
        sums = [loss_total, kl_sum, clipped, entropy_sum, *(astuple(mismatch) if mismatch is not None else ())]
        loss_total, kl_sum, clipped, entropy_sum, *rest = self.ranks.sum(sums)
        mismatch = Mismatch(*rest) if mismatch is not None else None
        grad_norm = clip_gradients(self.model, cfg.max_grad_norm, self.ranks)
        reason = guards.refusal(self.state.guard, loss_total, grad_norm, cfg.max_grad_norm)
        if reason:
            self.optimizer.zero_grad(set_to_none=True)
            self.rollback(step, reason)
        else:
            self.optimizer.step()
        self.sync_weights()  # a rollback changed the weights too
        self.scheduler.step()
        tokens = max(float(mask.sum()), 1.0)
        return {
            "loss": loss_total,
            "kl": kl_sum / tokens,
            "entropy": entropy_sum / tokens,
            "clip_fraction": clipped / tokens,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "lr": self.scheduler.get_last_lr()[0],
            "update_skipped": reason is not None,
            "mismatch/mean_abs_logp_diff": None if mismatch is None else mismatch.abs_logp_diff / tokens,
            "mismatch/kl": None if mismatch is None else mismatch.kl / tokens,
            "mismatch/capped_fraction": None if mismatch is None else mismatch.capped_tokens / tokens,
        }

    def my_rows(self, n: int, group: int, micro_batch: int) -> tuple[range, int]:
        """This rank's rows of an `n`-row rollout (whole groups of `group` rows: rank r trains the
        groups of its share) and the micro-batches every rank runs (those of the largest share)."""
        groups = self.ranks.share(n // group)
        return range(groups.start * group, groups.stop * group), -(-self.ranks.most(n // group) * group // micro_batch)

    def sync_weights(self) -> None:
        """Hand the engine the weights the optimizer (or a rollback) just set."""
        t0 = time.perf_counter()
        self.engine.wake()
        self.engine.update_weights(self.model)
        self.timing["weight_sync"] += time.perf_counter() - t0

    def after_step(self, step: int, metrics: dict[str, Any], started: float) -> TrainingResult | None:
        """Everything between two steps: evaluation and its checkpoint, the metrics event, the guards'
        warnings, the ETA, and a pause, stop or cancel asked for meanwhile (the result to end with)."""
        evaluated = step % self.cfg.eval_interval == 0 or step == self.cfg.total_steps
        if evaluated:
            t0 = time.perf_counter()
            with self.precision():
                result = self.evaluate(step)
            metrics["valid_reward_mean"] = result["reward"]
            metrics["valid_kl"] = result["kl"]
            metrics["valid_samples"] = result["samples"]
            for grader in metrics["scores"]["graders"]:
                grader["valid_reward_mean"] = result["graders"].get(grader["name"])
            metrics["timing"]["step"]["eval"] = time.perf_counter() - t0
            if step == self.cfg.total_steps:
                metrics["full_valid_mean_reward"] = result["reward"]
        self.state.step = step
        if evaluated:
            self.state.evals.append({"step": step, **metrics_of(metrics)})
            self.save(step, metrics)
            checkpoint.prune(self.ctx, self.state.evals, step, self.cfg.kl_limit)
        self.ctx.metrics(step, metrics)
        for key, message in guards.warnings(self.state.guard, metrics, self.state.evals, self.cfg.kl_limit):
            self.ctx.event(message, level="warn", dedupe_key=key)
        done = step - (self.state.resumed_at or 0)
        eta = (time.time() - started) / max(done, 1) * (self.cfg.total_steps - step)
        self.ctx.update_job(estimated_finish=int(time.time() + eta))
        request = self.ctx.control()
        if request == "cancel":
            return TrainingResult("cancelled")
        if request in ("pause", "stop"):  # stop: this worker is shutting down; the job requeues
            if not evaluated:
                self.save(step, metrics)
            return TrainingResult("paused" if request == "pause" else "requeued")
        return None

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        """Validation reward (and KL to the initial policy, when a reference is loaded) at `step`.
        Every evaluation draws with the same seed, so two evaluations differ by the weights alone."""
        cfg = self.cfg
        rollout, grades = self.sample_and_grade(
            self.valid, cfg.eval_samples, derive_seed(self.seed, "eval"), evaluation=True
        )
        kl = self.kl_to_reference(rollout) if self.reference.enabled else None
        samples = [
            {
                "prompt": self.valid[i // cfg.eval_samples].messages[-1].get("content"),
                "completion": text,
                "reward": grade.reward,
                "scores": grade.scores,  # per grader, for multi graders
                "errors": sorted(grade.errors),
                "grader_errors": grade.grader_errors,
            }
            for i, (text, grade) in enumerate(zip(rollout.texts, grades.grades, strict=True))
        ][:5]
        per_grader = grades.grader_means()
        return {
            "step": step,
            "reward": sum(grades.rewards) / max(len(grades.rewards), 1),
            "kl": kl,
            "graders": per_grader,
            "samples": samples,
        }

    def kl_to_reference(self, rollout: Rollout) -> float:
        """KL from the reference over the completions' tokens (k3), each rank scoring its share."""
        mine, _ = self.my_rows(len(rollout.texts), self.cfg.eval_samples, 1)
        rows, weight = torch.arange(mine.start, mine.stop), 1.0
        if not len(mine) and self.ranks.sharded:
            rows, weight = torch.zeros(1, dtype=torch.long), 0.0  # FSDP2: every rank runs the same passes
        total, count = 0.0, 0.0
        if len(rows):
            ids, attn, p = rollout.input_ids[rows], rollout.attention_mask[rows], rollout.prompt_len
            mask = rollout.completion_mask[rows].float() * weight
            logp, _ = token_logprobs(self.model, ids, attn, p, share_prompts=self.share_prompts)
            delta = self.reference.logprobs(ids, attn, p, self.share_prompts) - logp
            total, count = float(((delta.exp() - delta - 1) * mask).sum()), float(mask.sum())
        total, count = self.ranks.sum([total, count])
        return total / max(count, 1.0)

    def rollback(self, step: int, reason: str) -> None:
        """Refuse this update: back to the last checkpoint (or the base weights), learning rate halved."""
        guard = self.state.guard
        guards.count_rollback(guard, reason, step)
        latest = self.ctx.latest_checkpoint()
        if latest is not None:
            checkpoint.load_into(latest[1], self.model, self.optimizer, self.scheduler)
            source = f"the checkpoint at step {latest[0]}"
        else:
            self.model.load_state_dict(self.initial, strict=False)
            self.optimizer.state.clear()
            source = "the base weights"
        self.scheduler.base_lrs = [self.cfg.learning_rate * guard.lr_scale for _ in self.scheduler.base_lrs]
        self.ctx.event(
            f"Step {step}: {reason}. Update skipped, weights rolled back to {source}, learning rate halved to "
            f"{self.cfg.learning_rate * guard.lr_scale:.3g} "
            f"(rollback {guard.rollbacks} of {guards.MAX_ROLLBACKS}).",
            level="warn",
            dedupe_key=f"rollback:{step}",
        )

    def save(self, step: int, metrics: dict[str, Any]) -> None:
        checkpoint.save(
            self.ctx, step, self.model, self.tokenizer, self.optimizer, self.scheduler, self.state, metrics_of(metrics)
        )

    def precision(self) -> Any:
        """The forward passes' autocast (`RFT_TRAINING_PRECISION`); weights and optimizer stay fp32."""
        device = self.model.device.type
        if autocast_dtype(self.ctx.settings.training_precision, device) is None:
            return contextlib.nullcontext()
        return torch.autocast(device, dtype=torch.bfloat16)


def longest_first(mask: torch.Tensor, mine: range, group: int) -> torch.Tensor:
    """`mine`'s rows (whole groups) in the order the micro-batches take them: group by group, the
    groups with the longest live completion first, each group's rows together and in order (they
    share one prompt pass). A micro-batch runs as wide as its longest row, so this pads the short
    answers of most groups to one another rather than to the step's one long answer. Where a row
    is trained changes no gradient (they add up, and the normaliser is the whole step's)."""
    lengths = mask[mine.start : mine.stop].sum(dim=1).view(-1, group).max(dim=1).values  # (groups,)
    groups = torch.argsort(lengths, descending=True, stable=True)
    return (groups[:, None] * group + torch.arange(group)).flatten() + mine.start


def live_part(mask: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Of a micro-batch's `rows`, those that carry loss (others, such as masked truncated
    completions, would add exactly zero), and how many completion columns they use."""
    live = rows[mask[rows].sum(dim=1) > 0]
    if live.numel() == 0:
        return live, 0
    used = mask[live].sum(dim=0).nonzero().flatten()
    return live, int(used.max()) + 1


def clip_gradients(model: Any, max_norm: float, ranks: Ranks = SINGLE) -> float:
    """The gradient norm before clipping, over every rank (a seam the stability tests inject faults through)."""
    return ranks.clip_gradients(trainable(model), max_norm)


def metrics_of(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("train_reward_mean", "valid_reward_mean", "valid_kl", "kl", "entropy", "full_valid_mean_reward")
    return {k: metrics[k] for k in keys if k in metrics}
