"""/dashboard in headless Chromium against the running server: the block grid and the queues
follow requests as they arrive and finish (read from what the page drew, over the DevTools
protocol), and a screenshot under load is saved for the docs."""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import openai
import pytest

from tests.e2e.cdp import open_page
from tests.e2e.conftest import Serve

BLOCKS = "document.getElementById('blocks').dataset"
ROWS = "document.querySelectorAll('#queues tbody tr')"
LAST_STEP = ("(Number(document.getElementById('budget').dataset.prefill)"
             " + Number(document.getElementById('budget').dataset.decode))")
SCREENSHOT_ENV = "PAGEDSERVE_DASHBOARD_SCREENSHOT"  # a path: the screenshot is copied there too


def _load(serve: Serve, n: int, max_tokens: int, done: list[int]) -> list[threading.Thread]:
    client = openai.OpenAI(base_url=f"{serve.base_url}/v1", api_key="x", max_retries=0,
                           timeout=300)

    def one(i: int) -> None:
        prompt = "The shared opening of every request here, then its own part: " + "x " * (8 * i)
        out = client.completions.create(model="", prompt=prompt, max_tokens=max_tokens,
                                        temperature=0, extra_body={"ignore_eos": True})
        done.append(out.usage.completion_tokens)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def test_the_dashboard_follows_requests_as_they_run_and_finish(serve: Serve,
                                                               tmp_path: Path) -> None:
    with open_page(f"{serve.base_url}/dashboard", tmp_path / "profile") as page:
        page.wait_for("Number(document.body.dataset.updates) >= 1")
        idle = page.evaluate(f"({{...{BLOCKS}}})")
        assert int(idle["held"]) == int(idle["shared"]) == 0
        assert int(idle["free"]) + int(idle["cached"]) == 256  # the e2e server's NUM_KV_BLOCKS

        done: list[int] = []
        # long enough to span several of the page's 0.5 s polls (200 tokens could finish within
        # one on the tiny model); 4 x (prompt + 800) tokens fit the 256 blocks of 16
        threads = _load(serve, n=4, max_tokens=800, done=done)
        # (a snapshot taken while the first step is in flight has no finished step to show yet)
        page.wait_for(f"Number({BLOCKS}.held) > 0 && {ROWS}.length >= 2 && {LAST_STEP} > 0")
        busy = page.evaluate(f"({{...{BLOCKS}}})")
        states = page.evaluate(f"[...{ROWS}].map(r => r.dataset.state)")
        assert set(states) <= {"running", "waiting", "preempted"} and "running" in states
        budget = page.evaluate("({...document.getElementById('budget').dataset})")
        assert int(budget["prefill"]) + int(budget["decode"]) >= 1
        assert int(budget["budget"]) > 0
        page.screenshot(tmp_path / "dashboard.png")
        for t in threads:
            t.join(timeout=300)
        assert done == [800] * 4

        page.wait_for(f"Number({BLOCKS}.held) === 0 && {ROWS}.length === 0")
        after = page.evaluate(f"({{...{BLOCKS}}})")
        # finished requests leave their full blocks cached for reuse, not just free
        assert int(after["cached"]) > int(idle["cached"])
        assert int(busy["held"]) + int(busy["shared"]) > 0
    if os.environ.get(SCREENSHOT_ENV):
        shutil.copy(tmp_path / "dashboard.png", os.environ[SCREENSHOT_ENV])


@pytest.mark.parametrize("query, status", [("replica=0", 200), ("replica=1", 400),
                                           ("replica=x", 400)])
def test_the_state_names_a_bad_replica(serve: Serve, query: str, status: int) -> None:
    import httpx

    resp = httpx.get(f"{serve.base_url}/dashboard/state?{query}", timeout=30)
    assert resp.status_code == status, resp.text
    if status == 400:
        assert resp.json()["error"]["param"] == "replica"
    else:
        body = resp.json()
        assert body["num_blocks"] == 256 and body["token_budget"] > 0


AGGREGATE = """(() => {
  const n = 100000, states = new Uint8Array(n), owners = new Uint8Array(n);
  for (let i = 0; i < n; i++) {
    states[i] = i < 60000 ? 2 : i < 70000 ? 1 : 0;
    owners[i] = i < 60000 ? 1 + (i % 3) : 0;
  }
  let text = "";
  const b64 = (a) => { text = ""; for (const x of a) text += String.fromCharCode(x); return btoa(text); };
  drawBlocks({block_states: b64(states), block_owners: b64(owners)});
  const c = document.getElementById("blocks");
  return {...c.dataset, width: c.clientWidth, height: c.clientHeight};
})()"""


def test_a_pool_of_100k_blocks_is_drawn_in_aggregated_cells(serve: Serve, tmp_path: Path) -> None:
    """Blocks beyond the canvas's pixels share cells (one draw per cell, not per block), and the
    tallies still count every block."""
    with open_page(f"{serve.base_url}/dashboard", tmp_path / "profile") as page:
        page.wait_for("Number(document.body.dataset.updates) >= 1")
        drawn = page.evaluate(AGGREGATE)
    assert (int(drawn["held"]), int(drawn["cached"]), int(drawn["free"])) == (60000, 10000, 30000)
    cells, per_cell = int(drawn["cells"]), int(drawn["cellBlocks"])
    assert per_cell > 1 and (cells - 1) * per_cell < 100000 <= cells * per_cell
    assert cells <= (drawn["width"] // 3) * (drawn["height"] // 3)
