"""The ``attnopt`` command line."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import textwrap
from pathlib import Path

import click

import attnopt
from attnopt.codegen import tuning
from attnopt.codegen.spec import KernelSpec, default_tiles
from attnopt.kernels import aot
from attnopt.kernels.exact.render import render, write_source
from attnopt import convert as conversion  # (the module: `convert` is the command below)

from attnopt.cli_errors import ErrorHandlingGroup, set_debug
from attnopt.report import terminal_width
from attnopt.targets import load_target

ATTN_CHOICES = click.Choice(["eager", "sdpa"])
MODEL_CLASS_HELP = ("Hugging Face class to build: auto (the class config.json's architectures names, as saved), base "
                    "(AutoModel, no task head) or a class name such as LlamaForCausalLM. inspect and convert build "
                    "the same class, so they report the same site names.")  # fmt: skip

# Every string form of a policy (attnopt.Policy.from_string), shown under --help; README.md lists the same.
POLICY_FORMS = """\b
Policies (--policy):
  exact                 the same function, attnopt's fused kernel
  keep                  leave the site as written
  sparse                exact-sparse: the site's own causal, window or
                        padding mask on the sparse kernel (same function)
  sparse:causal         causal sparse attention
  sparse:blocked:B      blocks of B tokens (also sparse:<mask JSON>)
  sliding_window:W      a causal window of W tokens
  sliding_window:L,R    keys i-L .. i+R
  linear                linear attention, elu+1 features, causal or not
                        as each site's own mask is
  linear:relu           feature map elu, relu or identity
  linear:KEY=VALUE,...  feature_map, causal=true|false, normalize=
                        true|false|rms, decay=0.9|0.9/0.8/...|lightning
                        (with num_layers=N); e.g. linear:relu,causal=true
  sigmoid               sigmoid attention, bias -log(Sk)
  sigmoid:B             bias B (also sigmoid:bias=B)
  auto                  per site the fastest candidate within max_error
                        1e-2 (calibrated on the example inputs)
  auto:E                the same within max_error E, e.g. auto:1e-3
  FILE.yaml|.yml|.json  default, overrides ({site glob: variant}),
                        max_error, seq_len
All but exact, keep and bare sparse change the function: each site's
deviation is measured and reported; --validate holds it to --max-error."""


@click.group(cls=ErrorHandlingGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="attnopt")
@click.option("--debug", is_flag=True, is_eager=True, expose_value=False, callback=set_debug,
              help="Show the full traceback of a failure instead of a one-paragraph error.")
def main() -> None:
    """attnopt: find every attention in a PyTorch model and run it through generated kernels."""


@main.command(epilog=POLICY_FORMS)
@click.argument("target")
@click.option("--attn", "attn_implementation", type=ATTN_CHOICES, default=None,
              help="Hugging Face attn_implementation to build the model with.")
@click.option("--policy", default="exact", show_default=True,
              help="Policy whose decisions to show (every form below).")
@click.option("--model-class", default="auto", show_default=True, help=MODEL_CLASS_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("-v", "--verbose", is_flag=True, help="Show long reasons and the auto policy's candidates in full.")
def inspect(target: str, attn_implementation: str | None, policy: str, model_class: str, as_json: bool,
            verbose: bool) -> None:  # fmt: skip
    """List the attention sites of TARGET: a Hugging Face model directory (config.json, weights optional:
    random init when absent) or path/to/file.py:factory (a callable returning model, args[, kwargs])."""
    chosen = attnopt.Policy.from_string(policy)  # a misspelt policy fails before the model is built
    t = load_target(target, attn_implementation, model_class)
    report = attnopt.inspect(t.model, t.args, t.kwargs, policy=chosen)
    if as_json:
        click.echo(report.to_json())
    else:
        width = terminal_width()
        click.echo(textwrap.fill(t.description, width))
        click.echo(report.render(width, verbose=verbose))


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while a conversion runs, so its cleanup happens (main thread only)."""
    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@main.command(epilog=POLICY_FORMS)
@click.argument("src")
@click.option("--policy", required=True, help="What to do with each attention site (every form below).")
@click.option("--out", "out", required=True, type=click.Path(), help="Artifact directory to create.")
@click.option("--weights", default=None, help="Checkpoint for a file.py:factory SRC (.safetensors, or .pt/.pth/.bin/.ckpt "
              "loaded with weights_only=True).")
@click.option("--inputs", "inputs", multiple=True, help="Example input spec(s) NAME:AxB[:DTYPE], e.g. input_ids:1x512:int64 "
              "(comma separated or repeated); default: derived from the config or the factory's.")
@click.option("--format", "formats", multiple=True, type=click.Choice(["pt2", "onnx"]),
              help="Also write a torch.export program (model.pt2) and/or ONNX (model.onnx). Repeatable.")
@click.option("--onnx-attention", type=click.Choice(["standard", "decomposed"]), default="standard", show_default=True,
              help="standard: exact sites as ONNX Attention (opset 23); decomposed: attnopt-domain functions (opset 18).")
@click.option("--dynamic/--no-dynamic", default=True, show_default=True,
              help="Export .pt2 and ONNX with dynamic batch and sequence dims where the model allows it (batch: dim 0 "
              "of the inputs; sequence: dim 1 of token ids, masks and *embeds inputs); a model whose code fixes them "
              "keeps a dynamic batch only, or the example shapes, with a warning saying why (so does an example "
              "with batch 1: give batch >= 2). --no-dynamic: the example shapes.")
@click.option("--validate", is_flag=True, help="Run original and converted (module, .pt2, ONNX) on sample inputs; "
              "fail when the deviation exceeds the budget.")
@click.option("--samples", default=3, show_default=True, help="Sample inputs for --validate.")
@click.option("--max-error", type=float, default=None, help="Validation budget (relative deviation); default: the "
              "policy's max_error, else the output dtype's tolerance (1e-4 for float32).")
@click.option("--attn", "attn_implementation", type=ATTN_CHOICES, default=None,
              help="Hugging Face attn_implementation to load the model with (default: transformers' choice).")
@click.option("--model-class", default="auto", show_default=True, help=MODEL_CLASS_HELP)
@click.option("--force", is_flag=True, help="Replace OUT if it exists (an attnopt artifact or an empty directory).")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
def convert(src, policy, out, weights, inputs, formats, onnx_attention, dynamic, validate, samples, max_error,
            attn_implementation, model_class, force, as_json, quiet) -> None:  # fmt: skip
    """Convert SRC (a Hugging Face model directory, or path/to/file.py:factory with --weights) into an
    optimized, validated artifact directory OUT that attnopt.load(OUT) returns as a module.

    A model in which no attention is found still converts (exit 0: the artifact is the original model),
    with a warning on stderr."""
    with _sigterm_as_interrupt():
        manifest = conversion.convert(src, policy, out, weights=weights, inputs=list(inputs), formats=formats,
                               validate=validate, samples=samples, max_error=max_error, force=force,
                               attn_implementation=attn_implementation, onnx_attention=onnx_attention,
                               dynamic=dynamic, progress=not quiet, model_class=model_class)  # fmt: skip
    warning = conversion.no_attention_warning(manifest)
    if warning:
        click.secho(f"warning: {warning}", err=True, fg="yellow", bold=True)
    if as_json:
        click.echo(json.dumps(manifest, indent=2, default=str))
        return
    sites = manifest["sites"]
    rewritten = [s for s in sites if s["decision"] != "keep"]
    click.echo(f"wrote {out}: built {manifest['model']['class']}, {len(rewritten)} of {len(sites)} attention site(s) "
               f"rewritten, output deviation {_fmt(manifest['output_deviation'])}")  # fmt: skip
    for s in sites:
        click.echo(f"  {s['name']}: {s['decision']} (deviation {_fmt(s['deviation'])}) {s['reason']}")
    for fmt, entry in manifest["exports"].items():
        click.echo(f"  {fmt}: {entry['file']} ({_shapes(entry)})")
        for note in entry.get("shape_notes", []):
            click.echo(f"  warning: {fmt}: {note}")
    if manifest["validation"]:
        v = manifest["validation"]
        devs = ", ".join(f"{n} {_fmt(d)}" for n, d in v["deviation"].items())
        click.echo(f"  validated on {v['samples']} sample(s), budget {v['budget']:.1e}: {devs}")
        for r in v.get("reshaped") or []:
            click.echo(f"  validated {', '.join(r['targets'])} also at {', '.join(r['inputs'])} (dynamic dims)")


def _shapes(entry: dict) -> str:
    """``dynamic input_ids[batch, sequence], ...`` or ``static shapes`` for an export entry."""
    dims = entry.get("dynamic") or {}
    if not dims:
        return "static shapes"
    return "dynamic " + ", ".join(f"{name}[{', '.join(roles.values())}]" for name, roles in dims.items())


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.2e}"


@main.command()
@click.argument("artifact", metavar="DIR")
@click.option("--runs", default=10, show_default=True, help="Timed calls per row (the median is reported).")
@click.option("--warmup", default=3, show_default=True, help="Untimed calls first.")
@click.option("--device", default=None, help="Device for the PyTorch rows (default: cuda if available, else cpu).")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def bench(artifact, runs, warmup, device, as_json) -> None:
    """Time the original model against the converted one in artifact DIR on the local device (the policy
    was chosen at conversion: see attnopt convert --help for every policy form)."""
    from rich.console import Console
    from rich.table import Table

    result = conversion.bench(artifact, runs=runs, warmup=warmup, device=device, progress=not as_json)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    table = Table(title=f"attnopt bench: {result['model']} ({', '.join(result['inputs'])}), median of {runs} "
                        f"after {warmup} warmup")  # fmt: skip
    for col in ("variant", "device", "median ms", "min ms", "speedup", "max deviation"):
        table.add_column(col, justify="left" if col in ("variant", "device") else "right")
    for r in result["rows"]:
        table.add_row(r["name"], r["device"], f"{r['median_ms']:.3f}", f"{r['min_ms']:.3f}", f"{r['speedup']:.2f}x",
                      f"{r['deviation']:.1e}")  # fmt: skip
    console = Console(width=terminal_width())
    console.print(table)
    if result.get("report_timing"):
        t = result["report_timing"]
        console.print(f"the conversion's report measured on {t['device']}: original {t['original_ms']:.3f} ms, "
                      f"attnopt {t['optimized_ms']:.3f} ms ({t['original_ms'] / t['optimized_ms']:.2f}x)", markup=False)


@main.group()
def kernels() -> None:
    """Generated Triton kernels: show the source attnopt renders for a kernel spec, or build them ahead of time."""


_CAUSAL_CODES = {"none": 0, "top-left": 1, "bottom-right": 2}


@kernels.command("show")
@click.option("--direction", type=click.Choice(["fwd", "bwd_pre", "bwd_dkdv", "bwd_dq"]), default="fwd",
              show_default=True, help="The forward or one of the three backward kernels.")
@click.option("--head-dim", type=int, required=True, help="q/k head dim (1..256).")
@click.option("--head-dim-v", type=int, default=None, help="v head dim (default: --head-dim).")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="bfloat16", show_default=True)
@click.option("--causal", type=click.Choice(list(_CAUSAL_CODES)), default="none", show_default=True)
@click.option("--mask", type=click.Choice(["none", "bool", "additive"]), default="none", show_default=True)
@click.option("--bias", type=click.Choice(["none", "tensor", "alibi", "relpos"]), default="none", show_default=True)
@click.option("--key-padding", is_flag=True, help="Per-batch key-padding lengths.")
@click.option("--softcap", is_flag=True, help="Softcapped scores (Gemma 2).")
@click.option("--dropout", is_flag=True, help="In-kernel Philox dropout.")
@click.option("--group", type=int, default=1, show_default=True, help="Query heads per key/value head (GQA).")
@click.option("--write-ds", is_flag=True, help="bwd_dq also stores dS (mask and bias gradients).")
@click.option("--block-m", type=int, default=None, help="Query tile rows (default: the deterministic default).")
@click.option("--block-n", type=int, default=None, help="Key tile rows.")
@click.option("--num-warps", type=int, default=None)
@click.option("--num-stages", type=int, default=None)
@click.option("--gpu", "generation", type=click.Choice(["sm80", "sm86", "sm89", "sm90", "sm100"]), default=None,
              help="Use this GPU generation's deterministic default tiles instead of the interpreter's.")
@click.option("--path", "show_path", is_flag=True, help="Write the kernel into the cache and print its file path.")
def kernels_show(direction, head_dim, head_dim_v, dtype, causal, mask, bias, key_padding, softcap, dropout, group,
                 write_ds, block_m, block_n, num_warps, num_stages, generation, show_path) -> None:  # fmt: skip
    """Print the Triton source rendered for a kernel spec (its header holds the spec as JSON)."""
    dv = head_dim_v or head_dim
    spec = KernelSpec(direction=direction, head_dim=head_dim, head_dim_v=dv, dtype=dtype, causal=_CAUSAL_CODES[causal],
                      mask=mask, bias=bias, key_padding=key_padding, softcap=softcap, dropout=dropout, group=group,
                      write_ds=write_ds, **default_tiles(direction, dtype, head_dim, dv))  # fmt: skip
    if generation is not None:
        spec = tuning.default(spec, tuning.GENERATIONS[generation])
    chosen = dict(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=num_stages)
    spec = spec.replace(**{k: v for k, v in chosen.items() if v is not None})
    if show_path:
        click.echo(str(write_source(spec)))
    else:
        click.echo(render(spec), nl=False)


@kernels.command("build")
@click.option("--arch", "archs", multiple=True, required=True, type=click.Choice(list(aot.ARCHS)),
              help="Target GPU architecture (repeatable): sm_80 (A100), sm_90a (H100/H200), sm_100a (B200, where "
              "Triton's bundled ptxas supports it).")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Directory for ARCH/NAME.ptx, "
              "ARCH/NAME.cubin and report.json.")
@click.option("--only", default=None, help="Only kernels whose name matches this regular expression, "
              "e.g. 'exact_d128\\.fwd'.")
@click.option("--strict", is_flag=True, help="Also exit non-zero when a kernel breaks a resource gate (spill, "
              "serialized wgmma, shared memory above the arch's limit).")
def kernels_build(archs, out, only, strict) -> None:
    """Compile, without a GPU, every kernel attnopt would launch (exact, sparse, linear, sigmoid; forward and
    backward; typical head dims, masks and features) for each --arch, with the tiles attnopt picks on that
    GPU. Writes OUT/ARCH/NAME.ptx and OUT/ARCH/NAME.cubin per kernel and OUT/report.json: per kernel its
    tiles, registers, spills, shared memory, ptxas performance advisories, tensor-core instruction counts and
    its SASS interior loop (see docs/kernels-aot.md).

    Run it on any machine to pre-build and check the kernels for a deployment machine's GPU. The output is
    PTX and cubin files and the report only: attnopt does not load them (on the GPU it compiles through
    Triton's JIT at the first launch). Exits 1 when a kernel fails to compile (the report still lists it with
    its error)."""
    from rich.console import Console

    console = Console(width=terminal_width(), stderr=True)
    pattern = re.compile(only) if only else None
    with console.status("compiling") as status:
        result = aot.build(list(archs), Path(out), select=lambda name: pattern is None or bool(pattern.search(name)),
                           progress=lambda r: status.update(f"compiled {r['arch']} {r['name']}"))  # fmt: skip
    Console(width=max(terminal_width(), 160)).print(aot.table(result.records, f"attnopt kernels build: "
                                                    f"{len(result.records)} kernels in {result.seconds:.0f} s"))
    click.echo(f"wrote {Path(out) / 'report.json'}")
    failed = [f"{r['arch']} {r['name']}: {r['error'].splitlines()[0]}" for r in result.failed]
    if failed:
        raise click.ClickException(f"{len(failed)} kernel(s) failed to compile:\n  " + "\n  ".join(failed))
    gated = [f"{r['arch']} {r['name']}: {'; '.join(r['problems'])}" for r in result.records if r["problems"]]
    if strict and gated:
        raise click.ClickException(f"{len(gated)} kernel(s) break a resource gate:\n  " + "\n  ".join(gated))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
