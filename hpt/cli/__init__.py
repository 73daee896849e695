"""``hptctl``: the command line of hpt, for the operators of a cluster.

The commands live in modules by audience and are registered here on the root group:

- :mod:`hpt.cli.jobs`: the client commands (``submit``, ``ls``, ``status``, ``describe``, ``logs``,
  ``cancel``, ``ckpt``, ``nodes``, ``events``); they talk to the controller through
  :mod:`hpt.client`.
- :mod:`hpt.cli.daemons`: ``up``, ``controller`` and ``agent`` run the daemons in this process
  (:mod:`hpt.cli.boot` starts, watches and reaps them); ``demo`` (:mod:`hpt.cli.demo`) starts a
  local cluster, runs a job, kills a rank and shows the recovery.
- :mod:`hpt.cli.run` (``run``: torchrun's one-liner), :mod:`hpt.cli.plan` (``plan``) and
  :mod:`hpt.cli.cert` (``cert``).

Rendering is :mod:`hpt.cli.render`; errors, exit codes and connection options are
:mod:`hpt.cli.common`. The training API (``hpt``) never imports this package.

Exit codes: 0 success; 1 failure (an RPC error, or a job that failed while a command waited for
it); 2 usage error (bad flags, or a spec the controller refused as INVALID_ARGUMENT). Errors go to
stderr as one line ``error: ...``.
"""

from __future__ import annotations

import sys

import click

from hpt.cli import cert, daemons, jobs, plan, run
from hpt.cli.common import EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, error_line

_NoArgsIsHelp = getattr(click.exceptions, "NoArgsIsHelpError", ())  # click >= 8.2


class _Main(click.Group):
    """The root group: turns every failure into one ``error:`` line and an exit code."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        code = self._run(args, prog_name, complete_var, **extra)
        if standalone_mode:
            sys.exit(code)
        return code

    def _run(self, args, prog_name, complete_var, **extra) -> int:
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except _NoArgsIsHelp as e:  # bare ``hptctl``: show the help, as click 8.1 did
            click.echo(e.format_message())
            return EXIT_OK
        except click.UsageError as e:
            hint = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            error_line(e.format_message() + hint)
            return EXIT_USAGE
        except click.ClickException as e:
            error_line(e.format_message())
            return e.exit_code
        except click.Abort:
            return EXIT_INTERRUPTED
        return rv if isinstance(rv, int) else EXIT_OK


@click.group(cls=_Main, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="hpt", prog_name="hptctl", message="%(prog)s %(version)s")
def main() -> None:
    """hpt: run PyTorch jobs on a cluster and keep them alive."""


for _command in (*jobs.COMMANDS, *daemons.COMMANDS, plan.plan, run.run_command, cert.cert):
    main.add_command(_command)
