"""Dynamic (content-based) sparsity on inputs with known structure, CPU (and CUDA when present).

    python benchmarks/dynamic.py --out dynamic.json          # default: about 5 minutes on a quiet 2-core box
    python benchmarks/dynamic.py --sections speed --speed-seq 32768 --modes fwd,fwd+bwd --flex

Inputs (no pretrained weights): per head a combination of these structures (``MIXED`` varies it over the heads):

* needles: query block ``i = 3j + 1`` and key block ``j`` share a strong direction (a far key block that only
  that query block attends to); the planted (query block, key block) pairs are known. The direction has norm
  ``strength`` = 12 (a score of ``144 / √64 = 18``): its cross terms with the sink direction and the local
  features move a needle's score by about ±3, and at norm 9 (score 10) 19 of the 680 planted blocks at 32k held
  under 5% of their row's true mass, below far blocks that the local features align by chance, so no selection,
  the one on exact masses included, could count them as needles. At 12 every planted block holds at least 5% of
  its row's true mass at 16k and 32k (``--oracle`` recalls them all);
* sinks: the first keys align with every query (attention sinks);
* local: q and k are slow random walks, so nearby keys score highest (local smoothness).

Sections (``--sections``):

* ``recall``: every estimator at ``threshold`` (default 0.9) at ``--recall-seqs``, H4 D64, every head with
  needles, sinks and local structure: recall of the planted blocks, density (selected / allowed), estimation time.
  With ``--oracle`` also the ``exact`` row: the same selection rule on the exact block masses of the planted
  query blocks (the ceiling of any estimator; about a minute per 16k tokens).
* ``deviation``: every estimator (and ``pooled`` with ``sub=16``) at ``--dev-thresholds`` on mixed inputs at
  ``--dev-seq``: output deviation
  against exact causal attention (max |out - exact| / max |exact|), density, recall; and the ``exact`` row (the
  selection rule on the exact block masses: what a threshold can promise on these inputs).
* ``speed``: B1 H8 D64 fp32 causal mixed inputs at ``--speed-seq``: ``dynamic_attention`` (estimation included;
  its estimation share), the block-sparse op alone on the same selection, SDPA causal, attnopt's exact causal
  attention (``attnopt.attention(..., is_causal=True)``), and with ``--flex``
  compiled FlexAttention given the same blocks (``BlockMask.from_kv_blocks``); forward and forward+backward.
* ``memory``: the peak resident memory one dynamic forward+backward adds at S and 2S (``--mem-seq``).
* ``decode``: a toy one-layer decoder over a ``--decode-seq`` token cache (B1, 32 query heads, 8 key/value heads,
  D128; :func:`attnopt.kernels.dynamic.decode.retrieval_decode`) with a planted chain of tokens: the tokens
  exact decoding and page selection (10% of the pages, pages of 16) generate, and the attention time per step
  of each (selection included); then end to end through ``optimized.generate`` on a random-weight Llama over a
  ``--generate-seq`` token prompt: the milliseconds per decode step of the model's own generate (KV cache), of
  the paged caches with every page kept and with 10% of the pages (:func:`decode_generate`).

Times: best of ``--repeat`` interleaved rounds after a warm-up; the machine's load average is recorded. JSON to
stdout and ``--out``.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
import transformers
from _common import write_json
from cpu import peak_mib

import attnopt
from attnopt import masks
from attnopt.codegen.spec import CAUSAL_BOTTOM_RIGHT
from attnopt.kernels.dynamic import blocks, decode, ops, select
from attnopt.masks.dynamic import ESTIMATORS

BLOCK = 64


def _unit(g, d):
    x = torch.randn(d, generator=g)
    return x / x.norm()


def _local(g, s, d, strength):
    """[S, D] features whose dot products fall with distance: ``Σ_m cos(ω_m (i - j))`` (periods >= 128 tokens)."""
    omega = torch.rand(d // 2, generator=g) * (2 * torch.pi / 128)
    angle = torch.arange(s)[:, None] * omega
    return strength * torch.cat([angle.cos(), angle.sin()], -1) / (d // 2) ** 0.25


def structured(s, heads, d, kinds, seed=0, strength=12.0):
    """``(q, k, v, planted)``: head h has the structures ``kinds[h % len(kinds)]`` (a tuple of "needles",
    "sinks", "local"); ``planted`` maps a needle head to its {query block: key block}."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, heads, s, d, generator=g) * 0.3 for _ in range(3))
    planted = {}
    for h in range(heads):
        kind = kinds[h % len(kinds)]
        if "local" in kind:
            loc = _local(g, s, d, 3.75)
            q[0, h] += loc
            k[0, h] += loc
        if "sinks" in kind:
            u = _unit(g, d) * 8.0
            q[0, h] += u
            k[0, h, :8] += u
        if "needles" in kind:
            pairs = {}
            for j in range(1, s // BLOCK // 3):
                u = _unit(g, d) * strength
                q[0, h, (3 * j + 1) * BLOCK:(3 * j + 2) * BLOCK] += u
                k[0, h, j * BLOCK:(j + 1) * BLOCK] += u
                pairs[3 * j + 1] = j
            planted[h] = pairs
    return q, k, v, planted


ALL = (("needles", "sinks", "local"),)
MIXED = (("needles", "local"), ("sinks", "local"), ("needles", "sinks", "local"))


def recall(num, idx, nk, planted) -> float:
    chosen = blocks.dense_blocks(num, idx, nk)
    hits = [bool(chosen[0, h if chosen.shape[1] > 1 else 0, i, j]) for h, pairs in planted.items()
            for i, j in pairs.items()]  # fmt: skip
    return sum(hits) / max(len(hits), 1)


def density(num, s) -> float:
    allowed = blocks.allowed_blocks(s, s, BLOCK, BLOCK, 0).sum().item()
    return float(num.double().sum() / (num.shape[0] * num.shape[1] * allowed))


def exact_block_mass(q, k, query_blocks) -> torch.Tensor:
    """``[1, H, NQ, NK]``: the exact causal attention mass per key block, averaged over each query block's rows,
    for ``query_blocks`` (the other rows hold all their mass on the diagonal block: they are not evaluated)."""
    s, heads, nb = q.shape[2], q.shape[1], q.shape[2] // BLOCK
    out = torch.zeros(1, heads, nb, nb)
    out[0, :, torch.arange(nb), torch.arange(nb)] = 1.0
    for i in query_blocks:
        n = (i + 1) * BLOCK
        rows = torch.arange(i * BLOCK, n)
        scores = torch.matmul(q[0, :, i * BLOCK:n], k[0, :, :n].transpose(-2, -1)) * q.shape[-1] ** -0.5
        p = torch.softmax(scores.masked_fill(torch.arange(n)[None, :] > rows[:, None], float("-inf")), -1)
        out[0, :, i, :i + 1] = p.view(heads, BLOCK, i + 1, BLOCK).sum(-1).mean(1)
    return out


def _exact_selection(q, k, query_blocks, threshold):
    s = q.shape[2]
    probs = exact_block_mass(q, k, query_blocks)
    return select.select(probs, s, s, BLOCK, BLOCK, 0, threshold=threshold, sink=1, local=1)


def _mask(estimator, threshold, options=()):
    return masks.Dynamic(estimator, block=BLOCK, threshold=threshold, options=options)


# The deviation section's configurations: every estimator at its defaults, and pooled on 16-row sub-blocks.
DEVIATION_RUNS = tuple((est, ()) for est in ESTIMATORS) + (("pooled", (("sub", 16),)),)


def section_recall(args) -> list:
    rows = []
    for s in args.recall_seqs:
        q, k, _, planted = structured(s, 4, 64, ALL)
        for est in ESTIMATORS:
            t0 = time.perf_counter()
            num, idx = ops.select_blocks(q, k, _mask(est, args.threshold), CAUSAL_BOTTOM_RIGHT)
            rows.append({"seq": s, "estimator": est, "threshold": args.threshold,
                         "recall": recall(num, idx, s // BLOCK, planted), "density": round(density(num, s), 4),
                         "estimate_ms": round((time.perf_counter() - t0) * 1e3, 1)})  # fmt: skip
            print(rows[-1], flush=True)
        if args.oracle:
            planted_rows = sorted({i for pairs in planted.values() for i in pairs})
            num, idx = _exact_selection(q, k, planted_rows, args.threshold)
            rows.append({"seq": s, "estimator": "exact", "threshold": args.threshold,
                         "recall": recall(num, idx, s // BLOCK, planted)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def section_deviation(args) -> list:
    s = args.dev_seq
    q, k, v, planted = structured(s, 8, 64, MIXED)
    exact = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    rows = []
    for est, options in DEVIATION_RUNS:
        for threshold in args.dev_thresholds:
            out, _, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 64 ** -0.5,
                                                                  _mask(est, threshold, options).key())  # fmt: skip
            dev = float((out - exact).abs().max() / exact.abs().max())
            rows.append({"seq": s, "estimator": est, "options": dict(options), "threshold": threshold, "deviation": dev,
                         "density": round(density(num, s), 4), "recall": recall(num, idx, s // BLOCK, planted)})  # fmt: skip
            print(rows[-1], flush=True)
    for threshold in args.dev_thresholds:
        num, idx = _exact_selection(q, k, range(s // BLOCK), threshold)
        out, _ = torch.ops.attnopt.block_sparse_attention(q, k, v, num, idx, None, BLOCK, BLOCK, CAUSAL_BOTTOM_RIGHT,
                                                          64 ** -0.5)  # fmt: skip
        rows.append({"seq": s, "estimator": "exact", "threshold": threshold,
                     "deviation": float((out - exact).abs().max() / exact.abs().max()),
                     "density": round(density(num, s), 4),
                     "recall": recall(num, idx, s // BLOCK, planted)})  # fmt: skip
        print(rows[-1], flush=True)
    return rows


def _timed(steps: dict, repeat: int) -> dict:
    for step in steps.values():
        step()  # warm-up (and compile)
    times = {name: [] for name in steps}
    for _ in range(repeat):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: round(min(ts), 1) for name, ts in times.items()}


def _flex_step(q, k, v, num, idx, backward):
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    nk = -(-k.shape[2] // BLOCK)
    full_idx = torch.zeros(*idx.shape[:3], nk, dtype=torch.int32)
    full_idx[..., :idx.shape[-1]] = idx

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx

    bm = BlockMask.from_kv_blocks(num, full_idx, BLOCK_SIZE=BLOCK, mask_mod=causal,
                                  seq_lengths=(q.shape[2], k.shape[2]))
    compiled = torch.compile(flex_attention)
    return _step(lambda a, b, c: compiled(a, b, c, block_mask=bm), (q, k, v), backward)


def _step(fn, inputs, backward):
    if not backward:
        def run():
            with torch.no_grad():
                fn(*inputs)
        return run
    leaves = [t.detach().requires_grad_() for t in inputs]

    def run_bwd():
        out = fn(*leaves)
        (out[0] if isinstance(out, tuple) else out).sum().backward()
    return run_bwd


def section_speed(args) -> list:
    rows = []
    for s in args.speed_seq:
        q, k, v, _ = structured(s, 8, 64, MIXED)
        mask = _mask(args.speed_estimator, args.threshold)
        key = mask.key()
        with torch.no_grad():
            _, _, num, idx = torch.ops.attnopt.dynamic_attention(q, k, v, None, CAUSAL_BOTTOM_RIGHT, 0.125, key)
        for mode in args.modes:
            bwd = mode == "fwd+bwd"
            steps = {
                "dynamic": _step(lambda a, b, c: torch.ops.attnopt.dynamic_attention(a, b, c, None, CAUSAL_BOTTOM_RIGHT,
                                                                                     0.125, key), (q, k, v), bwd),
                "block_sparse_same_blocks": _step(lambda a, b, c: torch.ops.attnopt.block_sparse_attention(
                    a, b, c, num, idx, None, BLOCK, BLOCK, CAUSAL_BOTTOM_RIGHT, 0.125), (q, k, v), bwd),
                "sdpa_causal": _step(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True),
                                     (q, k, v), bwd),
                "attnopt_exact_causal": _step(lambda a, b, c: attnopt.attention(a, b, c, is_causal=True), (q, k, v),
                                              bwd),
            }  # fmt: skip
            if args.flex:
                steps["flex_same_blocks"] = _flex_step(q, k, v, num, idx, bwd)
            try:
                times = _timed(steps, args.repeat)
            except Exception as exc:  # e.g. FlexAttention cannot compile here: the others still count
                steps.pop("flex_same_blocks", None)
                times = _timed(steps, args.repeat)
                times["flex_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
            if not bwd:  # the estimation share of the last timed dynamic forward
                steps["dynamic"]()
            stats = ops.last_stats(key)
            row = {"seq": s, "mode": mode, "estimator": mask.estimator, "threshold": args.threshold, "ms": times,
                   "density": stats["density_mean"], "density_per_head": [stats["density_min"], stats["density_max"]],
                   "estimate_share": round(stats["estimate_share"], 3),
                   "speedup_vs_sdpa_causal": round(times["sdpa_causal"] / times["dynamic"], 2)}  # fmt: skip
            rows.append(row)
            print(row, flush=True)
    return rows


def section_memory(args) -> dict:
    out = {}
    for s in (args.mem_seq, 2 * args.mem_seq):
        q, k, v, _ = structured(s, 2, 64, MIXED)
        leaves = [t.requires_grad_() for t in (q, k, v)]
        key = _mask("pooled", args.threshold).key()

        def step():
            o = torch.ops.attnopt.dynamic_attention(*leaves, None, CAUSAL_BOTTOM_RIGHT, 0.125, key)[0]
            o.sum().backward()

        step()
        out[s] = peak_mib(step)
    out["ratio"] = round(out[2 * args.mem_seq] / max(out[args.mem_seq], 1e-9), 2)
    print(out, flush=True)
    return out


def section_decode(args) -> dict:
    g = torch.Generator().manual_seed(0)
    vocab, d, s, steps = 8192, 128, args.decode_seq, 16
    keys = torch.randn(vocab, d, generator=g) * (torch.rand(vocab, d, generator=g) < 0.125)  # few channels each
    keys = F.normalize(keys, dim=-1) * 4
    values = F.normalize(torch.randn(vocab, d, generator=g), dim=-1)
    prompt = torch.randint(100, vocab, (s,), generator=g)
    prompt[s // 3:s // 3 + steps + 1] = torch.arange(steps + 1)  # the planted chain; the prompt ends at its start
    prompt[-1] = 0
    pages = max(1, s // 16 // 10)
    runs = {name: [decode.retrieval_decode(prompt, keys, values, steps, (32, 8), top_k) for _ in range(args.repeat)]
            for name, top_k in (("exact", None), ("pages", pages))}  # fmt: skip
    ms = {name: round(min(t for _, t in r) / steps * 1e3, 2) for name, r in runs.items()}
    out = {"seq": s, "pages_kept": pages, "page": 16, "ms_per_step": ms, "speedup": round(ms["exact"] / ms["pages"], 2),
           "tokens_identical": runs["exact"][0][0] == runs["pages"][0][0],
           "retrieved_chain": runs["exact"][0][0] == list(range(1, steps + 1))}  # fmt: skip
    print(out, flush=True)
    if args.generate_seq:
        out["generate"] = decode_generate(args.generate_seq, args.generate_steps)
    return out


class _StepClock(transformers.LogitsProcessor):
    """Records when generate asks for each token's logits processing: the gaps are the per-step times."""

    def __init__(self):
        self.times = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def _generate_ms(model, ids, steps) -> tuple[float, list]:
    """Median milliseconds per decode step of ``model.generate`` (greedy), and the generated tokens."""
    clock = _StepClock()
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=steps + 1, do_sample=False, logits_processor=[clock])
    gaps = sorted(b - a for a, b in zip(clock.times, clock.times[1:]))
    return round(gaps[len(gaps) // 2] * 1e3, 2), out[0, ids.shape[1]:].tolist()


def decode_generate(s: int, steps: int) -> dict:
    """End to end through ``optimized.generate``: a random-weight Llama (2 layers, 8 query and 2 key/value heads,
    D64, SDPA) over an ``s``-token prompt; per-step time of its own generate (KV cache), of the paged caches with
    every page kept, and with 10% of the pages (pages of 16). The prefill keeps every block, so the paged runs
    differ from the original only in the decode steps' selection. Random weights attend diffusely (no retrieval
    structure), so 10% of the pages changes the tokens here; the toy decoder above measures retrieval. On a
    loaded shared box run with ``--threads 1``: the original's step (its KV cache grown by concatenation) suffers
    most from contended threads."""
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=512,
                                   intermediate_size=1024, vocab_size=1024, max_position_embeddings=s + steps + 8,
                                   bos_token_id=1, eos_token_id=None, pad_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(cfg, attn_implementation="sdpa").eval()
    ids = torch.randint(3, cfg.vocab_size, (1, s), generator=torch.Generator().manual_seed(0))
    total = -(-(s + steps) // 16)
    runs = {"original": _generate_ms(model, ids, steps)}
    for name, top_k in (("all_pages", total), ("pages_10pct", max(1, total // 10))):
        mask = masks.Dynamic("pooled", block=BLOCK, top_k=s // BLOCK + 1, decode_top_k=top_k, page=16)
        opt = attnopt.optimize(model, attnopt.Sparse(mask), kwargs=dict(input_ids=ids, use_cache=False),
                               measure=False)  # fmt: skip
        _generate_ms(opt, ids, 2)  # compiles the decode step's graph
        runs[name] = _generate_ms(opt, ids, steps)
    ms = {name: r[0] for name, r in runs.items()}
    out = {"seq": s, "steps": steps, "pages": total, "ms_per_step": ms,
           "speedup_vs_original": round(ms["original"] / ms["pages_10pct"], 2),
           "speedup_vs_all_pages": round(ms["all_pages"] / ms["pages_10pct"], 2),
           "all_pages_tokens_identical": runs["all_pages"][1] == runs["original"][1],
           "pages_10pct_tokens_identical": runs["pages_10pct"][1] == runs["original"][1]}  # fmt: skip
    print(out, flush=True)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sections", default="recall,deviation,speed,memory,decode")
    p.add_argument("--threshold", type=float, default=0.9)
    p.add_argument("--recall-seqs", default="16384,32768")
    p.add_argument("--dev-seq", type=int, default=4096)
    p.add_argument("--dev-thresholds", default="0.9,0.95,0.99")
    p.add_argument("--speed-seq", default="32768")
    p.add_argument("--speed-estimator", default="pooled", choices=ESTIMATORS)
    p.add_argument("--modes", default="fwd")
    p.add_argument("--mem-seq", type=int, default=8192)
    p.add_argument("--decode-seq", type=int, default=16384)
    p.add_argument("--generate-seq", type=int, default=4096, help="the decode section's optimized.generate prompt "
                   "(0: skip)")  # fmt: skip
    p.add_argument("--generate-steps", type=int, default=16)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--flex", action="store_true", help="also compiled FlexAttention on the same blocks (slow compile)")
    p.add_argument("--oracle", action="store_true", help="recall: also the selection on exact block masses (slow)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's); 1 on a loaded shared box")
    p.add_argument("--out")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.recall_seqs = [int(x) for x in args.recall_seqs.split(",")]
    args.speed_seq = [int(x) for x in args.speed_seq.split(",")]
    args.modes = args.modes.split(",")
    args.dev_thresholds = [float(x) for x in args.dev_thresholds.split(",")]
    result = {"torch": torch.__version__, "threads": torch.get_num_threads(), "load_before": os.getloadavg()}
    sections = {"recall": section_recall, "deviation": section_deviation, "speed": section_speed,
                "memory": section_memory, "decode": section_decode}  # fmt: skip
    for name in args.sections.split(","):
        result[name] = sections[name](args)
    result["load_after"] = os.getloadavg()
    write_json(result, args.out)


if __name__ == "__main__":
    main()
