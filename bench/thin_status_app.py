"""The thinnest honest version of `GET /v1/fine_tuning/jobs/{id}`: the yardstick for status_poll_bench.py.

Same work as rft's route and nothing else: HMAC digest of the bearer key, the active key's row, the
job row scoped to that key's project, the same JSON shape. FastAPI + SQLAlchemy Core + psycopg, one
pooled connection and one transaction per request.

    RFT_DATABASE_URL=postgresql+psycopg://... RFT_SECRET_KEY=... uvicorn bench.thin_status_app:app
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from fastapi import FastAPI, Header, HTTPException
from sqlalchemy import create_engine, select

from service.core.settings import DEV_SECRET
from service.core.tables import ApiKey, Job

engine = create_engine(os.environ["RFT_DATABASE_URL"])  # the default pool, as rft's
SECRET = os.environ.get("RFT_SECRET_KEY", DEV_SECRET).encode()
KEY, JOB = ApiKey.__table__, Job.__table__
app = FastAPI()


@app.get("/v1/fine_tuning/jobs/{job_id}")
def retrieve_job(job_id: str, authorization: str = Header("")) -> dict[str, Any]:
    digest = hmac.new(SECRET, authorization.removeprefix("Bearer ").encode(), hashlib.sha256).hexdigest()
    with engine.begin() as conn:
        project_id = conn.scalar(select(KEY.c.project_id).where(KEY.c.key_hash == digest, KEY.c.revoked_at.is_(None)))
        if project_id is None:
            raise HTTPException(401, "Incorrect API key provided.")
        job = conn.execute(select(JOB).where(JOB.c.project_id == project_id, JOB.c.id == job_id)).mappings().first()
    if job is None:
        raise HTTPException(404, f"No such fine-tuning job: {job_id}")
    return {
        "id": job["id"],
        "object": "fine_tuning.job",
        "created_at": job["created_at"],
        "finished_at": job["finished_at"],
        "estimated_finish": job["estimated_finish"],
        "error": job["error"],
        "fine_tuned_model": job["fine_tuned_model"],
        "model": job["model"],
        "organization_id": job["project_id"],
        "result_files": job["result_files"] or [],
        "status": job["status"],
        "trained_tokens": job["trained_tokens"],
        "training_file": job["training_file"],
        "validation_file": job["validation_file"],
        "seed": job["seed"],
        "method": job["method"],
        "metadata": job["metadata"],
        "integrations": job["integrations"],
        "hyperparameters": job["method"].get("reinforcement", {}).get("hyperparameters", {}),
        "user_provided_suffix": job["suffix"],
    }
