"""Config is the root of the import graph: reading, validating and showing a config never imports torch."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from opensora_core.models.registry import MODEL_TYPES, VAE_MODEL_TYPES

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs/opensora-v1-2/train/demo.py"

# Runs `opensora ARGV` in a fresh interpreter; the last stdout line says whether torch got imported.
SHOW = """
import json, sys
from opensora_core.cli import main
code = main(sys.argv[1:])
print(json.dumps({"code": code, "torch": "torch" in sys.modules}))
"""


def show(config: Path, *args: str) -> tuple[dict, list[str]]:
    proc = subprocess.run(
        [sys.executable, "-c", SHOW, "config", "show", str(config), *args],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return json.loads(proc.stdout.splitlines()[-1]), proc.stderr.splitlines()


def test_importing_the_config_package_does_not_import_torch() -> None:
    code = (
        "import sys, opensora_core.config, opensora_core.models.registry, opensora_core.schedulers, "
        "opensora_core.parallel.deepspeed_config, opensora_core.parallel.layout, opensora_core.train.mask_ratios; "
        "print('torch' in sys.modules)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "False"


def test_config_show_validates_the_demo_config_without_importing_torch() -> None:
    result, _ = show(DEMO)
    assert result == {"code": 0, "torch": False}


def test_config_show_of_a_sequence_parallel_config_does_not_import_torch(tmp_path: Path) -> None:
    config = tmp_path / "sp.py"
    config.write_text(f'_base_ = ["{DEMO}"]\nplugin = "zero2-seq"\nsp_size = 2\n')  # demo: 4 heads, 2 workers
    result, _ = show(config)
    assert result == {"code": 0, "torch": False}


def test_config_show_of_an_unknown_model_type_is_one_line_without_importing_torch(tmp_path: Path) -> None:
    config = tmp_path / "bad.py"
    config.write_text(f'_base_ = ["{DEMO}"]\nmodel = dict(type="STDiT9-XL/2")\n')
    result, stderr = show(config)
    assert result == {"code": 2, "torch": False}
    valid = ", ".join(MODEL_TYPES + VAE_MODEL_TYPES)  # a VAE can be the model too (Open-Sora's configs/vae)
    assert stderr == [f"error: model.type='STDiT9-XL/2' is unknown; valid types: {valid}"]
