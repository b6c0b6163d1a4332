"""Where ``attnopt convert`` reads a model from: a Hugging Face directory or ``path/to/file.py:factory`` with
optional ``--weights``, checked against the model's shapes before loading. Pickled checkpoints are read with
``torch.load(weights_only=True)`` only: attnopt never unpickles arbitrary objects."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from attnopt import artifact as A
from attnopt import inputs as I
from attnopt.api import AttnoptError
from attnopt.targets import TargetError, build_from_config, from_factory, hf_model_class, quiet_transformers

_HF_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")


class ConvertError(AttnoptError):
    """A conversion that cannot proceed; the message says why and what to do."""



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


