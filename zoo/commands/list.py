"""`zoo list`: the presets with their sizes, model files, weight sources and licences."""
from ..registry import PRESETS, build

HELP = "list the presets with sizes, weight sources and licences"


def add_arguments(parser):
    pass


def run(args):
    rows = [("preset", "model file", "parameters", "weights", "licence")]
    for name, p in PRESETS.items():
        n = sum(t.numel() for t in build(p.arch, p.config, meta=True).parameters())
        size = f"{n / 1e6:,.1f}M" if n >= 1e5 else f"{n / 1e3:,.1f}K"
        rows.append((name, f"models/{p.arch}.py", size, p.repo or "-", p.license or "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
