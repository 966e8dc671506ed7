"""compose.yaml and the Dockerfile hold what a deployment needs, checked without a Docker engine.

scripts/compose_check.sh builds and runs them for real (it needs dockerd and minutes, so it is not in
CI); these tests keep the file's promises between its runs: every service restarts, has a
healthcheck, runs as a non-root user on a read-only root filesystem with no capabilities and limits
on memory and processes, mounts the model read-only, and runs a command the CLI accepts.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pagedserve.cli import build_parser

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("executor", "scheduler", "router")


def services() -> dict[str, dict]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]  # merge keys resolved


def parses(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def test_the_three_services_run_one_image():
    found = services()
    assert set(found) == set(SERVICES)
    assert {s["image"] for s in found.values()} == {"pagedserve:latest"}


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_restarts_and_is_health_checked(name):
    service = services()[name]
    assert service["restart"] in ("always", "unless-stopped", "on-failure")
    test = service["healthcheck"]["test"]
    assert test[:3] == ["CMD", "pagedserve", "healthcheck"], test
    assert parses(test[2:]), test
    assert service["healthcheck"]["start_period"]


@pytest.mark.parametrize("name", SERVICES)
def test_each_service_is_confined(name):
    service = services()[name]
    uid = str(service["user"]).split(":")[0]
    assert uid not in ("0", "root"), service["user"]
    assert service["read_only"] is True
    assert "/tmp" in service["tmpfs"]
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]
    limits = service.get("deploy", {}).get("resources", {}).get("limits", {})
    assert service.get("mem_limit") or limits.get("memory"), "no memory limit"
    assert service["pids_limit"] > 0


@pytest.mark.parametrize("name", SERVICES)
def test_the_model_is_mounted_read_only(name):
    mounts = [v for v in services()[name].get("volumes", []) if ":/model" in v]
    assert all(v.endswith(":/model:ro") for v in mounts), mounts
    assert bool(mounts) == (name != "scheduler")  # the scheduler needs no weights nor tokenizer


@pytest.mark.parametrize("name", SERVICES)
def test_each_command_is_one_the_cli_accepts(name):
    assert parses(services()[name]["command"]), services()[name]["command"]


def test_only_the_router_publishes_ports_and_on_loopback_by_default():
    found = services()
    assert [n for n in SERVICES if found[n].get("ports")] == ["router"]
    for port in found["router"]["ports"]:
        assert port.startswith("${PAGEDSERVE_BIND:-127.0.0.1}:"), port


def test_the_dockerfile_keeps_both_build_paths_and_a_non_root_user():
    text = (ROOT / "Dockerfile").read_text()
    assert "ARG BASE=python:3.11-slim" in text  # the registry path stays the default
    assert re.search(r"^ARG WHEELS=$", text, re.M)  # empty: install from the index
    assert "--no-index --find-links /wheels" in text
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert "HEALTHCHECK" in text


def test_the_wheels_of_an_offline_build_reach_the_build_context():
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    assert "!build/wheels" in lines
    assert lines.index("!build/wheels") > lines.index("build/*")
