"""The `mdlm-golf` console entry point. It holds back Ctrl-C and SIGTERM while the command line module (and
with it torch) is imported: a signal landing inside torch's import machinery otherwise surfaces as a
traceback, a RecursionError or an abort instead of one line (`mdlm-golf CMD: interrupted`, exit 130;
`terminated (SIGTERM)`, exit 143)."""
from __future__ import annotations

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


def main(argv: list[str] | None = None) -> int:
    """Run one mdlm-golf command; exit 130 (143) if interrupted (terminated) while starting up."""
    argv = sys.argv[1:] if argv is None else argv
    cli_main, status = import_cli_main(argv)
    return status if cli_main is None else cli_main(argv)
