"""The `mdlm-golf` console entry point. It holds back Ctrl-C and SIGTERM while the command line module (and
with it torch) is imported: a signal landing inside torch's import machinery otherwise surfaces as a
traceback, a RecursionError or an abort instead of one line (`mdlm-golf CMD: interrupted`, exit 130;
`terminated (SIGTERM)`, exit 143)."""
from __future__ import annotations

import os
import signal
import sys


def command_name(argv: list[str]) -> str:
    """The subcommand as the CLI's messages name it (`mdlm-golf CMD: ...`), or `mdlm-golf` alone."""
    return f"mdlm-golf {argv[0]}" if argv and argv[0].isalpha() else "mdlm-golf"


def import_cli_main(argv: list[str]):
    """(cli.main, None), imported with SIGINT and SIGTERM recorded rather than acted on; (None, exit status)
    if one came meanwhile."""
    received: list[int] = []
    guarded = (signal.SIGINT, signal.SIGTERM)
    previous = {s: signal.signal(s, lambda signum, frame: received.append(signum)) for s in guarded}
    try:
        from .cli import main  # deferred on purpose: this import is what the handlers guard
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
    if signal.SIGTERM in received:
        print(f"{command_name(argv)}: terminated (SIGTERM)", file=sys.stderr)
        return None, 143
    if received:
        print(f"{command_name(argv)}: interrupted", file=sys.stderr)
        return None, 130
    return main, None


def exit_on_late_signal(argv: list[str]) -> None:
    """After the command: a Ctrl-C or SIGTERM while the interpreter shuts down (torch's exit hooks) ends
    the process with its one line and status, instead of a traceback from inside a hook."""
    def handle(signum, frame) -> None:
        print(f"{command_name(argv)}: {'terminated (SIGTERM)' if signum == signal.SIGTERM else 'interrupted'}",
              file=sys.stderr, flush=True)
        os._exit(143 if signum == signal.SIGTERM else 130)

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, handle)


def main(argv: list[str] | None = None) -> int:
    """Run one mdlm-golf command; exit 130 (143) if interrupted (terminated) while starting up."""
    argv = sys.argv[1:] if argv is None else argv
    cli_main, status = import_cli_main(argv)
    return status if cli_main is None else cli_main(argv)


def run() -> int:
    """The process entry point (`mdlm-golf`, `python -m mdlm_golf`): main, then late signals end the
    process in one line while it shuts down (set only here: they would outlive an in-process call)."""
    status = main()
    exit_on_late_signal(sys.argv[1:])
    return status
