"""`cnnlab ARGS` run through the CLI's own `main` inside the test process: the same parser, handlers and
exit-code mapping as `python -m cnnlab`, without its ~3-5 s of interpreter, torch and scikit-learn start-up.

For tests whose subject is what a command does, prints and returns. Tests about the process itself (a
signal, torchrun, the OpenMP environment, exit codes as the shell sees them) start a real process.
"""
from __future__ import annotations

import contextlib
import io
import os
import subprocess
from pathlib import Path


def run_cli(*args, cwd: str | Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Like `subprocess.run([sys.executable, "-m", "cnnlab", *args], capture_output=True, text=True)`: a
    CompletedProcess with returncode, stdout and stderr. `cwd` and `env` (variables to set) apply for the
    call only; torch's thread count and determinism switch, which a training command sets, are put back."""
    import torch

    from cnnlab import cli

    argv = [str(a) for a in args]
    out, err = io.StringIO(), io.StringIO()
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    saved_env = {k: os.environ.get(k) for k in (env or {})}
    try:
        os.environ.update(env or {})
        with contextlib.chdir(cwd or os.getcwd()), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as e:  # argparse's usage errors and --help / --version
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return subprocess.CompletedProcess(["cnnlab", *argv], code, out.getvalue(), err.getvalue())
