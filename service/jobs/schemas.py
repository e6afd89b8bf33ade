"""Request and response shapes of `/v1/fine_tuning/jobs`, as OpenAI's SDK sends and reads them."""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainValidator, field_validator, model_validator

from service.graders.schemas import GraderShape

Auto = Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def auto_or(kind: type[int] | type[float], *, low: float, high: float = math.inf, low_open: bool = False) -> Any:
    """`"auto"` or a number in range, with one error message that says both (not a union dump)."""
    what = "an integer" if kind is int else "a number"
    bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high != math.inf else "")

    def check(value: Any) -> Any:
        if value == "auto":
            return value
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and kind is int:
            ok = float(value).is_integer()
        if ok:
            ok = (value > low if low_open else value >= low) and value <= high
        if not ok:
            raise ValueError(f"must be 'auto' or {what} {bounds}, got {value!r}")
        return kind(value)

    # The bounds go into the schema too, so it offers only numbers this accepts.
    le = None if high == math.inf else high
    limits = Field(gt=low, le=le) if low_open else Field(ge=low, le=le)
    bounded = Annotated[kind, limits]  # type: ignore[valid-type]
    return Annotated[Auto | kind, PlainValidator(check, json_schema_input_type=Auto | bounded)]


def samples_per_prompt(compute_multiplier: Any) -> int:
    """The group size a `compute_multiplier` asks for: clamp(round(4 x multiplier), 2, 64), `auto` = 1.
    One rule for the API's memory check and the worker's resolved hyperparameters."""
    compute = 1.0 if compute_multiplier == "auto" else float(compute_multiplier)
    return min(max(round(4 * compute), 2), 64)


def _auto_or_bool(value: Any) -> Any:
    if value == "auto" or isinstance(value, bool):
        return value
    raise ValueError(f"must be true, false or 'auto', got {value!r}")


AutoOrBool = Annotated[Auto | bool, PlainValidator(_auto_or_bool, json_schema_input_type=Auto | bool)]


class RftHyperparameters(Strict):
    n_epochs: auto_or(int, low=1, high=50) = "auto"  # type: ignore[valid-type]
    batch_size: auto_or(int, low=1, high=256) = "auto"  # type: ignore[valid-type]
    learning_rate_multiplier: auto_or(float, low=0, low_open=True) = "auto"  # type: ignore[valid-type]
    eval_interval: auto_or(int, low=1) = "auto"  # type: ignore[valid-type]
    eval_samples: auto_or(int, low=1) = "auto"  # type: ignore[valid-type]
    compute_multiplier: auto_or(float, low=0, high=10, low_open=True) = "auto"  # type: ignore[valid-type]
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    # Our extras beyond OpenAI's fields (documented in README "Training hyperparameters").
    beta: Annotated[float, Field(ge=0, le=10)] = 0.04
    kl_estimator: Literal["k1", "k3"] = "k3"
    epsilon_low: Annotated[float, Field(gt=0, lt=1)] = 0.2
    epsilon_high: Annotated[float, Field(gt=0, lt=10)] = 0.28
    loss_aggregation: Literal["token_mean", "sequence_mean"] = "token_mean"
    importance_sampling: Literal["token", "sequence"] = "token"
    # The sampler: "auto" is the server's choice (RFT_ROLLOUT_ENGINE). Where it is not the trainer
    # (vLLM), its log-probs differ from the trainer's and truncated importance sampling corrects for
    # that ("auto": per token; "none" off), each weight capped at `importance_sampling_cap`.
    rollout_engine: Literal["auto", "torch", "vllm"] = "auto"
    importance_sampling_correction: Literal["auto", "token", "sequence", "none"] = "auto"
    importance_sampling_cap: Annotated[float, Field(ge=1, le=100)] = 2.0
    advantage_std: Literal["group", "batch", "none"] = "group"
    max_completion_tokens: Annotated[int, Field(ge=1, le=4096)] = 64
    temperature: Annotated[float, Field(gt=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    eval_temperature: Annotated[float, Field(ge=0, le=2)] | None = None  # None: `temperature`; 0: greedy
    warmup_steps: Annotated[int, Field(ge=0)] = 0
    max_grad_norm: Annotated[float, Field(gt=0)] = 1.0
    micro_batch_size: auto_or(int, low=1, high=1024) = "auto"  # type: ignore[valid-type]
    kl_limit: Annotated[float, Field(gt=0)] = 0.5
    mask_truncated_completions: bool = True
    refill_rounds: Annotated[int, Field(ge=0, le=8)] = 1
    lora_rank: Annotated[int, Field(ge=0, le=1024)] = 0  # 0: full fine-tuning
    lora_alpha: Annotated[float, Field(ge=0)] | None = None  # None: 2 x rank
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    lora_target_modules: Literal["all-linear"] | Annotated[list[str], Field(min_length=1)] = "all-linear"
    # Recompute each layer's activations in the backward pass instead of keeping them ("auto": off for now).
    gradient_checkpointing: AutoOrBool = "auto"
    # One process a device (workers/rl/ranks.py): "auto" is every device the worker offers a job
    # (RFT_WORKER_DEVICES, else its GPUs, else 1). Full fine-tuning shards the layers (FSDP2), LoRA
    # replicates the model (data parallel); either way the update is the one-process update.
    n_devices: auto_or(int, low=1, high=64) = "auto"  # type: ignore[valid-type]

    # Budget caps (service/jobs/budget.py): the job checkpoints and pauses when its running time on workers
    # or its trained tokens (prompt + completion tokens of the sequences trained on) reach them.
    max_wall_seconds: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class DeprecatedHyperparameters(BaseModel):
    """OpenAI's deprecated top-level `hyperparameters`: moved into method.reinforcement.hyperparameters
    (`service.jobs.service.move_deprecated_hyperparameters`). Other keys are let through to be refused
    there with the place they belong; the schema documents only these three."""

    model_config = ConfigDict(extra="allow", json_schema_extra={"additionalProperties": False, "deprecated": True})

    n_epochs: auto_or(int, low=1, high=50) = "auto"  # type: ignore[valid-type]
    batch_size: auto_or(int, low=1, high=256) = "auto"  # type: ignore[valid-type]
    learning_rate_multiplier: auto_or(float, low=0, low_open=True) = "auto"  # type: ignore[valid-type]


class Reinforcement(Strict):
    grader: Annotated[dict[str, Any], GraderShape]
    hyperparameters: RftHyperparameters = Field(default_factory=RftHyperparameters)
    response_format: dict[str, Any] | None = None


def _not_null(prop: dict[str, Any]) -> dict[str, Any]:
    """`X | None`'s schema without the null: for fields optional only so that our own 400 names them."""
    return next(option for option in prop["anyOf"] if option.get("type") != "null")


def _reinforcement_only(schema: dict[str, Any]) -> None:
    # OpenAI's SDK may send the other methods; they get a 400 that says so, but are not offered.
    schema["properties"]["type"] = {"type": "string", "const": "reinforcement", "title": "Type"}
    schema["properties"]["reinforcement"] = _not_null(schema["properties"]["reinforcement"])
    schema["required"] = ["type", "reinforcement"]
    for name in ("supervised", "dpo"):
        schema["properties"].pop(name)


class Method(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_reinforcement_only)

    type: Literal["reinforcement", "supervised", "dpo"]
    reinforcement: Reinforcement | None = None
    supervised: dict[str, Any] | None = None
    dpo: dict[str, Any] | None = None


Name = Annotated[str, Field(min_length=1, max_length=128)]
Tags = Annotated[list[Annotated[str, Field(min_length=1, max_length=64)]], Field(max_length=20)]


class WandbIntegration(Strict):
    project: Name
    name: Name | None = None
    entity: Name | None = None
    tags: Tags | None = None


class MlflowIntegration(Strict):
    """Ours: an MLflow tracking server. `tracking_uri` must be one the operator allows
    (RFT_MLFLOW_TRACKING_URIS); without it the workers' MLFLOW_TRACKING_URI is used."""

    tracking_uri: Annotated[str, Field(min_length=1, max_length=512)] | None = None
    experiment: Name
    run_name: Name | None = None
    tags: Tags | None = None


class Integration(Strict):
    """One tracker a job logs to (workers/tracking.py): `type` names it and the key of that name holds
    its settings, as OpenAI's `{"type": "wandb", "wandb": {...}}`."""

    type: Literal["wandb", "mlflow"]
    wandb: WandbIntegration | None = None
    mlflow: MlflowIntegration | None = None

    @model_validator(mode="after")
    def _settings_of_its_type(self) -> Integration:
        for kind in ("wandb", "mlflow"):
            given = getattr(self, kind) is not None
            if kind == self.type and not given:
                raise ValueError(f"type is {kind!r}, so the {kind!r} object with its settings is required")
            if kind != self.type and given:
                raise ValueError(f"type is {self.type!r}; the {kind!r} object belongs to type {kind!r}")
        return self


METADATA_SCHEMA: dict[str, Any] = {
    "maxProperties": 16,
    "propertyNames": {"maxLength": 64},
    "additionalProperties": {"type": "string", "maxLength": 512},
}


def _method_required(schema: dict[str, Any]) -> None:
    # Validated as optional so that a missing method gets our 400 saying what to send; documented as required.
    schema["properties"]["method"] = _not_null(schema["properties"]["method"])
    schema["required"] = [*schema["required"], "method"]


class JobCreate(Strict):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_method_required)

    model: Annotated[str, Field(min_length=1, max_length=256)]
    training_file: Annotated[str, Field(min_length=1, max_length=64)]
    validation_file: Annotated[str, Field(min_length=1, max_length=64)] | None = None
    suffix: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-.]+$")] | None = None
    seed: Annotated[int, Field(ge=0, le=2147483647)] | None = None
    metadata: Annotated[dict[str, str] | None, Field(json_schema_extra=METADATA_SCHEMA)] = None
    integrations: Annotated[list[Integration], Field(max_length=4)] | None = None
    method: Method | None = None  # required (see _method_required); optional here for our clearer 400
    hyperparameters: DeprecatedHyperparameters | None = None  # OpenAI's deprecated place for three of them

    @field_validator("metadata")
    @classmethod
    def _metadata_limits(cls, metadata: dict[str, str] | None) -> dict[str, str] | None:
        if metadata is None:
            return None
        if len(metadata) > 16:
            raise ValueError(f"metadata holds {len(metadata)} pairs; at most 16 are allowed")
        for key, value in metadata.items():
            if len(key) > 64:
                raise ValueError(f"metadata key {key[:20]!r}... is longer than 64 characters")
            if len(value) > 512:
                raise ValueError(f"metadata[{key!r}] is longer than 512 characters")
        return metadata


class ResumeBody(Strict):
    """Ours, optional: budget caps to change as the job resumes (service/jobs/budget.py); null removes one."""

    max_wall_seconds: Annotated[int, Field(ge=1)] | None = None
    max_tokens: Annotated[int, Field(ge=1)] | None = None


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    estimated_finish: int | None
    error: JobError | None
    fine_tuned_model: str | None
    model: str
    organization_id: str
    result_files: list[str]
    status: str
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    seed: int
    method: dict[str, Any]
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] | None
    hyperparameters: dict[str, Any]
    user_provided_suffix: str | None


class JobDeleted(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    deleted: bool = True


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobObject]
    has_more: bool


class EventObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: Literal["info", "warn", "error"]
    message: str
    type: Literal["message", "metrics"]
    data: dict[str, Any] | None


class EventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventObject]
    has_more: bool


class CheckpointObject(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, Any]
    fine_tuning_job_id: str


class CheckpointList(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointObject]
    first_id: str | None
    last_id: str | None
    has_more: bool


class PreflightFile(BaseModel):
    id: str
    examples: int


class PreflightTokens(BaseModel):
    counted_with: Literal["tokenizer", "estimate"]  # the model's tokenizer, or ~4 characters a token
    prompt: int  # of every sequence trained on: each example's prompt x group_size x n_epochs
    completion_at_most: int  # every trained sequence at max_completion_tokens
    trained_at_most: int  # prompt + completion_at_most: what `max_tokens` caps
    evaluation_at_most: int  # every evaluation's prompts and completions, the baseline's included


class PreflightEstimate(BaseModel):
    seconds: float | None  # None: no measurement yet
    device: str | None  # the worker class the figure is of
    basis: str


class Preflight(BaseModel):
    """Ours: what a job would be, without creating it (`POST /v1/fine_tuning/jobs/preflight`)."""

    object: Literal["fine_tuning.job.preflight"] = "fine_tuning.job.preflight"
    model: str
    training_file: PreflightFile
    validation_file: PreflightFile | None
    grader: dict[str, Any]
    hyperparameters: dict[str, Any]  # resolved as the worker resolves them
    total_steps: int
    steps_per_epoch: int
    evaluations: int  # the baseline's included
    memory_peak_bytes: int | None  # at least (the API's lower bound; None: the model's config is not here)
    memory_plan: str | None
    tokens: PreflightTokens
    estimate: PreflightEstimate
    warnings: list[str]
