"""attnopt on CPU beside what a user would otherwise run, in one process: zoo models, the exact op, sparse and linear.

    python benchmarks/cpu.py --out cpu.json        # everything the issue's "Done when" needs (~10 min, 2 quiet cores)
    python benchmarks/cpu.py --quick                # small sizes, a few minutes
    python benchmarks/cpu.py --sections op --op-seq 8192 --bias-seq 4096
    python benchmarks/cpu.py --sections model --models llama,gemma2 --model-seqs 2048,8192 --auto-models all

Sections (``--sections``, comma-separated; default all four):

* ``model`` (:mod:`cpu_models`): each zoo model (Llama, Mistral, Gemma 2, BERT, ViT, GPT-2; every attention
  implementation transformers offers for it) at the ``--model-seqs`` lengths (positions and image size overridden
  to fit; batch 1, the zoo's example inputs with its padded tail): the original forward, ``attnopt.optimize(model,
  "exact")`` and, for ``--auto-models``, ``optimize(model, "auto:1e-2")`` (slow: it calibrates), interleaved
  ``--model-repeat`` rounds; ratio = original / optimized (best rounds, and medians), ``auto_vs_exact``.
* ``op``: exact attention, B1 H8 D64 fp32: full and causal at ``--op-seq``; additive mask, GQA (8 query heads,
  2 key/value heads), softcap (Gemma 2: causal, cap 50), bottom-right causal (Sq = S/2, Sk = S) and a score bias
  (a per-head [1, H, S, S] additive bias, as T5 or ALiBi sites pass) at ``--bias-seq``. Providers: the attnopt
  op as an optimized model runs it (``torch.ops.attnopt.attention``), ``attnopt-blockwise`` (the op with dispatch
  off: the blockwise kernel, where SDPA would run; it backs the dispatch rule), SDPA (``F.scaled_dot_product_attention``,
  where it can express the case), compiled FlexAttention (``torch.compile(flex_attention)`` with a score_mod
  and block mask) and the eager code the site replaces (materialized scores, as the models write it); forward
  and forward+backward (``--modes``). Full and causal also run ``--duel-repeat`` rounds of the op against SDPA
  alone (``duel``: ratios of the best rounds, of the medians and the median per-round ratio), with SDPA a second
  time as a control (``control_vs_sdpa``: the same ratios between two runs of SDPA, the noise floor), and every case
  records the largest difference of the op's output and q, k, v gradients from SDPA's (``max_abs_diff_vs_attnopt``).
* ``sparse``: causal sliding windows 256 and 1024, a 2-D neighborhood (64x64 grid, kernel 13) and strided
  heads (stride H, causal window 256) at ``--sparse-seq``: ``torch.ops.attnopt.sparse_attention`` beside compiled
  FlexAttention with the same block mask and dense SDPA; causal linear attention beside SDPA causal; forward
  and forward+backward.
* ``bench`` (:mod:`cpu_models`): for ``--bench-models`` at ``--bench-seq``, ``attnopt convert`` (policy exact) of
  the saved zoo model and ``attnopt bench`` of the artifact: the report's measured speedup (recorded at
  conversion) beside bench's, ``report_over_bench`` their ratio.

Times: each case's providers run interleaved ``--repeat`` rounds after a warm-up (so a change of the machine's
load hits them alike; the order flips every round); the best round is reported, with the median and every
round. Peak memory (Linux): the resident memory one
warm call adds at its peak, every thread and every allocation included (SDPA's internal buffers too): freed heap
memory is returned to the system (``malloc_trim``), the high-water mark reset (``/proc/self/clear_refs``), and
``VmHWM`` after the call less ``VmRSS`` before it. A provider that fails
is reported with its error. JSON to stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from _common import write_json

import attnopt  # noqa: F401  (registers torch.ops.attnopt)
from attnopt.kernels.exact import dispatch
from attnopt.kernels.exact.reference import CAUSAL_BOTTOM_RIGHT, CAUSAL_NONE, CAUSAL_TOP_LEFT

MODELS = ("llama", "mistral", "gemma2", "bert", "vit", "gpt2")  # the model section's zoo models


# ---------------------------------------------------------------------------------------------------------------
# Timing and memory


def bench(providers: dict, repeat: int, backward: bool = False) -> dict:
    """``{name: {"ms", "median_ms", "rounds"} or {"error"}}``: interleaved rounds, best, median and every round.

    The order of the providers flips every round (A B, B A, ...): a provider never always runs right after the
    same other one (whose freed memory, cache state or thread wake-up it would inherit)."""
    steps, result = {}, {}
    for name, make in providers.items():
        try:
            step = make(backward)
            step()  # warm-up (and compile)
            steps[name] = step
        except Exception as exc:  # a provider that cannot run the case is reported, not fatal
            result[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    times = {name: [] for name in steps}
    order = list(steps)
    for _ in range(repeat):
        for name in order:
            t0 = time.perf_counter()
            steps[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
        order.reverse()
    for name, ts in times.items():
        result[name] = {"ms": round(min(ts), 2), "median_ms": round(statistics.median(ts), 2),
                        "rounds": [round(t, 2) for t in ts]}
    return result


def duel(times: dict, subject: str, other: str) -> dict | None:
    """Three estimates of ``other``'s time over ``subject``'s (> 1: subject faster) from interleaved rounds: the
    ratio of the best rounds (each provider's least-disturbed call), of the medians, and the median of the
    per-round ratios (each round's two calls ran back to back, under the same load)."""
    a, b = times.get(subject, {}), times.get(other, {})
    if "rounds" not in a or "rounds" not in b:
        return None
    paired = [y / x for x, y in zip(a["rounds"], b["rounds"])]
    return {"best": round(b["ms"] / a["ms"], 4), "median": round(b["median_ms"] / a["median_ms"], 4),
            "paired_median": round(statistics.median(paired), 4), "rounds": len(paired)}


def peak_mib(step) -> float:
    """The peak resident memory ``step()`` adds, in MiB (see the module docstring): freed heap memory is handed
    back to the system first (``malloc_trim``), the kernel's high-water mark reset (``/proc/self/clear_refs``),
    then ``VmHWM`` after the call less ``VmRSS`` before it. Every allocation of every thread counts."""
    return max(_peak_once(step) for _ in range(2))  # the larger of two: heap reuse varies between calls


def _peak_once(step) -> float:
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    step()
    return round((_status_kib("VmHWM") - before) / 1024, 1)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def with_ratios(times: dict, base: str, subject: str = "attnopt") -> dict:
    """Adds ``<subject>_vs_<other>`` = other's time / subject's time (> 1: subject faster) for each other provider."""
    out = dict(times)
    if "ms" not in times.get(subject, {}):
        return out
    for name, t in times.items():
        if name != subject and "ms" in t:
            out[f"{subject}_vs_{name}"] = round(t["ms"] / times[subject]["ms"], 3)
    return out


def _step(fn, inputs, backward: bool):
    """A callable running ``fn(*inputs)`` (forward under no_grad, or forward + backward)."""
    if not backward:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = [t.detach().requires_grad_() if t.is_floating_point() else t for t in inputs]

    def run_bwd():
        for t in leaves:
            t.grad = None
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
    return run_bwd


# ---------------------------------------------------------------------------------------------------------------
# Exact attention at the op level


def _eager(q, k, v, bias=None, keep=None, scale=None, softcap=0.0):
    """Attention as eager model code writes it: materialized fp32 scores, softmax, matmul."""
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    if keep is not None:
        s = s.masked_fill(~keep, float("-inf"))
    return torch.matmul(torch.softmax(s, dim=-1), v)


def _flex_provider(q_shape, k_shape, causal, bias=None, softcap=0.0, gqa=False):
    """``make(backward)`` for compiled FlexAttention with a causal block mask (top-left or bottom-right)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    sq, sk = q_shape[2], k_shape[2]
    offset = sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0
    block_mask = None
    if causal != CAUSAL_NONE:
        block_mask = create_block_mask(lambda b, h, i, j: j <= i + offset, None, None, sq, sk, device="cpu")

    def score_mod(score, b, h, i, j):
        if softcap:
            score = torch.tanh(score / softcap) * softcap
        if bias is not None:
            score = score + bias[0, h if bias.shape[1] > 1 else 0, i, j]
        return score

    torch._dynamo.reset()  # a fresh compile per case: past the recompile limit flex_attention would run unfused
    compiled = torch.compile(flex_attention, dynamic=False)
    mod = score_mod if (softcap or bias is not None) else None
    return lambda q, k, v: compiled(q, k, v, score_mod=mod, block_mask=block_mask, enable_gqa=gqa)


def op_cases(op_seq: int, bias_seq: int) -> list[dict]:
    """(name, Sq, Sk, Hkv, causal, bias kind, softcap, eager): the exact cases of the ``op`` section."""
    return [
        dict(name="full", sq=op_seq, sk=op_seq, hkv=8, causal=CAUSAL_NONE, duel=True),
        dict(name="causal", sq=op_seq, sk=op_seq, hkv=8, causal=CAUSAL_TOP_LEFT, duel=True),
        dict(name="additive mask", sq=bias_seq, sk=bias_seq, hkv=8, causal=CAUSAL_NONE, bias="mask", eager=True),
        dict(name="GQA causal (8 q heads, 2 kv heads)", sq=bias_seq, sk=bias_seq, hkv=2, causal=CAUSAL_TOP_LEFT,
             eager=True),
        dict(name="softcap 50, causal (Gemma 2)", sq=bias_seq, sk=bias_seq, hkv=8, causal=CAUSAL_TOP_LEFT,
             softcap=50.0, eager=True),
        dict(name="bottom-right causal, Sq = Sk/2", sq=bias_seq // 2, sk=bias_seq, hkv=8, causal=CAUSAL_BOTTOM_RIGHT,
             eager=True),
        dict(name="score bias [1, H, S, S]", sq=bias_seq, sk=bias_seq, hkv=8, causal=CAUSAL_NONE, bias="bias",
             eager=True),
    ]


def _op_inputs(case: dict):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 8, case["sq"], 64, generator=gen)
    k, v = (torch.randn(1, case["hkv"], case["sk"], 64, generator=gen) for _ in range(2))
    bias = None
    if case.get("bias") == "mask":  # an additive mask shared by heads
        bias = torch.randn(1, 1, case["sq"], case["sk"], generator=gen)
    elif case.get("bias") == "bias":  # a per-head score bias
        bias = torch.randn(1, 8, case["sq"], case["sk"], generator=gen)
    return q, k, v, bias


def op_providers(case: dict, q, k, v, bias) -> tuple[dict, dict]:
    """``{name: make(backward) -> step}`` for one exact case, and ``{name: fn(q, k, v) -> out}`` of the op and
    SDPA (where SDPA expresses the case), for :func:`agreement`."""
    causal, softcap, scale = case["causal"], case.get("softcap", 0.0), 64 ** -0.5
    sq, sk = case["sq"], case["sk"]
    keep = None
    if causal != CAUSAL_NONE:
        offset = sk - sq if causal == CAUSAL_BOTTOM_RIGHT else 0
        keep = torch.arange(sk)[None, :] <= torch.arange(sq)[:, None] + offset  # [Sq, Sk], eager's own mask
    gqa = case["hkv"] != 8

    def op(q, k, v):
        return torch.ops.attnopt.attention(q, k, v, bias, 0.0, causal, scale, None, softcap)[0]

    def blockwise(q, k, v):
        with dispatch.disabled():  # on CPU: attnopt's blockwise kernel even where SDPA's runs (backs the rule)
            return op(q, k, v)

    providers = {"attnopt": lambda bwd: _step(op, (q, k, v), bwd)}
    fns = {"attnopt": op}
    if not softcap:
        providers["attnopt-blockwise"] = lambda bwd: _step(blockwise, (q, k, v), bwd)
        is_causal = causal == CAUSAL_TOP_LEFT
        sdpa_mask = bias if causal != CAUSAL_BOTTOM_RIGHT else keep

        def sdpa(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=sdpa_mask, is_causal=is_causal, enable_gqa=gqa)
        providers["sdpa"] = lambda bwd: _step(sdpa, (q, k, v), bwd)
        fns["sdpa"] = sdpa
    flex = {}

    def flex_step(bwd):
        if "fn" not in flex:
            flex["fn"] = _flex_provider(q.shape, k.shape, causal, bias, softcap, gqa)
        return _step(flex["fn"], (q, k, v), bwd)
    providers["flex"] = flex_step
    if case.get("eager"):
        providers["eager"] = lambda bwd: _step(lambda q, k, v: _eager(q, k, v, bias, keep, scale, softcap), (q, k, v),
                                               bwd)
    return providers, fns


def agreement(fns: dict, inputs) -> dict:
    """The largest absolute difference from the first of ``fns`` (name -> fn) of each other one's output and of
    its gradients of q, k and v (dout = ones): the providers compared compute the same thing on the same inputs."""
    results = {}
    for name, fn in fns.items():
        leaves = [t.detach().requires_grad_() for t in inputs]
        out = fn(*leaves)
        out.backward(torch.ones_like(out))
        results[name] = [out.detach()] + [t.grad for t in leaves]
    first, *others = results
    return {name: {"out": float((results[name][0] - results[first][0]).abs().max()),
                   "grads": max(float((g - h).abs().max()) for g, h in zip(results[name][1:], results[first][1:]))}
            for name in others}


def op_section(args) -> list[dict]:
    rows = []
    for case in op_cases(args.op_seq, args.bias_seq):
        if args.op_cases and case["name"].split(" ")[0].split(",")[0] not in args.op_cases:
            continue
        q, k, v, bias = _op_inputs(case)
        providers, fns = op_providers(case, q, k, v, bias)
        providers = {n: p for n, p in providers.items() if not args.op_providers or n in args.op_providers}
        row = dict(case=case["name"], shape=f"B1 Hq8 Hkv{case['hkv']} Sq{case['sq']} Sk{case['sk']} D64 fp32")
        if "sdpa" in fns:
            row["max_abs_diff_vs_attnopt"] = agreement(fns, (q, k, v))
        for mode in args.modes:
            times = bench(providers, args.repeat, backward=mode == "fwd+bwd")
            row[mode] = with_ratios(times, "sdpa")
            if case.get("duel") and args.duel_repeat and "sdpa" in providers:
                # "sdpa (control)" is SDPA again: its ratio to SDPA is the noise floor of the attnopt-SDPA ratio
                trio = {n: providers[n] for n in ("attnopt", "sdpa") if n in providers}
                trio["sdpa (control)"] = providers["sdpa"]
                times = bench(trio, args.duel_repeat, mode == "fwd+bwd")
                row[mode]["duel"] = times | {"attnopt_vs_sdpa": duel(times, "attnopt", "sdpa"),
                                             "control_vs_sdpa": duel(times, "sdpa (control)", "sdpa")}
            if args.memory and case.get("eager"):
                row[mode]["peak_mib"] = {name: _safe(lambda: peak_mib(providers[name](mode == "fwd+bwd")))
                                         for name in ("attnopt", "eager") if name in providers}
        rows.append(row)
        print(f"# op {row['case']}: " + _summary(row, args.modes), flush=True)
    return rows


def _safe(fn):
    try:
        return fn()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"


def _summary(row: dict, modes) -> str:
    parts = []
    for mode in modes:
        ratios = {k: v for k, v in row.get(mode, {}).items() if k.startswith("attnopt_vs_")}
        parts.append(f"{mode} " + ", ".join(f"{k[11:]} {v}x" for k, v in ratios.items()))
        if "duel" in row.get(mode, {}):
            d = row[mode]["duel"]
            parts[-1] += f" (duel vs sdpa: {d['attnopt_vs_sdpa']}; sdpa's control: {d['control_vs_sdpa']})"
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------------
# Sparse and linear


def _flex_masked(mask_mod, sq: int, sk: int, heads):
    """Compiled FlexAttention with the block mask of ``mask_mod`` (``heads`` None: the same for every head)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    torch._dynamo.reset()  # a fresh compile per case: past the recompile limit flex_attention would run unfused
    block_mask = create_block_mask(mask_mod, None, heads, sq, sk, device="cpu")
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: compiled(q, k, v, block_mask=block_mask)


def _window(w: int):
    return lambda b, h, i, j: (j <= i) & (i - j < w)


def _neighborhood(side: int, kernel: int):
    """NATTEN's 2-D neighborhood on a side x side grid (the window shifted, not clipped, at the borders)."""
    def mask_mod(b, h, i, j):
        r0 = torch.clamp(i // side - kernel // 2, 0, side - kernel)
        c0 = torch.clamp(i % side - kernel // 2, 0, side - kernel)
        kr, kc = j // side, j % side
        return (kr >= r0) & (kr < r0 + kernel) & (kc >= c0) & (kc < c0 + kernel)
    return mask_mod


def _strided(stride: int, w: int):
    return lambda b, h, i, j: ((j % stride == h) | (i - j < w)) & (j <= i)


def sparse_section(args) -> list[dict]:
    from attnopt import masks
    from attnopt.kernels.linear.reference import feature_map

    s, heads = args.sparse_seq, 8
    cases = [  # (name, attnopt's mask, FlexAttention's mask_mod and heads, S, the dense SDPA to compare)
        (f"causal window 256, S{s}", masks.SlidingWindow(255, 0), (_window(256), None), s, "causal"),
        (f"causal window 1024, S{s}", masks.SlidingWindow(1023, 0), (_window(1024), None), s, "causal"),
        ("2-D neighborhood 64x64 kernel 13, S4096", masks.Neighborhood(13, grid=(64, 64)),
         (_neighborhood(64, 13), None), 4096, "dense"),
        (f"strided heads (stride 8) + causal window 256, S{s}",
         masks.Strided(heads, masks.SlidingWindow(255, 0)) & masks.causal(), (_strided(heads, 256), heads), s,
         "causal"),
    ]
    rows = []
    for name, mask, flex_mask, seq, dense in cases:
        gen = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, heads, seq, 64, generator=gen) for _ in range(3))
        key, scale = mask.key(), 64 ** -0.5

        def sparse(q, k, v, key=key, scale=scale):
            return torch.ops.attnopt.sparse_attention(q, k, v, None, None, key, scale, 0.0)[0]

        def sdpa(q, k, v, causal=dense == "causal"):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        flex = {}

        def flex_step(bwd, flex_mask=flex_mask, seq=seq, flex=flex, qkv=(q, k, v)):
            if "fn" not in flex:
                flex["fn"] = _flex_masked(flex_mask[0], seq, seq, flex_mask[1])
            return _step(flex["fn"], qkv, bwd)
        providers = {"attnopt": lambda bwd, f=sparse, qkv=(q, k, v): _step(f, qkv, bwd), "flex": flex_step,
                     f"sdpa ({dense})": lambda bwd, f=sdpa, qkv=(q, k, v): _step(f, qkv, bwd)}
        rows.append(_sparse_row(name, str(mask), providers, args))
    rows.append(_linear_row(s, heads, args, feature_map))
    return rows


def _sparse_row(name: str, mask: str, providers: dict, args) -> dict:
    row = dict(case=name, mask=mask, shape="B1 H8 D64 fp32")
    for mode in args.modes:
        row[mode] = with_ratios(bench(providers, args.repeat, backward=mode == "fwd+bwd"), "flex")
    print(f"# sparse {name}: " + _summary(row, args.modes), flush=True)
    return row


def _linear_row(s: int, heads: int, args, feature_map) -> dict:
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, s, 64, generator=gen) for _ in range(3))

    def linear(q, k, v):
        fq, fk = feature_map(q, "elu"), feature_map(k, "elu")
        return torch.ops.attnopt.linear_attention(fq, fk, v, None, True, True, 64 ** -0.5, 1e-6, None, None)[0]

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    flex = {}

    def flex_step(bwd):
        if "fn" not in flex:
            flex["fn"] = _flex_provider(q.shape, k.shape, CAUSAL_TOP_LEFT)
        return _step(flex["fn"], (q, k, v), bwd)
    providers = {"attnopt": lambda bwd: _step(linear, (q, k, v), bwd), "flex (causal softmax)": flex_step,
                 "sdpa (causal)": lambda bwd: _step(sdpa, (q, k, v), bwd)}
    return _sparse_row(f"causal linear (elu features), S{s}", "linear", providers, args)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", default="model,op,sparse,bench", help="comma-separated: model, op, sparse, bench")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--model-seqs", default="2048", help="e.g. 512,2048,8192 (8192 is slow: eager materializes)")
    p.add_argument("--auto-models", default="llama", help="models also optimized with 'auto:1e-2' (calibrates: "
                   "slow); 'all' or '' for none")
    p.add_argument("--bench-models", default="llama,bert,vit", help="models of the bench section")
    p.add_argument("--bench-seq", type=int, default=2048, help="sequence length of the bench section")
    p.add_argument("--op-seq", type=int, default=8192, help="full and causal exact cases")
    p.add_argument("--bias-seq", type=int, default=4096, help="mask, GQA, softcap, bottom-right and bias cases")
    p.add_argument("--op-cases", default="", help="only these op cases, by their first word (full, causal, "
                   "additive, GQA, softcap, bottom-right, score); default all")
    p.add_argument("--op-providers", default="", help="only these op providers (attnopt, attnopt-blockwise, sdpa, "
                   "flex, eager); default all")
    p.add_argument("--sparse-seq", type=int, default=8192)
    p.add_argument("--modes", default="fwd,fwd+bwd")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--duel-repeat", type=int, default=9, help="rounds of attnopt against SDPA alone, full and "
                   "causal (identical kernels: their ratio needs many rounds); 0 skips")
    p.add_argument("--model-repeat", type=int, default=21, help="rounds per model (a model call is cheap, noisy)")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-memory runs")
    p.add_argument("--quick", action="store_true", help="models S 512 and 2048, op S 2048, bias S 1024, sparse S 2048")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.model_seqs, args.op_seq, args.bias_seq, args.sparse_seq = "512,2048", 2048, 1024, 2048
    args.sections = [s for s in args.sections.split(",") if s]
    args.models = [m for m in args.models.split(",") if m]
    args.auto_models = [m for m in args.auto_models.split(",") if m]
    args.op_cases = [c for c in args.op_cases.split(",") if c]
    args.op_providers = [c for c in args.op_providers.split(",") if c]
    args.bench_models = [m for m in args.bench_models.split(",") if m]
    args.model_seqs = [int(s) for s in str(args.model_seqs).split(",") if s]
    args.modes = [m for m in args.modes.split(",") if m]
    return args


def main(argv=None) -> int:
    args = parse(argv)
    result = dict(machine=dict(platform=platform.platform(), processor=platform.processor(),
                               threads=torch.get_num_threads(), torch=torch.__version__),
                  args={k: v for k, v in vars(args).items() if k != "out"})
    from cpu_models import bench_section, model_section

    sections = dict(op=op_section, sparse=sparse_section, model=model_section, bench=bench_section)
    for name in args.sections:
        t0 = time.perf_counter()
        result[name] = sections[name](args)
        result[f"{name}_section_s"] = round(time.perf_counter() - t0, 1)
        if args.out:  # the sections done so far, should a later one not finish
            with open(args.out, "w") as f:
                json.dump(result, f, indent=2, default=str)
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
