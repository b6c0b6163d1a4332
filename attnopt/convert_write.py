"""What ``attnopt convert`` writes, and where: the staging directory renamed into place at the end (removed, with
any parent directories it created, on failure), the weights, the manifest and the exports, and the progress bar
over these steps."""

from __future__ import annotations

import contextlib
import datetime
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from attnopt import artifact as A
from attnopt import export as E
from attnopt import inputs as I
from attnopt.codegen.spec import default_spec
from attnopt.convert_source import ConvertError, Source
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT
from attnopt.policy import Policy
from attnopt.targets import quiet_transformers


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



@dataclass
class Staging:
    out: Path
    staging: Path
    created: list[Path]  # parent directories this conversion created (removed on failure)

    def discard(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
        for d in reversed(self.created):
            with contextlib.suppress(OSError):
                d.rmdir()


def check_out(out: Path, src: str, force: bool) -> None:
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


def make_staging(out: Path) -> Staging:
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
    return Staging(out, staging, created)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def move_into_place(st: Staging, force: bool) -> None:
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


def site_entries(report: Any) -> list[dict]:
    """Per site: the report's facts, the variant it runs (the one the optimized module's policy gave it: for an
    auto policy, the calibrated one; ``keep`` where it was kept) and the kernel spec."""
    out = []
    for s in report.sites:
        entry = s.to_dict()
        entry["variant"] = A.variant_to_dict(s.variant)
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




def no_attention_warning(manifest: dict) -> str | None:
    """The warning for a model in which attnopt found no attention site (the artifact is the original model)."""
    if manifest["sites"]:
        return None
    return (f"no attention found in {manifest['model']['class']}: nothing was rewritten, and the output is the "
            "original model (attnopt inspect lists what was found, the softmaxes not taken included)")


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


def write_weights(source: Source, staging: Path, args: tuple, kwargs: dict) -> tuple[list[str], dict]:
    """The model's weights (and, for a Hugging Face model, its config) and the sample inputs into ``staging``;
    the weight files written and the inputs' manifest entry."""
    with quiet_transformers():
        if source.kind == "hf":
            source.model.save_pretrained(str(staging), safe_serialization=True)
        else:
            from safetensors.torch import save_model

            save_model(source.model, str(staging / A.WEIGHTS))
    written = sorted(p.name for p in staging.iterdir() if p.name.startswith("model") or p.name == "config.json")
    return written, I.save(staging / A.INPUTS, args, kwargs)


def build_manifest(source: Source, staging: Path, written: list[str], inputs_entry: dict, report: Any,
                   sites: list[dict], policy: Policy, calibrated: Policy | None) -> dict:  # fmt: skip
    """The manifest of a conversion before its exports and validation (:mod:`attnopt.artifact`)."""
    manifest = {
        "format": A.FORMAT,
        "format_version": A.FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": A.versions(),
        "device": str(next(iter(source.model.parameters()), torch.empty(0)).device),
        "source": source.info,
        "fingerprint": A.fingerprint(staging, written),
        "model": _model_info(source),
        "policy": A.policy_to_dict(policy),
        "calibrated_policy": A.policy_to_dict(calibrated) if calibrated is not None else None,
        "inputs": inputs_entry,
        "sites": sites,
        "misses": [asdict(m) for m in report.misses],
        "output_deviation": report.output_deviation,
        "timing": report.timing,  # the report's measured forward times (attnopt bench shows them beside its own)
        "notes": source.notes + list(report.notes),
        "exports": {},
        "validation": None,
    }
    warning = no_attention_warning(manifest)
    if warning:
        manifest["notes"].append(warning)
    return manifest


def write_exports(staging: Path, manifest: dict, source: Source, args: tuple, kwargs: dict, formats: tuple,
                  dynamic: bool, onnx_attention: str, steps: Steps) -> None:  # fmt: skip
    """Each of ``formats`` exported into ``staging`` (one step each) from a single ``torch.export`` program, and
    recorded in the manifest's ``exports``."""
    sites = manifest["sites"]
    exported = None
    export_args = (source.model, A.decisions_policy(sites), args, kwargs)
    decisions = {s["name"]: s["decision"] for s in sites}
    for fmt in formats:
        steps.step(f"export {fmt}")
        if exported is None:
            exported = E.export_program(*export_args, expect=decisions, dynamic=dynamic)
        if fmt == "pt2":
            torch.export.save(exported.program, str(staging / A.PT2))
            manifest["exports"]["pt2"] = {"file": A.PT2, "attnopt_ops": E.count_attnopt_ops(exported.program),
                                          "load": "import attnopt; torch.export.load(path).module()",
                                          **exported.entry()}  # fmt: skip
        else:
            entry = _export_onnx(exported, export_args, decisions, staging / A.ONNX, onnx_attention)
            manifest["exports"]["onnx"] = {"file": A.ONNX, **entry}
        A.write_manifest(staging, manifest)
        steps.done()
