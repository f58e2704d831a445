"""Shared fixtures: one tiny SD3 pipeline per session, built offline; helpers to run the training script."""

from __future__ import annotations

import json
import locale
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# the tests are offline whatever the caller's environment says (HF_HUB_OFFLINE=0 would reach for the network), and
# no launcher setting of the caller's shell leaks into the in-process runs
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
for _name in [n for n in os.environ if n.startswith("ACCELERATE_")]:
    del os.environ[_name]


def _locale_is_utf8() -> bool:
    return sys.flags.utf8_mode or locale.getpreferredencoding(False).lower().replace("-", "") == "utf8"


def pytest_configure(config):
    """Under a locale whose encoding is not UTF-8, run the session again in Python's UTF-8 mode: cards, READMEs
    and configs are UTF-8 files, and the tests read them with the platform default (``Path.read_text()``)."""
    if _locale_is_utf8() or os.environ.get("PYTHONUTF8") == "1":
        return
    os.environ["PYTHONUTF8"] = "1"  # subprocesses of the tests inherit it
    capture = config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.stop_global_capturing()  # the new process writes to the real terminal, not pytest's buffers
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])


torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_path(tmp_path_factory) -> str:
    from danceopd_diffusers.tiny import tiny_sd3_path

    cache = tmp_path_factory.mktemp("danceopd-cache")
    os.environ["DANCEOPD_CACHE"] = str(cache)  # the script's embedded demo and subprocesses reuse it
    return tiny_sd3_path(cache)


@pytest.fixture
def tiny_pipe(tiny_path):
    from diffusers import StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_train(args: list[str]):
    """Run train_danceopd.main in-process (the accelerate singletons reset around it)."""
    import train_danceopd

    _reset_accelerate()
    try:
        parsed = train_danceopd.parse_args(args)
        train_danceopd.main(parsed)
    finally:
        from danceopd_diffusers.stopping import StopOnSignal

        StopOnSignal.stop_all()  # a run that raised leaves its SIGTERM/SIGINT handlers installed
        _reset_accelerate()
    return parsed


def make_lora_file(
    tiny_path: str,
    out_dir: Path,
    rank: int = 4,
    seed: int = 1,
    targets=("attn.to_q", "attn.to_v"),
    scale: float = 0.3,
) -> Path:
    """A LoRA expert for the tiny transformer with non-zero weights, saved in diffusers' format."""
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    transformer = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer")
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, target_modules=list(targets)), adapter_name="default"
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = get_peft_model_state_dict(transformer, adapter_name="default")
    StableDiffusion3Pipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=state,
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
    )
    return out_dir / "pytorch_lora_weights.safetensors"


def short_run(**flags) -> list[str]:
    """Flags of a seconds-long tiny run (tiny LoRA, 4 rollout steps, one sample per micro-step), ``flags`` added or
    overriding: ``short_run(max_train_steps=2)`` -> [..., "--max_train_steps", "2"]."""
    values = dict(
        num_rollout_steps=4,
        rank=4,
        train_batch_size=1,
        gradient_accumulation_steps=1,
        max_sequence_length=16,
        learning_rate=1e-3,
        seed=7,
        report_to="none",
    )
    values.update(flags)
    return [item for key, value in values.items() if value is not None for item in (f"--{key}", str(value))]


def python_blocks(card: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", card, flags=re.S)


#: runs a card's code blocks as a reader would: diffusers only (danceopd_diffusers unimportable), each block on
#: torch seed 0 (the card passes no generator); records each transformer forward's batch and each block's image
CARD_RUNNER = """
import importlib, json, sys
for module in sys.argv[2].split(",") if sys.argv[2] else []:  # a tiny base's own component classes (see below)
    importlib.import_module(module)
sys.modules["danceopd_diffusers"] = None
import numpy as np, torch, diffusers

cls = getattr(diffusers, sys.argv[1])
calls, forward = [], cls.forward

def counting(module, *args, **kwargs):
    x = kwargs.get("hidden_states", kwargs.get("x", args[0] if args else None))
    calls.append(len(x))
    return forward(module, *args, **kwargs)

cls.forward = counting
runs = []
for i, path in enumerate(sys.argv[3:]):
    calls.clear()
    torch.manual_seed(0)
    namespace = {}
    with open(path, encoding="utf-8") as f:
        exec(compile(f.read(), path, "exec"), namespace)
    np.save(f"image{i}.npy", np.asarray(namespace["image"], dtype=np.float32))
    runs.append(list(calls))
with open("calls.json", "w") as f:
    json.dump(runs, f)
"""


def substitute(code: str, repo_id: str, repo: Path, base: str) -> str:
    """What the card tells its reader to replace: the repo id by the folder, a local base's line by its folder."""
    from danceopd_diffusers.export import py_literal

    assert py_literal(repo_id) in code, code
    code = code.replace(py_literal(repo_id), repr(str(repo)))
    if "base = " in code:
        assert re.search(r"^base = .*# set this to the base's folder", code, flags=re.M), code
    return re.sub(r"^base = .*$", f"base = {base!r}", code, flags=re.M)


def run_card_blocks(
    blocks: list[str], repo_id: str, repo: Path, base: str, workdir: Path, transformer: str
) -> list[dict]:
    """Run every block in one fresh process without danceopd_diffusers: per block its transformer calls (batch
    sizes) and its image."""
    workdir.mkdir(parents=True, exist_ok=True)
    files = []
    for i, code in enumerate(blocks):
        files.append(workdir / f"block{i}.py")
        files[-1].write_text(substitute(code, repo_id, repo, base), encoding="utf-8")
    (workdir / "runner.py").write_text(CARD_RUNNER, encoding="utf-8")
    # the tiny Qwen-Image-Edit base names a processor class of danceopd_diffusers.tiny (the stock one needs
    # torchvision, which the test machine lacks): that module is imported before the package is blocked; a real
    # base names only diffusers and transformers classes
    index = json.loads(Path(base, "model_index.json").read_text())
    preload = sorted(
        {v[0] for v in index.values() if isinstance(v, list) and str(v[0]).startswith("danceopd")}
    )
    proc = subprocess.run(
        [sys.executable, "runner.py", transformer, ",".join(preload), *map(str, files)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = json.loads((workdir / "calls.json").read_text(encoding="utf-8"))
    return [{"calls": c, "image": np.load(workdir / f"image{i}.npy")} for i, c in enumerate(calls)]
