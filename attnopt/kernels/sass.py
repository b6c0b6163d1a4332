"""What NVIDIA's assembler and disassembler say about a compiled kernel: the tools in Triton's wheel, their output parsed.

Triton's NVIDIA backend ships ``ptxas`` (and ``ptxas-blackwell``, the one it uses from sm_90 on), ``cuobjdump``
and ``nvdisasm`` under ``triton/backends/nvidia/bin``. This module runs them on a kernel's PTX and cubin and
parses what they print:

* :func:`parse_ptxas` reads ``ptxas -v --warn-on-spills``: registers per thread, spill stores and loads,
  stack frame, and the performance advisories (``(C7515) Potential Performance Loss: wgmma.mma_async
  instructions are serialized ...``) and warnings;
* :func:`parse_sass` reads ``cuobjdump -sass`` into ``(address, opcode, text)`` instructions, :func:`loops`
  finds the loops (a branch back to an earlier address) and :func:`interior_loop` the innermost loop with the
  most tensor-core instructions, whose instruction count and warpgroup operations (``WARPGROUP.ARRIVE``,
  ``WARPGROUP.DEPBAR``) tell whether the wgmma pipeline runs back to back or serialized.

Nothing here imports triton at module level; only :func:`tool` asks where Triton is installed.
"""

from __future__ import annotations

import re
import subprocess
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

_MESSAGE = re.compile(r"^\S+ (?:info|warning)\s*: (\(C\d+\).*|.*spill.*)$")
_WHERE = re.compile(r" in (?:the )?function '[^']*'| in line \d+")
_REGISTERS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_INSTRUCTION = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")
_BRANCH = re.compile(r"\bBRA(?:\.[A-Z.]+)?\s+(?:`\()?0x([0-9a-f]+)")
_UTCMMA = re.compile(r"UTC[A-Z]*MMA")
_ALLOWED = re.compile(r"Allowed values for this option:(.*?)(?:Default value|\n\s*\n|\Z)", re.S)

SERIALIZED_WGMMA = re.compile(r"wgmma.*serializ", re.I)


def tool(name: str, capability: int | None = None) -> Path:
    """The path of ``name`` (``ptxas``, ``cuobjdump``, ``nvdisasm``) in Triton's wheel; for ``ptxas`` with a
    ``capability`` (e.g. 90), the assembler Triton itself runs for that target (``ptxas-blackwell`` from 90 on,
    when the wheel has it)."""
    import triton

    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    candidates = [bin_dir / name]
    if name == "ptxas" and capability is not None and capability >= 90:
        candidates.insert(0, bin_dir / "ptxas-blackwell")
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"{name} is not in Triton's wheel ({bin_dir}); attnopt kernels build needs Triton's "
                            "NVIDIA backend (pip install triton on Linux x86-64 or aarch64)")  # fmt: skip


def supported_archs(ptxas: Path) -> list[str]:
    """The real GPU targets (``sm_XY``, ``sm_XYa``) that ``ptxas`` accepts, from its ``--help``."""
    return parse_gpu_names(subprocess.run([str(ptxas), "--help"], capture_output=True, text=True, check=False).stdout)


def parse_gpu_names(help_text: str) -> list[str]:
    """The real GPU targets of ``--gpu-name`` in ``ptxas --help`` output, by architecture number."""
    match = _ALLOWED.search(help_text[help_text.find("--gpu-name"):])
    if match is None:
        return []
    names = set(re.findall(r"'(sm_\d+[a-z]?)'", match.group(1)))
    return sorted(names, key=lambda a: (int(re.sub(r"\D", "", a)), a))


@dataclass(frozen=True)
class PtxasInfo:
    """What ``ptxas -v --warn-on-spills`` reports for one kernel."""

    registers: int | None
    spill_stores: int
    spill_loads: int
    stack_bytes: int
    advisories: tuple[str, ...]

    @property
    def spill_bytes(self) -> int:
        return max(self.spill_stores, self.spill_loads)

    @property
    def serialized_wgmma(self) -> bool:
        """Whether an advisory says the wgmma pipeline is serialized (C7515, C7512, ...)."""
        return any(SERIALIZED_WGMMA.search(a) for a in self.advisories)


def parse_ptxas(text: str) -> PtxasInfo:
    """Parses the ``-v --warn-on-spills`` output of ``ptxas`` for a module with one kernel."""
    registers = _REGISTERS.search(text)
    frames = [tuple(int(x) for x in m) for m in _FRAME.findall(text)]
    stack, stores, loads = (max(column) for column in zip(*frames)) if frames else (0, 0, 0)
    advisories = []
    for line in text.splitlines():
        match = _MESSAGE.match(line.strip())
        message = _WHERE.sub("", match.group(1)).strip() if match else None
        if message and message not in advisories:
            advisories.append(message)
    return PtxasInfo(registers=int(registers.group(1)) if registers else None, spill_stores=stores,
                     spill_loads=loads, stack_bytes=stack, advisories=tuple(advisories))  # fmt: skip


def run_ptxas(ptx: str, arch: str, capability: int) -> PtxasInfo:
    """Assembles ``ptx`` for ``arch`` (``sm_90a``) with ``-v --warn-on-spills`` and parses what ptxas says.
    Raises RuntimeError with ptxas's message when it rejects the PTX."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "kernel.ptx"
        src.write_text(ptx)
        cmd = [str(tool("ptxas", capability)), "-v", "--warn-on-spills", f"-arch={arch}", str(src), "-o",
               str(Path(tmp) / "kernel.cubin")]  # fmt: skip
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for {arch}: {res.stderr.strip()[:2000]}")
    return parse_ptxas(res.stdout + res.stderr)


def disassemble(cubin: bytes) -> str:
    """``cuobjdump -sass`` of a cubin."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(tool("cuobjdump")), "-sass", str(path)], capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump failed: {res.stderr.strip()[:2000]}")
    return res.stdout


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str  # e.g. "HGMMA.64x128x16.F32.BF16", without the predicate
    text: str


def parse_sass(text: str) -> list[Instruction]:
    """The instructions of a ``cuobjdump -sass`` (or ``nvdisasm``) listing, in address order."""
    out = []
    for line in text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            words = match.group(2).split()
            opcode = words[1] if words[0].startswith("@") and len(words) > 1 else words[0]
            out.append(Instruction(int(match.group(1), 16), opcode, match.group(2)))
    return out


def mix(instructions: list[Instruction]) -> dict:
    """Tensor-core and warpgroup counts of a list of instructions: ``hgmma`` (Hopper wgmma), ``hmma``
    (mma.sync), ``utcmma`` (Blackwell tcgen05: UTCHMMA, UTCQMMA, ...), ``warpgroup_ops`` (``WARPGROUP.*``) and
    ``warpgroup`` (each kind's count)."""
    ops = [i.opcode for i in instructions]
    warpgroup = Counter(".".join(o.split(".")[:2]) for o in ops if o.startswith("WARPGROUP"))
    return dict(instructions=len(ops), hgmma=sum(o.startswith("HGMMA") for o in ops),
                hmma=sum(o.startswith("HMMA") for o in ops), utcmma=sum(_UTCMMA.match(o) is not None for o in ops),
                warpgroup_ops=sum(warpgroup.values()), warpgroup=dict(sorted(warpgroup.items())))  # fmt: skip


def tensor_ops(counts: dict) -> int:
    """All tensor-core instructions of a :func:`mix`."""
    return counts["hgmma"] + counts["hmma"] + counts["utcmma"]


def loops(instructions: list[Instruction]) -> list[dict]:
    """Every loop: a branch to an earlier (or its own) address; ``start``/``end`` addresses, ``innermost``
    (no other loop inside) and the :func:`mix` of its body, the branch included."""
    index = {ins.address: i for i, ins in enumerate(instructions)}
    spans = []
    for i, ins in enumerate(instructions):
        match = _BRANCH.search(ins.text) if ins.opcode.startswith("BRA") else None
        if match and int(match.group(1), 16) <= ins.address and int(match.group(1), 16) in index:
            spans.append((index[int(match.group(1), 16)], i))
    found = []
    for first, last in spans:
        inner = any(first <= a and b <= last and (a, b) != (first, last) for a, b in spans)
        found.append(dict(start=instructions[first].address, end=instructions[last].address, innermost=not inner,
                          **mix(instructions[first:last + 1])))  # fmt: skip
    return found


def interior_loop(instructions: list[Instruction]) -> dict | None:
    """The innermost loop with the most tensor-core instructions (the attention kernels' key-tile loop), or
    None when no loop issues any."""
    found = [lp for lp in loops(instructions) if lp["innermost"] and tensor_ops(lp) > 0]
    return max(found, key=lambda lp: (tensor_ops(lp), lp["instructions"]), default=None)
