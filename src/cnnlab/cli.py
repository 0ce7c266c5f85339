"""The `cnnlab` command: one parser assembled from the command modules, and errors mapped to exit codes.

Adding a command: write `add_parser(subparsers)` (parser + handler `func(args) -> exit code`) beside
the command's code, with its heavy imports inside the handler, and list the module in COMMANDS.
Errors: a `CnnlabError` exits with its own `exit_code` (2 bad input, 1 failed run), builtin
OSError / ValueError / KeyError from the libraries below exit 2; anything else is a bug and shows
its traceback.
"""
from __future__ import annotations

import argparse
import sys

from cnnlab import threads

threads.prefer_passive_wait()  # the `cnnlab` script's entry: before the imports below load torch (OpenMP)
from cnnlab import errors  # noqa: E402
from cnnlab.data import cli as data_cli  # noqa: E402
from cnnlab.deploy import cli as deploy_cli  # noqa: E402
from cnnlab.models import cli as models_cli  # noqa: E402
from cnnlab.models import explain  # noqa: E402
from cnnlab.report import build as report_build  # noqa: E402
from cnnlab.studies import compare  # noqa: E402
from cnnlab.training import calibrate  # noqa: E402
from cnnlab.training import cli as training_cli  # noqa: E402

# the order of `cnnlab --help`
COMMANDS = (training_cli, calibrate, deploy_cli, report_build, data_cli, models_cli, explain, compare)


def build_parser() -> argparse.ArgumentParser:
    from cnnlab import __version__

    p = argparse.ArgumentParser(prog="cnnlab", description="Train, compare and explain image-classification CNNs.")
    p.add_argument("--version", action="version", version=f"cnnlab {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in COMMANDS:
        module.add_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
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
    except SystemExit as e:  # stopped by a signal after saving: 143 / 130
        return int(e.code) if isinstance(e.code, int) else 1
    except KeyboardInterrupt:
        return 130
    except Exception as e:  # noqa: BLE001 - mapped by class; a bug (None) keeps its traceback
        code = errors.exit_code(e)
        if code is None:
            raise
        print(errors.message(e), file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
