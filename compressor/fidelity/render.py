"""explain's outputs: explain.md (markdown), explain.png (SQNR per layer) and the console notes;
the figures themselves come from :mod:`compressor.fidelity.explain`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .explain import Explanation, fmt_value, lowest_sqnr, worst_layer

EXPLAIN_FILES = ("explain.json", "explain.md", "explain.png")


def render_markdown(data: dict[str, Any], *, heading: str = "##", limit: int = 10) -> str:
    h = heading
    lines = [f"{h} Where accuracy is lost", "",
             f"{data['images']['count']} images {data['images']['from']}; layer SQNR against the float model each "
             f"engine was made from; flagged below {data['config']['threshold_db']:g} dB.", ""]
    lines += [f"{h}# Per pass", "", "| step | kind | form | top-1 % | agreement % | output SQNR dB |", "|---|---|---|---|---|---|"]
    for s in data["stages"]:
        if "status" in s:
            lines.append(f"| {s['step']} | {s['kind']} | {s.get('form', '')} | {s['status']} | | |")
        else:
            lines.append(f"| {s['step']} | {s['kind']} | {s.get('form', '')} | {s['top1']:.2f} | {s['agreement']:.2f} "
                         f"| {fmt_value(s['output_sqnr_db'])} |")
    lines.append("")
    for name, e in data["engines"].items():
        lines += [f"{h}# {name}", ""]
        if "status" in e:
            lines += [e["status"], ""]
            continue
        w = worst_layer(e)
        lines.append(f"output SQNR {fmt_value(e.get('output_sqnr_db'))} dB; layers against {e.get('reference', 'source')}"
                     + (f"; worst: **{w['name']}** ({w['why']})" if w else ""))
        if e.get("taps"):
            lines.append(f"taps: {e['taps']}")
        lines.append("")
        if "layers_status" in e:
            lines += [e["layers_status"], ""]
            continue
        sens = {s["name"]: s for s in e.get("sensitivity", []) if "gain_db" in s}
        layers = [layer for layer in e["layers"] if "status" not in layer]
        layers.sort(key=lambda layer: (-sens[layer["name"]]["gain_db"] if layer["name"] in sens else 1e9,
                                       lowest_sqnr(layer) if lowest_sqnr(layer) is not None else 1e9))
        lines += ["| layer | SQNR dB | channel SQNR dB | cosine | max abs err | outside range % | dB won back without its quantizer |",
                  "|---|---|---|---|---|---|---|"]
        for layer in layers[:limit]:
            s = sens.get(layer["name"])
            outside = layer.get("outside_share")
            lines.append(f"| {layer['name']} | {fmt_value(layer.get('sqnr_db'))} | {fmt_value(layer.get('channel_sqnr_db'))} | "
                         f"{fmt_value(layer.get('cosine'), 4)} | {fmt_value(layer.get('max_abs_err'), 3)} | "
                         f"{'-' if outside is None else f'{100 * outside:.2f}'} | {'-' if s is None else fmt_value(s['gain_db'])} |")
        rest = len(layers) - limit
        if rest > 0:
            lines.append(f"| ({rest} more in explain.json) | | | | | | |")
        missing = [layer for layer in e["layers"] if "status" in layer]
        lines.append("")
        for layer in missing:
            lines.append(f"- {layer['name']}: {layer['status']}")
        if e.get("unmapped"):
            lines.append(f"- engine layers not mapped to a source layer: {', '.join(e['unmapped'][:8])}")
        if e.get("sensitivity_status"):
            lines.append(f"- sensitivity {e['sensitivity_status']}")
        for d in e.get("verdict", {}).get("drift", [])[:5]:
            lines.append(f"- calibration drift at {d['name']} (on {data['drift_images']['count']} evaluation "
                         f"images): {d['why']}")
        lines.append("")
    if data["disagreements"]:
        lines += [f"{h}# Backends that disagree", ""]
        for d in data["disagreements"]:
            a, b = d["engines"]
            f = d["first"]
            lines.append(f"- {a} and {b} ({d['precision']}): {d['layers']} layer(s) more than "
                         f"{data['config']['disagreement_db']:g} dB apart, first {f['name']} ({fmt_value(f[a])} against "
                         f"{fmt_value(f[b])} dB)")
        lines.append("")
    return "\n".join(lines)


def plot(data: dict[str, Any], path: Path) -> bool:
    """SQNR per layer in graph order, one line per engine; False when matplotlib is missing."""
    from ..plots import pyplot, save

    plt = pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(10, 4.5), dpi=110)
    labels: list[str] = []
    for e in data["engines"].values():
        labels += [layer["name"] for layer in e.get("layers", []) if layer["name"] not in labels]
    at = {name: i for i, name in enumerate(labels)}
    drawn = skipped = 0
    for name, e in data["engines"].items():
        layers = [layer for layer in e.get("layers", []) if layer.get("sqnr_db") is not None]
        if not layers or min(layer["sqnr_db"] for layer in layers) >= 80.0:
            skipped += 1
            continue
        ax.plot([at[layer["name"]] for layer in layers], [min(layer["sqnr_db"], 80.0) for layer in layers],
                marker=".", label=f"{name} ({e['precision']})")
        drawn += 1
    if not drawn:
        plt.close(fig)
        return False
    ax.axhline(data["config"]["threshold_db"], color="grey", linestyle="--", linewidth=1, label="threshold")
    step = max(1, len(labels) // 30)
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=70, fontsize=7)
    ax.set_ylabel("SQNR against the float model, dB (capped at 80)")
    ax.set_title("Layer fidelity per engine" + (f" ({skipped} engine(s) above 80 dB everywhere not drawn)"
                                                 if skipped else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return save(fig, path)


def write_outputs(exp: Explanation, out_dir: Path) -> list[Path]:
    from ..staging import atomic_write, json_text

    written = [out_dir / "explain.json", out_dir / "explain.md"]
    atomic_write(written[0], json_text(exp.data))
    atomic_write(written[1], "# compressor explain\n\n" + render_markdown(exp.data))
    if plot(exp.data, out_dir / "explain.png"):
        written.append(out_dir / "explain.png")
    return written


def explain_notes(data: dict[str, Any], images: int) -> list[str]:
    """Console lines for what an explanation could not do as asked: fewer images than ``images``
    (the training split holds no more besides calibration's), per-pass rows the pass cache lacks."""
    notes = []
    used = data["images"]["count"]
    if used < images:
        notes.append(f"explained on {used} images, not the {images} asked for: that is every image of the training "
                     "split that calibration did not use")
    missing = data.get("stages_not_in_cache") or []
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        notes.append(f"no per-pass rows for {missing[0]}{more}: the pass cache holds no output of them (cleared, "
                     "another --cache-dir, or a run with --no-cache); run the recipe again to fill it")
    return notes
