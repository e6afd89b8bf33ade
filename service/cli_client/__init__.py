"""The client half of `rft`: commands that talk HTTP to any rft server.

The server is `--base-url`, else `RFT_BASE_URL`, else a local `rft serve` (http://127.0.0.1:8000);
with or without `/v1`. The key is `--api-key`, else `RFT_API_KEY`, else the one a local `rft serve`
keeps in its data dir. Results go to stdout, progress and messages to stderr; a failure prints
`error: <the server's message> (status code, param)` and exits 1, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import httpx2

from service.cli_client import chat, commands, watch
from service.cli_client.api import Api, CliError, describe

Handler = Callable[[Api, argparse.Namespace], int]


def register(sub: Any) -> None:
    """Add the client commands to `rft`'s subparsers; each sets `client_handler`."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--base-url", help="the server (default: $RFT_BASE_URL or http://127.0.0.1:8000)")
    common.add_argument("--api-key", help="default: $RFT_API_KEY, or a local `rft serve`'s key")

    def leaf(parent: Any, name: str, handler: Handler, help: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = parent.add_parser(name, parents=[common], help=help, description=help)
        parser.set_defaults(client_handler=handler)
        return parser

    files = sub.add_parser("files", help="upload and list files").add_subparsers(dest="files_command", required=True)
    p = leaf(files, "upload", lambda a, n: commands.upload_files(a, n.paths, n.purpose), "upload files; prints ids")
    p.add_argument("paths", nargs="+", metavar="PATH")
    p.add_argument("--purpose", default="fine-tune")
    leaf(files, "list", lambda a, n: commands.list_files(a), "list the project's files")

    jobs = sub.add_parser("jobs", help="fine-tuning jobs").add_subparsers(dest="jobs_command", required=True)
    _add_create(leaf(jobs, "create", _create, "create a reinforcement fine-tuning job; prints its id"))
    p = leaf(jobs, "list", lambda a, n: commands.list_jobs(a, n.limit, n.metadata), "list jobs, newest first")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE", help="filter (repeatable)")
    p = leaf(jobs, "get", lambda a, n: commands.show_job(a, n.job), "print a job as JSON")
    p.add_argument("job")
    p = leaf(jobs, "watch", lambda a, n: watch.watch(a, n.job, interval=n.interval), "follow a job until it ends")
    p.add_argument("job")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    p.epilog = "exit status: 0 succeeded, 1 failed or cancelled, 3 paused, 130 stopped watching (Ctrl-C)"
    p = leaf(jobs, "events", _events, "print a job's events, oldest first")
    p.add_argument("job")
    p.add_argument("--limit", type=int, default=20, help="how many of the latest events to print first")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new events until the job ends")
    for action in ("cancel", "pause"):
        leaf(jobs, action, _control(action), f"{action} a job").add_argument("job")
    p = leaf(jobs, "resume", commands.resume_job, "resume a paused job, raising or removing its budget caps")
    p.add_argument("job")
    for cap in ("max-tokens", "max-wall-seconds"):
        p.add_argument(
            f"--{cap}", type=commands.cap_value, default=argparse.SUPPRESS, metavar="N|none", help=f"set its {cap} cap"
        )

    ckpts = sub.add_parser("checkpoints", help="a job's checkpoints").add_subparsers(dest="ckpt_command", required=True)
    p = leaf(ckpts, "list", lambda a, n: commands.list_checkpoints(a, n.job, n.limit), "list checkpoints")
    p.add_argument("job")
    p.add_argument("--limit", type=int, default=10)
    p = leaf(ckpts, "download", commands.download_checkpoint, "download a checkpoint (or the final model) as a tar")
    p.add_argument("job")
    p.add_argument("checkpoint", nargs="?", help="a checkpoint id (ftckpt-...); default: the job's final model")
    p.add_argument("-o", "--output", help="the tar to write (default: JOB[-CHECKPOINT][-merged].tar)")
    p.add_argument("--extract", metavar="DIR", help="also unpack the archive into DIR")
    p.add_argument("--merged", action="store_true", help="LoRA adapters merged into full weights")

    p = leaf(sub, "chat", _chat, "chat with a model (a fine-tuned one: ft:...); a REPL unless -m is given")
    p.add_argument("model")
    p.add_argument("-m", "--message", help="send one message, print the reply and exit")
    p.add_argument("--system", help="a system message")
    p.add_argument("--temperature", type=float)
    p.add_argument("--max-tokens", type=int)


def _add_create(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True)
    p.add_argument("--training-file", required=True, help="a file id, or a local .jsonl to upload first")
    p.add_argument("--validation-file", help="a file id, or a local .jsonl to upload first")
    p.add_argument("--grader", required=True, help="a grader as .json or .yaml, or a .py defining grade()")
    p.add_argument("--hyperparameters", help="a JSON object, e.g. '{\"n_epochs\": 2}'")
    p.add_argument("-p", "--param", action="append", default=[], metavar="KEY=VALUE", help="a hyperparameter")
    p.add_argument("--response-format", help="method.reinforcement.response_format: a .json file or the JSON itself")
    p.add_argument("--suffix")
    p.add_argument("--seed", type=int)
    p.add_argument("--metadata", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--watch", action="store_true", help="then follow the job as `rft jobs watch` does")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate the files and grader and print the resolved hyperparameters, steps, tokens and a time "
        "estimate, without creating the job (local files are still uploaded; their ids are printed for the real run)",
    )


def _control(action: str) -> Handler:
    return lambda api, args: commands.control_job(api, args.job, action)


def _create(api: Api, args: argparse.Namespace) -> int:
    if args.dry_run:
        return commands.preflight(api, args)
    job_id = commands.create_job(api, args)
    return watch.watch(api, job_id) if args.watch else 0


def _events(api: Api, args: argparse.Namespace) -> int:
    return watch.events(api, args.job, limit=args.limit, follow=args.follow)


def _chat(api: Api, args: argparse.Namespace) -> int:
    return chat.chat(
        api,
        args.model,
        system=args.system,
        message=args.message,
        temperature=args.temperature,
        max_tokens=args.max_tokens,
    )


def run(args: argparse.Namespace, http: httpx2.Client | None = None) -> int:
    """Run a parsed client command; failures the user can act on become `error: ...` and exit 1."""
    api: Api | None = None
    try:
        api = Api.from_args(args.base_url, args.api_key, http)
        return args.client_handler(api, args)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `rft jobs get J | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except Exception as exc:
        message = describe(exc)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, CliError) else 1
    finally:
        if api is not None:
            api.close()


def main(argv: list[str] | None = None, http: httpx2.Client | None = None) -> int:
    """The client commands alone (`rft` adds them to its own parser); `http` lets tests bind a server."""
    parser = argparse.ArgumentParser(prog="rft")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv), http)
