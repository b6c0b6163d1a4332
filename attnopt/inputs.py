"""Example inputs for conversion, validation and benchmarks: shape specs, config-derived inputs, storage.

A shape spec names one input, its shape and its dtype::

    input_ids:1x512:int64            # keyword argument input_ids, shape [1, 512], int64
    pixel_values:2x3x224x224         # dtype defaults to float32
    0:4x16x64:float16                # an all-digit name is a positional argument (index 0)

Several specs are separated by commas or given as repeated ``--inputs`` options. Values are drawn
deterministically (seeded): floating inputs from N(0, 1); integer inputs named ``*mask*`` are ones,
``token_type_ids`` zeros, ``position_ids`` an arange along the last axis, other integer inputs uniform in
``[0, vocab_size)`` when a config with ``vocab_size`` is known (else ``[0, 2)``); boolean inputs are True.

Inputs are stored next to an artifact as safetensors (``arg.<i>`` and ``kwarg.<name>`` entries);
non-tensor keyword arguments (``use_cache=False``) are recorded in the manifest as constants.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from attnopt.zoo import example_inputs

DTYPES = {
    "float32": torch.float32, "float": torch.float32, "fp32": torch.float32, "float16": torch.float16,
    "half": torch.float16, "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float64": torch.float64, "double": torch.float64, "int64": torch.int64, "long": torch.int64,
    "int32": torch.int32, "int": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}  # fmt: skip
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$|^[0-9]+$")
_SCALARS = (bool, int, float, str, type(None))


class InputSpecError(ValueError):
    """A shape spec that cannot be parsed."""


@dataclass(frozen=True)
class InputSpec:
    name: str  # keyword name, or the decimal index of a positional argument
    shape: tuple[int, ...]
    dtype: str = "float32"

    @property
    def positional(self) -> bool:
        return self.name.isdigit()

    def to_dict(self) -> dict:
        return {**asdict(self), "shape": list(self.shape)}

    def __str__(self) -> str:
        return f"{self.name}:{'x'.join(map(str, self.shape))}:{self.dtype}"


def parse_spec(text: str) -> InputSpec:
    """One ``name:AxBxC[:dtype]`` spec."""
    parts = [p.strip() for p in text.strip().split(":")]
    if len(parts) not in (2, 3) or not all(parts):
        raise InputSpecError(f"bad input spec {text!r}: expected name:AxBxC[:dtype], e.g. input_ids:1x512:int64")
    name, dims = parts[0], parts[1]
    dtype = parts[2].lower() if len(parts) == 3 else "float32"
    if not _NAME.match(name):
        raise InputSpecError(f"bad input spec {text!r}: {name!r} is not an argument name or a positional index")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x"))
    except ValueError:
        raise InputSpecError(f"bad input spec {text!r}: shape {dims!r} must be sizes joined by 'x', e.g. 1x512") from None
    if any(d < 0 for d in shape):
        raise InputSpecError(f"bad input spec {text!r}: sizes must be >= 0")
    if dtype not in DTYPES:
        raise InputSpecError(f"bad input spec {text!r}: unknown dtype {dtype!r}; use one of {sorted(set(DTYPES))}")
    return InputSpec(name, shape, str(DTYPES[dtype]).replace("torch.", ""))


def parse_specs(texts: Any) -> list[InputSpec]:
    """Specs from one string (comma separated) or several; names must be unique."""
    if isinstance(texts, str):
        texts = [texts]
    specs = [parse_spec(t) for text in texts for t in text.split(",") if t.strip()]
    names = [s.name for s in specs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputSpecError(f"input(s) {dup} given more than once")
    positions = sorted(int(s.name) for s in specs if s.positional)
    if positions != list(range(len(positions))):
        raise InputSpecError(f"positional inputs must be numbered 0, 1, ... without gaps; got {positions}")
    return specs


def _draw(spec: InputSpec, gen: torch.Generator, vocab: int | None) -> torch.Tensor:
    dtype = getattr(torch, spec.dtype)
    if dtype.is_floating_point:
        return torch.randn(spec.shape, generator=gen).to(dtype)
    if dtype == torch.bool:
        return torch.ones(spec.shape, dtype=torch.bool)
    name = spec.name.lower()
    if "mask" in name:
        return torch.ones(spec.shape, dtype=dtype)
    if name == "token_type_ids":
        return torch.zeros(spec.shape, dtype=dtype)
    if name == "position_ids" and spec.shape:
        return torch.arange(spec.shape[-1], dtype=dtype).expand(spec.shape).contiguous()
    high = vocab if vocab else 2
    return torch.randint(0, high, spec.shape, generator=gen, dtype=torch.int64).to(dtype)


def make_inputs(specs: list[InputSpec], config: Any = None, seed: int = 0) -> tuple[tuple, dict]:
    """``(args, kwargs)`` drawn for ``specs`` (deterministic for a seed)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", None) if config is not None else None
    values = {s.name: _draw(s, gen, vocab) for s in specs}
    args = tuple(values[str(i)] for i in range(sum(s.positional for s in specs)))
    kwargs = {s.name: values[s.name] for s in specs if not s.positional}
    return args, kwargs


def from_config(config: Any, seed: int = 0) -> tuple[tuple, dict]:
    """Inputs derived from a Hugging Face config (:func:`attnopt.zoo.example_inputs`), with ``use_cache=False``
    for models that have a cache (an artifact computes outputs, it does not return caches)."""
    args, kwargs = example_inputs(config, generator=torch.Generator().manual_seed(seed))
    if getattr(config, "use_cache", None) is not None:
        kwargs["use_cache"] = False
    return args, kwargs


def specs_of(args: tuple, kwargs: dict) -> list[InputSpec]:
    """The specs of concrete tensor inputs (non-tensor keyword arguments are constants, not specs)."""
    specs = [InputSpec(str(i), tuple(a.shape), str(a.dtype).replace("torch.", "")) for i, a in enumerate(args)
             if isinstance(a, torch.Tensor)]  # fmt: skip
    specs += [InputSpec(k, tuple(v.shape), str(v.dtype).replace("torch.", "")) for k, v in kwargs.items()
              if isinstance(v, torch.Tensor)]  # fmt: skip
    return specs


def split_constants(args: tuple, kwargs: dict) -> tuple[tuple, dict, dict]:
    """``(args, tensor kwargs, constant kwargs)``; positional arguments must all be tensors."""
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise InputSpecError(f"positional example input {i} is a {type(a).__name__}; only tensors can be stored")
    tensors = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
    constants = {k: v for k, v in kwargs.items() if not isinstance(v, torch.Tensor)}
    bad = {k: type(v).__name__ for k, v in constants.items() if not isinstance(v, _SCALARS)}
    if bad:
        raise InputSpecError(f"keyword example inputs {bad} are neither tensors nor plain constants; pass --inputs")
    return args, tensors, constants


def save(path: Path, args: tuple, kwargs: dict) -> dict:
    """Writes the tensor inputs to ``path`` (safetensors); returns the manifest entry (specs, constants)."""
    from safetensors.torch import save_file

    args, tensors, constants = split_constants(args, kwargs)
    entries = {f"arg.{i}": a.detach().cpu().contiguous() for i, a in enumerate(args)}
    entries.update({f"kwarg.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()})
    save_file(entries, str(path))
    return {"file": path.name, "specs": [s.to_dict() for s in specs_of(args, tensors)], "constants": constants}


def load(path: Path, constants: dict | None = None, order: list[str] | None = None) -> tuple[tuple, dict]:
    """The ``(args, kwargs)`` stored by :func:`save`, keyword arguments in ``order`` (the recorded specs'
    names; safetensors itself sorts names), constants added back."""
    from safetensors.torch import load_file

    entries = load_file(str(path))
    n = sum(1 for k in entries if k.startswith("arg."))
    args = tuple(entries[f"arg.{i}"] for i in range(n))
    names = [k[len("kwarg."):] for k in entries if k.startswith("kwarg.")]
    rank = {name: i for i, name in enumerate(order or [])}
    names.sort(key=lambda name: rank.get(name, len(rank)))
    kwargs = {name: entries[f"kwarg.{name}"] for name in names}
    kwargs.update(constants or {})
    return args, kwargs


def resample(args: tuple, kwargs: dict, seed: int, config: Any = None) -> tuple[tuple, dict]:
    """Fresh inputs with the same specs as ``(args, kwargs)`` (constants kept), drawn with ``seed``.

    Masks and other structured integer inputs keep their stored values (their pattern is meaningful);
    floating inputs and token ids are redrawn.
    """
    gen = torch.Generator().manual_seed(seed)
    vocab = getattr(config, "vocab_size", None) if config is not None else None

    def fresh(name: str, t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return t
        if t.is_floating_point():
            return torch.randn(t.shape, generator=gen).to(t.dtype)
        lname = name.lower()
        if t.dtype == torch.bool or "mask" in lname or lname in ("token_type_ids", "position_ids"):
            return t.clone()
        high = vocab or int(t.max()) + 1 if t.numel() else 2
        return torch.randint(0, max(int(high), 1), t.shape, generator=gen, dtype=torch.int64).to(t.dtype)

    return tuple(fresh(str(i), a) for i, a in enumerate(args)), {k: fresh(k, v) for k, v in kwargs.items()}
