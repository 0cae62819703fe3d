"""The one exception type users see from phase 1.

Every message names what is wrong and how to fix it; the CLI prints it without a traceback.
"""


class CacheError(Exception):
    """A problem with the user's input or store, phrased as problem + fix."""


def run_cli(app) -> None:
    """Run a Typer `app` as a console entry point: user errors print as one message and exit 2,
    never as a traceback."""
    import sys

    from rich.console import Console

    try:
        app()
    except CacheError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
