"""Studies: each variation x grid point x seed of one config trained into its own fixed run folder under one
study folder (marked by rundir as a study), with a study.json manifest; run in this process, as parallel
subprocesses or on Ray, resumable (only what is missing runs again), then compared by studies/compare.py
(study.html / study.md). The executors live in studies/executors.py. Imports compare one way; compare
never imports this module."""
from __future__ import annotations

import contextlib
import itertools
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.errors import RunError
from cnnlab.rundir import MARKER, made_by_cnnlab
from cnnlab.studies import compare
from cnnlab.studies.compare import IGNORED, STUDY_KEYS, fmt_value
from cnnlab.studies.executors import EXECUTORS


class StudyError(RunError, RuntimeError):
    """Some runs of a study failed, or the study folder is busy; the message says which and where to look."""

    label = ""  # the message itself opens with what failed


@dataclass
class Planned:
    """One run of a study: its folder (relative to the study folder), group, seed and resolved config."""

    id: str  # "main" or "main/seed-1"
    variation: str
    seed: int
    overrides: dict
    cfg: C.Config


@dataclass
class Study:
    dir: Path
    config: C.Config
    runs: list[Planned]
    status: dict[str, str] = field(default_factory=dict)  # run id -> done | partial | pending | failed
    report: Path | None = None


# ----------------------------------------------------------------------------------------------
# Planning: names, overrides, resolved configs


def groups(cfg: C.Config) -> list[tuple[str, dict]]:
    """(name, dotted overrides) of each variation x grid point, in config order."""
    base = [(str(n), C.flatten(ov or {})) for n, ov in cfg.variations.items()] or [("", {})]
    keys = list(cfg.grid)
    lasts = [k.split(".")[-1] for k in keys]
    short = {k: (s if lasts.count(s) == 1 else k) for k, s in zip(keys, lasts)}
    out = []
    for vname, ov in base:
        for point in itertools.product(*(cfg.grid[k] for k in keys)):
            parts = [vname] * bool(vname) + [f"{short[k]}={fmt_value(v)}" for k, v in zip(keys, point)]
            name = "+".join(parts) or "main"
            out.append((name.replace("/", "_").replace(" ", "_"), {**ov, **dict(zip(keys, point))}))
    for name, _ in out:  # a run's folder is <study>/<name>: `..` or `.` would be output.dir or the study itself
        if name in (".", "..") or name.startswith(".") or any(c in name for c in "\\\0"):
            raise C.ConfigError(f"variation name {name!r}: must be a plain folder name (not starting with '.', "
                                "without '\\'): it names the run's folder inside the study folder")
    if len({n for n, _ in out}) != len(out):
        raise C.ConfigError(f"variation names must be unique, got {[n for n, _ in out]}")
    for name, ov in out:
        bad = [k for k in ov if k.split(".")[0] in STUDY_KEYS or k.startswith("output.")]
        if bad:
            raise C.ConfigError(f"variation {name!r}: {', '.join(bad)} cannot differ between the runs of a study")
    return out


def study_dir(cfg: C.Config) -> Path:
    name = cfg.output.name or "study"
    if name in (".", "..") or "/" in name or "\\" in name:
        raise C.ConfigError(f"output.name={name!r}: a study's name must be a plain folder name (the study folder "
                            "is output.dir/<name>)")
    return Path(cfg.output.dir) / name


def baseline_of(cfg: C.Config, names: list[str]) -> str:
    import difflib

    if cfg.baseline is None or cfg.baseline in names:
        return cfg.baseline or names[0]
    hint = "".join(f" Did you mean {c!r}?" for c in difflib.get_close_matches(cfg.baseline, names, n=1))
    raise C.ConfigError(f"baseline={cfg.baseline!r} is not a variation of this study.{hint} "
                        f"Variations: {', '.join(names)}")


def plan(cfg: C.Config) -> list[Planned]:
    """Every run of the study with its resolved single-run config (validated up front, names too)."""
    from cnnlab.training.experiment import check_names

    root, out = study_dir(cfg), []
    tree = {k: v for k, v in C.to_dict(cfg).items() if k not in STUDY_KEYS}
    for name, ov in groups(cfg):
        for r in range(cfg.repeats):
            seed = cfg.train.seed + r
            rid = name if cfg.repeats == 1 else f"{name}/seed-{seed}"
            fixed = {**ov, "train.seed": seed, "output.dir": str((root / rid).parent), "output.name": Path(rid).name}
            try:
                rcfg = C.load(tree, fixed)
                check_names(rcfg)
            except C.ConfigError as e:
                raise C.ConfigError(f"variation {name!r} ({', '.join(f'{k}={fmt_value(v)}' for k, v in ov.items())}): "
                                    f"{str(e).removeprefix('config: ')}") from None
            out.append(Planned(rid, name, seed, ov, rcfg))
    return out


def variation(cfg: C.Config, name: str, flag: str = "--variation") -> list[Planned]:
    """The planned run(s) of one variation (one per seed); refused, naming the variations, when there is none."""
    if not (cfg.variations or cfg.grid or cfg.repeats > 1):
        raise C.ConfigError(f"{flag} {name!r}: the config is not a study (it has no variations, grid or repeats)"
                            + ("; a search's trials are chosen as it goes" if cfg.search else ""))
    planned = plan(cfg)
    chosen = [p for p in planned if p.variation == name]
    if not chosen:
        import difflib

        names = list(dict.fromkeys(p.variation for p in planned))
        close = difflib.get_close_matches(name, names, n=1)
        raise C.ConfigError(f"{flag} {name!r} is not a variation of this study."
                            + (f" Did you mean {close[0]!r}?" if close else "") + f" Variations: {', '.join(names)}")
    return chosen


def shadowed(planned: list[Planned], overrides) -> list[str]:
    """Notes for the command-line overrides a variation sets again: in that variation's runs its own value
    wins (`train.epochs=1` for a smoke test does not shorten a variation that sets `train.epochs: 100`)."""
    pairs = (str(o).partition("=") for o in overrides or [])  # read as config.apply_overrides reads them
    given = (dict(overrides) if isinstance(overrides, dict)
             else {k.strip(): C.parse_value(v) for k, sep, v in pairs if sep})
    out = {}
    for p in planned:
        for k, v in p.overrides.items():
            if k in given and v != given[k]:
                out.setdefault((k, fmt_value(v), fmt_value(given[k])), []).append(p.variation)
    return [f"note: {', '.join(dict.fromkeys(names))} set{'s' if len(set(names)) == 1 else ''} {k}={v}, over the "
            f"command line's {k}={g} (a variation's own settings win in its runs)" for (k, v, g), names in out.items()]


def differences(a: dict, b: dict) -> list[str]:
    """Dotted keys whose values differ between two flat config dicts (ignoring IGNORED)."""
    return [k for k in sorted(set(a) | set(b)) if not k.startswith(IGNORED) and a.get(k) != b.get(k)]


class ChangedStudyError(C.ConfigError):
    """A study run again with settings that its finished runs were not trained with."""


def changed_runs(root: Path, planned: list[Planned]) -> dict[str, list[tuple[str, object, object]]]:
    """Finished runs whose saved config.yaml differs from what this config gives them: run id -> [(key, the
    run's value, this config's value)]. Their numbers would sit in a report that claims the new settings."""
    out = {}
    for p in planned:
        if run_state(root / p.id) != "done" or (saved := _saved_config(root / p.id)) is None:
            continue
        if diff := run_differences(saved, p):
            new = C.flatten(C.to_dict(p.cfg))
            out[p.id] = [(k, saved.get(k), new.get(k)) for k in diff]
    return out


def run_differences(saved: dict, p: Planned) -> list[str]:
    """The keys in which a run's saved config differs from what the study plans for it."""
    diff = differences(saved, C.flatten(C.to_dict(p.cfg)))
    if p.cfg.optim.lr == "auto":  # the run saved the rate the range test chose
        diff = [k for k in diff if k != "optim.lr"]
    return diff


def changed_message(root: Path, changed: dict) -> str:
    shown = list(changed.items())[:5]
    lines = [f"  {rid}: " + ", ".join(f"{k}={fmt_value(a)} (this config: {fmt_value(b)})" for k, a, b in diff[:3])
             + (f" and {len(diff) - 3} more" if len(diff) > 3 else "") for rid, diff in shown]
    more = [f"  ... and {len(changed) - 5} more runs"] if len(changed) > 5 else []
    return "\n".join([f"{root}: {len(changed)} finished run(s) of this study were trained with other settings than "
                      "this config gives them:", *lines, *more,
                      f"Nothing was changed. To keep them, give the new study its own folder (output.name="
                      f"{root.name}-2, or another output.dir); to delete them and train the whole study again with "
                      "these settings, add --fresh."])


def run_state(path: Path) -> str:
    """done when metrics.json exists (written after evaluation), partial when the folder exists, else pending."""
    return "done" if (path / R.METRICS).is_file() else "partial" if path.exists() else "pending"


def _saved_config(path: Path) -> dict | None:
    try:
        return C.flatten(C.to_dict(R.RunDir(path).config))
    except (C.ConfigError, OSError):
        return None


# ----------------------------------------------------------------------------------------------
# Running


def run_study(cfg: C.Config, *, jobs: int = 1, config_path: str | None = None, overrides=None, quiet: bool = False,
              executor: str = "auto", address: str | None = None, report: bool = True, fresh: bool = False,
              retrain_changed: bool = False) -> Study:
    """Train every missing run of a study (finished ones are kept untouched), then write study.json and the
    study report, and print each variation's verdict against the baseline. executor: auto (inline for
    jobs=1, else process) | inline | process | ray. Finished runs trained with other settings than this
    config gives them are refused (`changed_runs`), before anything is written, unless `fresh`: then every
    run of the study is deleted and trained again, or `retrain_changed` (a search's repeats of its best
    settings, which move as the search goes on): then those runs alone are.

    Under torchrun every process runs this: rank 0 plans, locks and writes the study files; each run is
    trained by all processes together (DDP), one run after another."""
    from cnnlab import dist

    if cfg.search:  # a hyperparameter search: its trials are the runs (studies/search.py)
        from cnnlab.studies import search

        return search.run_search(cfg, jobs=jobs, config_path=config_path, overrides=overrides, quiet=quiet,
                                 executor=executor, address=address, report=report)
    main = dist.is_main()
    say = (lambda *a: None) if quiet or not main else (lambda *a: print(*a, flush=True))
    planned = plan(cfg)
    for line in shadowed(planned, overrides):
        say(line)
    names = list(dict.fromkeys(p.variation for p in planned))
    base = baseline_of(cfg, names)
    root, kind = study_dir(cfg), executor if executor != "auto" else ("process" if jobs > 1 else "inline")
    if jobs < 1 or kind not in EXECUTORS:
        raise C.ConfigError(f"--jobs {jobs} --executor {executor}: jobs must be >= 1, the executor one of auto, "
                            f"{', '.join(EXECUTORS)}")
    if dist.world()[2] > 1:
        if kind != "inline":
            raise C.ConfigError(f"--jobs {jobs} --executor {executor}: under torchrun a study trains its runs one "
                                "after another, each on every process; leave out --jobs and --executor")
        from cnnlab import process

        process.setup(cfg)  # the process group, before rank 0 plans and broadcasts
    if main:
        _check_study_folder(root)
    changed = {} if fresh else changed_runs(root, planned)  # on every rank: each refuses alike
    if changed and not retrain_changed:
        raise ChangedStudyError(changed_message(root, changed))
    renew = {p.id for p in planned} if fresh else set(changed)
    if main:
        root.mkdir(parents=True, exist_ok=True)
        R.mark(root, "study")
    with _lock(root) if main else contextlib.nullcontext():
        todo, status = (_plan_todo(root, cfg, planned, base, executor, config_path, overrides, say, renew) if main
                        else ([], {}))
        say(f"study {root}: {len(names)} variation(s) x {cfg.repeats} seed(s) = {len(planned)} runs; "
            f"{len(planned) - len(todo)} done, {len(todo)} to run")
        if dist.active():  # every rank trains the same runs, in the same mode
            by_id = {p.id: p for p in planned}
            todo = [(by_id[i], mode) for i, mode in dist.broadcast_object([(p.id, m) for p, m in todo])]
        failures = EXECUTORS[kind](root, todo, jobs=jobs, quiet=quiet, say=say, address=address) if todo else {}
        out = Study(dir=root, config=cfg, runs=planned, status=status)
        if main:
            for rid in [k for k in failures if run_state(root / k) == "done"]:  # e.g. its own report.html failed
                say(f"warning: {rid} was trained and evaluated (metrics.json), but then: {failures.pop(rid)}")
            for p in planned:
                status[p.id] = "failed" if p.id in failures else run_state(root / p.id)
            write_manifest(root, cfg, planned, base, status, failures, config_path, overrides)
            if report and not any(status[p.id] == "done" for p in planned if p.variation == base):
                say(f"no study report: the baseline {base} has no finished run to compare against")
            elif report:
                out.report = compare.compare([root], out=root, baseline=base, say=say)
                say(f"study report: {out.report}")
    if failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in failures.items())
        raise StudyError(f"{len(failures)} of {len(planned)} runs of {root} failed:\n{lines}\n"
                         "Fix the cause and run the same command again: finished runs are kept.")
    return out


def _check_study_folder(root: Path) -> None:
    """A study writes study.*, configs/, logs/ and a folder per run into its folder: refuse an existing folder
    that holds other things and is not a study's (no study.yaml / study.json), before anything is written."""
    if not root.is_dir() or (root / R.STUDY_YAML).is_file() or (root / R.STUDY_JSON).is_file():
        return
    other = sorted(p.name for p in root.iterdir() if p.name not in (R.LOCK, R.MARKER))
    if other:
        raise C.ConfigError(f"{root}: not a study folder (no study.yaml or study.json; it holds "
                            f"{', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); a study writes its files and "
                            "one folder per run there. Choose another output.dir or output.name; nothing was changed.")


def _plan_todo(root: Path, cfg, planned, base, executor, config_path, overrides, say,
               renew: set[str] = frozenset()) -> tuple[list, dict]:
    """The runs still to train, each fresh or resumed; a partial run that cannot be resumed is removed, and so
    is each run named in `renew` (to be trained again) when cnnlab made its folder."""

    foreign = [str(root / p.id) for p in planned if run_state(root / p.id) == "partial"
               and not made_by_cnnlab(root / p.id) and _saved_config(root / p.id) is None]
    if foreign:  # never replace what cnnlab did not make (a class folder of images, another tool's output)
        raise C.ConfigError(f"{', '.join(foreign)}: {'this folder is' if len(foreign) == 1 else 'these folders are'} "
                            f"where runs of this study go, but not made by cnnlab (no {MARKER} in it); nothing was "
                            "changed. Move it away, or choose another output.dir, output.name or variation name.")
    gone = [p.id for p in planned if p.id in renew and (root / p.id).exists() and made_by_cnnlab(root / p.id)]
    for rid in gone:
        shutil.rmtree(root / rid)
    if gone:
        say(f"deleted {len(gone)} run folder(s) of {root} to train them again: {', '.join(gone[:6])}"
            + (" ..." if len(gone) > 6 else ""))
    R.write_text(root / R.STUDY_YAML, C.dump_yaml(cfg))
    todo, status = [], {}
    for p in planned:
        path = root / p.id
        state = status[p.id] = run_state(path)
        saved = _saved_config(path) if state != "pending" else None
        diff = run_differences(saved, p) if saved is not None else []
        if state == "done":  # (one trained with other settings was refused by changed_runs)
            continue
        mode = "fresh"
        if state == "partial":
            resumable = saved is not None and not diff and R.checkpoint_path(path, "last").is_file()
            if resumable and executor != "ray":  # (Ray workers start from scratch)
                mode = "resume"
            elif made_by_cnnlab(path):
                if diff:
                    say(f"{p.id}: unfinished, started with other settings ({', '.join(diff[:4])}); starting it again")
                shutil.rmtree(path)  # a run cnnlab started, with nothing resumable in it: start it cleanly
            else:
                raise C.ConfigError(f"{path}: a partial run of this study that cannot be resumed, made before "
                                    f"run folders were marked ({MARKER}); delete it to train it again")
        todo.append((p, mode))
    write_manifest(root, cfg, planned, base, status, {}, config_path, overrides)
    return todo, status


def write_manifest(root: Path, cfg, planned, base, status, failures, config_path, overrides) -> None:
    variations = []
    for name, ov in groups(cfg):
        runs = [p for p in planned if p.variation == name]
        variations.append({"name": name, "overrides": ov, "config": C.to_dict(runs[0].cfg),
                           "runs": [{"seed": p.seed, "dir": p.id, "status": status.get(p.id, "pending"),
                                     **({"error": failures[p.id]} if p.id in failures else {})} for p in runs]})
    R.write_json(root / R.STUDY_JSON, {
        "name": root.name, "baseline": base, "repeats": cfg.repeats,
        "seeds": [cfg.train.seed + r for r in range(cfg.repeats)], "grid": cfg.grid,
        "source": {"config": str(config_path) if config_path else None, "overrides": list(overrides or [])},
        "complete": all(s == "done" for s in status.values()), "variations": variations})


def _lock(root: Path):
    """An exclusive lock on the study folder (the one run folders have): two processes never run one study."""
    return R.lock(root, "running the study in", StudyError)


# `cnnlab compare` lives in studies/compare.py, its parser beside it (cli.py imports compare.add_parser).
