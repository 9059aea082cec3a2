"""The `scca-eval` command line: thin click commands over the Python API.

Every user error leaves as one line on stderr and exit status 2; Ctrl-C exits
with 130. Tracebacks are only for bugs.
"""

from __future__ import annotations

import sys

import click

from .. import __version__
from ..errors import UserError
from .bench import bench
from .finetune import finetune
from .lm_eval_cmd import lm_eval
from .passkey import passkey
from .patterns_cmd import patterns
from .ppl import ppl
from .report import compare, plot, table
from .sweep import sweep
from .tasks_cmd import tasks


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="scca-eval")
def cli():
    """Perplexity of long-context language models under sparse attention patterns.

    \b
    Quick start (offline, embedded SmolLM2-135M, bundled PG19/Proof-pile samples):
      scca-eval ppl --ctx 512,1024 --max-tokens 2048
      scca-eval ppl --pattern longmixed --ctx 8192
      scca-eval passkey --pattern full,s2,longmixed --ctx 1024,4096
      scca-eval table results/runs
      scca-eval tasks                     # every task: its use and size
    """


cli.add_command(ppl)
cli.add_command(table)
cli.add_command(compare)
cli.add_command(plot)
cli.add_command(sweep)
cli.add_command(passkey)
cli.add_command(patterns)
cli.add_command(bench)
cli.add_command(finetune)
cli.add_command(lm_eval)
cli.add_command(tasks)


def _fail(message: str, status: int = 2) -> None:
    click.echo(f"scca-eval: error: {message}", err=True)
    sys.exit(status)


# click >= 8.2 raises this for a group called without arguments; older click has no such class.
_NO_ARGS_IS_HELP = getattr(click.exceptions, "NoArgsIsHelpError", ())


def main(argv: list[str] | None = None) -> None:
    """Entry point of the console script and of `python -m scca_eval`."""
    try:
        # The arguments are kept for `--gpus N` (ppl, finetune), which starts the command again
        # under torchrun (cli/launch.py).
        status = cli.main(args=argv, prog_name="scca-eval", standalone_mode=False,
                          obj={"argv": list(sys.argv[1:] if argv is None else argv)})
    except UserError as error:
        _fail(str(error).splitlines()[0] if str(error) else type(error).__name__)
    except _NO_ARGS_IS_HELP as error:  # pragma: no cover - click >= 8.2
        click.echo(error.ctx.get_help() if error.ctx else str(error))
        sys.exit(0)
    except click.UsageError as error:
        command = error.ctx.command_path if error.ctx else "scca-eval"
        _fail(f"{error.format_message()} (see '{command} --help')")
    except click.ClickException as error:
        _fail(error.format_message(), error.exit_code or 1)
    except click.exceptions.Abort as error:  # click turns Ctrl-C inside a command into Abort
        cause = error.__cause__
        click.echo(f"scca-eval: {cause}" if cause is not None and str(cause) else "scca-eval: interrupted", err=True)
        sys.exit(130)
    except KeyboardInterrupt as error:  # an Interrupted from a run says what was saved and how to resume
        click.echo(f"scca-eval: {error}" if str(error) else "scca-eval: interrupted", err=True)
        sys.exit(130)
    except BrokenPipeError:  # e.g. `scca-eval table ... | head`
        sys.exit(0)
    sys.exit(status if isinstance(status, int) else 0)
