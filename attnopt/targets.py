"""What the CLI points at: a local Hugging Face model directory, or ``path/to/file.py:factory``."""

from __future__ import annotations

import contextlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from attnopt.zoo import example_inputs

WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


class TargetError(ValueError):
    """A TARGET that does not exist or cannot be turned into a model."""


@dataclass
class Target:
    model: torch.nn.Module
    args: tuple
    kwargs: dict = field(default_factory=dict)
    description: str = ""
    config: object = None


def hf_model_class(config: object, choice: str | None = None) -> tuple[type, str]:
    """The transformers class ``attnopt inspect`` and ``attnopt convert`` build from ``config``, and why.

    ``choice``: None or ``"auto"`` (the class in config.json's ``architectures``, the one the checkpoint
    was saved from; ``AutoModel``'s base class when it names none), ``"base"`` (``AutoModel``: the model
    without its task head) or a transformers class name (``LlamaForCausalLM``)."""
    import transformers

    if choice in (None, "auto"):
        for name in getattr(config, "architectures", None) or []:
            cls = getattr(transformers, name, None)
            if isinstance(cls, type) and hasattr(cls, "from_pretrained"):
                return cls, "the class config.json's architectures names"
        return transformers.AutoModel, "config.json names no architecture"
    if choice == "base":
        return transformers.AutoModel, "--model-class base"
    cls = getattr(transformers, choice, None)
    if not (isinstance(cls, type) and hasattr(cls, "from_pretrained")):
        raise TargetError(f"--model-class {choice}: transformers has no model class of that name; use auto, base "
                          "or a class name such as LlamaForCausalLM")  # fmt: skip
    return cls, f"--model-class {choice}"


def build_from_config(cls: type, config: object, **kw: object) -> torch.nn.Module:
    """A randomly initialized ``cls`` (a transformers model class or ``AutoModel``) for ``config``."""
    import transformers

    return (cls.from_config if cls is transformers.AutoModel else cls._from_config)(config, **kw)


def _from_hf_dir(path: Path, attn_implementation: str | None, model_class: str | None = None) -> Target:
    if not (path / "config.json").is_file():
        raise TargetError(f"{path} is a directory but has no config.json: not a Hugging Face model directory")
    try:
        import transformers
    except ImportError as exc:
        raise TargetError("loading a Hugging Face directory needs transformers: pip install 'attnopt[hf]'") from exc
    kw = {"attn_implementation": attn_implementation} if attn_implementation else {}
    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        cls, why = hf_model_class(config, model_class)
        has_weights = any((path / f).is_file() for f in WEIGHT_FILES)
        if has_weights:
            model = cls.from_pretrained(str(path), local_files_only=True, **kw)
            how = "weights from the directory"
        else:
            model = build_from_config(cls, config, **kw)
            how = "random weights (no weights in the directory)"
    except (OSError, ValueError, KeyError) as exc:
        raise TargetError(f"could not build a model from {path}: {exc}") from exc
    model.eval()
    args, kwargs = example_inputs(config)
    return Target(model, args, kwargs, f"built {type(model).__name__} ({config.model_type}) from {path}, {how} ({why}; "
                  "--model-class to choose)", config)  # fmt: skip


@contextlib.contextmanager
def quiet_transformers():
    """transformers prints loading reports and progress bars; attnopt reports problems itself."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def from_factory(spec: str) -> Target:
    """The model and example inputs returned by the factory ``spec`` names (``path/to/file.py:name``)."""
    file, _, name = spec.rpartition(":")
    path = Path(file)
    if not path.is_file():
        raise TargetError(f"{file} does not exist (TARGET is a model directory or path/to/file.py:factory)")
    module_spec = importlib.util.spec_from_file_location(f"attnopt_target_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:
        raise TargetError(f"importing {file} raised {type(exc).__name__}: {exc}") from exc
    factory = getattr(module, name, None)
    if not callable(factory):
        raise TargetError(f"{file} has no callable {name!r}")
    made = factory()
    if not isinstance(made, tuple) or len(made) not in (2, 3) or not isinstance(made[0], torch.nn.Module):
        raise TargetError(f"{spec} must return (model, args) or (model, args, kwargs); got {type(made).__name__}")
    model, args = made[0], made[1]
    args = (args,) if isinstance(args, torch.Tensor) else tuple(args)
    kwargs = dict(made[2]) if len(made) == 3 else {}
    return Target(model, args, kwargs, f"{type(model).__name__} from {spec}")


def load_target(target: str, attn_implementation: str | None = None, model_class: str | None = None) -> Target:
    """The model and example inputs named by ``target`` (``model_class``: see :func:`hf_model_class`)."""
    path = Path(os.path.expanduser(target))
    if path.is_dir():
        return _from_hf_dir(path, attn_implementation, model_class)
    if ":" in target and target.rpartition(":")[0].endswith(".py"):
        return from_factory(target)
    if path.exists():
        raise TargetError(f"{target} is a file; TARGET is a Hugging Face model directory or path/to/file.py:factory")
    raise TargetError(f"{target} does not exist (TARGET is a Hugging Face model directory or path/to/file.py:factory)")
