"""What tests/test_sandbox_privileges.py runs as an ordinary user (through tests.support.unprivileged): the
service's own sandbox and API code, with the results as one JSON line on stdout.

    python -m tests.support.unprivileged_probe sandbox|refusal DATA_DIR
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from service.core.settings import Settings
from service.graders.isolation import SandboxUnavailable, check_available
from service.graders.sandbox import PythonGraderPool

LOOK = """\
import json, os

def grade(sample, item):
    if item.get("fork"):
        children = 0
        try:
            while children < 64:
                if os.fork() == 0:
                    os.pause()
                children += 1
        except OSError:
            pass
        return float(children)
    status = dict(l.split(":\\t", 1) for l in open("/proc/self/status").read().splitlines() if ":\\t" in l)
    raise RuntimeError(json.dumps({
        "uid": os.getuid(),
        "root": sorted(os.listdir("/")),
        "data_dir_visible": os.path.exists(item["data_dir"]),
        "pids": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "interfaces": [l.split(":")[0].strip() for l in open("/proc/net/dev").readlines()[2:]],
        "seccomp": status["Seccomp"].strip(),
        "no_new_privs": status["NoNewPrivs"].strip(),
        "cap_eff": status["CapEff"].strip(),
    }))
"""


def sandbox(settings: Settings) -> dict[str, Any]:
    iso = check_available(settings)
    with PythonGraderPool(LOOK, size=1, isolation=iso) as pool:
        seen = pool.grade({}, {"data_dir": str(settings.data_dir)})
        forks = pool.grade({}, {"fork": True})
    assert seen.error is not None, seen
    inside = json.loads(seen.error.split("RuntimeError: ", 1)[1].rsplit(" (line", 1)[0])
    return {"service_uid": os.geteuid(), "mechanism": iso.mechanism, "inside": inside, "forks": forks.score}


def refusal(settings: Settings) -> dict[str, Any]:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.auth.service import create_api_key
    from service.core import db
    from service.core.migrate import upgrade

    try:
        check_available(settings)
        reason = None
    except SandboxUnavailable as exc:
        reason = exc.reason
    upgrade(settings.sqlalchemy_url)
    with db.unit_of_work(settings) as session:
        _, key = create_api_key(session, settings, "tenant")
    auth = {"Authorization": f"Bearer {key}"}
    grader = {"type": "python", "name": "g", "source": "def grade(sample, item):\n    return 1.0\n"}
    job = {
        "model": "tiny-random-llama",
        "training_file": "file-none",
        "method": {"type": "reinforcement", "reinforcement": {"grader": grader}},
    }
    with TestClient(create_app(settings)) as client:
        answers = {
            "run": client.post(
                "/v1/fine_tuning/alpha/graders/run", headers=auth, json={"grader": grader, "model_sample": "x"}
            ),
            "job": client.post("/v1/fine_tuning/jobs", headers=auth, json=job),
            "environment": client.get("/v1/fine_tuning/alpha/graders/environment", headers=auth),
        }
    return {"reason": reason, **{name: [r.status_code, r.json()] for name, r in answers.items()}}


def main() -> None:
    mode, data_dir = sys.argv[1], Path(sys.argv[2])
    settings = Settings(env="dev", data_dir=data_dir, broker_url="memory://")
    print(json.dumps({"sandbox": sandbox, "refusal": refusal}[mode](settings)))


if __name__ == "__main__":
    main()
