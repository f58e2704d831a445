"""Without a network a Hub id fails in seconds with one line that names the cause (the Hub cannot be reached),
and a reachable Hub's answer (no such repo, no such file, gated) is named too: never huggingface_hub's retries
and then "does not appear to have a file named model_index.json".

The network is simulated: an endpoint nothing listens on (``HF_ENDPOINT=http://127.0.0.1:9``), and a local
fake Hub that answers every request with the error a missing repo, file or a gated repo gets.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOWHERE = "http://127.0.0.1:9"  # the discard port: connection refused


@pytest.fixture
def online(monkeypatch, tmp_path):
    """huggingface_hub online (the tests' default is offline), an empty Hub cache, and ``use(endpoint)``."""
    from huggingface_hub import constants

    from danceopd_diffusers import network

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    network.hub_unreachable.cache_clear()

    def use(endpoint: str) -> None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )

    yield use
    network.hub_unreachable.cache_clear()


@pytest.fixture
def fake_hub():
    """``start(error_code)``: a local Hub answering every request 404/401 with that X-Error-Code; its URL."""
    servers = []

    def start(error_code: str) -> str:
        class Handler(http.server.BaseHTTPRequestHandler):
            def answer(self):
                self.send_response(401 if error_code == "GatedRepo" else 404)
                self.send_header("X-Error-Code", error_code)
                self.send_header("X-Error-Message", "fake Hub")
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_HEAD = do_GET = answer

            def log_message(self, *args):
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def test_an_unreachable_hub_fails_a_base_id_in_seconds_naming_the_network(online):
    from diffusers import DiffusionPipeline  # imported before the clock starts

    from danceopd_diffusers.config import ConfigError
    from danceopd_diffusers.preflight import inspect_pipeline

    assert DiffusionPipeline
    online(NOWHERE)
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        inspect_pipeline("stabilityai/stable-diffusion-3.5-medium")
    assert time.monotonic() - start < 5  # huggingface_hub's retries took 27-44 s
    message = str(err.value)
    assert "cannot be reached" in message and "Connection refused" in message and NOWHERE in message
    assert "model_index.json" not in message and "\n" not in message


def test_an_unreachable_hub_fails_lora_fields_and_checkpoints_the_same_way(online):
    from danceopd_diffusers.config import ConfigError
    from danceopd_diffusers.lora_io import resolve_lora_file
    from danceopd_diffusers.preflight import check_transformer_checkpoint

    online(NOWHERE)
    with pytest.raises(
        ConfigError, match=r"^LoRA 'someone/a-lora' is a Hub id, but the Hub .* cannot be reached"
    ):
        resolve_lora_file("someone/a-lora")
    with pytest.raises(
        ConfigError, match=r"checkpoint 'someone/a-model' is a Hub id, but .* cannot be reached"
    ):
        check_transformer_checkpoint("someone/a-model", None, None, "Field 'expert'")


@pytest.mark.parametrize(
    "error_code, says",
    [
        ("RepoNotFound", "no such repo on the Hub"),
        ("EntryNotFound", "the repo exists but holds no model_index.json"),
        ("GatedRepo", "the repo is gated"),
    ],
)
def test_a_reachable_hub_names_a_missing_repo_or_file(error_code, says, online, fake_hub):
    from diffusers import DiffusionPipeline  # imported before the clock starts

    from danceopd_diffusers.config import ConfigError
    from danceopd_diffusers.preflight import inspect_pipeline

    assert DiffusionPipeline
    online(fake_hub(error_code))
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        inspect_pipeline("someone/a-model")
    assert time.monotonic() - start < 5
    assert str(err.value).startswith("--pretrained_model_name_or_path 'someone/a-model': " + says)
    assert "cannot be reached" not in str(err.value)


def test_a_cached_repo_without_network_is_told_to_use_the_cache(online, tmp_path):
    from huggingface_hub import constants

    from danceopd_diffusers.config import ConfigError
    from danceopd_diffusers.network import check_hub_reachable

    online(NOWHERE)
    snapshot = Path(constants.HF_HUB_CACHE, "models--someone--cached", "snapshots", "0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "model_index.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("0" * 40)
    with pytest.raises(ConfigError, match="in your Hub cache: set HF_HUB_OFFLINE=1"):
        check_hub_reachable("--pretrained_model_name_or_path", "someone/cached")


def test_the_script_without_network_prints_one_error_line(tmp_path):
    """End to end, as a user without network runs it: HF_ENDPOINT unreachable, HF_HUB_OFFLINE unset."""
    data = tmp_path / "prompts.csv"
    data.write_text("prompt\na red circle\n")
    env = dict(os.environ, HF_ENDPOINT=NOWHERE, HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"))
    env["PYTHONPATH"] = str(REPO)
    cmd = [
        sys.executable,
        str(REPO / "train_danceopd.py"),
        "--pretrained_model_name_or_path",
        "someone/model",
    ]
    cmd += ["--cfg_scale", "3", "--dataset_name", str(data), "--output_dir", str(tmp_path / "out")]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "'someone/model' is a Hub id, but the Hub at http://127.0.0.1:9 cannot be reached" in errors[0]
    assert "Retrying" not in proc.stderr and "does not appear to have a file" not in proc.stderr
