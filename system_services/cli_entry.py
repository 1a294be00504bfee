"""llmosctl's entry point: Ctrl-C while the command line tool is still loading ends as one line and
exit 130, like Ctrl-C anywhere later (system_services/cli.py installs its handlers only once loaded)."""

import sys


def main() -> int:
    try:
        from system_services.cli import main as cli_main
    except KeyboardInterrupt:
        print("llmosctl: error: interrupted", file=sys.stderr, flush=True)
        return 130
    return cli_main()
