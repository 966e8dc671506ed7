"""Fixtures: the tiny llama's tokenizer, a fake scheduler on a unix socket, a router in a thread."""

from __future__ import annotations

from pathlib import Path

import pytest

from pagedserve.router.server import RouterThread
from pagedserve.router.tokenizer import Tokenizer
from tests.conftest import model_dir
from tests.router.fake_scheduler import FakeScheduler, FakeSchedulerThread

SERVED = "tiny-llama"


@pytest.fixture(scope="session")
def llama_dir() -> Path:
    return model_dir("llama")


@pytest.fixture(scope="session")
def tokenizer(llama_dir: Path) -> Tokenizer:
    return Tokenizer.from_dir(llama_dir)


@pytest.fixture(scope="session")
def scheduler_thread(tmp_path_factory: pytest.TempPathFactory) -> FakeSchedulerThread:
    sock = tmp_path_factory.mktemp("sched") / "s.sock"
    thread = FakeSchedulerThread(f"unix://{sock}").start()
    yield thread
    thread.stop()


@pytest.fixture
def fake(scheduler_thread: FakeSchedulerThread) -> FakeScheduler:
    scheduler_thread.servicer.reset()
    return scheduler_thread.servicer


@pytest.fixture(scope="session")
def router(llama_dir: Path, scheduler_thread: FakeSchedulerThread) -> RouterThread:
    r = RouterThread(llama_dir, scheduler_thread.address, served_model_name=SERVED, grpc_port=0,
                     enable_reflection=True, health_interval_s=0.1).start()
    yield r
    r.stop()


@pytest.fixture(scope="session")
def client(router: RouterThread):
    import openai

    return openai.OpenAI(base_url=router.base_url + "/v1", api_key="unused", max_retries=0,
                         timeout=20)
