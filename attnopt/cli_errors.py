"""How the ``attnopt`` command line fails: one paragraph naming the problem and the fix, exit code 1
(130 on Ctrl-C), and a traceback only under the global ``--debug`` option.

:class:`ErrorHandlingGroup` is the one place this happens: every command of the group (and of its
subgroups) runs inside its ``invoke``, so commands raise ordinary exceptions and never catch them.
"""

from __future__ import annotations

import pickle
import re

import click

from attnopt.api import AttnoptError
from attnopt.targets import TargetError

INTERRUPTED = 130  # the shell's code for a process ended by SIGINT (128 + 2)
_MAX_CHARS = 600


def first_paragraph(text: str) -> str:
    """The text up to its first blank line, on one line (whitespace collapsed), cut at :data:`_MAX_CHARS`."""
    head = re.split(r"\n\s*\n", text.strip(), maxsplit=1)[0]
    flat = " ".join(head.split())
    return flat if len(flat) <= _MAX_CHARS else flat[: _MAX_CHARS - 3].rstrip() + "..."


def _unwrap(exc: BaseException) -> BaseException:
    """The error a compiler wrapper (dynamo's BackendCompilerFailed) carries, else ``exc``."""
    inner = getattr(exc, "inner_exception", None)
    return _unwrap(inner) if isinstance(inner, BaseException) else exc


def explain(exc: BaseException) -> str:
    """One paragraph for the user: attnopt's own errors as they are (they name the fix), known library
    failures translated, anything else named with where to look next."""
    exc = _unwrap(exc)
    if isinstance(exc, (AttnoptError, TargetError)):
        return first_paragraph(str(exc))
    if isinstance(exc, pickle.UnpicklingError):
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))
        holding = unsafe.group(1) if unsafe else "objects"
        return (f"refusing to load a pickled checkpoint: it holds {holding}, not only tensors and plain "
                "containers, and attnopt loads checkpoints with torch.load(weights_only=True) only, never unpickling "
                "arbitrary objects (a pickle can run code). Re-save the weights as safetensors, e.g. "
                "model.save_pretrained(DIR) or safetensors.torch.save_file(state_dict, "
                "'model.safetensors').")  # fmt: skip
    if isinstance(exc, FileNotFoundError):
        return f"{exc.filename or first_paragraph(str(exc))} does not exist: check the path."
    if isinstance(exc, (OSError, ValueError, TypeError, NotImplementedError)):
        return first_paragraph(str(exc)) or f"{type(exc).__name__} (run with --debug for the traceback)"
    return (f"{type(exc).__name__}: {first_paragraph(str(exc))}. This looks like a bug in attnopt or a library it "
            "uses: run again with --debug for the traceback and report it.")  # fmt: skip


class ErrorHandlingGroup(click.Group):
    """A click group whose commands fail with :func:`explain`'s paragraph (exit 1) or exit 130 on Ctrl-C;
    ``--debug`` (stored in ``ctx.meta["attnopt.debug"]``) lets the original exception through instead."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            if ctx.meta.get("attnopt.debug"):
                raise
            click.echo("interrupted", err=True)
            ctx.exit(INTERRUPTED)
        except Exception as exc:
            if ctx.meta.get("attnopt.debug"):
                raise
            raise click.ClickException(explain(exc)) from exc


def set_debug(ctx: click.Context, _param, value: bool) -> bool:
    """Eager callback of the global ``--debug`` flag: read before any command runs."""
    ctx.meta["attnopt.debug"] = value
    return value
