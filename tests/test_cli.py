"""The attnopt command line: inspect on a Hugging Face directory and on file.py:factory."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from attnopt import zoo
from attnopt.cli import main


def test_help_lists_commands():
    res = CliRunner().invoke(main, ["--help"])
    assert res.exit_code == 0 and "inspect" in res.output


def test_inspect_hf_directory_random_init(tmp_path):
    zoo.config("llama").save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--attn", "eager"])
    assert res.exit_code == 0, res.output
    assert "random weights" in res.output
    assert "layers.0.self_attn" in res.output and "layers.1.self_attn" in res.output


def test_inspect_hf_directory_with_weights_json(tmp_path):
    zoo.build("bert", "sdpa").model.save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    assert [s["decision"] for s in report["sites"]] == ["exact", "exact"]


def test_inspect_factory(tmp_path):
    src = tmp_path / "mymodel.py"
    src.write_text(textwrap.dedent("""
        import torch
        def make():
            m = torch.nn.MultiheadAttention(16, 2, batch_first=True).eval()
            class Wrap(torch.nn.Module):
                def __init__(self):
                    super().__init__()
                    self.attn = m
                def forward(self, x):
                    return self.attn(x, x, x, need_weights=False)[0]
            return Wrap(), (torch.randn(2, 5, 16),)
    """))
    res = CliRunner().invoke(main, ["inspect", f"{src}:make"])
    assert res.exit_code == 0, res.output
    assert "attn" in res.output and "exact" in res.output


def test_missing_target_fails_clearly(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "nope")])
    assert res.exit_code != 0 and "does not exist" in res.output


def test_directory_without_config(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code != 0 and "no config.json" in res.output


def test_factory_missing_callable(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("x = 1\n")
    res = CliRunner().invoke(main, ["inspect", f"{src}:make"])
    assert res.exit_code != 0 and "no callable 'make'" in res.output


def test_console_script_installed():
    script = Path(sys.executable).parent / "attnopt"  # the venv's bin/, whether or not it is activated
    out = subprocess.run([str(script), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "inspect" in out.stdout


def test_backend_entry_point_without_importing_attnopt():
    code = (
        "import sys, torch\n"
        "f = torch.compile(lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v), backend='attnopt')\n"
        "q = torch.randn(1, 2, 5, 8)\n"
        "torch.testing.assert_close(f(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q))\n"
        "assert 'attnopt' in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------ failures: one paragraph, exit 1 / 130, --debug

def _refused_pickle_dir(tmp_path):
    import argparse

    import torch

    z = zoo.build("llama", "eager")
    z.model.config.save_pretrained(tmp_path)
    state = dict(z.model.state_dict(), extra=argparse.Namespace(a=1))  # not an allowed global for weights_only
    torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


def _assert_one_paragraph_error(res):
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    lines = [line for line in res.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output


def test_inspect_refused_pickle_is_one_paragraph_naming_the_fix(tmp_path):
    res = CliRunner().invoke(main, ["inspect", str(_refused_pickle_dir(tmp_path))])
    _assert_one_paragraph_error(res)
    assert "argparse.Namespace" in res.output and "safetensors" in res.output
    assert "weights_only=False" not in res.output  # never advise loading arbitrary pickles


def test_debug_shows_the_original_exception(tmp_path):
    import pickle

    res = CliRunner().invoke(main, ["--debug", "inspect", str(_refused_pickle_dir(tmp_path))])
    assert res.exit_code == 1 and isinstance(res.exception, pickle.UnpicklingError)


def test_unexpected_error_in_any_command_is_caught_centrally(monkeypatch, tmp_path):
    import attnopt.convert

    def boom(*args, **kwargs):
        raise RuntimeError("something broke\n\nlong details that belong to --debug")

    monkeypatch.setattr(attnopt.convert, "bench", boom)
    res = CliRunner().invoke(main, ["bench", str(tmp_path)])
    _assert_one_paragraph_error(res)
    assert "something broke" in res.output and "long details" not in res.output and "--debug" in res.output


def test_ctrl_c_exits_130_without_traceback(monkeypatch, tmp_path):
    import attnopt.cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(attnopt.cli, "load_target", interrupted)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path)])
    assert res.exit_code == 130 and "Traceback" not in res.output and "interrupted" in res.output


def test_kernels_show_bad_spec_is_a_clean_error():
    res = CliRunner().invoke(main, ["kernels", "show", "--head-dim", "999"])
    _assert_one_paragraph_error(res)
    assert "head_dim" in res.output


def test_inspect_report_fits_the_terminal_width(tmp_path):
    zoo.config("llama").save_pretrained(tmp_path)
    res = CliRunner(env={"COLUMNS": "80"}).invoke(main, ["inspect", str(tmp_path), "--attn", "eager", "--policy",
                                                         "linear"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert max(len(line) for line in res.output.splitlines()) <= 80 and "self_attn" in res.output


# ------------------------------------------------------------------ policy spelling

ATTENTION_FACTORY = """
import torch

class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = self.qkv(x).view(b, s, 3, 4, 8).permute(2, 0, 3, 1, 4)
        return torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1) @ v

class Mlp(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(32, 32)

    def forward(self, x):
        return torch.relu(self.fc(x))

def block():
    torch.manual_seed(0)
    return Block().eval(), (torch.randn(2, 7, 32),)

def mlp():
    return Mlp().eval(), (torch.randn(2, 7, 32),)
"""


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_help_lists_every_policy_form(command):
    res = CliRunner().invoke(main, [command, "--help"])
    assert res.exit_code == 0 and "arrive with issues" not in res.output
    for form in ("exact", "keep", "sparse:causal", "sparse:blocked:B", "sliding_window:W", "sliding_window:L,R",
                 "linear:relu,causal=true", "decay=", "normalize=", "sigmoid:bias=B", "auto:E", ".yaml"):
        assert form in res.output, form
    assert max(len(line) for line in res.output.splitlines()) <= 80


def test_readme_lists_every_policy_form():
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for form in ("sparse:causal", "sliding_window:W", "linear:relu,causal=true", "sigmoid:bias=", "auto:1e-2"):
        assert form in readme, form


def test_inspect_bare_linear_rewrites_a_llamas_masked_sites(tmp_path):
    zoo.config("llama").save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(tmp_path), "--attn", "eager", "--policy", "linear", "--json"])
    assert res.exit_code == 0, res.output
    sites = json.loads(res.stdout)["sites"]
    assert len(sites) == 2 and all(s["decision"] == "linear" and ", causal," in s["reason"] for s in sites), sites


def test_convert_model_without_attention_warns(tmp_path):
    (tmp_path / "m.py").write_text(ATTENTION_FACTORY)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["convert", f"{tmp_path / 'm.py'}:mlp", "--policy", "exact", "--out", str(out),
                                    "-q"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert "warning: no attention found in Mlp" in res.stderr and "original model" in res.stderr
    assert any("no attention found" in n for n in json.loads((out / "attnopt.json").read_text())["notes"])


def test_failed_validation_of_an_approximate_policy_points_at_max_error(tmp_path):
    (tmp_path / "m.py").write_text(ATTENTION_FACTORY)
    res = CliRunner().invoke(main, ["convert", f"{tmp_path / 'm.py'}:block", "--policy", "sigmoid", "--out",
                                    str(tmp_path / "out"), "--validate", "--samples", "1", "-q"])  # fmt: skip
    assert res.exit_code == 1 and "validation failed" in res.output, res.output
    assert "changes the function (sigmoid)" in res.output and "--max-error" in res.output


def test_convert_refused_pickle_names_the_class_without_torchs_unsafe_advice(tmp_path):
    src = _refused_pickle_dir(tmp_path / "src")
    res = CliRunner().invoke(main, ["convert", str(src), "--policy", "exact", "--out", str(tmp_path / "out"), "-q"])
    _assert_one_paragraph_error(res)
    assert "argparse.Namespace" in res.output and "safetensors" in res.output
    assert "can still be loaded" not in res.output and "weights_only=False" not in res.output
