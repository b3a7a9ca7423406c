"""The leakage report: the table printed, privacy.json, privacy.md and privacy.png, each written atomically."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sflam.platform.files import write_text
from sflam.privacy.accounting import Guarantee
from sflam.privacy.build import AttackSetup
from sflam.privacy.suite import SuiteResult, counted_positions, decode

THREAT_MODEL = (
    "An honest-but-curious server that sees every smashed-data message exactly as it arrives (after the codec, with "
    "any defence's noise) with its attention mask, knows the device part's architecture and current weights "
    "(white-box: it distributes the global device adapter), and holds auxiliary public data of the same domain "
    "(a seeded part of the train split, disjoint from the victims, the held-out test samples attacked).")
LABELS = "Labels are sent in the clear to the server: with the head on the server, every label leaks entirely."
SHOWN_VICTIMS = 6  # victims drawn or written out in the report, spread over all of them


@dataclass
class PrivacyReport:
    """Everything `sflam attack` measured on one configuration."""

    experiment: dict[str, Any]
    suite: SuiteResult
    guarantee: Guarantee | None
    auxiliary: dict[str, Any]
    victims: dict[str, Any]
    adapters: str | None
    notes: list[str]
    wall_s: float
    files: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        best = self.suite.best()
        return {
            **self.experiment,
            "threat_model": THREAT_MODEL,
            "labels": "sent in the clear to the server",
            "auxiliary": self.auxiliary,
            "victims": self.victims,
            "adapters": self.adapters,
            "notes": self.notes,
            "attacks": [{"name": r.name, "description": r.description, "metrics": _finite(r.metrics),
                         "budgets": r.budgets, "wall_s": round(r.wall_s, 3)} for r in self.suite.results],
            "best": {"attack": best.name, "metric": self.suite.headline,
                     "value": _finite(best.metrics)[self.suite.headline]},
            "dp": None if self.guarantee is None else _finite(self.guarantee.as_dict()),
            "info": self.suite.info,
            "intercept_s": round(self.suite.intercept_s, 3),
            "wall_s": round(self.wall_s, 3),
        }


def _finite(values: dict[str, Any]) -> dict[str, Any]:
    """JSON has no infinity: an infinite PSNR (exact recovery) or ε (no noise) is written as the string "inf"."""
    return {k: ("inf" if isinstance(v, float) and math.isinf(v) else v) for k, v in values.items()}


def _value(value: float) -> str:
    return "inf" if math.isinf(value) else f"{value:.4g}"


def format_table(report: PrivacyReport) -> list[str]:
    """The leakage table: one row per attack, its metrics, budget and wall time."""
    metrics = list(report.suite.results[0].metrics)
    header = ["attack", *metrics, "budget", "wall s"]
    rows = [[r.name, *(_value(r.metrics[m]) for m in metrics),
             " ".join(f"{k}={v}" for k, v in r.budgets.items()), f"{r.wall_s:.1f}"] for r in report.suite.results]
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
             for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    def cells(row: list[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |"

    return [cells(header), "|" + "|".join("---" for _ in header) + "|", *(cells(r) for r in rows)]


def markdown(report: PrivacyReport, setup: AttackSetup, figure: str | None) -> str:
    exp = report.experiment
    lines = [f"# Leakage of `{exp['name']}`: {exp['model']}, cut layer {exp['cut_layer']}, "
             f"{exp['weights']} device weights, {exp['activation_bits']}-bit smashed data", "",
             f"**Threat model.** {THREAT_MODEL}", "", f"**{LABELS}**", "",
             f"Auxiliary data: {report.auxiliary['samples']} samples of the {report.auxiliary['source']}. "
             f"Victims: {report.victims['samples']} samples of the {report.victims['source']}. Device adapter: "
             f"{report.adapters or 'none saved (a freshly built device part)'}.", ""]
    defence = exp["defence"]
    lines += [f"Defence: clip norm {defence['clip_norm']}, noise sigma {defence['noise_sigma']}, NoPeek weight "
              f"{defence['nopeek_weight']} (NoPeek acts in training; this measures the device part as built or "
              f"loaded).", ""]
    metrics = list(report.suite.results[0].metrics)
    rows = [[r.name, *(_value(r.metrics[m]) for m in metrics),
             ", ".join(f"{k}={v}" for k, v in r.budgets.items()), f"{r.wall_s:.1f}"] for r in report.suite.results]
    lines += ["## Leakage per attack", "", *_markdown_table(["attack", *metrics, "budget", "wall s"], rows), ""]
    best = report.suite.best()
    lines += [f"Most leaking: **{best.name}** ({report.suite.headline} {_value(best.metrics[report.suite.headline])})."
              f" Messages made in {report.suite.intercept_s:.1f} s; the whole attack took {report.wall_s:.1f} s.", ""]
    for key, value in report.suite.info.items():
        lines.append(f"- {key.replace('_', ' ')}: {value:.4g}")
    lines += ["", "## Differential privacy", ""]
    if report.guarantee is None:
        lines += ["No noise is added (privacy.noise_sigma = 0): the messages carry no DP guarantee.", ""]
    else:
        g = report.guarantee
        lines += [f"(ε, δ) = ({_value(g.epsilon)}, {g.delta:g}) with noise multiplier {g.noise_multiplier:g} over "
                  f"{g.releases} releases. {g.statement}", ""]
    for note in report.notes:
        lines.append(f"Note: {note}.")
    lines += ["", "## Reconstructions", ""]
    if figure is not None:
        lines += [f"Originals (left) beside each attack's reconstruction, at the original resolution: "
                  f"![reconstructions]({figure})", ""]
    else:
        lines += _text_examples(report, setup)
    return "\n".join(lines).rstrip() + "\n"


def shown_victims(count: int) -> torch.Tensor:
    """The victims written out or drawn: SHOWN_VICTIMS spread evenly over them (the split keeps the data's
    order, which may be by class)."""
    return torch.linspace(0, count - 1, min(SHOWN_VICTIMS, count)).round().long()


def _text_examples(report: PrivacyReport, setup: AttackSetup) -> list[str]:
    """Some victims' sentences beside each attack's reconstruction, with the share of tokens recovered."""
    suite, tokenizer = report.suite, setup.tokenizer
    shown = shown_victims(suite.truth.shape[0])
    truth, mask = suite.truth[shown], suite.mask[shown]
    counted = counted_positions(truth, mask, setup.special_ids)
    rows = []
    originals = decode(tokenizer, truth, counted)
    for i, victim in enumerate(shown.tolist()):
        rows.append([str(victim + 1), "original", originals[i]])
        for result in suite.results:
            guess = result.reconstruction[victim:victim + 1]
            hits = (guess[0] == truth[i])[counted[i]].double().mean() if counted[i].any() else torch.tensor(1.0)
            text = decode(tokenizer, guess, counted[i:i + 1])[0]
            rows.append(["", f"{result.name} ({100 * float(hits):.0f} %)", text])
    return _markdown_table(["victim", "source (tokens recovered)", "text"], rows)


def plot_images(report: PrivacyReport, setup: AttackSetup, path: Path) -> Path:
    """A grid: a row per victim, the original then every attack's reconstruction, at the original resolution."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sflam.pipelines.figures import save_figure

    geometry = setup.target.geometry
    assert geometry is not None
    suite = report.suite
    shown = shown_victims(suite.truth.shape[0])
    columns = [("original", geometry.to_original(suite.truth[shown]))]
    columns += [(r.name, geometry.to_original(r.reconstruction[shown])) for r in suite.results]
    rows = len(shown)
    fig, axes = plt.subplots(rows, len(columns), figsize=(1.6 * len(columns), 1.6 * rows), dpi=110, squeeze=False)
    for col, (title, images) in enumerate(columns):
        for row in range(rows):
            ax = axes[row, col]
            ax.imshow(images[row].numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(title, fontsize=8)
    exp = report.experiment
    defence = exp["defence"]
    noise = (f", clip {defence['clip_norm']:g} + noise σ={defence['noise_sigma']:g}"
             if defence["noise_sigma"] else "")
    nopeek = f", NoPeek {defence['nopeek_weight']:g}" if defence["nopeek_weight"] else ""
    return save_figure(fig, path, f"{exp['name']}: cut {exp['cut_layer']}, {exp['activation_bits']}-bit{noise}{nopeek}")


def write_report(report: PrivacyReport, setup: AttackSetup, folder: Path) -> list[Path]:
    """privacy.json, privacy.md and (images) privacy.png in `folder`; returns the paths written."""
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    figure = None
    if report.suite.modality == "image":
        written.append(plot_images(report, setup, folder / "privacy.png"))
        figure = "privacy.png"
    written.append(write_text(folder / "privacy.md", markdown(report, setup, figure)))
    report.files = [str(p) for p in [*written, folder / "privacy.json"]]
    written.append(write_text(folder / "privacy.json", json.dumps(report.as_json(), indent=2) + "\n"))
    return written
