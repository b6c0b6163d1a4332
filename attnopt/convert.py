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
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import math
import os
import pickle
import re
import shutil
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from attnopt import artifact as A
from attnopt import export as E
from attnopt import inputs as I
from attnopt.api import AttnoptError, optimize
from attnopt.auto import calibrate
from attnopt.codegen.spec import default_spec
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.passes import TOLERANCE, deviation
from attnopt.policy import Keep, Policy, as_policy
from attnopt.targets import TargetError, build_from_config, from_factory, hf_model_class, quiet_transformers

FORMATS = ("pt2", "onnx")
_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ConvertError(AttnoptError):
    """A conversion that cannot proceed; the message says why and what to do."""


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


# ------------------------------------------------------------------------------------------------------ source


@dataclass
class Source:
    kind: str  # "hf" | "factory"
    model: torch.nn.Module
    args: tuple
    kwargs: dict
    description: str
    info: dict  # recorded in the manifest's "source"
    config: Any = None
    notes: list[str] = field(default_factory=list)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def read_safetensors_shapes(path: Path) -> dict[str, tuple]:
    """Tensor shapes from a safetensors header; ConvertError for a corrupt or truncated file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise ConvertError(f"{path} is not a valid safetensors file (corrupt or truncated): {_first_line(exc)}") from exc


def load_pickle_checkpoint(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; a pickle with anything but tensors and containers is refused."""
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        unsafe = re.search(r"GLOBAL (\S+)", str(exc))  # torch names the first class it refused
        holding = unsafe.group(1) if unsafe else "objects"
        raise ConvertError(
            f"refusing to load {path}: it is a pickle holding {holding}, not only tensors and plain containers, and "
            "attnopt only loads checkpoints with torch.load(weights_only=True), never unpickling arbitrary objects "
            "(a pickle can run code). Re-save the weights as safetensors."
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise ConvertError(f"{path} is not a readable PyTorch checkpoint: {_first_line(exc)}") from exc


def _state_dict_of(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            inner = obj.get(key)
            if isinstance(inner, dict) and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return inner
    raise ConvertError(f"{path} holds no state dict (a mapping of names to tensors, or one under 'state_dict'/'model')")


def _hf_weight_files(path: Path) -> list[Path]:
    files = []
    for name in _HF_WEIGHTS:
        f = path / name
        if not f.is_file():
            continue
        if name.endswith(".index.json"):
            try:
                index = json.loads(f.read_text())
                shards = sorted(set(index["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise ConvertError(f"{f} is not a valid weight index: {_first_line(exc)}") from exc
            missing = [s for s in shards if not (path / s).is_file()]
            if missing:
                raise ConvertError(f"{f} lists shard(s) {missing} that are not in {path}")
            files += [f, *(path / s for s in shards)]
        else:
            files.append(f)
        break  # the first kind found is what transformers loads (safetensors first)
    return files


def _checkpoint_shapes(files: list[Path]) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    for f in files:
        if f.name.endswith(".json"):
            continue
        if f.suffix == ".safetensors":
            shapes.update(read_safetensors_shapes(f))
        else:
            sd = _state_dict_of(load_pickle_checkpoint(f), f)
            shapes.update({k: tuple(v.shape) for k, v in sd.items()})
    return shapes


def _check_shapes(ckpt: dict[str, tuple], expected: dict[str, tuple], prefix: str, where: str) -> None:
    bad = []
    for key, shape in ckpt.items():
        candidates = [key, f"{prefix}.{key}", key[len(prefix) + 1:] if prefix and key.startswith(prefix + ".") else None]
        target = next((c for c in candidates if c and c in expected), None)
        if target is not None and tuple(expected[target]) != tuple(shape):
            bad.append(f"{key}: checkpoint {list(shape)}, model expects {list(expected[target])}")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise ConvertError(f"the weights do not match {where}: {len(bad)} tensor(s) differ in shape: "
                           f"{'; '.join(bad[:3])}{more}")  # fmt: skip


def _load_hf(path: Path, attn_implementation: str | None, model_class: str | None = None) -> Source:
    if not (path / "config.json").is_file():
        raise ConvertError(f"{path} has no config.json: a Hugging Face model directory needs config.json next to "
                           "its weights (or pass path/to/file.py:factory)")  # fmt: skip
    try:
        import transformers
    except ImportError as exc:
        raise ConvertError("converting a Hugging Face directory needs transformers: pip install 'attnopt[hf]'") from exc
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        raise ConvertError(f"{path / 'config.json'} is not a usable Hugging Face config: {_first_line(exc)}") from exc
    files = _hf_weight_files(path)
    if not files:
        raise ConvertError(f"{path} has no weights ({' or '.join(_HF_WEIGHTS[::2])}); convert needs the trained "
                           "weights (attnopt inspect works on a config alone)")  # fmt: skip
    ckpt = _checkpoint_shapes(files)
    try:
        cls, why = hf_model_class(config, model_class)
    except TargetError as exc:
        raise ConvertError(str(exc)) from exc
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    with quiet_transformers():
        try:
            with torch.device("meta"):
                skeleton = build_from_config(cls, config, **kw)
        except Exception as exc:  # noqa: BLE001 - any failure to build from the config is the config's
            raise ConvertError(f"cannot build {cls.__name__} from {path / 'config.json'}: {_first_line(exc)}") from exc
        expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
        _check_shapes(ckpt, expected, getattr(skeleton, "base_model_prefix", ""), f"{path / 'config.json'}")
        del skeleton
        try:
            model, info = cls.from_pretrained(str(path), local_files_only=True, weights_only=True,
                                              output_loading_info=True, **kw)  # fmt: skip
        except Exception as exc:  # noqa: BLE001
            raise ConvertError(f"could not load the model in {path}: {_first_line(exc)}") from exc
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        raise ConvertError(f"the weights in {path} do not cover {type(model).__name__}: missing {missing[:5]}"
                           f"{' ...' if len(missing) > 5 else ''}")  # fmt: skip
    notes = []
    if info.get("unexpected_keys"):
        notes.append(f"ignored {len(info['unexpected_keys'])} checkpoint tensor(s) {type(model).__name__} does not use")
    model.eval()
    args, kwargs = I.from_config(config)
    fp_files = ["config.json", *(f.name for f in files)]
    return Source(
        kind="hf", model=model, args=args, kwargs=kwargs, config=config, notes=notes,
        description=f"{type(model).__name__} ({config.model_type}) from {path} ({why}; --model-class to choose)",
        info={"kind": "hf", "path": str(path.resolve()), "fingerprint": A.fingerprint(path, fp_files)},
    )  # fmt: skip


def _load_factory(spec: str, weights: str | None) -> Source:
    file = Path(spec.rpartition(":")[0]).resolve()
    try:
        target = from_factory(f"{file}:{spec.rpartition(':')[2]}")
    except TargetError as exc:
        raise ConvertError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - the factory is user code
        raise ConvertError(f"{spec} raised {type(exc).__name__}: {exc}") from exc
    model = target.model
    fp = [(file.parent, file.name)]
    if weights is not None:
        wpath = Path(weights)
        if not wpath.is_file():
            raise ConvertError(f"--weights {weights} does not exist")
        if wpath.suffix == ".safetensors":
            read_safetensors_shapes(wpath)
            from safetensors.torch import load_file

            sd = load_file(str(wpath))
        elif wpath.suffix in _PICKLE_SUFFIXES:
            sd = _state_dict_of(load_pickle_checkpoint(wpath), wpath)
        else:
            raise ConvertError(f"--weights {weights}: expected .safetensors or {'/'.join(_PICKLE_SUFFIXES)}")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        _check_shapes({k: tuple(v.shape) for k, v in sd.items()}, expected, "", type(model).__name__)
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError as exc:
            raise ConvertError(f"the weights in {weights} do not fit {type(model).__name__}: {_first_line(exc)}") from exc
        fp.append((wpath.resolve().parent, wpath.name))
    model.eval()
    digest = _multi_fingerprint(fp)
    return Source(
        kind="factory", model=model, args=target.args, kwargs=target.kwargs, description=target.description,
        info={"kind": "factory", "factory": f"{file}:{spec.rpartition(':')[2]}",
              "weights": str(Path(weights).resolve()) if weights else None, "fingerprint": digest},
    )  # fmt: skip


def _multi_fingerprint(files: list[tuple[Path, str]]) -> dict:
    h = hashlib.sha256()
    parts = []
    for root, name in files:
        sub = A.fingerprint(root, [name])
        h.update(sub["digest"].encode())
        parts.append(str(root / name))
    return {"algorithm": "sha256", "files": parts, "digest": h.hexdigest()}


def load_source(src: str, weights: str | None = None, attn_implementation: str | None = None,
                model_class: str | None = None) -> Source:  # fmt: skip
    path = Path(os.path.expanduser(src))
    if path.is_dir():
        if weights is not None:
            raise ConvertError("--weights is for path/to/file.py:factory sources; a Hugging Face directory holds its "
                               "own weights")  # fmt: skip
        return _load_hf(path, attn_implementation, model_class)
    if ":" in src and src.rpartition(":")[0].endswith(".py"):
        return _load_factory(src, weights)
    if path.exists():
        raise ConvertError(f"{src} is a file; SRC is a Hugging Face model directory or path/to/file.py:factory")
    raise ConvertError(f"{src} does not exist (SRC is a Hugging Face model directory or path/to/file.py:factory)")


# ------------------------------------------------------------------------------------------------- the manifest


def kernel_entry(site: Any) -> dict | None:
    """The kernel spec a rewritten site runs on CUDA (CPU runs the PyTorch reference)."""
    if site.decision == "keep":
        return None
    if site.decision != "exact":
        return {"spec": None, "note": f"runs the {site.decision} variant's kernels (their specs are chosen per call)"}
    causal = {"none": CAUSAL_NONE, "top-left": CAUSAL_TOP_LEFT, "bottom-right": CAUSAL_BOTTOM_RIGHT}.get(site.causal, 0)
    dtype = getattr(torch, site.dtype, None) if site.dtype else None
    dims = site.head_dims if len(site.head_dims) == 2 and all(isinstance(d, int) for d in site.head_dims) else None
    if dtype is None or dims is None:
        return {"spec": None, "note": "head dims or dtype unknown at conversion"}
    meta = lambda d: torch.empty(1, 1, 1, d, dtype=dtype, device="meta")  # noqa: E731
    mask = None if site.mask == "none" else torch.empty(1, dtype=torch.bool if site.mask == "bool" else dtype,
                                                            device="meta")  # fmt: skip
    try:
        spec = default_spec(meta(dims[0]), meta(dims[0]), meta(dims[1]), mask, causal)
    except ValueError as exc:
        return {"spec": None, "note": f"no generated kernel: {exc}; runs on the reference implementation"}
    return {"spec": spec.to_dict(), "key": spec.key, "name": spec.name,
            "note": "CUDA runs this generated Triton kernel; CPU runs the PyTorch reference"}  # fmt: skip


def site_entries(report: Any, policy: Policy) -> list[dict]:
    """Per site: the report's facts, the variant it runs (from the policy the optimized module applied: for an
    auto policy, the calibrated one) and the kernel spec."""
    out = []
    for s in report.sites:
        entry = asdict(s)
        variant = Keep() if s.decision == "keep" else policy.for_site(s.name)
        entry["variant"] = A.variant_to_dict(variant)
        entry["kernel"] = kernel_entry(s)
        out.append(entry)
    return out


def _model_info(source: Source) -> dict:
    m = source.model
    params = list(m.parameters())
    info = {"source": source.kind, "class": type(m).__name__, "module": type(m).__module__,
            "dtype": str(params[0].dtype).replace("torch.", "") if params else None,
            "parameters": sum(p.numel() for p in params)}  # fmt: skip
    if source.kind == "hf":
        info["attn_implementation"] = getattr(source.config, "_attn_implementation", None)
    return info


# --------------------------------------------------------------------------------------------------- progress


class Steps:
    """A rich progress bar on stderr over the conversion's steps (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.enabled = enabled
        self.progress = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                     MofNCompleteColumn(), TimeElapsedColumn(), console=Console(stderr=True),
                                     transient=False)  # fmt: skip
            self.task = self.progress.add_task("convert", total=total)

    def __enter__(self) -> "Steps":
        if self.progress is not None:
            self.progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.progress is not None:
            self.progress.stop()

    def step(self, description: str) -> None:
        if self.progress is not None:
            self.progress.update(self.task, description=description)

    def done(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.task)

    @contextlib.contextmanager
    def paused(self):
        """The bar off while another progress display (auto calibration's) runs: rich shows one at a time."""
        if self.progress is not None:
            self.progress.stop()
        try:
            yield
        finally:
            if self.progress is not None:
                self.progress.start()

    def subtask(self, description: str, total: int) -> Callable[[], None]:
        if self.progress is None:
            return lambda: None
        task = self.progress.add_task(description, total=total)
        return lambda: self.progress.advance(task)


# ----------------------------------------------------------------------------------------------- output dirs


@dataclass
class _Staging:
    out: Path
    staging: Path
    created: list[Path]  # parent directories this conversion created (removed on failure)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()


def _check_out(out: Path, src: str, force: bool) -> None:
    src_path = Path(os.path.expanduser(src.rpartition(":")[0] if not Path(src).is_dir() and ":" in src else src))
    src_abs = Path(os.path.abspath(src_path))
    if out == src_abs or out in src_abs.parents:
        raise ConvertError(f"--out {out} would replace the source {src}; choose another directory")
    if not (out.exists() or out.is_symlink()):
        return
    if not force:
        raise ConvertError(f"{out} already exists; pass --force to replace it")
    if out.is_symlink() or not out.is_dir():
        raise ConvertError(f"{out} exists and is not a directory; refusing to replace it even with --force")
    if any(out.iterdir()) and not (out / A.MANIFEST).is_file():
        raise ConvertError(f"{out} is a non-empty directory that is not an attnopt artifact (no {A.MANIFEST}); "
                           "refusing to replace it even with --force")  # fmt: skip


def _make_staging(out: Path) -> _Staging:
    created = []
    parent = out.parent
    missing = []
    while not parent.exists():
        missing.append(parent)
        parent = parent.parent
    try:
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.attnopt-tmp-", dir=out.parent))
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private; the artifact gets the usual mode
    except OSError as exc:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()
        raise ConvertError(f"cannot write the output {out}: {exc.strerror or exc} ({exc.filename or out.parent})") from exc
    return _Staging(out, staging, created)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(st: _Staging, force: bool) -> None:
    mode = 0o666 & ~_umask()
    for f in st.staging.rglob("*"):
        if f.is_file():
            os.chmod(f, mode)  # some writers (safetensors) create files readable by their owner only
    out = st.out
    if out.exists() or out.is_symlink():
        if not force:
            raise ConvertError(f"{out} appeared during the conversion; pass --force to replace it")
        backup = Path(tempfile.mkdtemp(prefix=f".{out.name}.attnopt-old-", dir=out.parent))
        os.rmdir(backup)
        os.rename(out, backup)
        try:
            os.rename(st.staging, out)
        except OSError:
            os.rename(backup, out)
            raise
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.rename(st.staging, out)


# ----------------------------------------------------------------------------------------------------- convert


def _budget(policy: Policy, max_error: float | None, outputs: tuple) -> float:
    if max_error is not None:
        return float(max_error)
    if policy.max_error is not None:
        return float(policy.max_error)
    dtypes = [t.dtype for t in outputs if t.is_floating_point()]
    return max((TOLERANCE.get(d, 1e-4) for d in dtypes), default=1e-4)


def _max_dev(got: tuple, want: tuple) -> float:
    if len(got) != len(want):
        return float("inf")
    pairs = [(g, w) for g, w in zip(got, want) if w.is_floating_point()]
    return max((deviation(g.to(w.device), w) for g, w in pairs), default=0.0)


def validate_dir(path: Path, source: Source, samples: int, budget: float, steps: Steps | None = None) -> dict:
    """Runs the original model and every converted form in ``path`` on ``samples`` inputs; the deviations.

    Exports with dynamic dims also run on inputs grown along them (:func:`_reshaped_draws`)."""
    art = A.open_artifact(path)
    args, kwargs = art.sample_inputs()
    draws = [(args, kwargs, None)] + [(*I.resample(args, kwargs, seed=i, config=source.config), None)
                                      for i in range(1, samples)]  # fmt: skip
    reshaped = _reshaped_draws(art.manifest, args, kwargs, source.config)
    draws += reshaped
    converted = A.load(path)
    targets: dict[str, Callable] = {"module": lambda a, k: E.flatten_output(converted(*a, **k))}
    pt2 = art.file("pt2")
    if pt2 is not None:
        program = torch.export.load(str(pt2)).module()
        targets["pt2"] = lambda a, k: tuple(program(*a, **{n: v for n, v in k.items() if isinstance(v, torch.Tensor)}))
    onnx_file = art.file("onnx")
    if onnx_file is not None:
        session = E.onnx_session(onnx_file)
        targets["onnx"] = lambda a, k: E.run_onnx(session, a, k)
    advance = steps.subtask("validate: samples", len(draws)) if steps else (lambda: None)
    dev = {name: 0.0 for name in targets}
    abs_diff = {name: 0.0 for name in targets}
    consistency = {name: 0.0 for name in targets if name != "module"}
    tolerance = 0.0
    with torch.no_grad():
        for a, k, only in draws:
            want = E.flatten_output(source.model(*a, **k))
            tolerance = max(tolerance, _budget(Policy(), None, want))
            outs = {name: fn(a, k) for name, fn in targets.items() if only is None or name in only}
            for name, got in outs.items():
                dev[name] = max(dev[name], _max_dev(got, want))
                pairs = [(g, w) for g, w in zip(got, want) if w.is_floating_point()]
                abs_diff[name] = max([abs_diff[name]] + [float((g.double() - w.double()).abs().max()) for g, w in pairs])
                if name in consistency:  # an export computes what the converted module computes
                    consistency[name] = max(consistency[name], _max_dev(got, outs["module"]))
            advance()
    failed = {n: d for n, d in dev.items() if not d <= budget}
    failed.update({f"{n} vs module": d for n, d in consistency.items() if not d <= tolerance})
    return {"samples": len(draws) - len(reshaped), "budget": budget, "deviation": dev, "max_abs_diff": abs_diff,
            "consistency": consistency, "consistency_tolerance": tolerance, "passed": not failed,
            "failed": failed, "reshaped": [{"targets": sorted(only), "inputs": [str(s) for s in I.specs_of(a, k)]}
                                           for a, k, only in reshaped]}  # fmt: skip


def _reshaped_draws(manifest: dict, args: tuple, kwargs: dict, config: Any) -> list[tuple[tuple, dict, set]]:
    """Per distinct set of dynamic dims among the exports: inputs with each of those dims grown (batch + 1,
    sequence + 3; masks pad the last row's end), to be run by the module and the exports that take them."""
    groups: dict[str, set] = {}
    for fmt, entry in (manifest.get("exports") or {}).items():
        if entry.get("dynamic"):
            groups.setdefault(json.dumps(entry["dynamic"], sort_keys=True), {"module"}).add(fmt)
    draws = []
    for seed, (key, only) in enumerate(groups.items(), start=100):
        dims, specs = json.loads(key), []
        for spec in I.specs_of(args, kwargs):
            grow = dims.get(f"args_{spec.name}" if spec.positional else spec.name, {})
            shape = [n + (1 if grow.get(str(d)) == "batch" else 3 if grow.get(str(d)) else 0)
                     for d, n in enumerate(spec.shape)]  # fmt: skip
            specs.append(I.InputSpec(spec.name, tuple(shape), spec.dtype))
        a, k = I.make_inputs(specs, config, seed=seed)
        for name, t in k.items():
            if "mask" in name.lower() and t.dim() == 2 and not t.is_floating_point() and t.shape[1] > 2:
                t[-1, -2:] = 0
        draws.append((a, {**k, **{n: v for n, v in kwargs.items() if not isinstance(v, torch.Tensor)}}, only))
    return draws


def _export_onnx(exported: Any, export_args: tuple, decisions: dict, path: Path, mode: str) -> dict:
    """ONNX of ``exported``. A dynamic program whose ONNX translation needs static sizes (a sparse site needs
    its sequence lengths) is exported again with a dynamic batch only, then at the example shapes; the
    reasons go to the entry's ``shape_notes``."""
    notes = []
    while True:
        try:
            entry = E.export_onnx(exported.program, path, mode, exported.output_names, exported.dim_symbols)
            info = exported.entry()
            return {**entry, **info, "shape_notes": [*info["shape_notes"], *notes]}
        except E.ExportError as exc:
            if not exported.dynamic:
                raise
            roles = sorted({r for dims in exported.dynamic.values() for r in dims.values()})
            notes.append(f"ONNX export refused dynamic {' and '.join(roles)}: {exc}")
        batch = {n: {d: r for d, r in dims.items() if r == "batch"} for n, dims in exported.dynamic.items()}
        batch = {n: dims for n, dims in batch.items() if dims}
        exported = E.export_program(*export_args, expect=decisions, dynamic=batch if batch != exported.dynamic else False)


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
    specs = I.parse_specs(inputs) if inputs else None
    out_path = Path(os.path.abspath(os.path.expanduser(str(out))))
    _check_out(out_path, src, force)
    st = _make_staging(out_path)
    started = time.perf_counter()
    n_steps = 4 + len(formats) + (1 if validate else 0)
    with warnings.catch_warnings():
        # torch's deprecation notices while (de)serializing exported programs are not the user's concern
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
        try:
            with Steps(n_steps, progress) as steps:
                steps.step(f"load {src}")
                source = load_source(src, weights, attn_implementation, model_class)
                if specs:
                    args, kwargs = I.make_inputs(specs, source.config)
                    if source.kind == "hf" and getattr(source.config, "use_cache", None) is not None:
                        kwargs.setdefault("use_cache", False)
                else:
                    args, kwargs = source.args, source.kwargs
                steps.done()

                steps.step("optimize: capture, rewrite and validate each site")
                calibration, applied = None, pol
                try:
                    if pol.is_auto:  # calibrated here, with its own progress bar, into a concrete policy
                        with steps.paused():
                            calibration = calibrate(source.model, pol, args, kwargs, progress=progress)
                        applied = calibration.policy
                    optimized = optimize(source.model, applied, args, kwargs)
                except (AttnoptError, ValueError, TypeError, NotImplementedError) as exc:
                    raise ConvertError(f"optimizing {source.description} failed: {exc}") from exc
                report = optimized.attnopt_report
                if calibration is not None:
                    calibration.annotate(report)
                steps.done()

                steps.step("write weights")
                with quiet_transformers():
                    if source.kind == "hf":
                        source.model.save_pretrained(str(st.staging), safe_serialization=True)
                    else:
                        from safetensors.torch import save_model

                        save_model(source.model, str(st.staging / A.WEIGHTS))
                written = sorted(p.name for p in st.staging.iterdir() if p.name.startswith("model") or p.name == "config.json")
                inputs_entry = I.save(st.staging / A.INPUTS, args, kwargs)
                steps.done()

                steps.step("write manifest")
                sites = site_entries(report, optimized.policy)
                manifest = {
                    "format": A.FORMAT,
                    "format_version": A.FORMAT_VERSION,
                    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                    "versions": A.versions(),
                    "device": str(next(iter(source.model.parameters()), torch.empty(0)).device),
                    "source": source.info,
                    "fingerprint": A.fingerprint(st.staging, written),
                    "model": _model_info(source),
                    "policy": A.policy_to_dict(pol),
                    "calibrated_policy": A.policy_to_dict(applied) if calibration is not None else None,
                    "inputs": inputs_entry,
                    "sites": sites,
                    "misses": [asdict(m) for m in report.misses],
                    "output_deviation": report.output_deviation,
                    "notes": source.notes + list(report.notes),
                    "exports": {},
                    "validation": None,
                }
                warning = no_attention_warning(manifest)
                if warning:
                    manifest["notes"].append(warning)
                A.write_manifest(st.staging, manifest)
                steps.done()

                exported = None
                export_args = (source.model, A.decisions_policy(sites), args, kwargs)
                decisions = {s["name"]: s["decision"] for s in sites}
                for fmt in formats:
                    steps.step(f"export {fmt}")
                    if exported is None:
                        exported = E.export_program(*export_args, expect=decisions, dynamic=dynamic)
                    if fmt == "pt2":
                        torch.export.save(exported.program, str(st.staging / A.PT2))
                        manifest["exports"]["pt2"] = {"file": A.PT2, "attnopt_ops": E.count_attnopt_ops(exported.program),
                                                      "load": "import attnopt; torch.export.load(path).module()",
                                                      **exported.entry()}  # fmt: skip
                    else:
                        entry = _export_onnx(exported, export_args, decisions, st.staging / A.ONNX, onnx_attention)
                        manifest["exports"]["onnx"] = {"file": A.ONNX, **entry}
                    A.write_manifest(st.staging, manifest)
                    steps.done()

                if validate:
                    steps.step("validate: original vs converted")
                    with torch.no_grad():
                        want = E.flatten_output(source.model(*args, **kwargs))
                    budget = _budget(pol, max_error, want)
                    result = validate_dir(st.staging, source, samples, budget, steps)
                    manifest["validation"] = result
                    A.write_manifest(st.staging, manifest)
                    if not result["passed"]:
                        raise ConvertError(validation_failure(result, sites))
                    steps.done()
                manifest["seconds"] = round(time.perf_counter() - started, 2)
                A.write_manifest(st.staging, manifest)
                _move_into_place(st, force)
        except BaseException:
            st.discard()
            raise
    return manifest


EXACT_DECISIONS = ("exact", "exact-sparse", "keep")  # the same function as the original


def validation_failure(result: dict, sites: list[dict]) -> str:
    """The error of a failed validation, with the way out: a larger budget (--max-error) when the policy
    changes the function at some site, else a report (exact sites stay within the dtype's tolerance)."""
    worst = ", ".join(f"{n} {d:.2e}" for n, d in result["failed"].items())
    text = (f"validation failed: the converted model deviates from the original beyond the budget "
            f"{result['budget']:.1e} on {result['samples']} sample(s): {worst}.")  # fmt: skip
    approximate = sorted({s["decision"] for s in sites if s["decision"] not in EXACT_DECISIONS})
    finite = [d for d in result["failed"].values() if math.isfinite(d) and d > 0]
    suggest = f" (e.g. --max-error {10 ** math.ceil(math.log10(max(finite))):.0e})" if finite else ""
    if approximate:
        return (f"{text} The policy changes the function ({', '.join(approximate)}): accept a larger deviation with "
                f"--max-error{suggest} (max_error= in Python, or in a policy file), or convert with an exact policy.")
    return (f"{text} The sites are exact, so this exceeds rounding: raise the budget with --max-error{suggest} if "
            "the output dtype is coarser than its default tolerance, else report it (rerun with --debug).")


def no_attention_warning(manifest: dict) -> str | None:
    """The warning for a model in which attnopt found no attention site (the artifact is the original model)."""
    if manifest["sites"]:
        return None
    return (f"no attention found in {manifest['model']['class']}: nothing was rewritten, and the output is the "
            "original model (attnopt inspect lists what was found, the softmaxes not taken included)")


# ------------------------------------------------------------------------------------------------------- bench


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], runs: int, warmup: int, device: torch.device) -> list[float]:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def bench(path: str | os.PathLike, runs: int = 10, warmup: int = 3, device: str | None = None,
          progress: bool = False) -> dict:  # fmt: skip
    """Times the original model against the converted forms in artifact ``path`` on the local device.

    Each row: median and min milliseconds over ``runs`` calls after ``warmup`` calls, speedup of the
    median over the original's, and the largest relative output deviation from the original.
    """
    if runs < 1 or warmup < 0:
        raise ConvertError("--runs must be >= 1 and --warmup >= 0")
    art = A.open_artifact(path)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args, kwargs = art.sample_inputs()
    to = lambda x: x.to(dev) if isinstance(x, torch.Tensor) else x  # noqa: E731
    d_args, d_kwargs = tuple(to(a) for a in args), {k: to(v) for k, v in kwargs.items()}
    original = art.build_model().to(dev)
    converted = A.load(path, check=False).to(dev)  # its own copy of the weights, captured at the first call
    rows = [("original (PyTorch)", str(dev), lambda: E.flatten_output(original(*d_args, **d_kwargs))),
            ("attnopt (attnopt.load)", str(dev), lambda: E.flatten_output(converted(*d_args, **d_kwargs)))]  # fmt: skip
    tensor_kwargs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    if art.file("pt2") is not None:
        program = torch.export.load(str(art.file("pt2"))).module()
        rows.append(("torch.export program (.pt2)", "cpu", lambda: tuple(program(*args, **tensor_kwargs))))
    if art.file("onnx") is not None:
        try:
            session = E.onnx_session(art.file("onnx"))
        except E.ExportError:
            session = None
        if session is not None:
            mode = art.manifest["exports"]["onnx"].get("attention", "standard")
            rows.append((f"onnxruntime ({mode} attention)", "cpu", lambda: E.run_onnx(session, args, kwargs)))
    steps = Steps(len(rows), progress)
    results = []
    with steps, torch.no_grad():
        want = None
        for name, where, fn in rows:
            steps.step(f"bench {name}")
            times = _time(fn, runs, warmup, torch.device(where))
            out = tuple(t.cpu() for t in fn())
            want = out if want is None else want
            results.append({"name": name, "device": where, "median_ms": statistics.median(times), "min_ms": min(times),
                            "deviation": _max_dev(out, want)})  # fmt: skip
            steps.done()
    base = results[0]["median_ms"]
    for r in results:
        r["speedup"] = base / r["median_ms"] if r["median_ms"] > 0 else float("nan")
    return {"artifact": str(art.path), "model": art.manifest["model"]["class"], "runs": runs, "warmup": warmup,
            "inputs": [str(I.InputSpec(s["name"], tuple(s["shape"]), s["dtype"])) for s in art.manifest["inputs"]["specs"]],
            "rows": results}  # fmt: skip


__all__ = ["ConvertError", "FORMATS", "Source", "bench", "convert", "load_source", "parse_policy", "validate_dir"]
