"""The web dashboard in a real browser (headless Chromium driven by Playwright) against a real
`rft serve` (API + workers on SQLite and the filesystem broker) whose jobs run a scripted trainer
that writes the metrics, evaluations, checkpoints and final-model event the RL loop writes.

The run also writes screenshots under `build/`: `dashboard.png` (the job page), and
`dashboard-new-job.png`, `dashboard-compare.png`, `dashboard-chat.png` (the README shows copies).
"""

from __future__ import annotations

import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import jsonl
from tests.support.procs import Proc, free_port, pids_with_env, printed_api_key, wait_healthy

try:
    from playwright.sync_api import Browser, sync_playwright

    from tests.support.browser import LAUNCH_ARGS, Server, Watched, chromium
except ImportError:  # pragma: no cover - the dev extra installs it
    pytest.skip("playwright is not installed: pip install -e '.[dev]'", allow_module_level=True)

# Written on every run under build/ (ignored by git); the docs/dashboard*.png the README shows are copies.
BUILD = Path(__file__).resolve().parent.parent / "build"
SCREENSHOT = BUILD / "dashboard.png"
TERMINAL = {"succeeded", "failed", "cancelled"}
EXACT = {
    "type": "string_check",
    "name": "exact",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "operation": "eq",
}
FUZZY = {**EXACT, "type": "text_similarity", "name": "close", "evaluation_metric": "fuzzy_match"}
del FUZZY["operation"]
MULTI = {
    "type": "multi",
    "name": "blend",
    "graders": {"exact": EXACT, "close": FUZZY},
    "calculate_output": "0.7 * exact + 0.3 * close",
}
LINES = [
    {
        "messages": [{"role": "user", "content": f"What is {i} + {i + 3}? Answer with just the number."}],
        "answer": str(2 * i + 3),
    }
    for i in range(1, 10)
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    path = chromium()
    if path is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=path, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("dashboard")
    port = free_port()
    env = {
        "RFT_DATA_DIR": str(tmp / "data"),
        "RFT_DATABASE_URL": "",
        "RFT_BROKER_URL": "",
        "RFT_TRAINER": "tests.support.dashboard_trainer:scripted",
    }
    serve = Proc(["serve", "--port", str(port)], env, tmp / "serve.log")
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, serve)
        key = printed_api_key(serve)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0)
        train = client.files.create(file=("train.jsonl", jsonl(LINES[:6])), purpose="fine-tune").id
        valid = client.files.create(file=("valid.jsonl", jsonl(LINES[4:])), purpose="fine-tune").id
        yield Server(url, key, client, (train, valid))
    finally:
        serve.stop()
        deadline = time.time() + 15
        while pids_with_env("RFT_DATA_DIR", env["RFT_DATA_DIR"]) and time.time() < deadline:
            time.sleep(0.2)


@pytest.fixture(scope="module")
def finished_job(server: Server) -> str:
    """A job that ran to the end: 12 steps, an evaluation every 3, with a multi grader."""
    job_id = server.create_job(MULTI, steps="12", step_seconds="0.1", eval_interval="3")
    assert server.wait(job_id, TERMINAL) == "succeeded"
    return job_id


@pytest.fixture
def watched(browser: Browser, server: Server) -> Iterator[Watched]:
    page = Watched(browser, server)
    yield page
    page.close()


def test_job_page_draws_the_curves_checkpoints_final_model_and_events(
    watched: Watched, server: Server, finished_job: str
) -> None:
    page = watched.open(f"#/jobs/{finished_job}")
    # 12 train points + the baseline and 4 evaluations on the validation curve.
    watched.wait_count('[data-chart="reward"] circle.pt', 17)
    assert watched.count('[data-chart="reward"] path[data-series="train"]') == 1
    assert watched.count('[data-chart="reward"] line[data-ref="baseline"]') == 1
    for chart in ("graders", "kl", "entropy", "length", "time"):
        assert watched.count(f'[data-chart="{chart}"] circle.pt') >= 12, chart
        assert watched.count(f'[data-chart="{chart}"] text.tick') >= 4, f"{chart} has axes with ticks"
    assert page.inner_text('[data-chart="kl"] figcaption') == "KL to the initial policy (nats / token)"
    assert watched.count('[data-chart="graders"] path.series') == 4  # exact and close, train and valid
    assert watched.count("#checkpoints tbody tr") == 4
    final_row = page.locator("#checkpoints tr.final")
    assert final_row.count() == 1 and "final" in final_row.inner_text()
    assert "Final model: the checkpoint at step" in page.inner_text("#final-model")
    assert "kl_limit" in page.inner_text("#hyperparameters")
    page.check('[data-filter="metrics"]')
    assert "Step 12/12" in page.inner_text("#events")
    assert "The job has successfully completed." in page.inner_text("#events")

    with page.expect_download() as download:
        page.click("#final-model button")
    with tarfile.open(download.value.path()) as tar:
        assert "config.json" in [Path(n).name for n in tar.getnames()]

    page.set_viewport_size({"width": 1280, "height": 1280})
    page.evaluate("window.scrollTo(0, 0)")
    page.wait_for_timeout(500)  # the charts redraw at the new size
    page.hover('[data-chart="reward"] svg', position={"x": 380, "y": 90})
    assert page.inner_text('[data-chart="reward"] .readout').startswith("step ")
    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT))
    assert SCREENSHOT.stat().st_size > 20_000
    assert watched.errors == []


def test_rollout_browser_shows_completions_and_follows_a_prompt_across_steps(
    watched: Watched, finished_job: str
) -> None:
    page = watched.open(f"#/jobs/{finished_job}/rollouts")
    watched.wait_count(".pill", 5)  # the baseline and 4 evaluations
    assert page.inner_text(".pill.active").startswith("step 12")
    completions = page.locator("pre.completion").all_inner_texts()
    assert len(completions) == 5 and all(text.strip() for text in completions)
    assert "exact:" in page.inner_text(".sample .scores")  # per-grader scores
    page.click('.pill[data-step="0"]')
    assert page.inner_text(".pill.active").startswith("baseline")
    page.click('[data-mode="compare"]')
    page.wait_for_selector("#prompt-select")
    assert watched.count("table.compare tbody tr") == 5  # the same prompt at each evaluation
    assert watched.errors == []


def test_grader_playground_runs_a_grader_and_shows_reward_sub_scores_and_errors(watched: Watched) -> None:
    page = watched.open("#/playground")
    page.select_option("#preset", label="multi (exact + fuzzy)")
    page.fill("#model-sample", "12")
    page.click("#run-grader")
    page.wait_for_selector("#reward-value")
    assert page.inner_text("#reward-value") == "1"
    assert "exact" in page.inner_text("#grader-result") and page.is_visible("#no-errors")

    page.fill("#item-json", '{"question": "no answer key"}')
    page.click("#run-grader")
    page.wait_for_selector("#grader-result .error-list")
    assert page.inner_text("#reward-value") == "0"
    assert "invalid_variable_error" in page.inner_text("#grader-result .error-list")

    page.fill("#item-json", "{not json")
    page.click("#run-grader")
    assert "is not valid JSON" in page.inner_text("#playground-output")
    assert watched.errors == []


def test_live_job_updates_while_running_and_pause_resume_cancel_work(watched: Watched, server: Server) -> None:
    job_id = server.create_job(EXACT, steps="400", step_seconds="0.3", eval_interval="5")
    server.wait(job_id, {"running"})
    page = watched.open(f"#/jobs/{job_id}")
    watched.wait_count('[data-chart="entropy"] circle.pt', 1)
    before = watched.count('[data-chart="entropy"] circle.pt')
    watched.wait_count('[data-chart="entropy"] circle.pt', before + 3)  # new points without a reload

    page.click('[data-action="pause"]')
    page.wait_for_selector(".badge.status-paused", timeout=30_000)
    page.click('[data-action="resume"]')
    page.wait_for_selector(".badge.status-running", timeout=30_000)
    page.click('[data-action="cancel"]')
    assert page.inner_text('[data-action="cancel"]') == "Really cancel?"
    page.click('[data-action="cancel"]')
    page.wait_for_selector(".badge.status-cancelled", timeout=30_000)
    assert server.client.fine_tuning.jobs.retrieve(job_id).status == "cancelled"
    assert page.is_disabled('[data-action="cancel"]')
    assert watched.errors == []


def test_jobs_list_shows_new_jobs_without_reload_and_filters_by_status(
    watched: Watched, server: Server, finished_job: str
) -> None:
    page = watched.open("#/jobs")
    page.wait_for_selector(f'tr[data-job="{finished_job}"] .progress-text')  # progress fills in after the list
    row = page.inner_text(f'tr[data-job="{finished_job}"]')
    assert "succeeded" in row and "12/12" in row and "tiny-random-llama" in row
    new_job = server.create_job(EXACT, steps="100", step_seconds="0.2")
    page.wait_for_selector(f'tr[data-job="{new_job}"]', timeout=15_000)
    page.select_option("#status-filter", "succeeded")
    shown = page.locator("tbody tr").evaluate_all("rows => rows.map(r => r.dataset.job)")
    assert finished_job in shown and new_job not in shown
    assert all("succeeded" in text for text in page.locator("tbody tr").all_inner_texts())
    server.client.fine_tuning.jobs.cancel(new_job)
    assert watched.errors == []


def test_phone_viewport_has_no_horizontal_overflow(browser: Browser, server: Server, finished_job: str) -> None:
    phone = Watched(browser, server, width=390, height=844)
    try:
        for route, ready in [
            ("#/jobs", f'tr[data-job="{finished_job}"]'),
            (f"#/jobs/{finished_job}", '[data-chart="reward"] circle.pt'),
            (f"#/jobs/{finished_job}/rollouts", "pre.completion"),
            ("#/playground", "#grader-json"),
            ("#/jobs/new", "#grader-json"),
            (f"#/compare?jobs={finished_job}&metric=kl", '[data-chart="compare"] circle.pt'),
            ("#/chat", "#chat-input"),
        ]:
            phone.open(route).wait_for_selector(ready)
            assert phone.no_horizontal_overflow(), f"{route} is wider than a phone screen"
            if "circle" in ready:  # the charts are drawn at the phone's width, not scaled down
                chart = phone.page.locator(f"{ready.split(' ')[0]} svg")
                assert 300 <= chart.bounding_box()["width"] <= 390  # type: ignore[index]
        assert phone.errors == []
    finally:
        phone.close()


def test_without_a_key_nothing_is_fetched_and_a_pasted_key_unlocks_the_jobs(
    browser: Browser, server: Server, finished_job: str
) -> None:
    fresh = Watched(browser, server, key=False)
    try:
        page = fresh.open("")
        page.wait_for_selector("#api-key")
        assert not [url for url in fresh.requests if "/v1/" in url], "no key, no data"
        page.fill("#api-key", "rft-not-a-key")
        page.click("form button")
        page.wait_for_selector("#key-message .error-box")
        assert "refused" in page.inner_text("#key-message")
        assert all("401" in e for e in fresh.errors)  # the browser logs the refused request itself
        page.fill("#api-key", server.key)
        page.click("form button")
        page.wait_for_selector(f'tr[data-job="{finished_job}"]')
        assert page.evaluate("localStorage.getItem('rft.apiKey')") == server.key
        assert all(server.key not in url for url in fresh.requests), "the key never travels in a URL"
    finally:
        fresh.close()


def test_dashboard_is_static_outside_the_api_schema(server: Server) -> None:
    page = httpx.get(f"{server.url}/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert httpx.get(f"{server.url}/dashboard/app.js").status_code == 200
    paths = httpx.get(f"{server.url}/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith("/dashboard")]


def shot(page: Any, name: str) -> None:
    BUILD.mkdir(exist_ok=True)
    page.evaluate("window.scrollTo(0, 0)")  # the sticky top bar would otherwise be drawn mid-page
    page.screenshot(path=str(BUILD / f"dashboard-{name}.png"), full_page=True)


def failed_requests_only(errors: list[str]) -> bool:
    """The browser logs each refused request itself; anything else is the page's own error."""
    return all("status of 400" in e for e in errors)


def test_new_job_form_uploads_the_files_and_creates_a_job_that_runs(
    watched: Watched, server: Server, tmp_path: Path
) -> None:
    train, valid = tmp_path / "form-train.jsonl", tmp_path / "form-valid.jsonl"
    train.write_bytes(jsonl(LINES[:6]))
    valid.write_bytes(jsonl(LINES[6:]))
    files_before = len(server.client.files.list(purpose="fine-tune").data)  # not the results files of jobs
    page = watched.open("#/jobs/new")
    page.wait_for_selector('#model option[value="tiny-random-llama"]', state="attached")
    page.set_input_files("#training_file-upload", str(train))
    page.set_input_files("#validation_file-upload", str(valid))
    page.select_option("#grader-preset", label="string_check (contains the answer, any case)")
    page.wait_for_selector("#grader-ok:not([hidden])")
    page.select_option("#model", "tiny-random-llama")
    page.fill("#suffix", "from-form")
    page.fill("#hp-n_epochs", "2")
    page.fill("#hp-extras", '{"beta": 0.02, "lora_rank": 4}')
    shot(page, "new-job")
    page.click("#create-job")
    page.wait_for_url("**/#/jobs/ftjob-*")
    job_id = page.evaluate("location.hash").removeprefix("#/jobs/")
    page.wait_for_selector(".badge.status-succeeded", timeout=60_000)  # it ran, on the page it landed on
    watched.wait_count('[data-chart="reward"] circle.pt', 12)

    job: Any = server.client.fine_tuning.jobs.retrieve(job_id).model_dump()
    assert job["model"] == "tiny-random-llama" and job["user_provided_suffix"] == "from-form"
    reinforcement = job["method"]["reinforcement"]
    assert reinforcement["grader"]["operation"] == "ilike"
    hp = reinforcement["hyperparameters"]
    assert (hp["n_epochs"], hp["beta"], hp["lora_rank"]) == (2, 0.02, 4)
    assert server.client.files.retrieve(job["training_file"]).filename == "form-train.jsonl"
    assert server.client.files.retrieve(job["validation_file"]).filename == "form-valid.jsonl"
    assert len(server.client.files.list(purpose="fine-tune").data) == files_before + 2
    assert watched.errors == []


def test_new_job_form_shows_a_bad_grader_and_api_errors_at_their_fields(watched: Watched, server: Server) -> None:
    jobs_before = len(server.client.fine_tuning.jobs.list(limit=100).data)
    page = watched.open("#/jobs/new")
    page.wait_for_selector(f'#training_file-existing option[value="{server.files[0]}"]', state="attached")
    page.select_option("#training_file-existing", server.files[0])
    page.select_option("#validation_file-existing", server.files[1])
    page.fill("#grader-json", json.dumps({**EXACT, "operation": "equals"}))
    page.click("#create-job")
    page.wait_for_selector("#grader-error:not([hidden])")
    assert "grader.operation" in page.inner_text("#grader-error")
    assert "'eq', 'ne', 'like' or 'ilike'" in page.inner_text("#grader-error")
    assert page.get_attribute("#grader-json", "aria-invalid") == "true"

    page.fill("#grader-json", "{not json")
    page.click("#create-job")
    page.wait_for_selector("#grader-error:not([hidden])")
    assert "not valid JSON" in page.inner_text("#grader-error")

    page.select_option("#grader-preset", label="string_check (exact answer)")
    page.wait_for_selector("#grader-ok:not([hidden])")
    page.fill("#hp-n_epochs", "0")  # the API's 400 names method.reinforcement.hyperparameters.n_epochs
    page.click("#create-job")
    page.wait_for_selector("#n_epochs-error:not([hidden])")
    assert "must be 'auto' or an integer >= 1" in page.inner_text("#n_epochs-error")
    assert page.is_hidden("#grader-error")
    page.fill("#hp-n_epochs", "")
    page.fill("#hp-extras", '{"beta": 99}')
    page.click("#create-job")
    page.wait_for_selector("#extras-error:not([hidden])")
    assert "beta" in page.inner_text("#extras-error") and page.is_hidden("#n_epochs-error")
    page.fill("#hp-extras", "")
    page.select_option("#training_file-existing", "")
    page.click("#create-job")
    page.wait_for_selector("#training_file-error:not([hidden])")
    assert "training file" in page.inner_text("#training_file-error")
    assert len(server.client.fine_tuning.jobs.list(limit=100).data) == jobs_before
    assert failed_requests_only(watched.errors), watched.errors


def test_compare_chart_draws_one_line_per_chosen_job(watched: Watched, server: Server, finished_job: str) -> None:
    other = server.create_job(EXACT, seed=11, steps="6", step_seconds="0.05", eval_interval="3")
    assert server.wait(other, TERMINAL) == "succeeded"
    page = watched.open("#/compare")
    page.wait_for_selector(f'input[data-job="{other}"]')
    assert "Tick two or more jobs" in page.inner_text("#compare-chart")
    page.check(f'input[data-job="{finished_job}"]')
    page.check(f'input[data-job="{other}"]')
    watched.wait_count('[data-chart="compare"] path.series', 2, exactly=True)
    series = page.locator('[data-chart="compare"] path.series').evaluate_all("ps => ps.map(p => p.dataset.series)")
    assert [name.split(" ")[0] for name in series] == [finished_job, other]
    assert watched.count('[data-chart="compare"] .legend-item') == 2
    assert watched.count('[data-chart="compare"] circle.pt') == 12 + 6  # train_reward_mean at every step

    page.select_option("#compare-metric", "valid_reward_mean")
    watched.wait_count('[data-chart="compare"] circle.pt', 5 + 3, exactly=True)  # the baseline and each evaluation
    assert page.inner_text('[data-chart="compare"] figcaption').startswith("valid_reward_mean")
    shot(page, "compare")
    page.select_option("#compare-metric", "kl")
    page.uncheck(f'input[data-job="{other}"]')
    watched.wait_count('[data-chart="compare"] circle.pt', 12, exactly=True)
    assert watched.count('[data-chart="compare"] path.series') == 1

    page.reload()  # the choice is in the address
    watched.wait_count('[data-chart="compare"] path.series', 1)
    assert page.input_value("#compare-metric") == "kl" and page.is_checked(f'input[data-job="{finished_job}"]')
    assert watched.errors == []


def test_chat_round_trip_streams_the_models_answer(watched: Watched, server: Server) -> None:
    settings: Any = {"model": "tiny-random-llama", "temperature": 1, "seed": 3, "max_completion_tokens": 16}
    hello: Any = [{"role": "user", "content": "Say hello"}]
    expected = server.client.chat.completions.create(messages=hello, **settings).choices[0].message.content
    assert expected
    page = watched.open("#/chat")
    page.wait_for_selector('#chat-model option[value="tiny-random-llama"]', state="attached")
    page.select_option("#chat-model", "tiny-random-llama")
    page.fill("#chat-seed", "3")
    page.fill("#chat-max-tokens", "16")
    page.fill("#chat-input", "Say hello")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.press("#chat-input", "Enter")
    first: Any = sent.value.post_data_json
    assert first["stream"] is True
    page.wait_for_selector(".msg.assistant .msg-foot:not(:empty)", timeout=60_000)
    answer = page.locator(".msg.assistant .msg-text").first.evaluate("el => el.textContent")
    assert answer == expected  # the streamed answer, piece by piece, is the SDK's whole answer
    assert "finish: length · 16 tokens" in page.inner_text(".msg.assistant .msg-foot")

    page.uncheck("#chat-stream")
    page.fill("#chat-input", "Again")
    with page.expect_request("**/v1/chat/completions") as sent:
        page.click("#chat-send")
    body: Any = sent.value.post_data_json
    assert "stream" not in body and [m["role"] for m in body["messages"]] == ["user", "assistant", "user"]
    assert body["messages"][1]["content"] == expected  # the conversation goes back with each turn
    watched.wait_count(".msg.assistant .msg-foot:not(:empty)", 2, timeout=60_000)
    shot(page, "chat")

    page.fill("#chat-temperature", "5")
    page.fill("#chat-input", "Too hot")
    page.click("#chat-send")
    page.wait_for_selector("#chat-temperature-error:not([hidden])")
    assert "temperature" in page.inner_text("#chat-temperature-error")
    assert page.input_value("#chat-input") == "Too hot"  # the failed turn is given back
    assert watched.count(".msg") == 4
    assert failed_requests_only(watched.errors), watched.errors
