"""`cnnlab predict` and `cnnlab export`: their parsers (`add_parser`); the handlers import predict.py and
export.py (torch) only when they run, so `cnnlab --help` stays fast."""
from __future__ import annotations

EXPORT_FORMATS = ["onnx", "torchscript"]  # the keys of export.SUFFIX (tests/test_architecture.py checks)


def _predict(args) -> int:
    from cnnlab.deploy.predict import run

    return run(args)


def _export(args) -> int:
    from cnnlab.deploy.export import export

    export(args.run_dir, args.format, args.out, dynamic_batch=args.dynamic_batch, opset=args.opset,
           checkpoint=args.checkpoint)
    return 0


def add_parser(subparsers) -> None:
    """Add `predict` and `export` to the main CLI's subparsers."""
    p = subparsers.add_parser(
        "predict", help="classify new images with a trained run (files, folders, zips, globs)",
        description="Classify unlabelled images with a run's checkpoint and its own evaluation preprocessing. "
                    "Exit status: 0 all predicted, 3 some inputs skipped (listed on stderr), 2 bad usage.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/NAME)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive), .zip files, globs")
    p.add_argument("--top-k", type=int, default=1, help="classes per image (default 1)")
    p.add_argument("--out", metavar="FILE", help="write .csv, .json or .jsonl (atomically) instead of a table")
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass (default 256)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="the best epoch's weights (default) or the last epoch's")
    p.add_argument("--tta", action="store_true", help="test-time augmentation: the run's train.tta (on by default when "
                                                      "the run set one), or the mirrored image's average when it set none")
    p.add_argument("--gradcam", action="store_true",
                   help="also write an HTML page with each image's Grad-CAM (beside --out, else predictions.html)")
    p.add_argument("--gradcam-limit", type=int, default=200, help="images shown on the Grad-CAM page (default 200)")
    p.set_defaults(func=_predict)

    p = subparsers.add_parser("export", help="export a run's model to ONNX or TorchScript, verified",
                              description="Export the run's checkpoint with its metadata (classes, input size, "
                                          "mean/std, version, run id), then check it against PyTorch on the "
                                          "run's images.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (runs/NAME)")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS, type=str.lower,
                   help=f"the file format: {' or '.join(EXPORT_FORMATS)}")
    p.add_argument("--out", metavar="FILE", help="default RUN_DIR/model.onnx or RUN_DIR/model.pt")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: any batch size (TorchScript always is)")
    p.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="the best epoch's weights (default) or the last epoch's")
    p.set_defaults(func=_export)
