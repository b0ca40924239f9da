"""/openapi.json: valid OpenAPI 3.1, every route and error code in it; schemathesis finds no 5xx, nothing off-schema."""

from __future__ import annotations

import ast
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import validate
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from starlette.routing import Route

from gateway.app import create_app
from gateway.web.openapi import ERRORS, document
from tests.utils import free_port, make_settings, to_toml

ROOT = Path(__file__).resolve().parent.parent / "gateway"
ERROR_CLASSES = {
    "BadRequest",
    "Unauthorized",
    "NotFound",
    "Conflict",
    "PayloadTooLarge",
    "UnsupportedMedia",
    "Unavailable",
    "RequestTimeout",
    "TooManyRequests",
}


def test_the_document_is_valid_openapi_3_1() -> None:
    validate(document())  # raises on any violation of the 3.1 schema


def test_every_route_of_the_app_is_documented_and_nothing_else(tmp_path: Path) -> None:
    app = create_app(make_settings(tmp_path / "g.db"))
    served = {
        (method.lower(), route.path)
        for route in app.routes
        if isinstance(route, Route) and route.path != "/static/demo.html"
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(method, path) for path, item in document()["paths"].items() for method in item}
    assert served == documented


def _raised_codes() -> set[str]:
    """Every stable error code the package raises (the first argument of an ApiError subclass)."""
    codes: set[str] = set()
    for path in ROOT.rglob("*.py"):
        if "sandbox" in path.parts or path.name == "fake.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Name)
                and node.func.id in ERROR_CLASSES | {"ProviderFailure"}
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                codes.add(node.args[0].value)
    return codes


def test_every_error_code_the_code_raises_is_documented() -> None:
    documented = {code for statuses in ERRORS.values() for codes in statuses.values() for code in codes}
    raised = _raised_codes()
    assert {"session_not_found", "invalid_phone", "idempotency_key_reused", "token_already_used"} <= raised
    assert raised - documented == set()


# --- schemathesis against a live sandbox gateway -----------------------------------------


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("openapi")
    port = free_port()
    (work / "config.toml").write_text(
        to_toml({"server": {"port": port}, "database": {"path": str(work / "g.db")}, "logging": {"level": "error"}})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    with (work / "log").open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "serve", "--sandbox", "--config", str(work / "config.toml")],
            cwd=work,
            env=env,
            stdout=log,
            stderr=log,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:  # a subprocess has no other readiness signal than answering
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                    break
            assert time.monotonic() < deadline and proc.poll() is None, (work / "log").read_text()
            time.sleep(0.05)
        yield base
    finally:
        proc.terminate()
        proc.wait(10)


def test_the_served_document_is_the_one_tested(live: str) -> None:
    answer = httpx.get(live + "/openapi.json", timeout=5)
    assert answer.status_code == 200 and answer.json() == document()


SCHEMA = schemathesis.openapi.from_dict(document()).exclude(path="/v1/sessions/{session_id}/events")
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
OPERATIONS = [result.ok() for result in SCHEMA.get_all_operations()]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("operation", OPERATIONS, ids=lambda op: op.label)
def test_schemathesis_finds_no_5xx_and_no_answer_outside_the_schema(live: str, operation: object) -> None:
    @settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(case=operation.as_strategy())  # type: ignore[attr-defined]
    def check(case: object) -> None:
        response = case.call(base_url=live, timeout=10)  # type: ignore[attr-defined]
        case.validate_response(response, checks=CHECKS)  # type: ignore[attr-defined]

    check()
