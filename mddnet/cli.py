"""The `mddnet` command line: the same functions the notebooks call, for users without notebooks.

Each subcommand imports its module only when it runs, so `mddnet --help` stays fast and importing
this module has no side effects. Errors of the user's input (`MddnetError`, a missing file) print
one line that says the fix; anything else keeps its traceback, and `-v` shows every traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

import yaml

from mddnet.errors import MddnetError

__all__ = ["main"]


def _load(args: argparse.Namespace):  # noqa: ANN202 (a Config; imported lazily)
    """The run's config from --params/--variant/--seed, with the CPU kernels pinned as it says."""
    from mddnet.config import load_config
    from mddnet.kernels import pin_cpu_kernels

    config = load_config(args.params, args.variant, seed=getattr(args, "seed", None))
    pin_cpu_kernels(config.cpu)
    return config


def _show_config(args: argparse.Namespace) -> int:
    from mddnet.config import config_to_dict

    config = _load(args)
    print(yaml.safe_dump(config_to_dict(config), sort_keys=False), end="")
    return 0


def _check_dataset(args: argparse.Namespace) -> int:
    from mddnet.data.layout import DatasetError, scan_dataset, summarize, validate_dataset

    samples = scan_dataset(args.root, args.classes)
    problems = validate_dataset(samples)
    if problems:
        raise DatasetError(problems)  # main prints every problem and exits with 2
    print(summarize(samples).to_string(index=False))
    return 0


def _convert_visa(args: argparse.Namespace) -> int:
    from mddnet.data.layout import scan_dataset, summarize
    from mddnet.data.visa import convert_visa

    convert_visa(args.src, args.dst)
    # Reading the result back proves the tree is in the layout the rest of mddnet reads.
    print(summarize(scan_dataset(args.dst)).to_string(index=False))
    return 0


_BENCHMARK_SIZES = (
    "image_size",
    "train_per_class",
    "test_good_per_class",
    "test_defect_per_class",
)


def _download_dataset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mddnet.data.fetch import download, source_of

    archive = download(source_of(args.sources, args.name), Path(args.archive))
    print(f"downloaded {args.name} to {archive} (sha256 checked)")
    return 0


def _extract_dataset(args: argparse.Namespace) -> int:
    from pathlib import Path

    from mddnet.data.fetch import extract, source_of
    from mddnet.data.layout import scan_dataset, summarize

    out = extract(source_of(args.sources, args.name), Path(args.archive), Path(args.out))
    print(summarize(scan_dataset(out)).to_string(index=False))
    return 0


def _make_benchmark(args: argparse.Namespace) -> int:
    from mddnet.benchmark import make_benchmark
    from mddnet.config import load_config

    sizes = {key: getattr(args, key) for key in _BENCHMARK_SIZES if getattr(args, key) is not None}
    config = load_config(args.params, overrides={"data": {"benchmark": sizes}})
    summary = make_benchmark(args.out, config.data.benchmark, args.seed)
    images = sum(
        c.train_good + c.test_good + sum(c.test_defects.values()) for c in summary.classes.values()
    )
    print(f"wrote {images} images of {len(summary.classes)} classes to {summary.root}")
    return 0


def _train(args: argparse.Namespace) -> int:
    from mddnet.calibration import calibrate_checkpoint
    from mddnet.train import fit

    config = _load(args)
    result = fit(config, args.out, losses_csv=args.losses_csv, resume=not args.restart)
    if int(os.environ.get("RANK", "0")) != 0:  # under torchrun only the main process writes
        return 0
    calibrate_checkpoint(config, result.checkpoint, result.checkpoint)
    print(
        f"wrote {result.checkpoint} ({result.steps} steps, {result.wall_time_s:.0f} s; calibrated)"
    )
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from mddnet.calibration import calibrate_checkpoint

    config = _load(args)
    out = args.out or args.checkpoint
    chosen = calibrate_checkpoint(config, args.checkpoint, out)
    scales = "summed" if chosen.scale_weights is None else chosen.scale_weights
    print(
        f"wrote {out}: {'z-scored maps' if chosen.normalise else 'plain sum'}, scales "
        f"{scales}, RI weight {chosen.restoration_identity}, image score {chosen.image_score}, "
        f"on {chosen.images} held-out normals"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    import pandas as pd

    from mddnet.calibration import candidates_table, validate_checkpoint
    from mddnet.io import write_text

    config = _load(args)
    calibration = validate_checkpoint(config, args.checkpoint, args.copies)
    table = candidates_table(calibration)
    if args.out:
        write_text(args.out, table.to_csv(index=False))
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.to_string(index=False))
    chosen = table[table["chosen"]].iloc[0]
    print(
        f"validation {chosen['score']:.2f} (the calibrated choice) on {calibration.images} "
        f"held-out normals with {args.copies} pair(s) of synthetic anomalies each; nothing written"
    )
    return 0


def _diagnose(args: argparse.Namespace) -> int:
    import pandas as pd

    from mddnet.diagnostics import diagnose_checkpoint
    from mddnet.io import write_text

    config = _load(args)
    table = diagnose_checkpoint(config, args.checkpoint, args.root)
    if args.out:
        write_text(args.out, table.to_csv(index_label="class"))
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.round(4).to_string())
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from mddnet.evaluate import evaluate_checkpoint
    from mddnet.io import write_json
    from mddnet.predictions import save_predictions

    config = _load(args)
    run = evaluate_checkpoint(config, args.checkpoint)
    write_json(args.metrics_out, run.metrics)
    if args.predictions_out:
        save_predictions(args.predictions_out, run.predictions)
    if args.provenance_out:
        write_json(args.provenance_out, run.provenance)
    print(run.table(config.report.decimals).to_string())
    return 0


def _predict(args: argparse.Namespace) -> int:
    from mddnet.predict import predict_images

    run = predict_images(
        args.checkpoint, args.images, args.out, class_name=args.class_name, device=args.device
    )
    print(f"scored {len(run.rows)} images: {run.scores_csv}")
    if run.failures:
        print(f"{len(run.failures)} unreadable images were skipped:", file=sys.stderr)
        for path, reason in run.failures:
            print(f"  {path}: {reason}", file=sys.stderr)
        return 1
    return 0


def _export_onnx(args: argparse.Namespace) -> int:
    from mddnet.export import DEFAULT_OPSET, export_onnx

    out = export_onnx(args.checkpoint, args.out, opset=args.opset or DEFAULT_OPSET)
    print(f"wrote {out}")
    return 0


def _pipeline(args: argparse.Namespace) -> int:
    from mddnet.notebook import project_root
    from mddnet.pipeline import PipelinePaths, write_pipeline, write_pipeline_params

    root = project_root()
    paths = PipelinePaths.for_dataset(args.name)
    if args.name is not None and (args.data_root or not (root / paths.params).is_file()):
        write_pipeline_params(root, paths, args.params, args.name, args.data_root)
    elif args.name is None and args.params != paths.params:
        raise SystemExit("mddnet pipeline: --params other than params.yaml needs --name")
    target = write_pipeline(root, paths)
    relative = target.relative_to(root)
    print(f"wrote {relative}; run it with: dvc repro {relative}")
    return 0


def _repro(args: argparse.Namespace) -> int:
    from mddnet.lanes import repro
    from mddnet.notebook import project_root
    from mddnet.pipeline import PipelinePaths

    repro(project_root(), PipelinePaths.for_dataset(args.name), args.lanes)
    return 0


def _params_parent(default_variant: str | None) -> argparse.ArgumentParser:
    """--params, --variant and --seed, shared by the commands that load a run's config."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--params", default="params.yaml", help="params file (default: params.yaml)"
    )
    parent.add_argument(
        "--variant", default=default_variant, help=f"variant (default: {default_variant})"
    )
    parent.add_argument("--seed", type=int, default=None, help="run seed (default: the first)")
    return parent


def _add_pipeline(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "pipeline",
        help="render dvc.yaml, or pipelines/NAME/dvc.yaml for another dataset",
        description="Render the DVC pipeline of a params file: params.yaml -> dvc.yaml; "
        "pipelines/NAME/params.yaml -> pipelines/NAME/dvc.yaml (results/NAME/). With --name and "
        "--data-root, first write pipelines/NAME/params.yaml, which extends --params.",
    )
    p.add_argument("--params", default="params.yaml", help="params file a new pipeline extends")
    p.add_argument("--name", default=None, help="pipeline name (a dataset), e.g. mvtec_ad")
    p.add_argument(
        "--data-root", nargs="+", default=None, help="MVTec-layout dataset folder(s) for --name"
    )
    p.set_defaults(func=_pipeline)
    p = sub.add_parser(
        "repro",
        help="dvc repro of a pipeline, its per-run stages in parallel lanes",
        description="dvc repro of dvc.yaml, or of pipelines/NAME/dvc.yaml, with the stale "
        "per-run stages (trainings, then calibrations, then evaluations) run side by side (DVC "
        "runs them one at a time) and recorded with dvc commit; the same numbers as dvc repro. "
        "Keep lanes x cpu.threads <= cores.",
    )
    p.add_argument("--name", default=None, help="pipeline name, as for `mddnet pipeline`")
    p.add_argument(
        "--lanes",
        type=int,
        default=None,
        help="stages at a time (default: cores // cpu.threads, at least 1)",
    )
    p.set_defaults(func=_repro)


def _add_run_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", parents=[_params_parent("mddnet")], help="train one variant (resumes)"
    )
    p.add_argument("--out", required=True, help="checkpoint to write, e.g. artifacts/mddnet.pt")
    p.add_argument("--losses-csv", default=None, help="per-step losses (default: beside --out)")
    p.add_argument("--restart", action="store_true", help="ignore an interrupted run's state")
    p.set_defaults(func=_train)

    p = sub.add_parser(
        "calibrate",
        parents=[_params_parent("mddnet")],
        help="(re)calibrate a trained checkpoint on its held-out training normals",
        description="Choose the fusion, per-scale weights and image score on synthetic anomalies "
        "of the training normals the run held out, and set per-class thresholds; `mddnet train` "
        "does this already. The params give the calibration settings.",
    )
    p.add_argument("checkpoint", help="checkpoint written by `mddnet train`")
    p.add_argument(
        "--out", default=None, help="calibrated checkpoint to write (default: in place)"
    )
    p.set_defaults(func=_calibrate)

    p = sub.add_parser(
        "validate",
        parents=[_params_parent("mddnet")],
        help="score a checkpoint's calibration candidates on K validation pairs (writes nothing)",
        description="What `mddnet calibrate` does, on COPIES pairs (a large and a small "
        "synthetic anomaly) per held-out training normal instead of the pipeline's one, and "
        "without writing the checkpoint: prints every candidate's validation I-AUROC, P-AUROC, "
        "AUPRO and their mean (score), and marks the choice. The first pair is the pipeline's, so "
        "--copies 1 repeats the stored calibration. Use it to judge screens on sets with few "
        "held-out normals per class (README, research log).",
    )
    p.add_argument("checkpoint", help="checkpoint written by `mddnet train`")
    p.add_argument(
        "--copies", type=int, default=8, help="validation pairs per held-out normal (default 8)"
    )
    p.add_argument("--out", default=None, help="also write the candidates to this CSV")
    p.set_defaults(func=_validate)

    p = sub.add_parser(
        "diagnose",
        parents=[_params_parent("mddnet")],
        help="why a checkpoint scores as it does, on its held-out training normals",
        description="Per class, on the normals the run held out and the calibration's synthetic "
        "anomalies made from them (never test images): the normals' TR discrepancy, how much the "
        "RI map repeats TR (pixel correlation, inside/normal contrast of each map), and whether "
        "the memory acts on z (gate, cosine to the nearest prototype). NaN where the model lacks "
        "the part. The params give the data roots, image size and blur.",
    )
    p.add_argument("checkpoint", help="checkpoint written by `mddnet train`")
    p.add_argument(
        "--root", action="append", default=None, help="data root (repeatable; default: params)"
    )
    p.add_argument("--out", default=None, help="also write the table to this CSV")
    p.set_defaults(func=_diagnose)

    p = sub.add_parser(
        "evaluate",
        parents=[_params_parent("mddnet")],
        help="metrics of a checkpoint on the test split of data.root",
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint written by `mddnet train`")
    p.add_argument("--metrics-out", required=True, help="metrics JSON to write")
    p.add_argument("--predictions-out", default=None, help="also write scores and maps (.npz)")
    p.add_argument("--provenance-out", default=None, help="also write provenance JSON")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser(
        "show-config", parents=[_params_parent(None)], help="print the validated params of a run"
    )
    p.set_defaults(func=_show_config)


def _add_model_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="score your own images: a verdict per image in a CSV and heat-map overlays",
    )
    p.add_argument("checkpoint", help="checkpoint written by `mddnet train`")
    p.add_argument("images", nargs="+", help="image files and/or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder (scores.csv, overlays/)")
    p.add_argument(
        "--class",
        dest="class_name",
        default=None,
        help="class of the images (default: predicted by the memory)",
    )
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: auto)")
    p.set_defaults(func=_predict)

    p = sub.add_parser(
        "export-onnx",
        help="export the inference graph (image -> anomaly map and score) to ONNX",
        description="Export a checkpoint as ONNX with its own scoring settings. Inputs: image "
        "(B, 3, S, S) ImageNet-normalised float32 and class_id (B,) int64, -1 for the class the "
        "memory predicts. Outputs: anomaly_map (B, S, S), score (B,), read_class_id (B,). The "
        "class names and image size are in the model's metadata.",
    )
    p.add_argument("checkpoint", help="checkpoint written by `mddnet train`")
    p.add_argument("out", help="ONNX file to write, e.g. mddnet.onnx")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: 17)")
    p.set_defaults(func=_export_onnx)


def _add_data_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("check-dataset", help="decode an MVTec-layout dataset and summarise it")
    p.add_argument("root", help="dataset root: <root>/<class>/train/good, test/<type>, ...")
    p.add_argument(
        "--classes", nargs="+", default=(), metavar="CLASS", help="only these (default: all)"
    )
    p.set_defaults(func=_check_dataset)

    p = sub.add_parser("convert-visa", help="convert the VisA release into MVTec layout")
    p.add_argument("src", help="VisA release folder (holds split_csv/1cls.csv)")
    p.add_argument("dst", help="output folder (must not exist or be empty)")
    p.set_defaults(func=_convert_visa)

    for command, job, func in (
        (
            "download-dataset",
            "download a real dataset's archive and check its sha256",
            _download_dataset,
        ),
        ("extract-dataset", "unpack a downloaded archive into MVTec layout", _extract_dataset),
    ):
        p = sub.add_parser(command, help=job)
        p.add_argument("name", help="a dataset of the sources file, e.g. mvtec_ad or visa")
        p.add_argument("--sources", default="pipelines/datasets/params.yaml", help="sources file")
        p.add_argument("--archive", required=True, help="the archive file (downloads/NAME.tar*)")
        if command == "extract-dataset":
            p.add_argument("--out", required=True, help="the dataset folder to write")
        p.set_defaults(func=func)

    p = sub.add_parser("make-benchmark", help="generate the offline benchmark in MVTec layout")
    p.add_argument("out", help="output folder (an earlier generated benchmark there is replaced)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--params", default="params.yaml", help="reads data.benchmark (default: params.yaml)"
    )
    for key in _BENCHMARK_SIZES:
        p.add_argument(
            f"--{key.replace('_', '-')}",
            type=int,
            default=None,
            help=f"override data.benchmark.{key}",
        )
    p.set_defaults(func=_make_benchmark)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mddnet",
        description="MDD-Net: memory-augmented dual-decoder networks for multi-class "
        "unsupervised anomaly detection.",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="log debug messages and show tracebacks"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_pipeline(sub)
    _add_run_commands(sub)
    _add_model_commands(sub)
    _add_data_commands(sub)
    return parser


def _message(err: BaseException) -> str:
    """The error's own message, without the traceback a DataLoader worker wraps around it.

    An error raised in a worker (`data.num_workers` > 0) comes back as the same type whose
    message is "Caught <type> in DataLoader worker ..." plus the whole traceback; the original
    message is the traceback's last entry, `<module>.<type>: <message>`.
    """
    text = str(err)
    if not text.startswith("Caught ") or "Original Traceback" not in text:
        return text
    kind = type(err)
    name = kind.__qualname__
    if kind.__module__ != "builtins":
        name = f"{kind.__module__}.{name}"
    _, found, original = text.rpartition(f"\n{name}: ")
    return original.strip() if found else text


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (MddnetError, FileNotFoundError) as err:
        if args.verbose:
            raise
        # The message already names the file or key and the fix; a traceback adds nothing.
        print(f"mddnet {args.command}: error: {_message(err)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
