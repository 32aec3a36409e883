"""Security and hygiene: no credentials in configs, checkpoints or Ray's state (doctor's masking: test_doctor.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from opensora_core.cli import main as cli_main
from opensora_core.config import load_config
from opensora_core.config.credentials import is_secret_name, redact_url
from opensora_core.errors import ConfigError

TRAIN_BASE = """
dataset = dict(type="VariableVideoTextDataset", data_path="data", frame_interval=1)
bucket_config = {"240p": {16: (1.0, 8)}}
model = dict(type="STDiT3-XL/2")
scheduler = dict(type="rflow")
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.py"
    path.write_text(TRAIN_BASE + text)
    return path


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ('wandb_api_key = "0123abcd"\n', "wandb_api_key"),
        ('mlflow = dict(password="hunter2")\n', "mlflow.password"),
        ('aws_secret_access_key = "abc"\n', "aws_secret_access_key"),
        ('hf_token = "hf_abc"\n', "hf_token"),
    ],
)
def test_a_credential_in_a_config_is_refused_naming_its_key(tmp_path: Path, line: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"^{key}: looks like a credential; .*environment") as err:
        load_config(write(tmp_path, line))
    assert "\n" not in str(err.value)


def test_a_url_with_a_password_is_refused_without_printing_the_password(tmp_path: Path) -> None:
    config = write(tmp_path, 'dataset = dict(data_path="s3://AKIAXYZ:s3cr3t@videos/clips")\n')
    with pytest.raises(ConfigError, match=r"^dataset.data_path: the URL carries a password") as err:
        load_config(config)
    assert "s3cr3t" not in str(err.value) and "AKIAXYZ" not in str(err.value)
    assert "s3://***@videos/clips" in str(err.value)


def test_the_cli_refuses_a_credential_with_exit_code_2_and_one_line(tmp_path: Path, capsys) -> None:
    config = write(tmp_path, 'wandb_api_key = "0123abcd"\n')
    assert cli_main(["config", "show", str(config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: wandb_api_key: looks like a credential")
    assert "0123abcd" not in captured.err


@pytest.mark.parametrize(
    "name", ["tokenizer", "model_max_length", "max_tokens", "tokenizer_path", "use_key_padding", "keep_prob"]
)
def test_ordinary_keys_are_not_mistaken_for_credentials(name: str) -> None:
    assert not is_secret_name(name)


def test_an_empty_or_false_credential_key_is_allowed(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, 'wandb_api_key = ""\nauth_token = None\n'))
    assert (cfg.raw["wandb_api_key"], cfg.raw["auth_token"]) == ("", None)


def test_redact_url_keeps_scheme_host_and_path() -> None:
    assert redact_url("http://alice:pw@mlflow.internal:5000/x?y=1") == "http://***@mlflow.internal:5000/x?y=1"
    assert redact_url("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert redact_url("/plain/path") == "/plain/path"


# own_ray: Ray's state API needs its dashboard, and the secret must be in the environment that Ray's own
# processes inherit when it starts (as for a command's local Ray), not only forwarded to the workers.
@pytest.mark.slow
@pytest.mark.own_ray
def test_tracking_credentials_reach_the_workers_but_not_rays_state_or_logs(
    tmp_path: Path, monkeypatch
) -> None:
    import ray
    from ray.util.state import list_actors, list_tasks

    from opensora_core.parallel.launch import run_training

    def report_password(config):  # runs in the Ray Train worker (a local function: pickled by value)
        import os
        from pathlib import Path

        Path(config["out"]).write_text(os.environ.get("MLFLOW_TRACKING_PASSWORD", "<unset>"))

    secret = "pw-7f3a9c-not-for-logs"
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", secret)
    ray.init(address="local", num_cpus=2, include_dashboard=True, log_to_driver=False)
    try:
        result = run_training(
            report_password,
            {"out": str(tmp_path / "seen")},
            num_workers=1,
            use_gpu=False,
            ray_address=None,
            storage_path=str(tmp_path / "ray"),
            run_name="secret",
        )
        assert result.error is None
        assert (tmp_path / "seen").read_text() == secret
        node = ray._private.worker._global_node
        address = f"http://{node.address_info['webui_url']}"
        state = repr(list_actors(address=address, detail=True)) + repr(
            list_tasks(address=address, detail=True)
        )
        session = Path(node.get_session_dir_path())
    finally:
        ray.shutdown()
    assert secret not in state
    leaking = [p for p in session.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaking == []
