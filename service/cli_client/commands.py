"""The client commands over files, jobs and checkpoints; each prints its result and returns an exit code."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any, cast

from service.cli_client.api import Api, CliError, raise_for_error
from service.cli_client.download import archive_path, download, extract
from service.cli_client.progress import number

FILE_PREFIX = "file-"


def upload_files(api: Api, paths: list[str], purpose: str) -> int:
    for path in paths:
        print(upload(api, path, purpose))
    return 0


def upload(api: Api, path: str, purpose: str = "fine-tune") -> str:
    try:
        with open(path, "rb") as f:
            return api.openai.files.create(file=f, purpose=cast(Any, purpose)).id
    except OSError as exc:
        raise CliError(f"cannot read {path}: {exc.strerror}") from None


def list_files(api: Api) -> int:
    rows = [
        [f.id, f.filename, str(f.bytes), f.status or "-", _when(f.created_at)] for f in api.openai.files.list().data
    ]
    table(["ID", "FILENAME", "BYTES", "STATUS", "CREATED"], rows)
    return 0


def load_grader(path: Path) -> dict[str, Any]:
    """A grader from JSON or YAML (a bare grader or `{grader: ...}`), or a `.py` file as a python grader."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise CliError(f"cannot read grader file {path}: {exc.strerror}") from None
    suffix = path.suffix.lower()
    if suffix == ".py":
        return {"type": "python", "name": path.stem, "source": text}
    if suffix in (".yaml", ".yml"):
        import yaml

        try:
            grader = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CliError(f"{path}: invalid YAML: {exc}") from None
    else:
        try:
            grader = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CliError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None
    if isinstance(grader, dict) and set(grader) == {"grader"}:
        grader = grader["grader"]
    if not isinstance(grader, dict) or "type" not in grader:
        raise CliError(f"{path} must hold one grader: a mapping with a 'type' (string_check, python, multi, ...)")
    return grader


def key_values(pairs: list[str], what: str, *, parse: bool) -> dict[str, Any]:
    """`key=value` pairs; with `parse`, values that read as JSON (2, 0.5, true, [..]) are typed."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CliError(f"{what} {pair!r} must look like key=value")
        if parse:
            try:
                out[key] = json.loads(value)
            except json.JSONDecodeError:
                out[key] = value  # a bare word such as auto
        else:
            out[key] = value
    return out


def hyperparameters(raw: str | None, pairs: list[str]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    if raw:
        try:
            merged = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise CliError(f"--hyperparameters is not valid JSON: {exc.msg} at column {exc.colno}") from None
        if not isinstance(merged, dict):
            raise CliError("--hyperparameters must be a JSON object, e.g. '{\"n_epochs\": 2}'")
    return merged | key_values(pairs, "-p", parse=True)


def response_format(value: str) -> Any:
    """`--response-format`: a .json file, or the JSON itself."""
    path = Path(value)
    text = path.read_text() if path.suffix == ".json" and path.is_file() else value
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise CliError(f"--response-format is not valid JSON: {exc.msg} at column {exc.colno}") from None


def file_id(api: Api, value: str) -> str:
    """A local path is uploaded first; anything else must be a file id."""
    if Path(value).is_file():
        uploaded = upload(api, value)
        print(f"uploaded {value} as {uploaded}", file=sys.stderr)
        return uploaded
    if value.startswith(FILE_PREFIX):
        return value
    raise CliError(f"{value!r} is neither a local file nor a file id ({FILE_PREFIX}...)")


def job_request(api: Api, args: argparse.Namespace) -> dict[str, Any]:
    """The create request's body from `rft jobs create`'s arguments, local files uploaded."""
    # Local mistakes are found before anything is uploaded.
    grader = load_grader(Path(args.grader))
    reinforcement: dict[str, Any] = {"grader": grader}
    hyper = hyperparameters(args.hyperparameters, args.param)
    if hyper:
        reinforcement["hyperparameters"] = hyper
    if args.response_format:
        reinforcement["response_format"] = response_format(args.response_format)
    metadata = key_values(args.metadata, "--metadata", parse=False)
    optional = {"suffix": args.suffix, "seed": args.seed, "metadata": metadata or None}
    training = file_id(api, args.training_file)
    if args.validation_file:
        optional["validation_file"] = file_id(api, args.validation_file)
    return {
        "model": args.model,
        "training_file": training,
        "method": {"type": "reinforcement", "reinforcement": reinforcement},
        **{k: v for k, v in optional.items() if v is not None},
    }


def create_job(api: Api, args: argparse.Namespace) -> str:
    job = api.openai.fine_tuning.jobs.create(**job_request(api, args))
    print(job.id, flush=True)
    print(f"created {job.id} ({job.status}); follow it with `rft jobs watch {job.id}`", file=sys.stderr)
    return job.id


def list_jobs(api: Api, limit: int, metadata: list[str]) -> int:
    filters = key_values(metadata, "--metadata", parse=False)
    page = api.openai.fine_tuning.jobs.list(limit=limit, metadata=filters or None)
    rows = [[j.id, j.status, j.model, j.fine_tuned_model or "-", _when(j.created_at)] for j in page.data]
    table(["ID", "STATUS", "MODEL", "FINE-TUNED MODEL", "CREATED"], rows)
    return 0


def show_job(api: Api, job_id: str) -> int:
    print(api.openai.fine_tuning.jobs.retrieve(job_id).to_json(indent=2))
    return 0


def preflight(api: Api, args: argparse.Namespace) -> int:
    """`rft jobs create --dry-run`: the server's pre-flight of the request, printed for a person."""
    body = job_request(api, args)
    response = api.http.post(api.url("fine_tuning/jobs/preflight"), headers=api.headers(), json=body)
    raise_for_error(response)
    print(preflight_text(response.json()))
    return 0


def preflight_text(p: dict[str, Any]) -> str:
    hp, tokens, estimate = p["hyperparameters"], p["tokens"], p["estimate"]
    files = f"training {p['training_file']['id']} ({p['training_file']['examples']} examples)"
    if p.get("validation_file"):
        files += f", validation {p['validation_file']['id']} ({p['validation_file']['examples']} examples)"
    seconds = estimate["seconds"]
    time = f"about {_duration(seconds)} on {estimate['device']}" if seconds is not None else "unknown"
    lines = [
        f"dry run: {p['model']} would train; nothing was created",
        f"files:        {files}: valid",
        f"grader:       {p['grader']['type']} {p['grader']['name']!r}: valid",
        f"steps:        {p['total_steps']} ({hp['n_epochs']} epochs x {p['steps_per_epoch']}), "
        f"{p['evaluations']} evaluations (baseline included)",
        f"per step:     {hp['batch_size']} prompts x {hp['group_size']} samples, learning rate {hp['learning_rate']:g}",
        f"tokens:       {tokens['prompt']:,} prompt + at most {tokens['completion_at_most']:,} completion = at most "
        f"{tokens['trained_at_most']:,} trained ({tokens['counted_with']}); evaluations at most "
        f"{tokens['evaluation_at_most']:,}",
        f"memory:       {p['memory_plan'] or 'planned by the worker (the model config is not on the server)'}",
        f"time:         {time} ({estimate['basis']})",
        "hyperparameters: " + json.dumps(hp, sort_keys=True),
    ]
    return "\n".join(lines + [f"warning: {w}" for w in p["warnings"]])


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s" if minutes else f"{secs} s"


def cap_value(text: str) -> int | None:
    """A budget cap from the command line: a positive integer, or `none` to remove the cap."""
    if text.lower() in ("none", "null"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer or 'none'")
    return int(text)


def resume_job(api: Api, args: argparse.Namespace) -> int:
    caps = {k: getattr(args, k) for k in ("max_tokens", "max_wall_seconds") if hasattr(args, k)}  # given: N or none
    job = api.openai.fine_tuning.jobs.resume(args.job, extra_body=caps or None)
    print(f"{job.id} {job.status}")
    return 0


def control_job(api: Api, job_id: str, action: str) -> int:
    jobs = api.openai.fine_tuning.jobs
    job = {"cancel": jobs.cancel, "pause": jobs.pause, "resume": jobs.resume}[action](job_id)
    print(f"{job.id} {job.status}")
    return 0


def list_checkpoints(api: Api, job_id: str, limit: int) -> int:
    page = api.openai.fine_tuning.jobs.checkpoints.list(job_id, limit=limit)
    rows = []
    for c in page.data:
        metrics: dict[str, Any] = c.metrics.to_dict() if c.metrics else {}
        valid, kl = metrics.get("valid_reward_mean"), metrics.get("valid_kl", metrics.get("kl"))
        rows.append([c.id, str(c.step_number), number(valid), number(kl, 4), c.fine_tuned_model_checkpoint])
    table(["ID", "STEP", "VALID REWARD", "KL", "MODEL"], rows)
    return 0


def download_checkpoint(api: Api, args: argparse.Namespace) -> int:
    name = "-".join(p for p in (args.job, args.checkpoint, "merged" if args.merged else None) if p)
    out = Path(args.output or f"{name}.tar")
    sha256 = download(api, archive_path(args.job, args.checkpoint), out, merged=args.merged)
    print(f"saved {out} (sha256 {sha256})", file=sys.stderr)
    if args.extract:
        count = extract(out, Path(args.extract))
        print(f"extracted {count} files into {args.extract}", file=sys.stderr)
    print(args.extract or out)
    return 0


def table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [headers, *rows]) for i in range(len(headers))]
    for row in [headers, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())


def _when(ts: int | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M") if ts else "-"
