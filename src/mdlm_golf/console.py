"""The `mdlm-golf` console entry point. It holds back Ctrl-C while the command line module (and with it
torch) is imported: an interrupt landing inside torch's import machinery otherwise surfaces as a
traceback or a RecursionError instead of the one-line `mdlm-golf CMD: interrupted`."""
from __future__ import annotations

import signal
import sys


def command_name(argv: list[str]) -> str:
    """The subcommand as the CLI's messages name it (`mdlm-golf CMD: ...`), or `mdlm-golf` alone."""
    return f"mdlm-golf {argv[0]}" if argv and argv[0].isalpha() else "mdlm-golf"


def import_cli_main(argv: list[str]):
    """cli.main, imported with SIGINT recorded rather than raised; None if Ctrl-C came meanwhile."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        from .cli import main  # deferred on purpose: this import is what the handler guards
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(f"{command_name(argv)}: interrupted", file=sys.stderr)
        return None
    return main


def main(argv: list[str] | None = None) -> int:
    """Run one mdlm-golf command; exit 130 if interrupted while starting up."""
    argv = sys.argv[1:] if argv is None else argv
    cli_main = import_cli_main(argv)
    return 130 if cli_main is None else cli_main(argv)
