"""Hyperparameter search: a study config's `search:` section (config.SearchConfig) on Optuna, by ask and tell.
Each trial is a normal run folder of the study (<study>/trial-NNN) trained by the study executors (inline,
`--jobs N` processes, Ray); every epoch the training loop calls `epoch_hook` (loop.fit's on_epoch), which
reports the objective to the trial in the search's storage (<study>/search.journal, or search.storage) and
stops the run where the pruner says. Only this process asks for trials, so there are never more than
`search.trials` of them; a killed search resumes from the storage (finished trials kept, an interrupted
one resumed from its last.pt, or re-run). Before each ask the sampler is seeded with (seed + trial number),
so a resumed inline search asks exactly what an uninterrupted one would. Results: search.json, search.csv
(the trials table), best.yaml, study.json and the pages, written by studies/search_report.py.

Imports config, rundir, studies.study (folders, lock, spawning runs, Ray); optuna and training inside functions."""
from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

from cnnlab import config as C
from cnnlab import rundir as R
from cnnlab.studies import executors as X
from cnnlab.studies import study as S
from cnnlab.studies.compare import STUDY_KEYS, fmt_value

TRIAL = "trial-{:03d}"
STATES = {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}


def _optuna():
    try:
        import optuna
    except ImportError:
        raise C.ConfigError("search: needs Optuna: pip install 'cnnlab[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def direction(s: C.SearchConfig) -> str:
    if s.direction != "auto":
        return s.direction
    return "minimize" if any(w in s.objective for w in ("loss", "ece", "error")) else "maximize"


def distributions(s: C.SearchConfig) -> dict:
    """Optuna distributions of `search.space`, by dotted key."""
    from optuna import distributions as D

    out = {}
    for key, spec in s.space.items():
        spec = {"categorical": spec} if isinstance(spec, list) else spec
        if "categorical" in spec:
            out[key] = D.CategoricalDistribution(spec["categorical"])
        elif "int" in spec:
            lo, hi = (int(v) for v in spec["int"])
            out[key] = D.IntDistribution(lo, hi, step=int(spec.get("step") or 1), log=bool(spec.get("log")))
        else:
            lo, hi = (float(v) for v in spec.get("loguniform") or spec["uniform"])
            out[key] = D.FloatDistribution(lo, hi, log="loguniform" in spec,
                                           step=float(spec["step"]) if spec.get("step") else None)
    return out


def grid_size(s: C.SearchConfig) -> int:
    n = 1
    for spec in s.space.values():
        n *= len(spec if isinstance(spec, list) else spec["categorical"])
    return n


def total_trials(s: C.SearchConfig) -> int:
    return min(s.trials, grid_size(s)) if s.sampler == "grid" else s.trials


def make_sampler(s: C.SearchConfig, seed: int):
    optuna = _optuna()
    if s.sampler == "grid":
        grid = {k: (v if isinstance(v, list) else v["categorical"]) for k, v in s.space.items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(s: C.SearchConfig):
    optuna = _optuna()
    if s.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=s.startup_trials,  # steps are epochs from 1:
                                           n_warmup_steps=s.warmup_epochs + 1)  # epoch <= warmup never pruned
    if s.pruner == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=s.reduction_factor)
    return optuna.pruners.NopPruner()


def storage_spec(root: Path, s: C.SearchConfig) -> str:
    """A database URL as given, else the absolute path of a journal file (default <study>/search.journal)."""
    if s.storage and "://" in s.storage:
        return s.storage
    return str(Path(os.path.expanduser(s.storage)).resolve() if s.storage else (root / R.SEARCH_JOURNAL).resolve())


def open_storage(spec: str):
    optuna = _optuna()
    if "://" in spec:
        return spec
    from optuna.storages.journal import JournalFileBackend

    return optuna.storages.JournalStorage(JournalFileBackend(spec))


# ----------------------------------------------------------------------------------------------
# Trials: configs, the per-epoch hook, the objective of a finished run


def base_tree(cfg: C.Config) -> dict:
    return {k: v for k, v in C.to_dict(cfg).items() if k not in STUDY_KEYS}


def trial_config(cfg: C.Config, root: Path, name: str, params: dict) -> C.Config:
    return C.load(base_tree(cfg), {**params, "output.dir": str(root), "output.name": name})


def check(cfg: C.Config, s: C.SearchConfig, root: Path) -> None:
    """What a search cannot run, refused before any work: other study keys, a space value no run can take."""
    from cnnlab.training.experiment import check_names

    if cfg.variations or cfg.grid:
        raise C.ConfigError("search: a search chooses its own runs; leave out variations and grid (run them as "
                            "another study)")
    for key, spec in s.space.items():
        spec = {"categorical": spec} if isinstance(spec, list) else spec
        kind = next(k for k in C.SPACE_KINDS if k in spec)
        for v in spec[kind]:
            try:
                check_names(trial_config(cfg, root, "check", {key: v}))
            except C.ConfigError as e:
                raise C.ConfigError(f"search.space.{key}: the value {fmt_value(v)} cannot be run: "
                                    f"{str(e).removeprefix('config: ')}") from None


def epoch_hook(spec: dict):
    """loop.fit's `on_epoch` for one trial: report the objective of every epoch to the trial in the search's
    storage; return why to stop when the pruner says so (never after the last epoch: that trial is complete)."""
    optuna = _optuna()
    s = C.SearchConfig(**spec["search"])
    study = optuna.load_study(study_name=spec["study"], storage=open_storage(spec["storage"]), pruner=make_pruner(s))
    trial = optuna.trial.Trial(study, spec["trial_id"])

    def on_epoch(epoch: int, row: dict) -> str | None:
        v = row.get(s.objective)
        if v is None or not math.isfinite(v):
            return None
        with warnings.catch_warnings():  # a resumed trial reports its first epochs again: ignored
            warnings.simplefilter("ignore")
            trial.report(float(v), epoch)
        if s.pruner != "none" and epoch < spec["epochs"] and trial.should_prune():
            return f"pruned by the search's {s.pruner} pruner after epoch {epoch} ({s.objective} {v:.4f})"
        return None

    return on_epoch


def objective_of(run_dir: Path, s: C.SearchConfig) -> float | None:
    """The objective of a finished run: a history.csv column at its best epoch, or a metrics.json number."""
    m = R.read_json(run_dir / R.METRICS) or {}
    if s.objective in C.EPOCH_METRICS:
        row = next((r for r in R.read_csv(run_dir / R.HISTORY) if r["epoch"] == m.get("best_epoch")), {})
        v = row.get(s.objective)
    else:
        v = m
        for part in s.objective.split("."):
            v = v.get(part) if isinstance(v, dict) else None
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


class Trials:
    """Hands out the trials to run, in order: the ones a killed search left running, then new ones asked
    from the sampler until there are `search.trials`; and tells each result to the study."""

    def __init__(self, cfg: C.Config, s: C.SearchConfig, root: Path, study, spec: str, *, resume: bool, say):
        from optuna.trial import TrialState

        self.cfg, self.s, self.root, self.study, self.spec, self.resume, self.say = cfg, s, root, study, spec, resume, say
        self.dists, self.failures, self.TS = distributions(s), {}, TrialState
        trials = study.get_trials(deepcopy=False)
        self.pending = [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
        counted = [t for t in trials if t.state != TrialState.FAIL]
        self.new = max(0, total_trials(s) - len(counted))
        self.total = len(self.pending) + self.new
        self.seed = cfg.train.seed if s.seed is None else s.seed
        self.started: dict[str, float] = {}
        known = {TRIAL.format(t.number) for t in trials}
        strays = sorted(p.name for p in root.glob("trial-*") if p.is_dir() and p.name not in known)
        if strays:  # folders of a search whose storage is gone: never overwritten
            raise C.ConfigError(f"{root}: {', '.join(strays[:3])} exist but the search's storage ({spec}) has no such "
                                "trial; delete them (or the study folder) to start the search again")

    def next(self):
        """(Planned, mode: fresh | resume | done, hook spec), or None when every trial has been handed out."""
        if self.pending:
            ft = self.pending.pop(0)
        elif self.new > 0:
            self.new -= 1
            self.study.sampler = make_sampler(self.s, self.seed + len(self.study.get_trials(deepcopy=False)))
            ft = self.study.ask(self.dists)  # (a Trial: number, params and _trial_id as a FrozenTrial has them)
        else:
            return None
        name = TRIAL.format(ft.number)
        p = S.Planned(name, name, self.cfg.train.seed, dict(ft.params),
                      trial_config(self.cfg, self.root, name, dict(ft.params)))
        mode, path = "fresh", self.root / name
        state = S.run_state(path)
        if state == "done":
            mode = "done"
        elif state == "partial":
            saved = S._saved_config(path)
            same = saved is not None and not S.differences(saved, C.flatten(C.to_dict(p.cfg)))
            if self.resume and same and R.checkpoint_path(path, "last").is_file():
                mode = "resume"
            elif R.made_by_cnnlab(path):
                shutil.rmtree(path)  # started, nothing resumable in it: start it cleanly
            else:
                raise C.ConfigError(f"{path}: where trial {ft.number} goes, but not made by cnnlab; move it away")
        hook = {"study": self.study.study_name, "storage": self.spec, "trial_id": ft._trial_id,
                "search": C.to_dict(self.s), "epochs": p.cfg.train.epochs}
        self.started[name] = time.perf_counter()
        self.say(f"[{ft.number + 1}/{total_trials(self.s)}] {name}" + (" (resuming)" if mode == "resume" else "")
                 + f": {', '.join(f'{k}={fmt_value(v)}' for k, v in ft.params.items())}")
        return p, mode, hook

    def finish(self, p: S.Planned, error: str | None = None) -> None:
        number = int(p.id.split("-")[1])
        path = self.root / p.id
        if error is None and S.run_state(path) != "done":
            error = "the run ended without metrics.json"
        if error is not None:
            self.failures[p.id] = error
            self.study.tell(number, state=self.TS.FAIL, skip_if_finished=True)
            self.say(f"  {p.id} failed: {error}")
            return
        m = R.read_json(path / R.METRICS) or {}
        value = objective_of(path, self.s)
        seconds = time.perf_counter() - self.started.get(p.id, time.perf_counter())
        if m.get("stopped_by") and "pruner" in m["stopped_by"]:
            self.study.tell(number, state=self.TS.PRUNED, skip_if_finished=True)
            self.say(f"  {p.id}: {m['stopped_by']} ({seconds:.0f} s)")
        elif value is None:
            self.failures[p.id] = f"no {self.s.objective} in {path / R.METRICS} or {path / R.HISTORY}"
            self.study.tell(number, state=self.TS.FAIL, skip_if_finished=True)
            self.say(f"  {p.id} failed: {self.failures[p.id]}")
        else:
            self.study.tell(number, value, skip_if_finished=True)
            self.say(f"  {p.id}: {self.s.objective} {value:.4f} ({seconds:.0f} s)")


# ----------------------------------------------------------------------------------------------
# Executors: each runs what `Trials.next` hands out and `finish`es it


def run_inline(trials: Trials, *, quiet: bool, **_) -> None:
    from cnnlab import process
    from cnnlab.training import experiment

    while (item := trials.next()) is not None:
        p, mode, hook = item
        if mode != "done":
            try:
                experiment.run(p.cfg, device=process.setup(p.cfg), quiet=quiet, on_epoch=epoch_hook(hook),
                               resume_dir=trials.root / p.id if mode == "resume" else None)
            except Exception as e:  # one broken trial must not stop the search
                trials.finish(p, f"{type(e).__name__}: {e}")
                continue
        trials.finish(p)


def run_processes(trials: Trials, *, jobs: int, **_) -> None:
    """Up to `jobs` trials at a time, each `cnnlab train` in its own process reporting to the shared storage."""
    threads = max(1, (os.cpu_count() or 1) // jobs)
    running = {}
    try:
        while True:
            while len(running) < jobs and (item := trials.next()) is not None:
                p, mode, hook = item
                if mode == "done":
                    trials.finish(p)
                    continue
                running[X.spawn(trials.root, p, mode, threads, ["--search-trial", json.dumps(hook)])] = p
            if not running:
                return
            time.sleep(0.2)
            for proc in [q for q in running if q.poll() is not None]:
                p = running.pop(proc)
                trials.finish(p, X.ended(trials.root, p, proc))
    except BaseException:  # Ctrl-C / SIGTERM: every trial saves a checkpoint; the next run resumes them
        X.stop_all(running)
        raise


def run_ray(trials: Trials, *, jobs: int, address: str | None = None, say, **_) -> None:
    """Trials as Ray tasks (workers start each trial afresh and report to the storage, which every node must
    reach: search.storage); up to --jobs at a time, by default as many as the cluster's CPUs allow."""
    ray, started, task, threads, what = X.ray_setup(trials.total, jobs, address)
    slots = jobs if jobs > 1 else max(1, int(ray.cluster_resources().get("CPU", 1)) // threads)
    say(f"trials on Ray: {slots} at a time ({what})")
    refs = {}
    try:
        while True:
            while len(refs) < slots and (item := trials.next()) is not None:
                p, mode, hook = item
                if mode == "done":
                    trials.finish(p)
                    continue
                refs[task.remote(C.to_dict(p.cfg), p.id, threads, hook)] = p
            if not refs:
                return
            ready, _ = ray.wait(list(refs), num_returns=1)
            p = refs.pop(ready[0])
            trials.finish(p, X.unpack(trials.root, p, ready[0]))
    finally:
        if started:
            ray.shutdown()


EXECUTORS = {"inline": run_inline, "process": run_processes, "ray": run_ray}


def run_repeats(cfg: C.Config, root: Path, best: dict, *, jobs: int, executor: str, address, quiet: bool,
                say) -> dict:
    """With `repeats: N`: the best trial's settings and the config's own (the baseline) each trained over N
    seeds, as a study in <study>/repeats (resumable like any), compared with the study report's t-test."""
    tree = {**base_tree(cfg), "variations": {"baseline": {}, "best": best["params"]}, "repeats": cfg.repeats,
            "baseline": "baseline"}
    tree["output"] = {**tree["output"], "dir": str(root), "name": R.SEARCH_REPEATS}
    say(f"the best settings ({best['name']}) and the baseline over {cfg.repeats} seeds: {root / R.SEARCH_REPEATS}")
    S.run_study(C.load(tree), jobs=jobs, executor=executor, address=address, quiet=quiet, retrain_changed=True)
    comp = R.read_json(root / R.SEARCH_REPEATS / R.COMPARISON_JSON) or {}
    c = next(iter(comp.get("comparisons") or []), {})
    return {"dir": R.SEARCH_REPEATS, "seeds": cfg.repeats, **(c.get("text") or {})}


def run_search(cfg: C.Config, *, jobs: int = 1, config_path: str | None = None, overrides=None, quiet: bool = False,
               executor: str = "auto", address: str | None = None, report: bool = True) -> S.Study:
    """Run (or resume) the search of a study config: trials until there are `search.trials`, then the results
    (search.json, search.csv, best.yaml, study.json) and the search report."""
    from cnnlab import dist
    from cnnlab.studies import search_report

    s = C.search_config(cfg)
    optuna = _optuna()
    kind = executor if executor != "auto" else ("process" if jobs > 1 else "inline")
    if jobs < 1 or kind not in EXECUTORS:
        raise C.ConfigError(f"--jobs {jobs} --executor {executor}: jobs must be >= 1, the executor one of auto, "
                            f"{', '.join(EXECUTORS)}")
    if dist.world()[2] > 1:
        raise C.ConfigError("a search does not run under torchrun; run it as one process (--jobs N for trials "
                            "in parallel, --executor ray across machines)")
    root = S.study_dir(cfg)
    check(cfg, s, root)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    S._check_study_folder(root)
    root.mkdir(parents=True, exist_ok=True)
    R.mark(root, "study")
    with S._lock(root):
        R.write_text(root / R.STUDY_YAML, C.dump_yaml(cfg))
        spec = storage_spec(root, s)
        study = optuna.create_study(study_name=root.name, storage=open_storage(spec), direction=direction(s),
                                    pruner=make_pruner(s), load_if_exists=True)
        if study.direction.name.lower() != direction(s):
            raise C.ConfigError(f"search.direction: the search in {spec} was started to {study.direction.name.lower()}"
                                f" its objective; a new direction needs a new study (output.name)")
        trials = Trials(cfg, s, root, study, spec, resume=kind != "ray", say=say)
        done = total_trials(s) - trials.total
        say(f"search {root}: {total_trials(s)} trials ({s.sampler} sampler, {s.pruner} pruner, {direction(s)} "
            f"{s.objective}); {done} done, {trials.total} to run")
        EXECUTORS[kind](trials, jobs=jobs, quiet=quiet, say=say, address=address)
        summary = search_report.write_results(root, cfg, s, study, config_path, overrides)
        if cfg.repeats > 1 and summary["best"] and not trials.failures:
            summary["repeats"] = run_repeats(cfg, root, summary["best"], jobs=jobs, executor=kind, address=address,
                                             quiet=quiet, say=say)
            R.write_json(root / R.SEARCH_JSON, summary)
        out = S.Study(dir=root, config=cfg, runs=[], status={t["name"]: t["state"] for t in summary["trials"]})
        if report:
            out.report = search_report.write(root, summary)
            say(f"search report: {out.report}")
        if summary["best"]:
            b = summary["best"]
            say(f"best: {b['name']}, {s.objective} {b['value']:.4f} ({', '.join(f'{k}={fmt_value(v)}' for k, v in b['params'].items())}); "
                f"cnnlab train {root / R.BEST_YAML}")
    if trials.failures:
        lines = "\n".join(f"  {k}: {v}" for k, v in trials.failures.items())
        raise S.StudyError(f"{len(trials.failures)} trial(s) of {root} failed:\n{lines}\nFix the cause and run the "
                           "same command again: finished trials are kept, failed ones are tried anew.")
    return out
