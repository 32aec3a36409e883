"""bench/gpu.py: its CPU dry run reports every part, and its shape arithmetic is Open-Sora's.

The dry run is the same code as the GPU run at tiny sizes, so the script cannot rot between the
rare sessions that have a GPU. It runs as a user runs it, in a subprocess, with Ray, MLflow and
Prefect made unimportable: the GPU machine it is written for has none of them.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu.py"
ABSENT_ON_GPU_MACHINE = ("ray", "mlflow", "prefect")


def load_bench():
    if "bench_gpu" not in sys.modules:  # registered first: its dataclasses look their module up
        spec = importlib.util.spec_from_file_location("bench_gpu", SCRIPT)
        sys.modules["bench_gpu"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules["bench_gpu"])
    return sys.modules["bench_gpu"]


def run_dry(out: Path, *args: str, absent: tuple[str, ...] = ABSENT_ON_GPU_MACHINE) -> dict:
    """bench/gpu.py --dry-run in a subprocess where the `absent` packages cannot be imported."""
    blocker = f"import sys; sys.modules.update(dict.fromkeys({absent!r})); "
    runner = (
        blocker + "import runpy; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
    )
    done = subprocess.run(
        [sys.executable, "-c", runner, str(SCRIPT), "--dry-run", "--out", str(out), *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == printed  # the last line printed is the file written
    return printed


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory) -> dict:
    return run_dry(tmp_path_factory.mktemp("gpu") / "gpu.json")


def errors_in(value, path="") -> list[str]:
    if isinstance(value, dict):
        found = [f"{path}: {value['error']}"] if "error" in value else []
        return found + [e for k, v in value.items() for e in errors_in(v, f"{path}.{k}")]
    return []


@pytest.mark.slow
def test_dry_run_reports_every_part_without_errors(dry_run):
    assert dry_run["device"] == "cpu" and dry_run["dry_run"] is True
    assert set(dry_run["part_s"]) == {"paths", "train", "encoders", "fit"}
    assert errors_in(dry_run) == []


@pytest.mark.slow
def test_dry_run_paths_name_what_ran_and_losses_agree(dry_run):
    assert dry_run["process_group"] == {"backend": "gloo", "all_reduce_ok": True}
    kernels = dry_run["paths"]["kernels"]
    assert kernels["attention_impl"] == "torch SDPA flash kernel"  # torch's CPU flash kernel
    assert kernels["layernorm_impl"] == "torch.nn.LayerNorm"
    assert any("using torch.nn.LayerNorm" in line for line in kernels["model_log"])
    check = dry_run["paths"]["fast_vs_fallback"]
    assert set(check["runs"]) == {"fallback_fp32_math", "fast_bf16", "deepspeed_zero2_bf16"}
    assert check["runs"]["deepspeed_zero2_bf16"]["impl"].endswith("ZeRO-2 bf16")
    assert check["losses_agree"] is True
    for run in check["runs"].values():
        assert run["finite"] and run["max_rel_diff_vs_fallback"] <= check["tolerance_rel"]
    assert dry_run["ratio"] == check["speedup_fast_vs_fallback"] > 0
    assert dry_run["paths"]["pinned_dataloader"] == {"skipped": "pinned memory needs CUDA"}


@pytest.mark.slow
def test_dry_run_train_encoders_and_fit_report_their_figures(dry_run):
    train = dry_run["train"]
    assert train["model"] == "STDiT3-XL/2" and train["impl"].startswith("deepspeed")
    for shape in ("16x256x256", "51x240p"):
        entry = train[shape]
        assert entry["flops_per_step"] > 0
        for mode in ("no_grad_checkpoint", "grad_checkpoint"):
            assert entry[mode]["tokens_per_s_per_gpu"] > 0 and entry[mode]["step_s"] > 0
            assert "mfu" not in entry[mode]  # no published peak for a CPU
        assert dry_run["encoders"]["vae"][shape]["encode_samples_per_s"] > 0
    assert dry_run["encoders"]["t5"]["encode_samples_per_s"] > 0
    assert dry_run["encoders"]["sampling"]["s_per_video_with_decode"] > 0
    fit = dry_run["fit"]
    assert fit["max_batch_size"] == fit["search_cap"] == 4  # a tiny model fits the whole range on a CPU
    assert fit["searched_to_convergence"] is True
    assert [t["batch_size"] for t in fit["trials"]] == [1, 2, 4]


def test_latent_arithmetic_is_open_soras_v1_2_vae():
    bench = load_bench()
    assert bench.latent_shape((51, 240, 426), None) == (15, 30, 53)
    assert bench.latent_shape((16, 256, 256), None) == (4, 32, 32)
    assert bench.tokens_per_sample((15, 30, 53)) == 15 * 15 * 27  # 2x2 patches, the odd side padded
    assert bench.tokens_per_sample((4, 32, 32)) == 1024


def test_latent_arithmetic_matches_the_vae_pipeline(tmp_path):
    from opensora_core.models.registry import build_vae
    from opensora_core.models.tiny_random import create_tiny_pretrained

    bench = load_bench()
    tiny = create_tiny_pretrained(tmp_path)
    vae = build_vae(dict(type="OpenSoraVAE_V1_2", from_pretrained=str(tiny.vae_v1_2)))
    for pixels in [(51, 240, 426), (16, 256, 256), (1, 64, 64), (34, 360, 640), (20, 144, 256)]:
        assert bench.latent_shape(pixels, None) == tuple(vae.get_latent_size(list(pixels))), pixels


def test_model_inputs_have_the_bucket_shapes():
    bench = load_bench()
    x, args = bench.model_inputs(bench.REAL, (51, 240, 426), 2, torch.device("cpu"))
    assert tuple(x.shape) == (2, 4, 15, 30, 53)
    assert tuple(args["y"].shape) == (2, 1, 300, 4096)
    assert args["mask"].sum(dim=1).tolist() == [120, 120]
    assert args["height"].tolist() == [240.0, 240.0] and args["width"].tolist() == [426.0, 426.0]


def test_unknown_part_is_refused_in_one_line():
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--parts", "train,speed"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert done.returncode == 2
    assert (
        done.stderr.strip()
        .splitlines()[-1]
        .endswith("--parts: unknown speed; valid: paths, train, encoders, fit")
    )


@pytest.mark.slow
def test_a_missing_optional_package_is_named_and_its_part_skipped(tmp_path):
    report = run_dry(
        tmp_path / "gpu.json", "--parts", "paths,encoders",
        absent=(*ABSENT_ON_GPU_MACHINE, "deepspeed", "diffusers"),
    )  # fmt: skip
    assert report["packages"]["deepspeed"] is False and report["packages"]["diffusers"] is False
    assert report["paths"]["deepspeed"] == {
        "skipped": "deepspeed is not installed: ZeRO-2 with overlap_comm not measured"
    }
    assert set(report["paths"]["fast_vs_fallback"]["runs"]) == {"fallback_fp32_math", "fast_bf16"}
    assert report["encoders"]["vae"] == {
        "skipped": "diffusers is not installed: the v1.2 VAE (its SDXL image VAE) not measured"
    }
    assert report["encoders"]["sampling"]["s_per_video_with_decode"] is None  # no VAE to decode with
    assert report["encoders"]["sampling"]["s_per_video_denoise"] > 0
    assert errors_in(report) == []
