"""Converted artifacts: the manifest (``attnopt.json``), fingerprints, and :func:`load`.

An artifact directory (written by ``attnopt convert``, see :mod:`attnopt.convert`) holds::

    attnopt.json                 the manifest (below)
    config.json                  Hugging Face sources: the model config (plus generation_config.json if any)
    model.safetensors            the weights (safetensors only: loading an artifact never unpickles)
    sample_inputs.safetensors    the example inputs the conversion was decided and validated on
    model.pt2                    with --format pt2: a torch.export program (attnopt ops kept as custom ops)
    model.onnx                   with --format onnx: ONNX (exact sites as the standard Attention operator)

Both exports take dynamic batch and sequence dims unless converted with ``--no-dynamic``; the manifest's
``exports`` entries list per input the ``dynamic`` dims, the ``outputs`` names and ``shape_notes`` (why a
dim stayed static).

The manifest records the format version, the attnopt/torch/triton/transformers versions, the source and
its fingerprint, the policy (its dict form), every site's decision, variant, kernel spec and measured
deviation, the inputs, the exports and the validation results.

Fingerprints are sha256 digests over a list of files: for each file, sorted by its path relative to the
directory, the path, its size in bytes and its contents. The *source* fingerprint covers the source's
config.json and weight files (for ``file.py:factory`` sources: the factory file and ``--weights``); the
*artifact* fingerprint covers the artifact's config.json (Hugging Face sources) and model.safetensors,
and :func:`load` recomputes it and refuses an artifact whose files no longer match their manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from attnopt import inputs
from attnopt.api import AttnoptError, optimize
from attnopt import policy as policy_module
from attnopt.policy import Policy
from attnopt.targets import TargetError, from_factory, quiet_transformers
from attnopt.version import __version__

FORMAT = "attnopt-artifact"
FORMAT_VERSION = 1
MANIFEST = "attnopt.json"
WEIGHTS = "model.safetensors"
INPUTS = "sample_inputs.safetensors"
PT2 = "model.pt2"
ONNX = "model.onnx"
_CHUNK = 1 << 20


class ArtifactError(AttnoptError):
    """An artifact directory that cannot be loaded: missing, corrupt, from a newer format, or tampered with."""


# ----------------------------------------------------------------------------------------------- fingerprints


def fingerprint(root: Path, files: list[str]) -> dict:
    """sha256 over ``files`` (paths relative to ``root``): per file, sorted by path, its path, size and bytes."""
    h = hashlib.sha256()
    for name in sorted(files):
        path = Path(root) / name
        h.update(name.encode() + b"\0" + str(path.stat().st_size).encode() + b"\0")
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return {"algorithm": "sha256", "files": sorted(files), "digest": h.hexdigest()}


def versions() -> dict:
    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    return {"attnopt": __version__, "torch": torch.__version__, "triton": dist("triton"),
            "transformers": dist("transformers"), "onnx": dist("onnx"), "onnxruntime": dist("onnxruntime")}  # fmt: skip


# ------------------------------------------------------------------------------------------ policy dict form
# The dict forms are attnopt.policy's (Policy.to_dict, variant_to_dict): a variant records its name under
# "variant" and its fields (a sparse variant its mask descriptor), so any variant class that has a dict
# form round-trips through a manifest.


def _jsonable(x: Any) -> Any:
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    if isinstance(x, (list, tuple)):
        return [_jsonable(i) for i in x]
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if dataclasses.is_dataclass(x):
        return {"type": type(x).__name__, **_jsonable(dataclasses.asdict(x))}
    return repr(x)


def variant_to_dict(v: Any) -> dict:
    """``{"variant": "exact"}``; variants with fields (sparse masks, linear feature maps) record them too."""
    return policy_module.variant_to_dict(v)


def variant_from_dict(d: dict) -> Any:
    if isinstance(d, dict) and d.get("variant") == "exact-sparse":
        # Sparse("auto") writes its display name "exact-sparse"; the dict form's name is "sparse"
        d = {**d, "variant": "sparse"}
    try:
        return policy_module.variant_from_dict(d, "manifest variant")
    except NotImplementedError as exc:
        raise ArtifactError(f"the manifest uses variant {d.get('variant')!r}, which this attnopt cannot run: {exc}") from exc
    except (TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest's variant {d!r} is not one this attnopt knows ({exc}); upgrade attnopt") from exc


def policy_to_dict(p: Policy) -> dict:
    return p.to_dict()


def escape_glob(name: str) -> str:
    """``name`` as an fnmatch glob that matches only itself (``*``, ``?``, ``[``, ``]`` bracketed)."""
    return "".join(f"[{c}]" if c in "*?[]" else c for c in name)


def decisions_policy(sites: list[dict]) -> Policy:
    """The policy reapplying recorded decisions: default ``keep``, each rewritten site by its exact name."""
    overrides = []
    for s in sites:
        if s["decision"] == "keep":
            continue
        variant = variant_from_dict(s.get("variant") or {"variant": s["decision"]})
        overrides.append((escape_glob(s["name"]), variant))
    return Policy(default="keep", overrides=tuple(overrides))


# --------------------------------------------------------------------------------------------------- manifest


def read_manifest(path: Path) -> dict:
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path} does not exist or is not a directory (an attnopt artifact is a directory)")
    file = path / MANIFEST
    if not file.is_file():
        raise ArtifactError(f"{path} is not an attnopt artifact: it has no {MANIFEST} (write one with attnopt convert)")
    try:
        manifest = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{file} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{file} is not an attnopt manifest (no \"format\": \"{FORMAT}\")")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version < 1:
        raise ArtifactError(f"{file} has an invalid format_version {version!r}")
    if version > FORMAT_VERSION:
        raise ArtifactError(
            f"{path} was written by a newer attnopt (artifact format {version}; this attnopt "
            f"{manifest.get('versions', {}).get('attnopt', '?')} wrote it, and this one reads formats up to "
            f"{FORMAT_VERSION}): upgrade attnopt to load it"
        )
    return manifest


def write_manifest(path: Path, manifest: dict) -> None:
    tmp = Path(path) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(_jsonable(manifest), indent=2) + "\n")
    os.replace(tmp, Path(path) / MANIFEST)


def verify_fingerprint(path: Path, manifest: dict) -> None:
    recorded = manifest.get("fingerprint") or {}
    files = recorded.get("files")
    if not files or recorded.get("algorithm") != "sha256":
        raise ArtifactError(f"{path / MANIFEST} records no sha256 fingerprint of the artifact's files")
    missing = [f for f in files if not (Path(path) / f).is_file()]
    if missing:
        raise ArtifactError(f"{path} is incomplete: {missing} listed in its fingerprint are missing")
    actual = fingerprint(path, files)["digest"]
    if actual != recorded.get("digest"):
        raise ArtifactError(
            f"fingerprint mismatch in {path}: the sha256 of {files} is {actual[:16]}..., the manifest records "
            f"{str(recorded.get('digest'))[:16]}...; the weights or config were changed after conversion. "
            "Convert again from the source."
        )


# --------------------------------------------------------------------------------------------------- artifact


@dataclass
class Artifact:
    """An artifact directory whose manifest was read (and fingerprint checked)."""

    path: Path
    manifest: dict

    @property
    def sites(self) -> list[dict]:
        return self.manifest.get("sites", [])

    @property
    def decisions(self) -> dict[str, str]:
        return {s["name"]: s["decision"] for s in self.sites}

    def policy(self) -> Policy:
        """The policy that reapplies the recorded decisions (no recalibration)."""
        return decisions_policy(self.sites)

    def sample_inputs(self) -> tuple[tuple, dict]:
        entry = self.manifest.get("inputs") or {}
        file = self.path / entry.get("file", INPUTS)
        if not file.is_file():
            raise ArtifactError(f"{self.path} has no sample inputs ({file.name} is missing)")
        return inputs.load(file, entry.get("constants"), [s["name"] for s in entry.get("specs", [])])

    def config(self) -> Any:
        if self.manifest["model"]["source"] != "hf":
            return None
        import transformers

        return transformers.AutoConfig.from_pretrained(str(self.path), local_files_only=True)

    def build_model(self) -> torch.nn.Module:
        """The converted model's weights in its original class, without attnopt (eval mode)."""
        info = self.manifest["model"]
        if info["source"] == "hf":
            model = _build_hf(self.path, info)
        elif info["source"] == "factory":
            model = _build_factory(self.path, self.manifest)
        else:
            raise ArtifactError(f"unknown model source {info['source']!r} in {self.path / MANIFEST}")
        return model.eval()

    def file(self, name: str) -> Path | None:
        entry = (self.manifest.get("exports") or {}).get(name)
        return self.path / entry["file"] if entry else None


def _build_hf(path: Path, info: dict) -> torch.nn.Module:
    try:
        import transformers
    except ImportError as exc:
        raise ArtifactError("this artifact is a Hugging Face model: loading it needs transformers "
                            "(pip install 'attnopt[hf]')") from exc  # fmt: skip
    cls = getattr(transformers, info["class"], None)
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ArtifactError(f"transformers {transformers.__version__} has no model class {info['class']!r}")
    kw = {"attn_implementation": info["attn_implementation"]} if info.get("attn_implementation") else {}
    if info.get("attn_implementation") == "attnopt":
        import attnopt.hf  # noqa: F401  (registers the implementation)

    try:
        with quiet_transformers():
            return cls.from_pretrained(str(path), local_files_only=True, weights_only=True, **kw)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ArtifactError(f"could not load {info['class']} from {path}: {exc}") from exc


def _build_factory(path: Path, manifest: dict) -> torch.nn.Module:
    spec = manifest["source"].get("factory")
    try:
        model = from_factory(spec).model
    except TargetError as exc:
        raise ArtifactError(f"{path} was converted from {spec}, which cannot be rebuilt now ({exc}); "
                            "pass the model: attnopt.load(path, model=...)") from exc  # fmt: skip
    _load_weights_into(model, path / WEIGHTS)
    return model


def _load_weights_into(model: torch.nn.Module, file: Path) -> None:
    from safetensors.torch import load_model

    try:
        missing, unexpected = load_model(model, str(file), strict=False)
    except RuntimeError as exc:
        raise ArtifactError(f"the weights in {file} do not fit {type(model).__name__}: {exc}") from exc
    if missing or unexpected:
        raise ArtifactError(f"the weights in {file} do not fit {type(model).__name__}: missing {sorted(missing)}, "
                            f"unexpected {sorted(unexpected)}")  # fmt: skip


def open_artifact(path: str | os.PathLike, verify: bool = True) -> Artifact:
    """Reads ``path``'s manifest (refusing newer formats) and, with ``verify``, checks the fingerprint."""
    path = Path(os.path.expanduser(str(path)))
    manifest = read_manifest(path)
    if verify:
        verify_fingerprint(path, manifest)
    return Artifact(path, manifest)


def load(path: str | os.PathLike, model: torch.nn.Module | None = None, check: bool = True):
    """The optimized module stored in artifact directory ``path``, reapplying the recorded decisions.

    The manifest's per-site decisions become ``Policy(default="keep", overrides={site: variant})`` and the
    model (rebuilt from the artifact: Hugging Face sources with ``from_pretrained`` on the directory,
    ``file.py:factory`` sources by calling the recorded factory; or ``model``, a module whose
    ``state_dict`` keys are the artifact's, with the weights loaded into it) is passed to
    :func:`attnopt.optimize` with it: nothing is recalibrated. With ``check`` (default), the module is
    captured on the stored sample inputs now and every recorded site must be found and decided as recorded
    (else :class:`ArtifactError`); without it, capture happens at the first call.

    Refuses (``ArtifactError``) a directory without a manifest, a manifest from a newer format, and files
    whose fingerprint no longer matches the manifest.
    """
    art = open_artifact(path)
    if model is None:
        model = art.build_model()
    else:
        _load_weights_into(model, art.path / WEIGHTS)
        model.eval()
    policy = art.policy()
    if not check:
        optimized = optimize(model, policy)
    else:
        args, kwargs = art.sample_inputs()
        try:
            optimized = optimize(model, policy, args, kwargs)
        except ValueError as exc:  # a recorded site glob that matches no site
            raise ArtifactError(f"{art.path}: the recorded attention sites are not all in the model: {exc}") from exc
        got = {s.name: s.decision for s in optimized.attnopt_report.sites}
        wrong = {n: (d, got.get(n)) for n, d in art.decisions.items() if got.get(n) != d}
        if wrong:
            raise ArtifactError(
                f"{art.path}: reapplying the recorded decisions gave different ones "
                f"{ {n: f'recorded {a}, now {b}' for n, (a, b) in wrong.items()} }"
            )
    object.__setattr__(optimized, "attnopt_artifact", art)
    return optimized


__all__ = ["Artifact", "ArtifactError", "FORMAT_VERSION", "fingerprint", "load", "open_artifact"]
