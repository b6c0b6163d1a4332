"""Capturing a model with dynamo: the example inputs checked, the eager reference run, the captured run, and
the errors of each (the compile pipeline's entry; :mod:`attnopt.api` and :mod:`attnopt.auto` run models through it)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnopt.backend import Backend
from attnopt.errors import AttnoptError
from attnopt.passes import deviation


class CaptureError(AttnoptError):
    """The model could not be captured as FX graphs, or attnopt failed on a captured graph."""


class InputError(AttnoptError, ValueError):
    """The example inputs do not fit the model."""


# Hugging Face models all run through one shared wrapper function, so each optimized model adds compiled
# entries to the same code object; dynamo's default limit of 8 would silently fall back to eager after
# a handful of models. attnopt's own calls run with this higher limit (scoped, never set globally).
RECOMPILE_LIMIT = 256


def dynamo_limits():
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * limit))


def check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnopt works on torch.nn.Module instances, got {type(model).__name__}")


def normalize(args: Any, kwargs: Any) -> tuple[tuple, dict]:
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    return tuple(args), dict(kwargs or {})


def leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in leaves(x)]
    return []


def run_eager(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return model(*args, **kwargs)
    except Exception as exc:
        raise InputError(
            f"the example inputs do not fit {type(model).__name__}: calling it raised {type(exc).__name__}: {exc}. "
            "Pass args/kwargs that the model's forward accepts."
        ) from exc


def compile_error(exc: torch._dynamo.exc.BackendCompilerFailed, model: nn.Module, args: tuple,
                  kwargs: dict) -> AttnoptError:  # fmt: skip
    """The attnopt error behind dynamo's wrapper: attnopt's own as raised; an input the original model also
    refuses (a wrong dtype, shape or device) as an :class:`InputError`; anything else as a :class:`CaptureError`."""
    inner = exc.inner_exception
    if isinstance(inner, AttnoptError):
        return inner
    name = type(model).__name__
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            model(*args, **kwargs)
    except Exception as original:
        return InputError(f"the inputs do not fit {name}: the original model raises {_first_line(original)}. Pass "
                          "inputs with the dtype, device and shapes the model takes.")  # fmt: skip
    return CaptureError(f"attnopt failed on a graph captured from {name} ({_first_line(inner)}), although the original "
                        "model runs on these inputs: a bug in attnopt; please report it with the traceback.")


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def run_captured(fn, model: nn.Module, backend: Backend, args: tuple, kwargs: dict) -> Any:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = fn(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        raise compile_error(exc, model, args, kwargs) from exc.inner_exception
    except AttnoptError:
        raise
    except Exception as exc:
        raise CaptureError(f"dynamo could not capture {type(model).__name__}: {type(exc).__name__}: {exc}") from exc
    lost = ""
    if isinstance(backend, Backend):  # (auto's calibrating backend keeps no report)
        backend.note_breaks()  # a break after the last graph ended no graph: the backend has not seen it yet
        lost = "".join(f"; attention {n.name} was not captured: {n.reason.rstrip('.')}"
                       for n in backend.report.not_captured)  # fmt: skip
    if not backend.contexts:
        raise CaptureError(
            f"no graph of {type(model).__name__} could be captured: its forward ran entirely outside dynamo "
            f"(e.g. under torch._dynamo.disable, or with a graph break on every operation){lost}."
        )
    return out


def output_deviation(want: Any, got: Any) -> float | None:
    pairs = [(g, w) for g, w in zip(leaves(got), leaves(want)) if w.is_floating_point()]
    return max((deviation(g, w) for g, w in pairs), default=None)
