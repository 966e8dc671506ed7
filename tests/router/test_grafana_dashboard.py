"""docs/grafana/pagedserve.json is a well-formed Grafana dashboard whose queries name only metrics
the router exports, and docs/metrics.md lists every metric the router exports."""

from __future__ import annotations

import json
import re

import httpx

from tests.conftest import ROOT

DASHBOARD = ROOT / "docs" / "grafana" / "pagedserve.json"
METRIC = re.compile(r"\bpagedserve_[a-z0-9_]+")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported(router) -> set[str]:
    """The metric families a real router's /metrics declares (# TYPE lines)."""
    text = httpx.get(router.base_url + "/metrics", timeout=10).text
    return {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}


def test_the_dashboard_is_well_formed() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] == "pagedserve" and dash["title"]
    assert {v["name"] for v in dash["templating"]["list"]} == {"datasource"}
    ids, cells = set(), set()
    for panel in dash["panels"]:
        assert panel["id"] not in ids and panel["title"] and panel["targets"]
        ids.add(panel["id"])
        g = panel["gridPos"]
        cell = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cell & cells, f"{panel['title']} overlaps another panel"
        cells |= cell
        refs = [t["refId"] for t in panel["targets"]]
        assert len(set(refs)) == len(refs)
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])


def test_the_dashboard_queries_only_exported_metrics(router) -> None:
    names = exported(router)
    dash = json.loads(DASHBOARD.read_text())
    used = {m for p in dash["panels"] for t in p["targets"] for m in METRIC.findall(t["expr"])}
    base = {next((m.removesuffix(s) for s in HISTOGRAM_SERIES if m.endswith(s)), m) for m in used}
    assert base <= names, f"not exported: {sorted(base - names)}"
    assert len(base) >= 20  # the panels cover the server, not a corner of it


def test_every_exported_metric_is_documented(router) -> None:
    documented = set(METRIC.findall((ROOT / "docs" / "metrics.md").read_text()))
    missing = sorted(exported(router) - documented)
    assert not missing, f"docs/metrics.md lacks {missing}"
