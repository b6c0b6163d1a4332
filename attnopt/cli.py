"""The ``attnopt`` command line."""

from __future__ import annotations

import sys

import click

from attnopt.targets import TargetError, load_target

ATTN_CHOICES = click.Choice(["eager", "sdpa"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnopt")
def main() -> None:
    """attnopt: find every attention in a PyTorch model and run it through generated kernels."""


@main.command()
@click.argument("target")
@click.option("--attn", "attn_implementation", type=ATTN_CHOICES, default=None,
              help="Hugging Face attn_implementation to build the model with.")
@click.option("--policy", default="exact", show_default=True, help="Policy whose decisions to show (exact, keep).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect(target: str, attn_implementation: str | None, policy: str, as_json: bool) -> None:
    """List the attention sites of TARGET: a Hugging Face model directory (config.json, weights optional:
    random init when absent) or path/to/file.py:factory (a callable returning model, args[, kwargs])."""
    import attnopt

    try:
        t = load_target(target, attn_implementation)
        report = attnopt.inspect(t.model, t.args, t.kwargs, policy=policy)
    except (TargetError, attnopt.AttnoptError, ValueError, NotImplementedError, TypeError) as exc:
        raise click.ClickException(str(exc)) from exc
    if as_json:
        click.echo(report.to_json())
    else:
        click.echo(t.description)
        click.echo(str(report))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
