"""Multi-process runs for tests/distributed: ``run(world, cases, tmp)`` spawns ``world`` gloo processes on a
FileStore, runs each named case in every process and returns ``[per rank {case: result}]``.

A case builds its inputs from fixed seeds (the same on every rank), computes the single-process result
itself and the context-parallel one, and returns relative errors (``max |a - b| / max |b|``) and the bytes
it measured; the tests assert on them. One spawn serves every case of a world size (start-up dominates).
"""

from __future__ import annotations

import copy
import os
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

SEQ = 32  # divides into 2·4 chunks
MISTRAL_WINDOW = 5  # keys left of the query: halos span two chunks at 4 ranks (chunk length 4, shard 8)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-30))


def run(world: int, cases: list[str], tmp) -> list[dict]:
    store = os.path.join(str(tmp), f"store{world}")
    mp.spawn(_worker, args=(world, store, cases, str(tmp)), nprocs=world, join=True)
    return [torch.load(os.path.join(str(tmp), f"result{world}_{r}.pt")) for r in range(world)]


def _worker(rank: int, world: int, store: str, cases: list[str], out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    results = {}
    try:
        for name in cases:
            torch._dynamo.reset()  # each case compiles afresh: a case must not hit another's recompile limit
            start = time.perf_counter()
            try:
                results[name] = CASES[name](out_dir)
                results[name]["seconds"] = time.perf_counter() - start
            except Exception:  # reported to the test, which fails with the traceback
                results[name] = {"error": traceback.format_exc()}
            dist.barrier()
        torch.save(results, os.path.join(out_dir, f"result{world}_{rank}.pt"))
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ op cases

def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    gen = torch.Generator().manual_seed(7)
    weight = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    return out, weight, inputs


def _op_case(fn, q, k, v, seq_dim=2, mesh=None):
    """Single process vs sharded over ``mesh`` (the default group for None): (rel error of the output, of dq, dk,
    dv)."""
    import attnopt.distributed as ad

    ref_in = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ref = fn(*ref_in)
    weight = torch.randn(ref.shape, generator=torch.Generator().manual_seed(7), dtype=ref.dtype)
    (ref * weight).sum().backward()
    with ad.context_parallel(mesh, buffers=[], buffer_seq_dims=[]):
        local = [ad.shard(t, seq_dim, mesh).requires_grad_(True) for t in (q, k, v)]
        out = fn(*local)
        (out * ad.shard(weight, seq_dim)).sum().backward()
    got = [ad.unshard(t, seq_dim, mesh) for t in (out, *(x.grad for x in local))]
    return [rel(g, r) for g, r in zip(got, (ref, *(x.grad for x in ref_in)))]


def _qkv(seq=SEQ, hq=4, hkv=2, d=8, dv=8):
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(1, hq, seq, d, generator=gen), torch.randn(1, hkv, seq, d, generator=gen),
            torch.randn(1, hkv, seq, dv, generator=gen))


def case_ops(_out_dir):
    from attnopt.codegen.spec import CAUSAL_NONE, CAUSAL_TOP_LEFT
    from attnopt.distributed import TRAFFIC
    from attnopt.masks import SlidingWindow
    from torch.distributed.device_mesh import init_device_mesh

    q, k, v = _qkv()
    attn = torch.ops.attnopt.attention
    win = SlidingWindow(MISTRAL_WINDOW, 0).key()
    out = {
        "causal": _op_case(lambda q, k, v: attn(q, k, v, None, 0.0, CAUSAL_TOP_LEFT, 0.3, None)[0], q, k, v),
        "full": _op_case(lambda q, k, v: attn(q, k, v, None, 0.0, CAUSAL_NONE, 0.3, None)[0], q, k, v,
                         mesh=init_device_mesh("cpu", (dist.get_world_size(),))),
        "window": _op_case(lambda q, k, v: torch.ops.attnopt.sparse_attention(q, k, v, None, None, win, 0.3)[0],
                           q, k, v),
    }
    decay = torch.log(torch.tensor([0.9, 0.8, 0.95, 0.7]))
    feats = [torch.nn.functional.elu(t) + 1 if i < 2 else t for i, t in enumerate((q, k, v))]
    lin = torch.ops.attnopt.linear_attention
    out["linear"] = _op_case(lambda q, k, v: lin(q, k, v, decay, True, True, 0.3, 1e-6, None, None)[0], *feats)
    for seq in (SEQ, 4 * SEQ):  # the bytes of a linear site do not grow with S
        q, k, v = _qkv(seq)
        TRAFFIC.reset()
        _op_case(lambda q, k, v: lin(q, k, v, None, True, False, 0.3, 1e-6, None, None)[0], q.exp(), k.exp(), v)
        out[f"linear_calls_{seq}"] = list(TRAFFIC.calls)
    return out


# --------------------------------------------------------------------------------------------- model cases

def _model(name, dtype=torch.float32, **overrides):
    from attnopt import zoo

    z = zoo.build(name, attn_implementation="sdpa", batch=1, seq=SEQ, **overrides)
    return z.model.to(dtype), z.kwargs["input_ids"]


def _model_case(name, policy, **overrides):
    """Single-process optimized model vs the same one under context_parallel: rel errors of the output and of
    every parameter gradient, and the measured bytes per routed call."""
    import attnopt
    import attnopt.distributed as ad

    model, ids = _model(name, **overrides)
    pos = torch.arange(SEQ)[None]
    ref = attnopt.optimize(copy.deepcopy(model), policy, kwargs=dict(input_ids=ids, position_ids=pos), measure=False)
    want = ref(input_ids=ids, position_ids=pos).last_hidden_state
    weight = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (want * weight).sum().backward()
    opt = attnopt.optimize(copy.deepcopy(model), policy)
    ids_l, pos_l, weight_l = ids.clone(), pos.clone(), weight.clone()
    ad.TRAFFIC.reset()
    with ad.context_parallel(buffers=[ids_l, pos_l, weight_l], buffer_seq_dims=[1, 1, 1]):
        got = opt(input_ids=ids_l, position_ids=pos_l).last_hidden_state
        forward_calls = list(ad.TRAFFIC.calls)
        (got * weight_l).sum().backward()
        got = ad.unshard(got, 1)
    errors = {"output": rel(got, want)}
    for (n, p), (_, r) in zip(opt.module.named_parameters(), ref.module.named_parameters()):
        g = p.grad.clone()
        dist.all_reduce(g)
        errors[n] = rel(g, r.grad)
    variants = sorted({type(s.variant).__name__ for s in opt.attnopt_report.sites})
    return {"errors": errors, "forward_calls": forward_calls, "variants": variants,
            "layers": model.config.num_hidden_layers, "shape": (model.config.num_key_value_heads,
                                                                model.config.hidden_size // model.config.num_attention_heads)}  # fmt: skip


def case_llama(_out_dir):
    return _model_case("llama", "exact")


def case_mistral(_out_dir):
    return _model_case("mistral", "sparse", sliding_window=MISTRAL_WINDOW + 1)


def case_linear(_out_dir):
    import attnopt

    return _model_case("llama", attnopt.Linear(causal=True, decay="lightning", num_layers=2))


CASES = {"ops": case_ops, "llama": case_llama, "mistral": case_mistral, "linear": case_linear}


# ------------------------------------------------------------------------------------- DDP, FSDP2 and DCP

def _batch():
    """Two rows of tokens: rank r trains on row r (each rank's loss is its row's mean)."""
    _, ids = _model("llama")
    return torch.cat([ids, ids.flip(1)])


def _loss(module, ids):
    out = module(input_ids=ids)
    return (out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]).pow(2).mean()


def _step(wrapped, ids, full=lambda p: p):
    """One SGD step of ``wrapped`` on ``ids``: its gradients and the parameters after it (full tensors). The
    gradients are compared: a step's update is below fp32's resolution of some weights (RMSNorm's 1.0)."""
    opt = torch.optim.SGD(wrapped.parameters(), lr=0.5)
    _loss(wrapped, ids).backward()
    opt.step()
    return [full(p.grad).detach() for p in wrapped.parameters()], [full(p).detach() for p in wrapped.parameters()]


def _reference_step(model):
    """The same step on the original model, one process, the whole batch."""
    return _step(copy.deepcopy(model), _batch())


_COMPILED_REFERENCE = []


def _compiled_reference_step(model):
    """The same step of ``torch.compile(model, backend="attnopt")`` on one process, the whole batch (Inductor's
    gradients differ from eager ones by ~1e-4 even in fp64, with or without attnopt: compiled is compared with
    compiled). Computed once per process."""
    if not _COMPILED_REFERENCE:
        _COMPILED_REFERENCE.append(_step(torch.compile(copy.deepcopy(model), backend="attnopt"), _batch()))
    return _COMPILED_REFERENCE[0]


def _step_errors(got, want):
    """Largest relative error of the gradients and of the parameters after the step."""
    return {"grads": max(rel(g, w) for g, w in zip(got[0], want[0])),
            "params": max(rel(g, w) for g, w in zip(got[1], want[1]))}  # fmt: skip


def case_ddp(_out_dir):
    import attnopt
    from torch.nn.parallel import DistributedDataParallel as DDP

    model, _ = _model("llama", torch.float64, num_hidden_layers=1)  # fp64: Inductor's fused fp32 rounds differently
    want = _reference_step(model)
    ids = _batch()[dist.get_rank():dist.get_rank() + 1]
    optimized = attnopt.optimize(copy.deepcopy(model), "exact")
    eager = _step_errors(_step(DDP(optimized), ids), want)
    compiled = torch.compile(DDP(copy.deepcopy(model)), backend="attnopt")
    return {"optimize": eager, "compile": _step_errors(_step(compiled, ids), _compiled_reference_step(model)),
            "sites": len(optimized.attnopt_report.sites)}  # fmt: skip


def case_fsdp(out_dir):
    import attnopt
    import torch.distributed.checkpoint as dcp
    from torch.distributed.fsdp import fully_shard

    model, _ = _model("llama", torch.float64, num_hidden_layers=1)  # fp64: Inductor's fused fp32 rounds differently
    want = _reference_step(model)
    ids = _batch()[dist.get_rank():dist.get_rank() + 1]
    full = lambda p: p.full_tensor()  # noqa: E731
    optimized = attnopt.optimize(copy.deepcopy(model), "exact")
    fully_shard(optimized)
    eager = _step_errors(_step(optimized, ids, full), want)
    dcp.save(optimized.state_dict(), checkpoint_id=os.path.join(out_dir, "dcp"))
    saved = {n: t.full_tensor() for n, t in optimized.state_dict().items()}
    if dist.get_rank() == 0:
        torch.save(saved, os.path.join(out_dir, "dcp_expected.pt"))
    inner = copy.deepcopy(model)
    fully_shard(inner)
    compiled = torch.compile(inner, backend="attnopt")
    return {"optimize": eager, "compile": _step_errors(_step(compiled, ids, full), _compiled_reference_step(model))}


CASES.update({"ddp": case_ddp, "fsdp": case_fsdp})
