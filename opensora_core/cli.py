"""`opensora` command line: config | scan | bucket | precompute | train | plan | search-bs | evaluate |
eval-loss | sample | vae | models | demo-data."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from opensora_core import console
from opensora_core.config.args import add_common_args, add_sample_args, add_train_args
from opensora_core.errors import OpenSoraError

CONFIG_ONLY = ("command", "func", "config_command", "mode")


def _config_args(ns: argparse.Namespace, extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """The argparse values that are config overrides (everything but our own plumbing). `--verbose` is
    our switch (a bool), except where it is Open-Sora's inference verbosity level (an int config key)."""
    return {
        k: v
        for k, v in vars(ns).items()
        if k not in CONFIG_ONLY + extra and not (k == "verbose" and isinstance(v, bool))
    }


def _shows_logs(ns: argparse.Namespace) -> bool:
    """`--verbose`, or Open-Sora's `--verbose 2` (its detailed level) where the command takes a level."""
    verbose = getattr(ns, "verbose", False)
    return verbose is True or (type(verbose) is int and verbose >= 2)


def cmd_config_show(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config

    mode = ns.mode
    overrides = _config_args(ns)
    cfg = load_config(ns.config, overrides, mode=mode, needs_scheduler=False)
    # a diffusion config without a scheduler (Open-Sora's misc/extract.py) is one for bucket and precompute
    only = (
        "; no scheduler: for bucket and precompute only"
        if cfg.scheduler is None and not cfg.is_vae_model
        else ""
    )
    print(f"# {ns.config} ({cfg.mode} config, validated{only})")
    print(cfg.raw.pretty_text)
    return 0


def cmd_scan(ns: argparse.Namespace) -> int:
    from opensora_core.data.scan import scan

    console.log_to(Path(ns.output).parent, "scan")
    result = scan(Path(ns.input), Path(ns.output), workers=ns.workers, progress=not ns.quiet)
    console.summary()  # scan printed its own; this adds where the log file is
    return 0 if result.n_ok else 1


def cmd_bucket(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config
    from opensora_core.data.bucket_report import REPORT_PLOT_NAME, format_report
    from opensora_core.data.snapshot import open_snapshot
    from opensora_core.stages import build_buckets

    if ns.report:
        snap = open_snapshot(ns.output)
        print(format_report(snap.manifest))
        if (snap.path / REPORT_PLOT_NAME).is_file():
            print(f"plot: {snap.path / REPORT_PLOT_NAME}")
        return 0
    from opensora_core.storage import local_mirror

    # neither stage diffuses: Open-Sora's misc/extract.py, which names no scheduler, buckets and encodes
    cfg = load_config(ns.config, {}, cfg_options=ns.cfg_options, mode="train", needs_scheduler=False)
    console.log_to(local_mirror(ns.output).parent, "bucket")
    start = time.perf_counter()
    info = build_buckets(cfg, Path(ns.meta), ns.output, seed=ns.seed, epoch=ns.epoch)  # a path or a URI
    m = info.manifest
    console.summary(
        f"bucket snapshot {m.snapshot_id}: {m.num_kept} samples kept in {len(m.buckets)} buckets, "
        f"of {m.num_samples}, in {console.duration(time.perf_counter() - start)}"
    )
    print(info.path)
    return 0


def cmd_precompute(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config
    from opensora_core.features.store import ERRORS_NAME
    from opensora_core.stages import precompute_stage
    from opensora_core.storage import local_mirror

    cfg = load_config(ns.config, {}, cfg_options=ns.cfg_options, mode="train", needs_scheduler=False)
    console.log_to(local_mirror(cfg.training.outputs), "precompute")
    start = time.perf_counter()
    info = precompute_stage(cfg, ns.snapshot, ns.output, progress=not ns.quiet)
    m = info.manifest
    rows = max(1, m.num_encoded + m.num_reused)
    errors = f" (listed in {info.path / ERRORS_NAME})" if m.num_errors else ""
    print(
        f"feature snapshot {m.feature_id}: {m.num_samples} samples x {m.views} view(s); "
        f"{m.num_encoded} rows encoded, {m.num_reused} reused, {m.num_errors} samples left out{errors}; "
        f"{info.stored_bytes() / rows:,.0f} bytes per row; in {info.path} "
        f"({console.duration(time.perf_counter() - start)})"
    )
    console.summary()  # the line above is the summary; this adds where the log file is
    return 0


def cmd_train(ns: argparse.Namespace) -> int:
    from opensora_core import tracking
    from opensora_core.config import load_config
    from opensora_core.stages import run_training
    from opensora_core.storage import local_mirror

    # --num-train-workers overrides the config key, so it is validated with it (sp_size must divide it)
    overrides = _config_args(ns, extra=("snapshot", "features", "ray_address"))
    cfg = load_config(ns.config, overrides, mode="train")
    console.log_to(local_mirror(cfg.training.outputs), "train")
    with tracking.stage_run("train", parent_run_id=None) as run_id:
        if run_id:
            tracking.log_config(run_id, cfg.raw.to_dict(), ns.config)
        result = run_training(
            cfg,
            snapshot=ns.snapshot,
            features=ns.features,
            num_workers=ns.num_train_workers,
            ray_address=ns.ray_address,
            mlflow_run_id=run_id,
            progress=True,
        )
    loss = f"{result.final_loss:.4f}" if result.final_loss is not None else "n/a"
    console.summary(
        f"trained to global step {result.global_step} in {console.duration(result.elapsed)}, loss {loss}",
        f"checkpoint: {result.checkpoint}",
        f"MLflow run: {_mlflow_run(run_id)}",
    )
    print(
        json.dumps(
            {"checkpoint": result.checkpoint, "global_step": result.global_step, "loss": result.final_loss}
        )
    )
    return 0


def _mlflow_run(run_id: str | None) -> str:
    """Where a command's MLflow run is, for its summary."""
    from opensora_core import tracking

    if run_id is None:
        return "none" if tracking.tracking_enabled() else "none (MLFLOW_TRACKING_URI is not set)"
    return tracking.run_url(run_id) or f"{run_id} in {os.environ.get('MLFLOW_TRACKING_URI')}"


def _console() -> Any:
    """A rich console that keeps tables whole when stdout is a file or a pipe (rich would take 80 columns)."""
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)


def cmd_plan(ns: argparse.Namespace) -> int:
    from opensora_core import tracking
    from opensora_core.config import load_config
    from opensora_core.stages import current_snapshot
    from opensora_core.storage import local_mirror
    from opensora_core.train.plan import log_plan, make_plan, plan_table

    cfg = load_config(ns.config, {}, cfg_options=ns.cfg_options, mode="train")
    console.log_to(local_mirror(cfg.training.outputs), "plan")  # the step trials' DeepSpeed logs
    start = time.perf_counter()
    plan = make_plan(
        cfg, snapshot_dir=ns.snapshot or current_snapshot(cfg), num_workers=ns.num_train_workers,
        step_times=ns.step_times, on_workers=ns.num_train_workers is not None, ray_address=ns.ray_address,
    )  # fmt: skip
    _console().print(plan_table(plan))
    run_id = None
    if tracking.tracking_enabled():
        with tracking.stage_run("plan", parent_run_id=None) as run_id:
            log_plan(run_id, plan)
    sources = {source: sum(c.source == source for c in plan.buckets) for source in ("search-bs", "measured")}
    console.summary(
        f"planned {len(plan.buckets)} bucket(s) of {plan.snapshot} in {console.duration(time.perf_counter() - start)}: "
        f"{plan.total_steps} steps, {plan.gpu_hours:.3g} GPU-hours (step times: {sources['search-bs']} from "
        f"search-bs, {sources['measured']} measured here)",
        f"MLflow run: {_mlflow_run(run_id)}",
    )
    return 0


def cmd_search_bs(ns: argparse.Namespace) -> int:
    from opensora_core.storage import local_mirror
    from opensora_core.train.search_bs import search_batch_sizes, search_config, search_table

    cfg, _ = search_config(ns.config, ns.cfg_options)  # a bad config fails here, in one line
    console.log_to(local_mirror(cfg.training.outputs), "search-bs")  # DeepSpeed's logs of each trial
    result = search_batch_sizes(
        ns.config, output=ns.output, memory_budget_gib=ns.memory_budget, cfg_options=ns.cfg_options,
        warmup_steps=ns.warmup_steps, active_steps=ns.active_steps, batch_size_start=ns.batch_size_start,
        batch_size_end=ns.batch_size_end, num_workers=ns.num_train_workers, ray_address=ns.ray_address,
    )  # fmt: skip
    _console().print(search_table(result.results, result.reference_step_s))
    fitted = sum(r.trial is not None for r in result.results)
    console.summary(
        f"searched {len(result.results)} buckets ({fitted} with a batch size that fits) on {result.device} "
        f"in {console.duration(result.wall_s)}",
        f"fitted config: {result.output} (trials: {result.results_file})",
        f"MLflow run: {_mlflow_run(result.mlflow_run_id)}",
    )
    return 0


def cmd_evaluate(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config
    from opensora_core.sample.evaluate import evaluate_checkpoints, find_checkpoints

    cfg = load_config(ns.config, {}, cfg_options=ns.cfg_options, mode="train")
    out = ns.output or str(find_checkpoints(ns.checkpoint)[0].parent / "eval")
    runs = [ns.mlflow_run_id] if ns.mlflow_run_id else []
    console.log_to(Path(out).resolve().parent, "evaluate")  # beside the samples, not among them
    start = time.perf_counter()
    results = evaluate_checkpoints(cfg, ns.checkpoint, out, mlflow_run_ids=runs)
    for result in results:
        for path in result.samples:
            print(path)
    console.summary(
        f"evaluated {len(results)} checkpoint(s): {sum(len(r.samples) for r in results)} samples in "
        f"{console.duration(time.perf_counter() - start)}, under {out}",
        f"MLflow run: {_mlflow_run(ns.mlflow_run_id)}",
    )
    return 0


def cmd_eval_loss(ns: argparse.Namespace) -> int:
    from opensora_core.sample.eval_loss import eval_loss_checkpoints
    from opensora_core.sample.evaluate import find_checkpoints

    runs = [ns.mlflow_run_id] if ns.mlflow_run_id else []
    out = Path(ns.output) if ns.output else find_checkpoints(ns.checkpoint)[0].parent / "eval_loss"
    console.log_to(out.resolve().parent, "eval-loss")  # Ray's and the workers' logs, beside the results
    start = time.perf_counter()
    results = eval_loss_checkpoints(
        ns.config, ns.checkpoint, snapshot_dir=ns.snapshot, output_dir=out, cfg_options=ns.cfg_options,
        mlflow_run_ids=runs, num_workers=ns.num_train_workers, ray_address=ns.ray_address,
    )  # fmt: skip
    for result in results:
        print(json.dumps({"global_step": result.global_step, "mean": result.mean, **result.per_bucket}))
    last = results[-1]
    console.summary(
        f"eval-loss of {len(results)} checkpoint(s) in {console.duration(time.perf_counter() - start)}: "
        f"mean {last.mean:.5f} at step {last.global_step} over {sum(last.samples.values())} held-out "
        f"samples, under {out}",
        f"MLflow run: {_mlflow_run(ns.mlflow_run_id)}",
    )
    return 0


def cmd_sample(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config
    from opensora_core.sample.inference import run_inference

    cfg = load_config(ns.config, _config_args(ns), mode="sample")
    console.log_to(Path(cfg.sampling.save_dir).resolve().parent, "sample")  # not among the samples
    start, count = time.perf_counter(), 0
    for path in run_inference(cfg):
        print(path)
        count += 1
    console.summary(
        f"sampled {count} video(s) in {console.duration(time.perf_counter() - start)}, under {cfg.sampling.save_dir}"
    )
    return 0


def cmd_vae_reconstruct(ns: argparse.Namespace) -> int:
    from opensora_core.config import load_config
    from opensora_core.sample.vae_reconstruct import reconstruct, summary_line, summary_table

    cfg = load_config(ns.config, {}, cfg_options=ns.cfg_options, mode="sample")
    result = reconstruct(cfg, data=ns.data, snapshot=ns.snapshot, output=ns.output, progress=not ns.quiet)
    _console().print(summary_table(result))
    print(summary_line(result))
    return 0 if result.files else 1


def cmd_models(ns: argparse.Namespace) -> int:
    from opensora_core.models.registry import (
        MODEL_TYPES,
        TEXT_ENCODER_TYPES,
        VAE_TYPES,
        count_component_parameters,
        count_parameters,
    )
    from opensora_core.schedulers import SCHEDULER_TYPES

    rows = [(name, f"{count_parameters(name):,}") for name in MODEL_TYPES]
    rows += [(name, f"{count_component_parameters('vae', name):,}  (vae)") for name in VAE_TYPES]
    rows += [
        (name, f"{count_component_parameters('text_encoder', name):,}  (text encoder)")
        for name in TEXT_ENCODER_TYPES
    ]
    rows += [(name, "0  (scheduler, no weights)") for name in SCHEDULER_TYPES]
    width = max(len(name) for name, _ in rows)
    for name, count in rows:
        print(f"{name:<{width}}  {count}")
    return 0


def cmd_demo_data(ns: argparse.Namespace) -> int:
    from opensora_core.data.demo_data import make_demo_data
    from opensora_core.models.tiny_random import create_tiny_pretrained

    out = Path(ns.dir)
    demo = make_demo_data(out, seed=ns.seed)
    weights = create_tiny_pretrained(out / "pretrained", seed=ns.seed)
    print(
        f"demo media in {out}: {len(demo.videos)} videos, {len(demo.images)} images, "
        f"1 deliberately corrupt file ({demo.corrupt}), captions in sidecar .txt files and {demo.captions_csv}"
    )
    print(f"tiny text encoder {weights.t5} and VAE {weights.vae}: RANDOM weights, so samples are noise")
    return 0


def cmd_doctor(ns: argparse.Namespace) -> int:
    from opensora_core.doctor import environment_checks, format_report, service_checks

    checks = environment_checks() + service_checks()
    print(format_report(checks))
    return 0 if all(c.ok for c in checks) else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="opensora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub)
    _add_training_commands(sub)
    _add_sampling_commands(sub)
    _add_tool_commands(sub)
    _add_verbose(parser)
    return parser


def _add_data_commands(sub: Any) -> None:
    """scan, bucket, precompute: media to metadata, bucket snapshots and feature snapshots."""
    scan = sub.add_parser("scan", help="probe media headers into a metadata table")
    scan.add_argument("input", help="folder of media (+ .txt captions) or an Open-Sora CSV with path,text")
    scan.add_argument("--output", required=True, help="metadata .parquet to write")
    scan.add_argument("--workers", type=int, help="probe processes (default: all cores)")
    scan.add_argument("--quiet", action="store_true", help="no progress bar")
    scan.set_defaults(func=cmd_scan)

    bucket = sub.add_parser("bucket", help="build a bucket snapshot (Ray Data) or print its report")
    bucket.add_argument("config", nargs="?", help="training config with bucket_config")
    bucket.add_argument("--meta", help="metadata .parquet from `opensora scan`")
    bucket.add_argument(
        "--output",
        required=True,
        help="snapshot root, a path or a URI such as s3://bucket/prefix (ROOT/CURRENT names the newest)",
    )
    bucket.add_argument("--seed", type=int)
    bucket.add_argument("--epoch", type=int, default=0)
    bucket.add_argument("--report", action="store_true", help="print the current snapshot's bucket table")
    bucket.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    bucket.set_defaults(func=cmd_bucket)

    precompute = sub.add_parser(
        "precompute", help="encode a bucket snapshot's samples into a feature snapshot (Ray Data)"
    )
    precompute.add_argument("config", help="training config with vae and text_encoder")
    precompute.add_argument("--snapshot", help="bucket snapshot or root (default: {outputs}/buckets CURRENT)")
    precompute.add_argument(
        "--output", help="feature snapshot root (default: feature_snapshot or {outputs}/features)"
    )
    precompute.add_argument("--quiet", action="store_true", help="no progress bar")
    precompute.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    precompute.set_defaults(func=cmd_precompute)


def _add_training_commands(sub: Any) -> None:
    """train, evaluate, plan, search-bs, eval-loss: the training run and what is measured around it."""
    train = sub.add_parser("train", help="train on Ray Train + DeepSpeed")
    add_common_args(train)
    add_train_args(train)
    train.add_argument(
        "--snapshot", help="bucket snapshot to train on (default: scan + bucket dataset.data_path)"
    )
    train.add_argument(
        "--features",
        help="feature snapshot to train from (default: feature_snapshot, else {outputs}/features; "
        "the config sets load_video_features / load_text_features)",
    )
    train.add_argument("--num-train-workers", type=int, help="Ray Train workers (config: num_train_workers)")
    train.add_argument("--ray-address", help="Ray cluster address (default: RAY_ADDRESS or a local Ray)")
    train.set_defaults(func=cmd_train)

    evaluate = sub.add_parser("evaluate", help="sample the eval prompts from a checkpoint")
    evaluate.add_argument("config")
    evaluate.add_argument(
        "--checkpoint",
        required=True,
        help="a checkpoint (epochE-global_stepG) or a run directory: all its checkpoints",
    )
    evaluate.add_argument("--output", help="where samples go (default: beside the checkpoint)")
    evaluate.add_argument("--mlflow-run-id", help="log the samples to this MLflow run")
    evaluate.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    evaluate.set_defaults(func=cmd_evaluate)

    plan = sub.add_parser("plan", help="per-bucket batches, steps per epoch and GPU-hours before training")
    plan.add_argument("config")
    plan.add_argument("--snapshot", help="bucket snapshot (default: the current one under {outputs}/buckets)")
    plan.add_argument(
        "--num-train-workers", type=int,
        help="training workers (config: num_train_workers); given, step times are measured on as many Ray Train workers",
    )  # fmt: skip
    plan.add_argument(
        "--ray-address", help="measure on this Ray cluster's workers (default: in this process)"
    )
    plan.add_argument("--step-times", help="search-bs results file (default: the one beside the config)")
    plan.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    plan.set_defaults(func=cmd_plan)

    search = sub.add_parser("search-bs", help="per-bucket batch sizes by timing the real train step")
    search.add_argument(
        "config", help="config whose bucket_config entries are search ranges (see search_bs.py)"
    )
    search.add_argument("--output", help="fitted config to write (default: {outputs}/search_bs/NAME.py)")
    search.add_argument("--memory-budget", type=float, metavar="GIB", help="peak memory a batch size may use")
    search.add_argument("--warmup-steps", type=int, default=1, help="untimed steps per trial")
    search.add_argument("--active-steps", type=int, default=3, help="timed steps per trial (their median)")
    search.add_argument("--batch-size-start", type=int, default=2, help="v1.1 form (keep_prob, bs): lowest")
    search.add_argument("--batch-size-end", type=int, default=256, help="v1.1 form: highest + 1")
    search.add_argument(
        "--num-train-workers", type=int,
        help="trials on as many Ray Train workers, as training runs (default: in this process; sp_size > 1: "
        "num_train_workers)",
    )  # fmt: skip
    search.add_argument(
        "--ray-address", help="trials on this Ray cluster's workers (default: in this process)"
    )
    search.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    search.set_defaults(func=cmd_search_bs)

    eval_loss = sub.add_parser("eval-loss", help="validation loss per bucket and timestep of checkpoints")
    eval_loss.add_argument(
        "config", help="config with bucket_config, num_eval_timesteps, val_fraction or val_data_path"
    )
    eval_loss.add_argument(
        "--checkpoint", required=True, help="a checkpoint or a run directory: all its checkpoints"
    )
    eval_loss.add_argument(
        "--snapshot", help="the training snapshot val_fraction splits (not needed with val_data_path)"
    )
    eval_loss.add_argument("--output", help="where results go (default: eval_loss/ beside the checkpoints)")
    eval_loss.add_argument("--mlflow-run-id", help="log the losses to this MLflow run")
    eval_loss.add_argument(
        "--num-train-workers", type=int,
        help="Ray Train workers (default: the config's num_train_workers when above 1, else this process)",
    )  # fmt: skip
    eval_loss.add_argument(
        "--ray-address", help="Ray cluster to run the workers on (default: RAY_ADDRESS, else local)"
    )
    eval_loss.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    eval_loss.set_defaults(func=cmd_eval_loss)


def _add_sampling_commands(sub: Any) -> None:
    """sample and vae reconstruct."""
    sample = sub.add_parser("sample", help="generate videos or images from prompts")
    add_common_args(sample)
    add_sample_args(sample)
    sample.set_defaults(func=cmd_sample)

    vae = sub.add_parser("vae", help="VAE tools (Open-Sora's configs/vae)")
    vae_sub = vae.add_subparsers(dest="vae_command", required=True)
    recon = vae_sub.add_parser(
        "reconstruct", help="encode and decode clips and images; PSNR, SSIM (and LPIPS) per file"
    )
    recon.add_argument("config", help="a VAE config, e.g. configs/vae/inference/video.py")
    source = recon.add_mutually_exclusive_group()
    source.add_argument(
        "--data", help="media folder, path,text CSV or metadata .parquet (default: data_path)"
    )
    source.add_argument("--snapshot", help="a bucket snapshot: reconstruct its files")
    recon.add_argument("--output", help="where originals, reconstructions and tables go (default: save_dir)")
    recon.add_argument("--quiet", action="store_true", help="no progress bar")
    recon.add_argument("--cfg-options", nargs="+", metavar="KEY=VALUE")
    recon.set_defaults(func=cmd_vae_reconstruct)


def _add_tool_commands(sub: Any) -> None:
    """config show, models, doctor, demo-data."""
    config = sub.add_parser("config", help="inspect configs")
    config_sub = config.add_subparsers(dest="config_command", required=True)
    show = config_sub.add_parser("show", help="print the resolved, validated config")
    add_common_args(show)
    add_train_args(show)
    add_sample_args(show)
    show.add_argument(
        "--mode", choices=("train", "sample"), help="default: train if the config has a dataset"
    )
    show.set_defaults(func=cmd_config_show)

    models = sub.add_parser("models", help="list model types with their parameter counts")
    models.set_defaults(func=cmd_models)

    doctor = sub.add_parser(
        "doctor", help="check torch/CUDA, kernels, DeepSpeed, Ray and the services; say which path will run"
    )
    doctor.set_defaults(func=cmd_doctor)

    demo = sub.add_parser("demo-data", help="write synthetic captioned media and tiny random weights")
    demo.add_argument("dir")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_data)


def _add_verbose(parser: argparse.ArgumentParser) -> None:
    """`--verbose` on every command (after its name, with its other options)."""
    subcommands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    taken = any("--verbose" in a.option_strings for a in parser._actions)  # Open-Sora's level (sample)
    if not subcommands and not taken:
        parser.add_argument(
            "--verbose",
            action="store_true",
            help="show library and Ray logs on the console (always in the log file)",
        )
    for action in subcommands:
        for child in action.choices.values():
            _add_verbose(child)


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    console.start(verbose=_shows_logs(ns), level=os.environ.get("OPENSORA_LOG_LEVEL", "INFO"))
    try:
        return ns.func(ns)
    except OpenSoraError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception:
        path = console.open_log()  # what led to it stays readable
        if path is not None:
            print(f"log: {path}", file=sys.stderr)
        raise


if __name__ == "__main__":
    sys.exit(main())
