"""Serving tests: they need vLLM (its CPU build pins its own torch and transformers, so it lives in its own
environment: `.ci/run` builds `.venv-vllm` and runs `pytest tests/serving` there). Without vLLM every module here is
skipped with that reason, so the main `pytest` run stays clean."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
NO_VLLM = ("serving tests need vLLM: pip install torch==2.13.0 -e '.[vllm]' in a separate environment "
           "(.ci/run builds .venv-vllm and runs pytest tests/serving there)")


class EngineRuns:
    """engine_run.py processes started together (their imports and engine starts overlap), results read by name."""

    def __init__(self, root: Path):
        self.root, self.procs, self.dirs = root, {}, {}

    def start(self, name: str, scenario: str, model_dir, *args: str) -> None:
        out = self.root / f"{name}.json"
        self.dirs[name] = Path(model_dir)
        env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0")
        env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it for the kernel tests; vLLM must not see it
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)  # engine_run.py sets the KV budget in bytes
        log = open(out.with_suffix(".log"), "w")
        cmd = [sys.executable, str(HERE / "engine_run.py"), scenario, str(model_dir), str(out), *args]
        self.procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), out, log)

    def result(self, name: str, timeout: int = 900) -> dict:
        import json

        proc, out, log = self.procs[name]
        rc = proc.wait(timeout=timeout)
        log.close()
        if rc != 0:
            tail = out.with_suffix(".log").read_text()[-4000:]
            raise AssertionError(f"engine_run.py for {name} failed (rc={rc}):\n{tail}")
        return json.loads(out.read_text())

    def stop(self) -> None:
        for proc, _, log in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


EXACTNESS_RUNS = {  # model -> engine_run arguments (tests/serving/test_vllm_exactness.py)
    "llama": ("exactness", "--block-size", "32", "--max-model-len", "512"),
    "qwen3": ("exactness+preemption", "--block-size", "16", "--blocks", "40", "--max-model-len", "160"),
    "qwen2": ("exactness", "--block-size", "16", "--max-model-len", "512"),
}


class Server:
    """`vllm serve` of a checkpoint on 127.0.0.1 (a free port), in its own process group. Started as
    `python -m hysparse_compile.serving.vllm serve`: the `vllm` command of vllm-cpu 0.32.0 cannot start (see that
    module's docstring)."""

    NAME = "hysparse-tiny"

    def __init__(self, model_dir, log: Path):
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir, self.log_path = Path(model_dir), log
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        cmd = [sys.executable, "-m", "hysparse_compile.serving.vllm", "serve", str(model_dir), "--host", "127.0.0.1",
               "--port", str(self.port), "--served-model-name", self.NAME, "--dtype", "float32", "--enforce-eager",
               "--max-model-len", "512", "--block-size", "16", "--max-num-batched-tokens", "64",
               "--kv-cache-memory-bytes", str(64 * 2**20), "--max-num-seqs", "8"]
        self.log = open(log, "w")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> "Server":
        import time
        import urllib.request

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"vllm serve exited (rc={self.proc.returncode}):\n"
                                     f"{self.log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                    if r.status == 200:
                        return self
            except OSError:
                time.sleep(1)
        raise AssertionError(f"vllm serve not ready after {timeout}s:\n{self.log_path.read_text()[-4000:]}")

    def stop(self) -> None:
        import signal

        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="session", autouse=True)
def engines(tmp_path_factory):
    """Every engine the serving tests read, started as soon as its checkpoint is written (builds, interpreter
    starts and engine starts overlap, and overlap the op tests): the server, the exactness runs, the capacity pair.
    Autouse: it starts with the first serving test. `engines.checkpoints`: name -> directory of tiny.MODELS."""
    import tiny

    root = tmp_path_factory.mktemp("ckpt")
    runs = EngineRuns(tmp_path_factory.mktemp("engines"))
    runs.checkpoints = {}

    def build(name):
        runs.checkpoints[name] = tiny.build(name, root / name)
        return runs.checkpoints[name]

    runs.server = Server(build("llama"), runs.root / "server.log")
    try:
        for name, (scenario, *args) in EXACTNESS_RUNS.items():
            runs.start(name, scenario, runs.checkpoints.get(name) or build(name), *args)
        hysparse = build("capacity")
        runs.start("capacity-hysparse", "capacity", hysparse, *tiny.CAPACITY_ENGINE_ARGS)
        full = tiny.strip_hysparse(hysparse, root / "capacity-full")
        runs.start("capacity-full", "capacity", full, *tiny.CAPACITY_ENGINE_ARGS)
        yield runs
    finally:
        runs.stop()
        runs.server.stop()


@pytest.fixture(scope="session")
def checkpoints(engines):
    """name -> directory of the tiny HySparse checkpoints (tiny.MODELS)."""
    return engines.checkpoints
