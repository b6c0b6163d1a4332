"""Linear attention through the generated Triton kernels: validation, spec choice and launches.

``forward`` and ``backward`` are the CUDA implementations behind ``torch.ops.attnopt.linear_attention``
and its backward, with the results of :func:`attnopt.kernels.linear.chunked.forward` / ``backward``
(same argument order). q, k, v are read through their strides (GQA: key/value head h // group, never
repeated); states are fp32 and contiguous. Forward: a state pass (``state`` kernel) stores the state
carried into every chunk, then all chunks' outputs run in parallel (``out`` kernel). Backward: the
forward states are recomputed, a reverse state pass runs over (s·q, dO'), and the ``grad`` kernel
produces every chunk's gradients in parallel. See :mod:`attnopt.kernels.linear.render`.
"""

from __future__ import annotations

import contextlib

import torch

from attnopt.codegen.spec import dtype_name, inputs_refusal
from attnopt.kernels.launch import device_capability, launch_first
from attnopt.kernels.linear.render import load
from attnopt.kernels.linear.spec import CHUNK, MAX_HEAD_DIM, specs


def supported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these inputs (the op then runs the chunked PyTorch code), or None."""
    return inputs_refusal(q, k, v, MAX_HEAD_DIM)


def _strides(t: torch.Tensor, name: str) -> dict:
    return {f"stride_{name}{d}": t.stride(i) for i, d in enumerate("bhsd")}


def _run(candidates: list, grid, args: dict, like: torch.Tensor) -> None:
    """Launches the first of ``candidates`` the GPU takes (:func:`attnopt.kernels.launch.launch_first`);
    ``grid(spec)`` is its launch grid."""

    def launch(spec) -> None:
        guard = torch.cuda.device(like.device) if like.is_cuda else contextlib.nullcontext()
        with guard:
            load(spec)[grid(spec)](**args, num_warps=spec.num_warps, num_stages=spec.num_stages)

    launch_first(candidates, launch, str(like.device))


def _fp32(t: torch.Tensor | None, shape: tuple, like: torch.Tensor) -> torch.Tensor:
    """``t`` as contiguous fp32 (zeros of ``shape`` when None)."""
    if t is None:
        return torch.zeros(shape, dtype=torch.float32, device=like.device)
    return t.to(torch.float32).contiguous()


def _states(x, y, u, log_decay, init, init_norm, causal, normalize, group, x_scale, reverse):
    """Runs the state kernel over ``x`` [B, H / group, S, D] and ``y`` [B, H / group, S, Dv].

    Returns (per-chunk states [B*H, N, D, Dv] or None, their norms [B*H, N, D] or None, final state
    [B, H, D, Dv], final norm [B, H, D] or None). ``init``/``init_norm`` are fp32 contiguous.
    """
    b, h, d, dv = init.shape
    seq = x.shape[2]
    n = max(-(-seq // CHUNK), 1)
    # The reverse pass reads s·q and the fp32 dO / (den + eps): its spec keeps q's dtype, so its products run
    # on tensor cores in tf32 (ieee only for fp32 inputs; see attnopt.codegen.triton_text.dot).
    candidates = specs("state", d, dv, dtype_name(x.dtype), causal, normalize, log_decay is not None, reverse,
                       device_capability(x))
    final = torch.empty_like(init)
    args = dict(X=x, Y=y, Init=init, Final=final, **_strides(x, "x"), **_strides(y, "y"), num_heads=h, group=group,
                seq=seq, n_chunks=n, x_scale=float(x_scale))  # fmt: skip
    states = norms = final_norm = None
    if causal:
        states = torch.empty((b * h, n, d, dv), dtype=torch.float32, device=x.device)
        args["States"] = states
    if normalize:
        final_norm = torch.empty_like(init_norm)
        args.update(InitNorm=init_norm, FinalNorm=final_norm)
        if causal:
            norms = torch.empty((b * h, n, d), dtype=torch.float32, device=x.device)
            args["Norms"] = norms
        if reverse:
            args["U"] = u
    if log_decay is not None:
        args["LogDecay"] = log_decay
    _run(candidates, lambda spec: (-(-dv // spec.block_dv), b * h), args, x)
    return states, norms, final, final_norm


def _log_decay(log_decay: torch.Tensor | None) -> torch.Tensor | None:
    return None if log_decay is None else log_decay.to(torch.float32).contiguous()


def forward(q, k, v, log_decay=None, causal=True, normalize=True, scale=1.0, eps=1e-6, initial_state=None,
            initial_norm=None):  # fmt: skip
    """Returns ``(out, den, state, norm)`` as :func:`attnopt.kernels.linear.chunked.forward`."""
    b, hq, sq, d = q.shape
    hkv, dv = k.shape[1], v.shape[-1]
    log_decay = _log_decay(log_decay)
    init = _fp32(initial_state, (b, hq, d, dv), q)
    init_norm = _fp32(initial_norm, (b, hq, d), q) if normalize else None
    states, norms, final, final_norm = _states(k, v, None, log_decay, init, init_norm, causal, normalize, hq // hkv,
                                               1.0, reverse=False)  # fmt: skip
    out = torch.empty((b, hq, sq, dv), dtype=q.dtype, device=q.device)
    den = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device) if normalize else q.new_empty(0, dtype=torch.float32)
    if sq > 0:
        candidates = specs("out", d, dv, dtype_name(q.dtype), causal, normalize, log_decay is not None,
                           capability=device_capability(q))
        n = max(-(-sq // CHUNK), 1)
        args = dict(Q=q, K=k, V=v, Out=out, States=states if causal else final, **_strides(q, "q"), **_strides(k, "k"),
                    **_strides(v, "v"), **_strides(out, "o"), num_heads=hq, group=hq // hkv, seq_q=sq, n_chunks=n,
                    scale=float(scale), eps=float(eps))  # fmt: skip
        if normalize:
            args.update(Norms=norms if causal else final_norm, Den=den)
        if log_decay is not None:
            args["LogDecay"] = log_decay
        _run(candidates, lambda spec: (n, -(-dv // spec.block_dv), b * hq), args, q)
    norm = final_norm if normalize else q.new_empty(0, dtype=torch.float32)
    return out, den, final, norm


def _group_sum(t: torch.Tensor, hkv: int) -> torch.Tensor:
    b, hq = t.shape[:2]
    return t.reshape(b, hkv, hq // hkv, *t.shape[2:]).sum(dim=2)


def _grads(q, k, v, do, carried: dict, log_decay, causal, normalize, scale):
    """Runs the grad kernel over every chunk; ``carried`` holds the states (and dden) it reads.

    Returns dq (q's dtype), dk [B, H, Sk, D] and dv [B, H, Sk, Dv] fp32 per query head. Each of the kernel's
    key-dim column tiles adds its part of dv atomically (a [tiles, ...] buffer of parts would take
    tiles times dv's memory).
    """
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    dq = torch.empty_like(q)
    dk = torch.empty((b, hq, sk, d), dtype=torch.float32, device=q.device)
    rows = max(sq, sk)
    if rows == 0:
        return dq, dk, torch.empty((b, hq, sk, dv), dtype=torch.float32, device=q.device)
    n = max(-(-rows // CHUNK), 1)
    args = dict(Q=q, K=k, V=v, DNum=do, DQ=dq, DK=dk, **carried, **_strides(q, "q"), **_strides(k, "k"),
                **_strides(v, "v"), **_strides(do, "dn"), **_strides(dq, "dq"), **_strides(dk, "dk"),
                num_heads=hq, group=hq // hkv, seq_q=sq, seq_k=sk, n_chunks=n, scale=float(scale))  # fmt: skip
    if log_decay is not None:
        args["LogDecay"] = log_decay
    dvh = torch.zeros((b, hq, sk, dv), dtype=torch.float32, device=q.device)  # column tiles add their parts
    args.update(DV=dvh, **_strides(dvh, "dv"))
    candidates = specs("grad", d, dv, dtype_name(q.dtype), causal, normalize, log_decay is not None,
                       capability=device_capability(q))
    _run(candidates, lambda spec: (n, -(-d // spec.block_dt), b * hq), args, q)
    return dq, dk, dvh


def backward(dout, q, k, v, out, den, log_decay=None, causal=True, normalize=True, scale=1.0, eps=1e-6,
             initial_state=None, initial_norm=None, dstate=None, dnorm=None):  # fmt: skip
    """Returns ``(dq, dk, dv, dinitial_state, dinitial_norm)`` as :func:`attnopt.kernels.linear.chunked.backward`."""
    b, hq, sq, d = q.shape
    hkv, sk, dv = k.shape[1], k.shape[2], v.shape[-1]
    log_decay = _log_decay(log_decay)
    do = dout.to(torch.float32)
    dden = None
    if normalize:
        inv = 1.0 / (den + eps)  # [B, H, Sq]
        dden = (-(do * out.to(torch.float32)).sum(-1) * inv).contiguous()
        do = do * inv[..., None]
    do = do.contiguous()
    init = _fp32(initial_state, (b, hq, d, dv), q)
    init_norm = _fp32(initial_norm, (b, hq, d), q) if normalize else None
    states, norms, final, final_norm = _states(k, v, None, log_decay, init, init_norm, causal, normalize, hq // hkv,
                                               1.0, reverse=False)  # fmt: skip
    dfinal = _fp32(dstate, (b, hq, d, dv), q)
    dfinal_norm = _fp32(dnorm, (b, hq, d), q) if normalize else None
    rstates, rnorms, dinit, dinit_norm = _states(q, do, dden, log_decay, dfinal, dfinal_norm, causal, normalize, 1,
                                                 scale, reverse=True)  # fmt: skip
    carried = dict(States=states if causal else final, RStates=rstates if causal else dinit)
    if normalize:
        carried.update(DDen=dden, Norms=norms if causal else final_norm, RNorms=rnorms if causal else dinit_norm)
    dq, dk, dvh = _grads(q, k, v, do, carried, log_decay, causal, normalize, scale)
    dk = _group_sum(dk, hkv).to(k.dtype)
    dvk = _group_sum(dvh, hkv).to(v.dtype)
    if not causal:
        return dq, dk, dvk, None, None
    return dq, dk, dvk, dinit, dinit_norm if normalize else None


def arch_spec(spec, capability: tuple[int, int]):
    """The spec this launcher runs on a GPU of compute ``capability`` for the kernel ``spec`` names (the first
    of :func:`attnopt.kernels.linear.spec.specs` there; ``attnopt kernels build`` compiles it per target)."""
    return specs(spec.kind, spec.head_dim, spec.head_dim_v, spec.dtype, spec.causal, spec.normalize, spec.decay,
                 spec.reverse, tuple(capability))[0]  # fmt: skip
