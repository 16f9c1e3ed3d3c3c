"""streams.devtools.localstripe: the runner, its idempotency layer and ``paystream stripe``."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from streams.devtools.localstripe import LocalStripe, LocalStripeError, cli, free_port, running_pid
from streams.settings import Settings


def post(url: str, form: str, idempotency_key: str | None = None) -> tuple[int, dict[str, str], dict]:
    headers = {"Authorization": "Bearer sk_test_runner", "Content-Type": "application/x-www-form-urlencoded"}
    if idempotency_key:
        headers["Idempotency-Key"] = idempotency_key
    request = urllib.request.Request(url, data=form.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=5) as answer:
            return answer.status, dict(answer.headers), json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def test_the_runner_starts_answers_and_stops(tmp_path: Path) -> None:
    log = tmp_path / "localstripe.log"
    with LocalStripe(log_path=log) as runner:
        assert runner.answering()
        assert runner.process is not None and runner.process.poll() is None
        with pytest.raises(LocalStripeError, match="taken"):
            LocalStripe(runner.port).start()
    assert not runner.answering()
    assert runner.process is None
    assert "GET /v1/payment_intents" in log.read_text()


def test_ensure_plan_makes_a_plan_once_and_refuses_another_price_under_its_id() -> None:
    with LocalStripe() as runner:
        assert runner.ensure_plan("plan_team_monthly", 1200, "EUR", "month") == "plan_team_monthly"
        assert runner.ensure_plan("plan_team_monthly", 1200, "eur", "month") == "plan_team_monthly"
        request = urllib.request.Request(runner.url + "/v1/plans?limit=10",
                                         headers={"Authorization": "Bearer sk_test_runner"})
        with urllib.request.urlopen(request, timeout=5) as answer:
            plans = json.loads(answer.read())["data"]
        [plan] = plans
        assert (plan["id"], plan["amount"], plan["currency"], plan["interval"]) == (
            "plan_team_monthly", 1200, "eur", "month")
        assert plan["product"].startswith("prod_")
        with pytest.raises(LocalStripeError, match="exists with"):
            runner.ensure_plan("plan_team_monthly", 1500, "eur", "month")
        with pytest.raises(LocalStripeError, match="HTTP 400"):
            runner.ensure_plan("plan_fortnightly", 100, "eur", "fortnight")


def test_the_idempotency_layer_replays_refuses_and_forgets_on_flush() -> None:
    with LocalStripe() as runner:
        url = runner.url + "/v1/payment_intents"
        key = uuid.uuid4().hex
        status, _, first = post(url, "amount=500&currency=eur", key)
        assert status == 200
        status, headers, again = post(url, "amount=500&currency=eur", key)
        assert (status, again["id"], headers.get("Idempotent-Replayed")) == (200, first["id"], "true")
        status, _, other = post(url, "amount=600&currency=eur", key)
        assert status == 400 and other["error"]["type"] == "idempotency_error"
        # A refusal is kept too: the same bad request with its key gets the same answer.
        bad_key = uuid.uuid4().hex
        assert post(url, "amount=-1&currency=eur", bad_key)[0] == 400
        assert post(url, "amount=-1&currency=eur", bad_key)[1].get("Idempotent-Replayed") == "true"
        # Without a key every POST runs.
        assert post(url, "amount=500&currency=eur")[2]["id"] != post(url, "amount=500&currency=eur")[2]["id"]
        runner.flush()
        status, _, fresh = post(url, "amount=500&currency=eur", key)
        assert status == 200 and fresh["id"] != first["id"]


def test_paystream_stripe_start_status_webhook_stop(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    settings = Settings.from_env(state_dir=tmp_path, stripe_api_base=f"http://127.0.0.1:{free_port()}")
    assert cli("status", settings) == 3
    assert cli("start", settings) == 0
    try:
        pid = running_pid(tmp_path)
        assert pid is not None
        assert cli("start", settings) == 0  # already running: nothing new
        assert running_pid(tmp_path) == pid
        assert cli("status", settings) == 0
        assert cli("webhook", settings, webhook_url="http://127.0.0.1:9/webhooks/stripe") == 0
        assert "answering" in capsys.readouterr().out
    finally:
        assert cli("stop", settings) == 0
    assert running_pid(tmp_path) is None
    assert cli("status", settings) == 3
    assert (tmp_path / "localstripe.log").exists()
