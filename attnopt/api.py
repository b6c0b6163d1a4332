"""The public entry points: ``inspect``, ``optimize``, ``report``, ``generate`` and ``attention`` (the functional
entry point, :func:`attnopt.functional.attention`)."""

from __future__ import annotations

import statistics
from typing import Any

import torch
from torch import nn

from attnopt.auto import calibrate
from attnopt.backend import Backend
from attnopt.capture import (RECOMPILE_LIMIT, CaptureError, InputError, check_model, compile_error, dynamo_limits,  # noqa: F401
                             normalize, output_deviation, run_captured, run_eager)  # fmt: skip
from attnopt.cost import annotate
from attnopt.errors import AttnoptError, GraphDeviationError  # noqa: F401  (attnopt.api.AttnoptError, re-exported)
from attnopt.functional import attention  # noqa: F401  (attnopt.api.attention, re-exported)
from attnopt.policy import Policy, as_policy
from attnopt.report import Report
from attnopt.timing import device_label, device_of, interleaved_times
from attnopt.variants.registry import generation_mode


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
            with dynamo_limits():
                out = self._attnopt_compiled(*args, **kwargs)
        except torch._dynamo.exc.BackendCompilerFailed as exc:
            raise compile_error(exc, self.module, args, kwargs) from exc.inner_exception
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

        A model whose sites ``attnopt.Linear`` rewrote generates through their recurrent states, one whose
        sites have a dynamic decode selection through their paged KV caches (:func:`attnopt.generate`: no KV
        cache of the model's own); any other keeps its KV cache, and the graphs of its decode steps are
        captured, rewritten and validated like any new input shape.
        """
        inner = self.module
        if not callable(getattr(inner, "generate", None)):
            raise AttributeError(f"{type(inner).__name__} has no generate(); call the optimized module instead")
        if any(generation_mode(s.variant) != "kv-cache" for s in self.attnopt_report.sites):
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


def _capture(model: nn.Module, policy: Policy, args: tuple, kwargs: dict, rewrite: bool) -> tuple[Backend, Any, Any]:
    want = run_eager(model, args, kwargs)
    backend = Backend(policy, then="eager", rewrite=rewrite, model=model, check_globs=False)
    compiled = torch.compile(model, backend=backend)
    with dynamo_limits():
        got = run_captured(compiled, model, backend, args, kwargs)
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
    check_model(model)
    args, kwargs = normalize(args, kwargs)
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
    calibration = calibrate(model, policy, args, kwargs)
    return calibration.policy, calibration


def optimize(model: nn.Module, policy: Any = "exact", args: Any = (), kwargs: dict | None = None,
             measure: bool = True) -> OptimizedModule:  # fmt: skip
    """A module computing the same function as ``model`` with its attention sites rewritten per ``policy``.

    With example inputs, the model is captured, rewritten and validated now (each site checked against
    the original; deviants are rolled back) and the report records the largest output difference and, with
    ``measure`` (and the model in eval mode), the forward time of both on the example inputs, timed as
    ``attnopt bench`` times them (each site's own time is measured during validation).
    Without them, that happens at the first call. An auto policy (``"auto:1e-2"``, ``Policy.auto(...)``)
    is calibrated on the example inputs first (:mod:`attnopt.auto`).
    """
    policy = as_policy(policy)
    check_model(model)
    args, kwargs = normalize(args, kwargs)
    policy, calibration = _resolve_auto(model, policy, args, kwargs)
    report = Report()
    optimized = OptimizedModule(model, policy, report)
    if args or kwargs:
        object.__setattr__(optimized, "_attnopt_globs_pending", False)
        want = run_eager(model, args, kwargs)
        got = run_captured(optimized, model, optimized._attnopt_backend, args, kwargs)
        report.output_deviation = output_deviation(want, got)
        if model.training:
            report.notes.append("the model is in training mode: dropout makes outputs random (call .eval() to compare)")
        if measure and not model.training:
            report.timing = _forward_times(model, optimized, args, kwargs)
        _check_globs(policy, report)
        annotate(report, policy)
        if calibration is not None:
            calibration.annotate(report)
    return optimized


def _forward_times(model: nn.Module, optimized: OptimizedModule, args: tuple, kwargs: dict) -> dict:
    """The median forward milliseconds of ``model`` and ``optimized`` on the example inputs (no grad), measured
    as ``attnopt bench`` measures an artifact (:func:`attnopt.timing.interleaved_times`, its runs and warm-up)."""
    device = device_of((args, kwargs))
    with torch.no_grad():
        times = interleaved_times({"original": (lambda: model(*args, **kwargs), device),
                                   "optimized": (lambda: optimized(*args, **kwargs), device)})
    return {"device": device_label(device), "original_ms": statistics.median(times["original"]),
            "optimized_ms": statistics.median(times["optimized"])}


def generate(model: OptimizedModule, input_ids: torch.Tensor | None = None, **generate_kwargs: Any) -> Any:
    """transformers' ``generate`` on a Hugging Face decoder whose attention sites ``attnopt.Linear`` rewrote (through
    their recurrent states) or ``attnopt.Sparse(Dynamic(..., decode_top_k=K))`` rewrote (through paged KV caches,
    each step attending to the selected pages): the prompt once, then one token per step
    (:func:`attnopt.generation.generate`; a site that would need a KV cache of the model's is refused by name)."""
    from attnopt import generation

    if not isinstance(model, OptimizedModule):
        raise TypeError(f"attnopt.generate takes the module attnopt.optimize returned, got {type(model).__name__}")
    return generation.generate(model, input_ids, **generate_kwargs)


def report(module: nn.Module) -> Report:
    """The report of a module returned by :func:`optimize`."""
    if isinstance(module, OptimizedModule):
        return module.attnopt_report
    raise TypeError(f"attnopt.report takes a module returned by attnopt.optimize, got {type(module).__name__}")
