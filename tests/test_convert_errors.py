"""attnopt convert refuses bad input with a clear message, a non-zero exit, and nothing left behind."""

import errno
import json
import os
import pickle

import pytest
import torch
from click.testing import CliRunner

from attnopt import zoo
from attnopt.cli import main


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    zoo.build("llama", "sdpa").model.save_pretrained(path)
    return path


def _copy(src, dst, skip=()):
    dst.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dst / f.name).write_bytes(f.read_bytes())
    return dst


def _run_and_check_clean(work, args, *fragments):
    """Runs ``attnopt convert``; it must fail with every fragment in its message and leave ``work`` unchanged."""
    before = sorted(os.listdir(work))
    res = CliRunner().invoke(main, ["convert", *map(str, args), "-q"])
    assert res.exit_code != 0, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)  # no traceback
    for fragment in fragments:
        assert fragment in res.output, res.output
    assert sorted(os.listdir(work)) == before  # no OUT, no staging directory
    return res


def test_corrupt_safetensors(tmp_path, llama_dir):
    src = _copy(llama_dir, tmp_path / "src")
    data = (src / "model.safetensors").read_bytes()
    (src / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"],
                         "model.safetensors is not a valid safetensors file (corrupt or truncated)")  # fmt: skip
    (src / "model.safetensors").write_bytes(b"\x00garbage" * 64)
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"], "not a valid safetensors")


class Payload:
    """Unpickling this would create a marker file (what a malicious checkpoint does with os.system)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path, llama_dir):
    marker = tmp_path / "pwned"
    src = _copy(llama_dir, tmp_path / "src", skip=("model.safetensors",))
    state = zoo.build("llama", "sdpa").model.state_dict()
    torch.save({**state, "evil": Payload(marker)}, src / "pytorch_model.bin")  # a state dict with a payload
    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"weight": Payload(marker)}, f)  # a bare pickle: refused too, and never run
    assert not marker.exists()
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"],
                         "refusing to load", "weights_only=True", "never unpickling")  # fmt: skip
    assert not marker.exists()

    factory = tmp_path / "m.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 4), (torch.randn(1, 4),)\n")
    _run_and_check_clean(tmp_path, [f"{factory}:make", "--weights", tmp_path / "evil.pt", "--policy", "exact",
                                    "--out", tmp_path / "out"], "evil.pt")  # fmt: skip
    assert not marker.exists()


def test_missing_config(tmp_path, llama_dir):
    src = _copy(llama_dir, tmp_path / "src", skip=("config.json",))
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"], "has no config.json")


def test_missing_weights(tmp_path, llama_dir):
    src = _copy(llama_dir, tmp_path / "src", skip=("model.safetensors",))
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"], "has no weights")


def test_shape_mismatch_between_weights_and_config(tmp_path, llama_dir):
    src = _copy(llama_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config["intermediate_size"] = 96  # the checkpoint's MLP weights are 128 wide
    (src / "config.json").write_text(json.dumps(config))
    _run_and_check_clean(tmp_path, [src, "--policy", "exact", "--out", tmp_path / "out"],
                         "the weights do not match", "mlp", "checkpoint [128, 64], model expects [96, 64]")  # fmt: skip


def test_shape_mismatch_factory_weights(tmp_path):
    from safetensors.torch import save_file

    factory = tmp_path / "m.py"
    factory.write_text("import torch\ndef make():\n    return torch.nn.Linear(4, 4), (torch.randn(1, 4),)\n")
    save_file(torch.nn.Linear(4, 8).state_dict(), str(tmp_path / "w.safetensors"))
    _run_and_check_clean(tmp_path, [f"{factory}:make", "--weights", tmp_path / "w.safetensors", "--policy", "exact",
                                    "--out", tmp_path / "out"], "weight: checkpoint [8, 4], model expects [4, 4]")  # fmt: skip


@pytest.mark.parametrize("policy, fragment", [("fastest", "unknown policy 'fastest'"),
                                              ("sliding_window:zero", "sliding_window"),
                                              ("nope.yaml", "nope.yaml")])  # fmt: skip
def test_unknown_policy(tmp_path, llama_dir, policy, fragment):
    _run_and_check_clean(tmp_path, [llama_dir, "--policy", policy, "--out", tmp_path / "out"], fragment)


def test_read_only_out(tmp_path, llama_dir, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        if os.access(parent, os.W_OK):  # root ignores permissions: make creating anything there fail as it would
            real_mkdir = os.mkdir

            def read_only_mkdir(path, *args, **kwargs):
                if os.path.dirname(os.path.abspath(path)) == str(parent):
                    raise PermissionError(errno.EACCES, "Permission denied", str(path))
                return real_mkdir(path, *args, **kwargs)

            monkeypatch.setattr(os, "mkdir", read_only_mkdir)
        _run_and_check_clean(parent, [llama_dir, "--policy", "exact", "--out", parent / "out"],
                             "cannot write the output", "Permission denied")  # fmt: skip
        _run_and_check_clean(parent, [llama_dir, "--policy", "exact", "--out", parent / "a" / "b"], "Permission denied")
    finally:
        parent.chmod(0o755)


def test_missing_source_and_bad_inputs(tmp_path, llama_dir):
    _run_and_check_clean(tmp_path, [tmp_path / "nope", "--policy", "exact", "--out", tmp_path / "out"], "does not exist")
    _run_and_check_clean(tmp_path, [llama_dir, "--policy", "exact", "--out", tmp_path / "out", "--inputs", "ids:1xZ"],
                         "bad input spec")  # fmt: skip
    _run_and_check_clean(tmp_path, [llama_dir, "--policy", "exact", "--out", tmp_path / "out", "--inputs",
                                    "input_ids:1x7:float32"], "do not fit LlamaModel")  # fmt: skip
    _run_and_check_clean(tmp_path, [llama_dir, "--policy", "exact", "--out", tmp_path / "out", "--weights", "w.pt"],
                         "--weights is for")  # fmt: skip
