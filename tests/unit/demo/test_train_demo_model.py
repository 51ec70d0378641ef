"""tools/train_demo_model.py end to end at a tiny size: it runs, writes what the server loads, and is
reproducible (stage 2 rerun from a saved stage 1 gives the one-go run's weights bit for bit)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from vlmserve.models import default_model

ROOT = Path(__file__).resolve().parents[3]
TINY = [
    "--scenes-per-step=1",
    "--steps-code=2",
    "--check-scenes=1",
    "--pool-size=8",
    "--held-out=4",
    "--images-per-step=4",
    "--steps-classify=2",
    "--steps-project=2",
    "--steps-joint=2",
    "--steps-answer=2",
    "--threads=1",
]


def _train(*extra: str) -> str:
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "train_demo_model.py"), *TINY, *extra],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_tiny_run_writes_loadable_weights_reproducibly(tmp_path: Path) -> None:
    one_go, saved, rerun = (
        tmp_path / "one-go.safetensors",
        tmp_path / "code.pt",
        tmp_path / "rerun.safetensors",
    )
    log = _train(f"--out={one_go}", f"--save-code={saved}")
    assert "scene code (no vision)" in log and "whole model (vision + code rows)" in log
    _train(f"--out={rerun}", f"--code-from={saved}")

    written, again = load_file(one_go), load_file(rerun)
    shipped = load_file(default_model.DEMO_WEIGHTS_PATH)
    assert {k: (v.shape, v.dtype) for k, v in written.items()} == {
        k: (v.shape, v.dtype) for k, v in shipped.items()
    }
    assert written.keys() == again.keys()
    assert all(torch.equal(written[k], again[k]) for k in written)
    with safe_open(str(one_go), "pt") as f:
        assert f.metadata()["seed"] == "1"

    # --answer-tower: phase (d) trains the tower too (the other phases are as in the rerun)
    tower_too = tmp_path / "tower-too.safetensors"
    _train(f"--out={tower_too}", f"--code-from={saved}", "--answer-tower")
    changed = load_file(tower_too)
    tower = [k for k in written if k.startswith("vision_model.")]
    assert tower and any(not torch.equal(changed[k], again[k]) for k in tower)

    # the server's own assembly accepts the file
    model_dir = tmp_path / "model"
    default_model.build_default_model(model_dir, vision_weights=one_go)
    assert (model_dir / "config.json").is_file()
