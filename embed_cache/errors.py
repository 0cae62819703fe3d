"""The one exception type users see: `JasperError`, with a subclass per phase.

Every message names what is wrong and how to fix it; the CLIs print it without a traceback. Code
shared by the phases (config loading, path checks) raises `JasperError` itself; each phase raises
its own subclass (`CacheError` here, `distill.config.DistillError`, `pipeline.config.PipelineError`),
so a caller can catch one phase's problems or all of them.
"""


class JasperError(Exception):
    """A problem with the user's input, store or run, phrased as problem + fix."""


class CacheError(JasperError):
    """Phase 1: the corpus, a teacher or the target store."""


def run_cli(app) -> None:
    """Run a Typer `app` as a console entry point: user errors print as one message and exit 2,
    never as a traceback."""
    import sys

    from rich.console import Console

    try:
        app()
    except JasperError as err:
        Console(stderr=True).print(f"[bold red]error:[/] {err}", highlight=False, soft_wrap=True)
        sys.exit(2)
