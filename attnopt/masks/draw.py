"""Pictures of masks: text for terminals and tests, PNG through matplotlib (imported only here, when drawing)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (a type only: the mask classes use this module)
    from attnopt.masks.base import Mask

MAX_TEXT = 256  # the largest side drawn as text


def draw_text(mask: Mask, sq: int, sk: int, head: int = 0, block: tuple[int, int] | None = None) -> str:
    """``#`` visible, ``.`` hidden, one line per query; with ``block=(bm, bn)`` one character per tile:
    ``F`` full, ``p`` partial (element test), ``.`` skipped."""
    if block is not None:
        bm, bn = block
        bmap = mask.block_map(sq, sk, bm, bn, heads=head + 1, bits=False)
        return bmap.text(min(head, bmap.heads - 1))
    if max(sq, sk) > MAX_TEXT:
        raise ValueError(f"text drawings are for sizes up to {MAX_TEXT}; draw tiles with block=(bm, bn) instead")
    dense = mask.dense(sq, sk, heads=head + 1)
    rows = dense[min(head, dense.shape[0] - 1)].tolist()
    return "\n".join("".join("#" if x else "." for x in row) for row in rows)


def draw_png(mask: Mask, path, sq: int, sk: int, head: int = 0, block: tuple[int, int] | None = None) -> None:
    """Writes the element mask of ``head`` as a PNG, with tile boundaries and skipped tiles shaded when ``block``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:  # pragma: no cover - exercised only without the extra
        raise ImportError("drawing masks as PNG needs matplotlib: pip install 'attnopt[plot]'") from exc
    dense = mask.dense(sq, sk, heads=head + 1)
    img = dense[min(head, dense.shape[0] - 1)].float().numpy()
    fig, ax = plt.subplots(figsize=(6, 6 * sq / max(sk, 1) + 0.5))
    ax.imshow(img, cmap="Blues", vmin=0, vmax=1.25, interpolation="nearest", aspect="auto")
    if block is not None:
        bm, bn = block
        bmap = mask.block_map(sq, sk, bm, bn, heads=head + 1, bits=False)
        for r, line in enumerate(bmap.text(min(head, bmap.heads - 1)).splitlines()):
            for c, ch in enumerate(line):
                if ch == ".":
                    ax.add_patch(plt.Rectangle((c * bn - 0.5, r * bm - 0.5), bn, bm, color="0.85", zorder=0.5))
        for y in range(0, sq + 1, bm):
            ax.axhline(y - 0.5, color="0.5", lw=0.5)
        for x in range(0, sk + 1, bn):
            ax.axvline(x - 0.5, color="0.5", lw=0.5)
    ax.set_xlabel("key")
    ax.set_ylabel("query")
    ax.set_title(f"{mask}\nSq={sq}, Sk={sk}, head {head}, density {mask.density(sq, sk, head + 1):.1%}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
