"""One prompt, looked at three ways: which components wrote the predicted next token's logit (direct
logit attribution), at which layer the stream first predicts it (logit lens), and which heads the
prompt's loss depends on (a zero-ablation head sweep). `python -m resstream analyse MODEL --prompt
TEXT` prints this and writes analysis.json and analysis.png; MODEL is a run directory or a Hugging
Face model directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import numpy as np
from matplotlib.figure import Figure

from resstream import analysis
from resstream.ablation import ablation_sweep
from resstream.model import TokenError, Transformer


@dataclasses.dataclass
class PromptAnalysis:
    """What `analyse_prompt` found. Token labels are the tokenizer's (`' the'`, `'\\n'`).

    prompt:      the prompt's tokens as labels [seq].
    next_tokens: the likeliest next tokens after the prompt, (label, probability), likeliest first.
    dla:         (component, its direct contribution to the predicted token's logit), every
                 component with heads split, largest magnitude first; they sum to `logit`.
    lens:        per point of the stream (`embed`, `{l}_attn_out`, ..., `final`): (point, probability
                 of the predicted token read out there, the top token there).
    heads:       loss change of the prompt's next-token loss with each head zero-ablated [n_layers, n_heads].
    """

    prompt: list[str]
    next_tokens: list[tuple[str, float]]
    logit: float
    dla: list[tuple[str, float]]
    lens: list[tuple[str, float, str]]
    baseline_loss: float
    heads: np.ndarray

    def to_json(self) -> dict[str, Any]:
        """The findings as plain JSON-ready values."""
        out = dataclasses.asdict(self)
        out["heads"] = self.heads.tolist()
        return out

    def __str__(self) -> str:
        predicted = self.next_tokens[0][0]
        lines = [
            f"prompt tokens: {' '.join(self.prompt)}",
            "next token: " + ", ".join(f"{label} {p:.3f}" for label, p in self.next_tokens),
        ]
        lines.append(f"\ndirect logit attribution to {predicted} (logit {self.logit:.3f} = the sum of all rows):")
        lines += [f"  {label:>14} {value:+9.4f}" for label, value in self.dla[:12]]
        lines.append(f"\nlogit lens: probability of {predicted} read out at each point (top token there):")
        lines += [f"  {label:>14} {p:8.4f}  {top}" for label, p, top in self.lens]
        order = np.argsort(-np.abs(self.heads), axis=None)[:8]
        lines.append(f"\nheads whose zero ablation changes the prompt's loss ({self.baseline_loss:.4f}) most:")
        for flat in order:
            layer, head = np.unravel_index(flat, self.heads.shape)
            lines.append(f"  {f'L{layer}H{head}':>14} {self.heads[layer, head]:+9.4f}")
        return "\n".join(lines)


def analyse_prompt(
    model: Transformer, tokenizer: Any, text: str, *, top: int = 5, memory_budget: int | None = None
) -> PromptAnalysis:
    """Direct logit attribution, logit lens and a head sweep for the prompt `text` (see `PromptAnalysis`)."""
    ids = np.asarray(tokenizer.encode(text), np.int32)
    if len(ids) < 2:
        raise TokenError(f"the prompt {text!r} is {len(ids)} token(s): give at least two, so it has a loss to sweep")
    ids = ids[-model.cfg.n_ctx :][None]  # [1, seq]
    logits, cache = model.run_with_cache(ids, memory_budget=memory_budget)
    probs = np.asarray(jax.nn.softmax(logits[0, -1]))
    best = np.argsort(-probs)[:top]
    predicted = int(best[0])
    attrs = analysis.logit_attrs(model, cache, [predicted], split_heads=True, pos=-1, memory_budget=memory_budget)
    values = np.asarray(attrs.values[:, 0], np.float64)
    dla = sorted(zip(attrs.labels, values.tolist(), strict=True), key=lambda row: -abs(row[1]))
    lens = analysis.logit_lens(model, cache, mid=True, pos=-1, memory_budget=memory_budget)
    lens_probs = np.asarray(jax.nn.softmax(lens.values[:, 0], axis=-1))
    label = tokenizer.token_label
    sweep = ablation_sweep(model, ids, "heads", memory_budget=memory_budget)
    return PromptAnalysis(
        prompt=[label(int(t)) for t in ids[0]],
        next_tokens=[(label(int(t)), float(probs[t])) for t in best],
        logit=float(logits[0, -1, predicted]),
        dla=dla,
        lens=[
            (name, float(p[predicted]), label(int(np.argmax(p))))
            for name, p in zip(lens.labels, lens_probs, strict=True)
        ],
        baseline_loss=float(sweep.baseline),
        heads=np.asarray(sweep.total, np.float64).reshape(model.cfg.n_layers, model.cfg.n_heads),
    )


def write_analysis(result: PromptAnalysis, out: Path) -> None:
    """out/analysis.json and out/analysis.png: the top direct contributions, the logit lens and the
    head sweep as a [layer, head] heatmap."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "analysis.json").write_text(json.dumps(result.to_json(), indent=2) + "\n")
    fig = Figure(figsize=(15, 4.5))
    dla_ax, lens_ax, heads_ax = fig.subplots(1, 3, gridspec_kw={"width_ratios": [1.2, 1.2, 1]})
    predicted = result.next_tokens[0][0]
    shown = result.dla[:15][::-1]
    dla_ax.barh([label for label, _ in shown], [value for _, value in shown])
    dla_ax.axvline(0, color="black", linewidth=0.8)
    dla_ax.set_title(f"direct logit attribution to {predicted}")
    dla_ax.set_xlabel("contribution to the logit")
    points = [label for label, _, _ in result.lens]
    lens_ax.plot(range(len(points)), [p for _, p, _ in result.lens], marker="o")
    lens_ax.set_xticks(range(len(points)), points, rotation=90, fontsize=7)
    lens_ax.set_ylim(0, 1)
    lens_ax.set_title(f"logit lens: P({predicted})")
    limit = float(np.max(np.abs(result.heads))) or 1.0
    image = heads_ax.imshow(result.heads, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto")
    heads_ax.set_xlabel("head")
    heads_ax.set_ylabel("layer")
    heads_ax.set_title("loss change, head zero-ablated")
    fig.colorbar(image, ax=heads_ax)
    fig.tight_layout()
    fig.savefig(out / "analysis.png", dpi=110)
