"""`cnnlab train` and `cnnlab eval`: their parsers and handlers (`add_parser`), thin over the Python API.

Torch and the training code are imported inside the handlers, so `cnnlab --help` stays fast.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def _train(args) -> int:
    from cnnlab import config as C
    from cnnlab import dist

    if args.resume:
        from cnnlab.training.resume import resume_config

        overrides = list(args.overrides or [])
        if args.config and "=" in args.config and not Path(args.config).is_file():  # `--resume RUN key=value`
            overrides.insert(0, args.config)
        elif args.config:
            raise C.ConfigError(f"give a config file or --resume RUN_DIR, not both ({args.config!r} and "
                                f"--resume {args.resume!r})")
        cfg = resume_config(args.resume, overrides)
    else:
        if not args.config:
            raise C.ConfigError("cnnlab train needs a config file (or --resume RUN_DIR)")
        cfg = C.load(args.config, args.overrides)
    if args.print_config:
        print(C.dump_yaml(cfg), end="")
        return 0
    if args.fresh and not (cfg.variations or cfg.grid or cfg.repeats > 1) or args.fresh and cfg.search:
        raise C.ConfigError("--fresh: only for a study of variations, a grid or repeats (a single run or a search "
                            "starts afresh under a new output.name)")
    if args.variation:
        if args.fresh:
            raise C.ConfigError("--fresh trains the whole study again; leave out --variation (or delete that "
                                "variation's run folder to train it again)")
        return _one_variation(cfg, args.variation)
    if cfg.variations or cfg.grid or cfg.repeats > 1 or cfg.search:
        from cnnlab.studies import study

        executor = "ray" if args.ray_address and args.executor == "auto" else args.executor
        study.run_study(cfg, jobs=args.jobs, config_path=args.config, overrides=args.overrides,
                        executor=executor, address=args.ray_address, fresh=args.fresh)
        dist.shutdown()
        return 0
    from cnnlab import process
    from cnnlab.training import experiment

    hook = None
    if args.search_trial:  # a trial of a search run by `--jobs N`: report every epoch to the search's storage
        import json

        from cnnlab.studies import search

        hook = search.epoch_hook(json.loads(args.search_trial))
    device = process.setup(cfg)
    experiment.run(cfg, device=device, resume_dir=Path(args.resume) if args.resume else None, on_epoch=hook)
    dist.shutdown()  # under torchrun: leave the process group cleanly (after success only: a failed rank exits)
    return 0


def _one_variation(cfg, name: str) -> int:
    """`cnnlab train STUDY --variation NAME`: that variation's run(s) alone, in the folder the whole study
    would give them (a later run of the study finds them done). One already trained is kept (said so), one
    trained with other settings refused as the whole study refuses it."""
    from cnnlab import dist, process
    from cnnlab.studies import study
    from cnnlab.training import experiment

    chosen, root = study.variation(cfg, name), study.study_dir(cfg)
    changed = study.changed_runs(root, chosen)
    if changed:
        raise study.ChangedStudyError(study.changed_message(root, changed))
    for p in chosen:
        if study.run_state(root / p.id) == "done":
            if dist.is_main():
                print(f"{p.id}: already trained ({root / p.id}); delete that folder to train it again")
            continue
        experiment.run(p.cfg, device=process.setup(p.cfg))
    dist.shutdown()
    return 0


def _eval(args) -> int:
    from cnnlab.training import evaluate

    evaluate.main(args)
    return 0


def _lr_find(args) -> int:
    from cnnlab.training import lrfind

    return lrfind.main(args)


def add_parser(subparsers) -> None:
    """Add `train`, `eval` and `lr-find` to the main CLI's subparsers; each sets `func(args) -> exit code`."""
    t = subparsers.add_parser("train", help="train a config (a study when it has variations/grid/repeats)")
    t.add_argument("config", nargs="?", help="the experiment YAML")
    t.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.lr=0.05")
    t.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    t.add_argument("--resume", metavar="RUN_DIR", help="continue a stopped run exactly where it left off")
    t.add_argument("--jobs", type=int, default=1, help="studies: run this many variations in parallel")
    t.add_argument("--executor", default="auto", choices=["auto", "inline", "process", "ray"],
                   help="studies: inline (one process), process (--jobs subprocesses) or ray (default: inline, "
                        "or process when --jobs > 1)")
    t.add_argument("--variation", metavar="NAME", help="studies: train only this variation (into the study's folder)")
    t.add_argument("--ray-address", help="studies on Ray: the cluster address (default RAY_ADDRESS or local)")
    t.add_argument("--fresh", action="store_true", help="studies: delete the study's runs and train them all again "
                   "(needed when finished runs were trained with other settings)")
    t.add_argument("--search-trial", help=argparse.SUPPRESS)  # set by a search's --jobs executor (studies/search.py)
    t.set_defaults(func=_train)

    e = subparsers.add_parser("eval", help="re-evaluate a saved run's best checkpoint, optionally on other data")
    e.add_argument("run_dir", help="a run folder (runs/NAME)")
    e.add_argument("overrides", nargs="*", help="data.* overrides, e.g. data.root=other.zip")
    e.add_argument("--checkpoint", default="best", choices=["best", "last"],
                   help="the best epoch's weights (default) or the last epoch's")
    e.add_argument("--split", metavar="SPLIT[,SPLIT]", help="evaluate on test, val and/or train (in eval mode, "
                   "unaugmented), comma-separated; default: the run's own evaluation split")
    e.set_defaults(func=_eval)

    f = subparsers.add_parser("lr-find", help="the learning-rate range test: plot loss against an exponentially "
                              "growing learning rate and suggest one",
                              description="A short run on the training split with the learning rate growing "
                              "from --start-lr to --end-lr; writes only lr_find.png and lr_find.csv into --out and "
                              "prints the suggested learning rate (a tenth of where the smoothed loss was lowest).")
    f.add_argument("config", help="the experiment YAML (a study's base config)")
    f.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. optim.name=adam")
    f.add_argument("--steps", type=int, default=100, help="optimizer steps at most (default 100)")
    f.add_argument("--start-lr", type=float, default=1e-7, help="the first learning rate (default 1e-7)")
    f.add_argument("--end-lr", type=float, default=10.0, help="the last learning rate (default 10)")
    f.add_argument("--out", metavar="DIR", help="where the plot and the curve go (default: "
                   "<output.dir>/<output.name>-lr-find)")
    f.set_defaults(func=_lr_find)
