"""`opensora doctor`: what this machine offers and which code path each stage will take on it.

Checks are read-only and fast: library versions and optional kernels (no model is built), and the
services named by RAY_ADDRESS / MLFLOW_TRACKING_URI / PREFECT_API_URL, reached with one short request.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from urllib.parse import urlparse

from opensora_core.config.credentials import redact_url

TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Check:
    """One line of the report: `ok` False marks a problem; `detail` says what was found or what will run."""

    name: str
    ok: bool
    detail: str


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def environment_checks() -> list[Check]:
    """torch / CUDA, attention and LayerNorm kernels, DeepSpeed, Ray, video decoders."""
    import torch

    cuda = torch.cuda.is_available()
    checks = [Check("torch", True, f"{torch.__version__}")]
    if cuda:
        names = ", ".join(torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count()))
        bf16 = "bf16 supported" if torch.cuda.is_bf16_supported() else "no bf16: use fp16 or fp32"
        checks.append(Check("cuda", True, f"{torch.cuda.device_count()} GPU(s): {names}; {bf16}"))
        backend = "nccl"
    else:
        checks.append(Check("cuda", True, "no GPU: training and sampling run on CPU in fp32"))
        backend = "gloo"
    checks.append(Check("distributed", True, f"torch.distributed backend {backend}"))

    flash = _installed("flash_attn")
    if flash and cuda:
        checks.append(Check("attention", True, "flash-attn (enable_flash_attn=True), else torch SDPA"))
    else:
        why = "flash-attn not installed" if not flash else "flash-attn needs CUDA"
        checks.append(Check("attention", True, f"torch SDPA ({why}; enable_flash_attn falls back)"))
    apex = _installed("apex")
    if apex and cuda:
        checks.append(Check("layernorm", True, "apex FusedLayerNorm (enable_layernorm_kernel=True)"))
    else:
        checks.append(Check("layernorm", True, "torch.nn.LayerNorm (apex with CUDA not available)"))

    deepspeed = _version("deepspeed")
    if deepspeed is None:
        checks.append(Check("deepspeed", False, "not installed: training cannot run (pip install deepspeed)"))
    else:
        accelerator = os.environ.get("DS_ACCELERATOR") or ("cuda" if cuda else "cpu")
        checks.append(Check("deepspeed", True, f"{deepspeed}, accelerator {accelerator}, ZeRO via `plugin`"))
    ray = _version("ray")
    checks.append(
        Check("ray", ray is not None, f"{ray}" if ray else "not installed: bucket build and training need it")
    )
    decoders = [name for name, module in (("decord", "decord"), ("PyAV", "av")) if _installed(module)]
    checks.append(
        Check(
            "video decoding",
            bool(decoders),
            " then ".join(decoders)
            if decoders
            else "neither decord nor PyAV is installed: cannot read clips",
        )
    )
    return checks


def _http_ok(url: str) -> tuple[bool, str]:
    parts = urlparse(url)
    if "@" in parts.netloc:  # reachability needs no login; keep the secret out of the request line
        url = parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_S) as response:
            return True, f"HTTP {response.status}"
    except urllib.error.HTTPError as err:  # the server answered: it is up, the path may need auth
        return err.code < 500, f"HTTP {err.code}"
    except (urllib.error.URLError, OSError, ValueError) as err:  # ValueError: a malformed URL
        reason = getattr(err, "reason", err)
        return False, f"unreachable ({reason})"


def _tcp_ok(host: str, port: int) -> tuple[bool, str]:
    try:
        with socket.create_connection((host, port), timeout=TIMEOUT_S):
            return True, "port open"
    except OSError as err:
        return False, f"unreachable ({err.strerror or err})"


def _running_ray_on_this_node() -> str | None:
    """The GCS address `ray.init(address="auto")` would join (the last `ray start` here), if any."""
    from ray._private import services

    return services.find_bootstrap_address(None) or next(iter(services.find_gcs_addresses()), None)


def service_checks(env: dict[str, str] | None = None) -> list[Check]:
    """Each service named in the environment, reached once; unset ones say what runs instead."""
    env = dict(os.environ) if env is None else env
    checks = []

    ray_address = env.get("RAY_ADDRESS")
    if not ray_address or ray_address == "local":
        checks.append(Check("ray cluster", True, "RAY_ADDRESS unset: a local Ray starts per command"))
    elif ray_address == "auto":
        found = _running_ray_on_this_node()
        if found is None:
            checks.append(Check("ray cluster", False, "RAY_ADDRESS=auto: no Ray cluster runs on this node"))
        else:
            host, _, port = found.rpartition(":")
            ok, detail = _tcp_ok(host, int(port))
            checks.append(Check("ray cluster", ok, f"RAY_ADDRESS=auto joins {found}: {detail}"))
    else:
        parsed = urlparse(ray_address if "://" in ray_address else f"ray://{ray_address}")
        port = parsed.port or (10001 if ray_address.startswith("ray://") else 6379)
        ok, detail = _tcp_ok(parsed.hostname or "127.0.0.1", port)
        checks.append(Check("ray cluster", ok, f"{redact_url(ray_address)}: {detail}"))

    mlflow_uri = env.get("MLFLOW_TRACKING_URI")
    if not mlflow_uri:
        checks.append(Check("mlflow", True, "MLFLOW_TRACKING_URI unset: runs are not tracked"))
    elif mlflow_uri.startswith(("http://", "https://")):
        ok, detail = _http_ok(mlflow_uri.rstrip("/") + "/health")
        checks.append(Check("mlflow", ok, f"{redact_url(mlflow_uri)}: {detail}"))
    else:
        checks.append(Check("mlflow", True, f"{redact_url(mlflow_uri)}: local store, no server"))

    prefect_api = env.get("PREFECT_API_URL")
    if not prefect_api:
        checks.append(Check("prefect", True, "PREFECT_API_URL unset: flows run ephemerally, no UI"))
    else:
        ok, detail = _http_ok(prefect_api.rstrip("/") + "/health")
        checks.append(Check("prefect", ok, f"{redact_url(prefect_api)}: {detail}"))
    return checks


def format_report(checks: list[Check]) -> str:
    width = max(len(c.name) for c in checks)
    lines = [f"{'ok ' if c.ok else 'BAD'}  {c.name:<{width}}  {c.detail}" for c in checks]
    bad = sum(not c.ok for c in checks)
    lines.append(f"{len(checks) - bad} ok, {bad} problem(s)")
    return "\n".join(lines)
