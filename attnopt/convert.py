"""``attnopt convert``: a checkpoint in, an optimized, validated artifact directory out.

    attnopt convert SRC --policy POLICY --out DIR [--weights CKPT] [--inputs SPEC] [--format pt2|onnx]
                    [--dynamic/--no-dynamic] [--validate] [--force]

SRC is a local Hugging Face model directory (config.json and safetensors or ``pytorch_model.bin``
weights) or ``path/to/file.py:factory`` (a callable returning ``(model, args[, kwargs])``) with optional
``--weights CKPT`` (``.safetensors``, or ``.pt``/``.pth``/``.bin``/``.ckpt`` read with
``torch.load(weights_only=True)``: attnopt never unpickles arbitrary objects). The artifact layout and
the manifest are described in :mod:`attnopt.artifact`.

The conversion is written to a staging directory next to DIR and renamed into place at the end: a
failed or interrupted conversion (any exception, KeyboardInterrupt, SIGTERM in the CLI) removes the
staging directory (and any parent directories it had to create) and leaves DIR as it was. An existing
DIR is replaced only with ``force`` and only if it is an attnopt artifact or empty.

This module runs the steps; :mod:`attnopt.convert_source` loads SRC, :mod:`attnopt.convert_write` writes the
artifact and :mod:`attnopt.convert_check` validates and benches it.
"""

from __future__ import annotations

import os
import time
import warnings
from pathlib import Path
from typing import Any

from attnopt import artifact as A
from attnopt import export as E
from attnopt import inputs as I
from attnopt.api import AttnoptError, optimize
from attnopt.auto import Calibration, calibrate
from attnopt.convert_check import EXACT_DECISIONS, bench, validate_artifact, validate_dir, validation_failure
from attnopt.convert_source import ConvertError, Source, load_pickle_checkpoint, load_source, read_safetensors_shapes
from attnopt.convert_write import (Steps, build_manifest, check_out, kernel_entry, make_staging, move_into_place,
                                   no_attention_warning, site_entries, write_exports, write_weights)  # fmt: skip
from attnopt.policy import Policy, as_policy

FORMATS = ("pt2", "onnx")


# ------------------------------------------------------------------------------------------------------ policy


def parse_policy(text: Any) -> Policy:
    """A policy from the CLI: a string form (``exact``, ``keep``, ``auto:1e-2``, ``sliding_window:1024``, ...) or
    a .yaml/.yml/.json policy file (:meth:`attnopt.Policy.from_string`); ConvertError with the reason."""
    if isinstance(text, Policy):
        return text
    try:
        return as_policy(text)
    except NotImplementedError as exc:
        raise ConvertError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise ConvertError(f"policy file {text} does not exist") from exc
    except (ValueError, TypeError, OSError) as exc:
        raise ConvertError(f"invalid policy {text!r}: {exc}") from exc


def convert(src: str, policy: Any, out: str | os.PathLike, *, weights: str | None = None, inputs: Any = None,
            formats: Any = (), validate: bool = False, samples: int = 3, max_error: float | None = None,
            force: bool = False, attn_implementation: str | None = None, onnx_attention: str = "standard",
            dynamic: bool = True, progress: bool = False, model_class: str | None = None) -> dict:  # fmt: skip
    """Converts ``src`` under ``policy`` into the artifact directory ``out``; returns the manifest.

    ``dynamic`` exports ``.pt2`` and ONNX with dynamic batch and sequence dims where the model allows it
    (:func:`attnopt.export.export_program`); the manifest's export entries say which dims are dynamic and why
    any stayed static.

    Raises :class:`ConvertError` (with a message fit for the command line) on any problem, leaving ``out``
    untouched and nothing behind.
    """
    try:
        return _convert(src, policy, out, weights=weights, inputs=inputs, formats=formats, validate=validate,
                        samples=samples, max_error=max_error, force=force, attn_implementation=attn_implementation,
                        onnx_attention=onnx_attention, dynamic=dynamic, progress=progress,
                        model_class=model_class)  # fmt: skip
    except (I.InputSpecError, A.ArtifactError, E.ExportError) as exc:
        raise ConvertError(str(exc)) from exc


def _convert(src: str, policy: Any, out: str | os.PathLike, *, weights, inputs, formats, validate, samples,
             max_error, force, attn_implementation, onnx_attention, dynamic, progress, model_class) -> dict:  # fmt: skip
    pol = parse_policy(policy)
    formats = _check_request(formats, onnx_attention, validate, samples)
    specs = I.parse_specs(inputs) if inputs else None
    out_path = Path(os.path.abspath(os.path.expanduser(str(out))))
    check_out(out_path, src, force)
    st = make_staging(out_path)
    started = time.perf_counter()
    n_steps = 4 + len(formats) + (1 if validate else 0)
    with warnings.catch_warnings():
        # torch's deprecation notices while (de)serializing exported programs are not the user's concern
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        try:
            with Steps(n_steps, progress) as steps:
                steps.step(f"load {src}")
                source = load_source(src, weights, attn_implementation, model_class)
                args, kwargs = _sample_inputs(source, specs)
                steps.done()

                steps.step("optimize: capture, rewrite and validate each site")
                optimized, calibration = _optimize(source, pol, args, kwargs, steps, progress)
                steps.done()

                steps.step("write weights")
                written, inputs_entry = write_weights(source, st.staging, args, kwargs)
                steps.done()

                steps.step("write manifest")
                report = optimized.attnopt_report
                manifest = build_manifest(source, st.staging, written, inputs_entry, report,
                                          site_entries(report), pol,
                                          calibration.policy if calibration is not None else None)  # fmt: skip
                A.write_manifest(st.staging, manifest)
                steps.done()

                write_exports(st.staging, manifest, source, args, kwargs, formats, dynamic, onnx_attention, steps)
                if validate:
                    steps.step("validate: original vs converted")
                    validate_artifact(st.staging, manifest, source, pol, max_error, args, kwargs, samples, steps)
                    steps.done()
                manifest["seconds"] = round(time.perf_counter() - started, 2)
                A.write_manifest(st.staging, manifest)
                move_into_place(st, force)
        except BaseException:
            st.discard()
            raise
    return manifest


def _check_request(formats: Any, onnx_attention: str, validate: bool, samples: int) -> tuple:
    """The formats asked for, each once; ConvertError for an unknown format or ONNX attention mode, a missing
    ONNX dependency or too few samples, before anything is loaded or written."""
    formats = tuple(dict.fromkeys(formats or ()))
    bad = [f for f in formats if f not in FORMATS]
    if bad:
        raise ConvertError(f"unknown format(s) {bad}; choose from {list(FORMATS)}")
    if onnx_attention not in E.ONNX_ATTENTION_MODES:
        raise ConvertError(f"unknown ONNX attention mode {onnx_attention!r}; use one of {E.ONNX_ATTENTION_MODES}")
    if "onnx" in formats:
        for mod, why in (("onnxscript", "export"), ("onnxruntime", "validation")):
            if why == "validation" and not validate:
                continue
            try:
                __import__(mod)
            except ImportError as exc:
                raise ConvertError(f"--format onnx needs {mod} for {why}: pip install {mod}") from exc
    if samples < 1:
        raise ConvertError("--samples must be >= 1")
    return formats


def _sample_inputs(source: Source, specs: list | None) -> tuple[tuple, dict]:
    """The inputs the conversion runs on: built from ``--inputs`` specs, else the source's own."""
    if not specs:
        return source.args, source.kwargs
    args, kwargs = I.make_inputs(specs, source.config)
    if source.kind == "hf" and getattr(source.config, "use_cache", None) is not None:
        kwargs.setdefault("use_cache", False)
    return args, kwargs


def _optimize(source: Source, pol: Policy, args: tuple, kwargs: dict, steps: Steps,
              progress: bool) -> tuple[Any, Calibration | None]:  # fmt: skip
    """The optimized model; an auto policy is first calibrated (with its own progress bar) into a concrete one,
    and the calibration annotates the report."""
    calibration, applied = None, pol
    try:
        if pol.is_auto:
            with steps.paused():
                calibration = calibrate(source.model, pol, args, kwargs, progress=progress)
            applied = calibration.policy
        optimized = optimize(source.model, applied, args, kwargs)
    except (AttnoptError, ValueError, TypeError, NotImplementedError) as exc:
        raise ConvertError(f"optimizing {source.description} failed: {exc}") from exc
    if calibration is not None:
        calibration.annotate(optimized.attnopt_report)
    return optimized, calibration


__all__ = ["EXACT_DECISIONS", "FORMATS", "ConvertError", "Source", "Steps", "bench", "convert", "kernel_entry",
           "load_pickle_checkpoint", "load_source", "no_attention_warning", "parse_policy", "read_safetensors_shapes",
           "site_entries", "validate_dir", "validation_failure"]
