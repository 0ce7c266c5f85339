"""The `cnnlab` command: thin subcommands over the Python API. Bad input exits 2 with a clear message."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXIT_USAGE = 2


def _train(args) -> int:
    from cnnlab import config as C
    from cnnlab import dist

    if args.resume:
        if args.config and "=" in args.config and not Path(args.config).is_file():
            # `train --resume RUN train.epochs=20`: argparse takes the first override for the config
            args.overrides, args.config = [args.config, *args.overrides], None
        if not (Path(args.resume) / "config.yaml").is_file():
            raise C.ConfigError(f"--resume {args.resume!r}: not a run folder (no config.yaml in it)")
        cfg = C.load(Path(args.resume) / "config.yaml", args.overrides)
    else:
        if not args.config:
            raise C.ConfigError("cnnlab train needs a config file (or --resume RUN_DIR)")
        cfg = C.load(args.config, args.overrides)
    if args.print_config:
        print(C.dump_yaml(cfg), end="")
        return 0
    if cfg.variations or cfg.grid or cfg.repeats > 1:
        from cnnlab.studies import study

        executor = "ray" if args.ray_address and args.executor == "auto" else args.executor
        study.run_study(cfg, jobs=args.jobs, config_path=args.config, overrides=args.overrides,
                        executor=executor, address=args.ray_address)
        dist.shutdown()
        return 0
    from cnnlab.training import experiment

    experiment.run(cfg, resume_dir=Path(args.resume) if args.resume else None)
    dist.shutdown()  # under torchrun: leave the process group cleanly (after success only: a failed rank exits)
    return 0


def _eval(args) -> int:
    from cnnlab.training import evaluate

    evaluate.main(args)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cnnlab", description="Train, compare and explain image-classification CNNs.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a config (a study when it has variations/grid/repeats)")
    t.add_argument("config", nargs="?", help="the experiment YAML")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where it left off")
    t.add_argument("--jobs", type=int, default=1, help="studies: run this many variations in parallel")
    t.add_argument("--executor", default="auto", choices=["auto", "inline", "process", "ray"],
                   help="studies: inline (one process), process (--jobs subprocesses) or ray (default: inline, "
                        "or process when --jobs > 1)")
    t.add_argument("--ray-address", help="studies on Ray: the cluster address (default RAY_ADDRESS or local)")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="re-evaluate a saved run's best checkpoint, optionally on other data")
    e.add_argument("run_dir")
    e.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=other.zip")
    e.add_argument("--checkpoint", default="best", choices=["best", "last"])
    e.set_defaults(func=_eval)

    for mod in ("cnnlab.report.build", "cnnlab.data.cli", "cnnlab.models.cli", "cnnlab.studies.study"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ImportError:
            continue
        if hasattr(module, "register"):
            module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    from cnnlab import threads

    threads.prefer_passive_wait()  # the `cnnlab` script's entry: before anything imports torch
    from cnnlab.config import ConfigError

    argv = sys.argv[1:] if argv is None else argv
    # `cnnlab train exp.yaml --resume X` and overrides mixed with flags: argparse handles the order.
    parser = build_parser()
    # overrides may also follow flags (`train exp.yaml --jobs 2 optim.lr=0.1`): argparse leaves them over
    args, extra = parser.parse_known_args(argv)
    if extra:
        if hasattr(args, "overrides") and all("=" in x and not x.startswith("-") for x in extra):
            args.overrides = list(args.overrides or []) + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `cnnlab ... | head`
        sys.stderr.close()
        return 0
    except ConfigError as e:
        print(f"cnnlab: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (OSError, ValueError, KeyError) as e:  # missing files, failed downloads, bad data
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"cnnlab: error: {msg}", file=sys.stderr)
        return EXIT_USAGE
    except RuntimeError as e:  # a refused checkpoint, a non-finite loss, too little disk space: no traceback
        from cnnlab.training.checkpoint import CheckpointError
        from cnnlab.studies.study import StudyError
        from cnnlab.training.loop import TrainingError

        if not isinstance(e, (CheckpointError, TrainingError, StudyError)):
            raise
        print(f"cnnlab: {'' if isinstance(e, StudyError) else 'error: '}{e}", file=sys.stderr)
        return 1
    except SystemExit as e:  # Stopped by a signal after saving: 143 / 130
        return int(e.code) if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
