"""The public entry points: ``inspect``, ``optimize``, ``report``, ``generate`` and ``attention``."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from attnopt.backend import Backend
from attnopt.cost import annotate
from attnopt.errors import AttnoptError, GraphDeviationError
from attnopt.kernels.exact.reference import CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.kernels.exact.ops import check_mask_dtype, new_seed
from attnopt.passes import deviation
from attnopt.policy import Exact, Policy, as_policy
from attnopt.report import Report


class CaptureError(AttnoptError):
    """The model could not be captured as FX graphs, or attnopt failed on a captured graph."""


class InputError(AttnoptError, ValueError):
    """The example inputs do not fit the model."""


# Hugging Face models all run through one shared wrapper function, so each optimized model adds compiled
# entries to the same code object; dynamo's default limit of 8 would silently fall back to eager after
# a handful of models. attnopt's own calls run with this higher limit (scoped, never set globally).
RECOMPILE_LIMIT = 256


def _dynamo_limits():
    limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    return torch._dynamo.config.patch(recompile_limit=limit, accumulated_recompile_limit=max(
        torch._dynamo.config.accumulated_recompile_limit, 4 * limit))


class OptimizedModule(nn.Module):
    """The module ``optimize`` returns: the original module, run through attnopt's rewritten graphs.

    Attributes, ``state_dict`` and ``load_state_dict`` are those of the wrapped module (same keys), so
    checkpoints move freely between the two. The first call with new shapes captures and rewrites.
    """

    def __init__(self, module: nn.Module, policy: Policy, report: Report):
        super().__init__()
        self.module = module
        backend = Backend(policy, then="eager", report=report, model=module, check_globs=False)
        object.__setattr__(self, "_attnopt_backend", backend)
        object.__setattr__(self, "_attnopt_compiled", torch.compile(module, backend=backend))
        # policy globs are checked against the sites once the first call's graphs are captured (optimize
        # does it itself when given example inputs)
        object.__setattr__(self, "_attnopt_globs_pending", True)

    @property
    def attnopt_report(self) -> Report:
        return self._attnopt_backend.report

    @property
    def policy(self) -> Policy:
        return self._attnopt_backend.policy

    def forward(self, *args, **kwargs):
        try:
            with _dynamo_limits():
                out = self._attnopt_compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise _compile_error(exc, self.module, args, kwargs) from exc.inner_exception
        if self._attnopt_globs_pending and self._attnopt_backend.contexts:
            object.__setattr__(self, "_attnopt_globs_pending", False)
            _check_globs(self.policy, self.attnopt_report)
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["module"], name)

    def generate(self, *args, **kwargs):
        """transformers' ``generate`` of the wrapped model, every forward through the rewritten graphs.

        A model whose sites ``attnopt.Linear`` rewrote generates through their recurrent states
        (:func:`attnopt.generate`: no KV cache); any other keeps its KV cache, and the graphs of its
        decode steps are captured, rewritten and validated like any new input shape.
        """
        inner = self.module
        if not callable(getattr(inner, "generate", None)):
            raise AttributeError(f"{type(inner).__name__} has no generate(); call the optimized module instead")
        if any(site.decision == "linear" for site in self.attnopt_report.sites):
            return generate(self, *args, **kwargs)
        return _forward_view(self).generate(*args, **kwargs)

    def state_dict(self, *args, **kwargs):
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, *args, **kwargs):
        return self.module.load_state_dict(*args, **kwargs)


def _forward_view(optimized: OptimizedModule) -> nn.Module:
    """The wrapped module seen through a subclass whose call is ``optimized``'s: its own methods (a Hugging
    Face ``generate``) then run every forward through the rewritten graphs. Attributes are shared."""
    inner = optimized.module
    view_type = type(f"Optimized{type(inner).__name__}", (type(inner),),
                     {"__call__": lambda self, *args, **kwargs: optimized(*args, **kwargs)})  # fmt: skip
    view = object.__new__(view_type)
    view.__dict__ = inner.__dict__
    return view


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"attnopt works on torch.nn.Module instances, got {type(model).__name__}")


def _normalize(args: Any, kwargs: Any) -> tuple[tuple, dict]:
    if isinstance(args, torch.Tensor):
        args = (args,)
    if not isinstance(args, (tuple, list)):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise TypeError(f"kwargs must be a dict, got {type(kwargs).__name__}")
    return tuple(args), dict(kwargs or {})


def _leaves(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in _leaves(x)]
    return []


def _run_eager(model: nn.Module, args: tuple, kwargs: dict) -> Any:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return model(*args, **kwargs)
    except Exception as exc:
        raise InputError(
            f"the example inputs do not fit {type(model).__name__}: calling it raised {type(exc).__name__}: {exc}. "
            "Pass args/kwargs that the model's forward accepts."
        ) from exc


def _compile_error(exc: torch._dynamo.exc.BackendCompilerFailed, model: nn.Module, args: tuple,
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


def _run_captured(fn, model: nn.Module, backend: Backend, args: tuple, kwargs: dict) -> Any:
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = fn(*args, **kwargs)
    except torch._dynamo.exc.BackendCompilerFailed as exc:
        raise _compile_error(exc, model, args, kwargs) from exc.inner_exception
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


def _output_deviation(want: Any, got: Any) -> float | None:
    pairs = [(g, w) for g, w in zip(_leaves(got), _leaves(want)) if w.is_floating_point()]
    return max((deviation(g, w) for g, w in pairs), default=None)


def _capture(model: nn.Module, policy: Policy, args: tuple, kwargs: dict, rewrite: bool) -> tuple[Backend, Any, Any]:
    want = _run_eager(model, args, kwargs)
    backend = Backend(policy, then="eager", rewrite=rewrite, model=model, check_globs=False)
    compiled = torch.compile(model, backend=backend)
    with _dynamo_limits():
        got = _run_captured(compiled, model, backend, args, kwargs)
    return backend, want, got


def _check_globs(policy: Policy, report: Report) -> None:
    names = list(dict.fromkeys(s.name for s in report.sites))
    unmatched = policy.unmatched_globs(names)
    if unmatched:
        raise ValueError(
            f"policy override glob(s) {unmatched} match no attention site; sites are {names} (module paths: "
            "write the globs against these names, e.g. 'model.layers.0.*')"
        )


def inspect(model: nn.Module, args: Any = (), kwargs: dict | None = None, policy: Any = "exact") -> Report:
    """Captures ``model`` on the example inputs and reports every attention site and what ``policy`` would do
    (an auto policy is calibrated first)."""
    policy = as_policy(policy)
    _check_model(model)
    args, kwargs = _normalize(args, kwargs)
    if not args and not kwargs:
        raise ValueError("attnopt.inspect needs example inputs: inspect(model, args=(...,), kwargs={...})")
    policy, calibration = _resolve_auto(model, policy, args, kwargs)
    backend, _, _ = _capture(model, policy, args, kwargs, rewrite=False)
    _check_globs(policy, backend.report)
    annotate(backend.report, policy)
    if calibration is not None:
        calibration.annotate(backend.report)
    return backend.report


def _resolve_auto(model: nn.Module, policy: Policy, args: tuple, kwargs: dict) -> tuple[Policy, Any]:
    """An auto policy calibrated into a concrete one (with the calibration), any other as it is."""
    if not policy.is_auto:
        return policy, None
    from attnopt.auto import calibrate

    calibration = calibrate(model, policy, args, kwargs)
    return calibration.policy, calibration


def optimize(model: nn.Module, policy: Any = "exact", args: Any = (), kwargs: dict | None = None) -> OptimizedModule:
    """A module computing the same function as ``model`` with its attention sites rewritten per ``policy``.

    With example inputs, the model is captured, rewritten and validated now (each site checked against
    the original; deviants are rolled back) and the report records the largest output difference.
    Without them, that happens at the first call. An auto policy (``"auto:1e-2"``, ``Policy.auto(...)``)
    is calibrated on the example inputs first (:mod:`attnopt.auto`).
    """
    policy = as_policy(policy)
    _check_model(model)
    args, kwargs = _normalize(args, kwargs)
    policy, calibration = _resolve_auto(model, policy, args, kwargs)
    report = Report()
    optimized = OptimizedModule(model, policy, report)
    if args or kwargs:
        object.__setattr__(optimized, "_attnopt_globs_pending", False)
        want = _run_eager(model, args, kwargs)
        got = _run_captured(optimized, model, optimized._attnopt_backend, args, kwargs)
        report.output_deviation = _output_deviation(want, got)
        if model.training:
            report.notes.append("the model is in training mode: dropout makes outputs random (call .eval() to compare)")
        _check_globs(policy, report)
        annotate(report, policy)
        if calibration is not None:
            calibration.annotate(report)
    return optimized


def generate(model: OptimizedModule, input_ids: torch.Tensor | None = None, **generate_kwargs: Any) -> Any:
    """transformers' ``generate`` on a Hugging Face decoder whose attention sites ``attnopt.Linear`` rewrote,
    through their recurrent states: the prompt once, then one token per step, no KV cache
    (:func:`attnopt.generation.generate`; a site that would need a KV cache is refused by name)."""
    from attnopt import generation

    return generation.generate(model, input_ids, **generate_kwargs)


def report(module: nn.Module) -> Report:
    """The report of a module returned by :func:`optimize`."""
    if isinstance(module, OptimizedModule):
        return module.attnopt_report
    raise TypeError(f"attnopt.report takes a module returned by attnopt.optimize, got {type(module).__name__}")


def attention(q, k, v, attn_mask=None, is_causal: bool = False, scale: float | None = None, variant: Any = None,
              dropout_p: float = 0.0):  # fmt: skip
    """attnopt's kernels called directly, with SDPA's layout and semantics.

    q [..., Hq, Sq, D], k [..., Hkv, Sk, D], v [..., Hkv, Sk, Dv] (Hq % Hkv == 0: GQA needs no repeat);
    ``attn_mask`` boolean (True = attend) or floating-point additive (an integer mask is refused, as by SDPA:
    ``attn_mask.bool()`` makes a 0/1 keep-mask boolean); ``is_causal`` is SDPA's (top-left aligned).
    """
    if variant is not None and not isinstance(as_policy(variant).default, Exact):
        raise NotImplementedError(
            f"attnopt.attention runs exact attention only, not {variant!r}; apply other variants to a model with "
            "attnopt.optimize(model, policy)"
        )
    check_mask_dtype(attn_mask)
    if is_causal and attn_mask is not None:
        raise ValueError("attnopt.attention: pass either attn_mask or is_causal=True, not both (as SDPA)")
    if q.dim() not in (3, 4) or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(f"attnopt.attention takes 3-D or 4-D q, k, v; got {q.dim()}-D, {k.dim()}-D, {v.dim()}-D")
    squeeze = q.dim() == 3
    if squeeze:
        q, k, v = q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    seed = new_seed() if dropout_p > 0.0 else None
    causal = CAUSAL_TOP_LEFT if is_causal else CAUSAL_NONE
    out, _ = torch.ops.attnopt.attention(q, k, v, attn_mask, float(dropout_p), causal, scale, seed)
    return out.squeeze(0) if squeeze else out
