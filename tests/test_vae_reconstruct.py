"""`opensora vae reconstruct` (Open-Sora's inference_vae.py) with a tiny random VAE and LPIPS."""

import math
from pathlib import Path

import pandas as pd
import pytest
from vae_media import write_vae_media

from opensora_core.cli import main
from opensora_core.config import load_config
from opensora_core.sample.vae_reconstruct import reconstruct

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    return write_vae_media(tmp_path_factory.mktemp("vae-media"))


def video_config(media, **cfg_options):
    options = {
        "model.from_pretrained": str(media.pretrained.vae_v1_2),
        "dtype": "fp32",
        "dataset.image_size": (32, 32),
        "dataset.num_frames": 9,
        "lpips_path": str(media.lpips),
        **cfg_options,
    }
    return load_config(REPO / "configs/vae/inference/video.py", cfg_options=options, mode="sample")


def test_reconstruct_writes_both_versions_and_reports_quality_to_mlflow(media, tmp_path, monkeypatch):
    import mlflow

    from opensora_core.tracking import EXPERIMENT

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    # artifacts in the test's directory, not ./mlruns
    mlflow.MlflowClient().create_experiment(EXPERIMENT, artifact_location=str(tmp_path / "artifacts"))
    result = reconstruct(
        video_config(media), data=str(media.media), output=str(tmp_path / "out"), progress=False
    )

    assert sorted(Path(f.path).name for f in result.files) == ["clip0.mp4", "clip1.mp4", "still.png"]
    assert [path for path, _ in result.skipped] == [str(media.corrupt)]
    for f in result.files:
        assert f.frames == 9 and Path(f.original).suffix == Path(f.reconstruction).suffix == ".mp4"
        assert math.isfinite(f.psnr) and 0 < f.psnr < 60 and -1 <= f.ssim <= 1 and f.lpips > 0
        assert (tmp_path / "out" / "compare" / Path(f.reconstruction).name).is_file()
    assert len(result.latent_mean) == len(result.latent_std) == 4

    run = mlflow.MlflowClient().get_run(result.run_id)
    means = result.means()
    assert run.data.metrics["psnr_mean"] == pytest.approx(means["psnr"])
    assert run.data.metrics["ssim_mean"] == pytest.approx(means["ssim"])
    assert run.data.metrics["lpips_mean"] == pytest.approx(means["lpips"])
    assert run.data.metrics["files_skipped"] == 1
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "reconstruct")}
    assert artifacts == {"reconstruct/quality.csv", "reconstruct/skipped.csv"}
    table = pd.read_csv(tmp_path / "out" / "quality.csv")
    assert table["psnr"].tolist() == pytest.approx([f.psnr for f in result.files])


def test_image_config_writes_pngs_and_leaves_lpips_out_without_weights(media, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    code = main(
        ["vae", "reconstruct", str(REPO / "configs/vae/inference/image.py"), "--data", str(media.media),
         "--output", str(tmp_path / "out"), "--quiet", "--cfg-options",
         f"model.from_pretrained={media.pretrained.vae_v1_2}", "dtype=fp32", "dataset.image_size=(32, 32)",
         f"lpips_path={tmp_path / 'absent.pth'}"]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "3 files reconstructed, 1 skipped, mean PSNR" in out and "LPIPS" not in out
    assert sorted(p.name for p in (tmp_path / "out" / "rec").iterdir()) == [
        "000-clip0.png", "001-clip1.png", "002-still.png",
    ]  # fmt: skip


def test_a_diffusion_config_is_refused_in_one_line(tmp_path, capsys):
    code = main(
        [
            "vae",
            "reconstruct",
            str(REPO / "configs/opensora-v1-2/inference/sample.py"),
            "--data",
            str(tmp_path),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "needs a VAE model" in err
