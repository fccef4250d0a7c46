"""The evaluation report: eval.json, PNG plots, report.md and a self-contained report.html (images inlined)."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

METRIC_ROWS = [
    ("accuracy", "Reward accuracy (tuned, implicit reward; ties ½)"),
    ("reference_ranking_accuracy", "Reference log-prob ranking accuracy"),
    ("policy_ranking_accuracy", "Tuned log-prob ranking accuracy"),
    ("margin_mean", "Mean reward margin"),
    ("margin_median", "Median reward margin"),
    ("chosen_reward_mean", "Mean reward, chosen"),
    ("rejected_reward_mean", "Mean reward, rejected"),
    ("policy_logps_chosen_mean", "Tuned log p(chosen)"),
    ("policy_logps_rejected_mean", "Tuned log p(rejected)"),
    ("reference_logps_chosen_mean", "Reference log p(chosen)"),
    ("reference_logps_rejected_mean", "Reference log p(rejected)"),
]


def held_out(m: dict[str, Any]) -> str:
    """'N held-out pairs', or for unpaired (KTO) data 'N held-out examples (d desirable, u undesirable)'."""
    if "pairs" in m:
        return f"{m['pairs']} held-out pairs"
    return f"{m['examples']} held-out examples ({m['desirable']} desirable, {m['undesirable']} undesirable)"


def metric_rows(m: dict[str, Any]) -> list[tuple[str, str]]:
    return [(key, label) for key, label in METRIC_ROWS if key in m]


def fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def with_interval(value: float, low: float, high: float, n: int | None = None, digits: int = 4) -> str:
    """'0.6104 (95% CI 0.5549–0.6631, n=308)': how every accuracy and win rate is shown."""
    count = f", n={n}" if n is not None else ""
    return f"{value:.{digits}f} (95% CI {low:.3f}–{high:.3f}{count})"


def metric_text(m: dict[str, Any], key: str) -> str:
    """A held-out metric, with its interval and n when it is a rate (see evaluate.metrics)."""
    if f"{key}_ci_low" not in m:
        return fmt(m[key])
    return with_interval(m[key], m[f"{key}_ci_low"], m[f"{key}_ci_high"], m.get("pairs", m.get("examples")))


def judge_rows(j: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, text) of a judge's verdict; eval.json files written before length control have the raw rate only."""
    rows = [(f"Judge win rate, tuned vs base ({j['model']})", with_interval(j["win_rate"], j["ci_low"], j["ci_high"],
                                                                           j["prompts"], 3))]
    if "lc_win_rate" in j:
        note = "" if j.get("length_identifiable", True) else " — every length difference equal: not separable"
        rows += [("Length-controlled win rate (at equal length)",
                  with_interval(j["lc_win_rate"], j["lc_ci_low"], j["lc_ci_high"], j["prompts"], 3) + note),
                 ("Mean length change, tuned − base (tokens)", f"{j['mean_length_change']:+.1f}")]
    return rows


SCORE_COLUMNS = ("mean", "std", "min", "q25", "median", "q75", "max")


def _plots(result: dict[str, Any], out: Path, history: list[dict] | None) -> list[tuple[str, str]]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = []
    if history:
        train = [h for h in history if "loss" in h and "step" in h]
        evals = [h for h in history if "eval_loss" in h]
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for ax, key, title in zip(axes, ("loss", "rewards/accuracies", "rewards/margins"),
                                  ("DPO loss", "Reward accuracy", "Reward margin")):
            ax.plot([h["step"] for h in train if key in h], [h[key] for h in train if key in h], label="train", color="#4c72b0")
            ekey = "eval_" + key
            ax.plot([h["step"] for h in evals if ekey in h], [h[ekey] for h in evals if ekey in h], "o-", label="eval (per epoch)", color="#dd8452")
            ax.set_title(title)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=110)
        plt.close(fig)
        plots.append(("curves.png", "Training curves"))
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].hist(result["margins"], bins=20, color="#55a868")
    axes[0].axvline(0, color="black", lw=1)
    axes[0].set_title("Reward margin per held-out pair (> 0: prefers chosen)")
    lengths = result["lengths"]
    axes[1].bar(["base", "tuned"], [lengths["base"]["mean"], lengths["tuned"]["mean"]], color=["#8c8c8c", "#4c72b0"])
    axes[1].set_title("Mean response length (tokens)")
    fig.tight_layout()
    fig.savefig(out / "margins_lengths.png", dpi=110)
    plt.close(fig)
    plots.append(("margins_lengths.png", "Margins and response lengths"))
    if "scores" in (result.get("judge") or {}):
        plots.append(_judge_plot(result, out, plt))
    return plots


def _judge_plot(result: dict[str, Any], out: Path, plt) -> tuple[str, str]:
    """Histograms of the judge's scores, base and tuned on shared bins, and score against length: a judge that
    rewards length shows as a slope on the right."""
    gens = result["generations"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    base, tuned = [g["judge_base"] for g in gens], [g["judge_tuned"] for g in gens]
    axes[0].hist([base, tuned], bins=15, label=["base", "tuned"], color=["#8c8c8c", "#4c72b0"])
    axes[0].set_title("Judge score per answer")
    axes[0].legend()
    axes[1].plot([g["base_tokens"] for g in gens], base, "o", color="#8c8c8c", label="base")
    axes[1].plot([g["tuned_tokens"] for g in gens], tuned, "o", color="#4c72b0", label="tuned")
    axes[1].set_title("Judge score vs answer length (tokens)")
    axes[1].legend()
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "judge_scores.png", dpi=110)
    plt.close(fig)
    return "judge_scores.png", "Judge scores"


def _markdown(result: dict[str, Any], plots) -> str:
    m = result["metrics"]["policy"]
    lines = [f"# Evaluation of `{result['model']}`", "",
             f"Method `{result.get('method', 'dpo')}` · reference: `{result['reference']}` · template "
             f"`{result['template']}` · β = {result['beta']} · {held_out(m)}", "", "| metric | value |", "|---|---|"]
    lines += [f"| {label} | {metric_text(m, key)} |" for key, label in metric_rows(m)]
    lengths = result["lengths"]
    lines += [f"| Response length, base (mean / median tokens) | {lengths['base']['mean']:.1f} / {lengths['base']['median']:.1f} |",
              f"| Response length, tuned (mean / median tokens) | {lengths['tuned']['mean']:.1f} / {lengths['tuned']['median']:.1f} |"]
    if "judge" in result:
        lines += [f"| {label} | {text} |" for label, text in judge_rows(result["judge"])]
        lines += _score_table_md(result["judge"])
    lines.append("")
    lines += [f"![{title}]({name})" for name, title in plots]
    lines += ["", "## Generations (same seed and settings)", ""]
    for g in result["generations"]:
        lines += [f"### {g['question']}", "", f"**Base** ({g['base_tokens']} tokens): {g['base'].strip()}", "",
                  f"**Tuned** ({g['tuned_tokens']} tokens): {g['tuned'].strip()}", ""]
    return "\n".join(lines)


def _score_table_md(j: dict[str, Any]) -> list[str]:
    if "scores" not in j:
        return []
    lines = ["", "Judge scores per model:", "", "| model | " + " | ".join(SCORE_COLUMNS) + " |",
             "|---" * (len(SCORE_COLUMNS) + 1) + "|"]
    return lines + [f"| {who} | " + " | ".join(f"{j['scores'][who][c]:.3f}" for c in SCORE_COLUMNS) + " |"
                    for who in ("base", "tuned")]


def _score_table_html(j: dict[str, Any]) -> str:
    if "scores" not in j:
        return ""
    head = "".join(f"<th>{c}</th>" for c in SCORE_COLUMNS)
    rows = "".join(f"<tr><td>{who}</td>" + "".join(f"<td class='num'>{j['scores'][who][c]:.3f}</td>"
                                                    for c in SCORE_COLUMNS) + "</tr>" for who in ("base", "tuned"))
    return f"<h2>Judge scores</h2><table><tr><th>model</th>{head}</tr>{rows}</table>"


CSS = """body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}h1{font-size:1.6em;margin-bottom:.2em}.sub{color:#666;margin-bottom:1.5em}
table{border-collapse:collapse;margin:1em 0}td,th{border-bottom:1px solid #e3e3e3;padding:.35em .9em;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}.cards{display:flex;gap:1em;flex-wrap:wrap;margin:1em 0}
.card{background:#f5f7fb;border-radius:8px;padding:.8em 1.2em;min-width:180px}.card b{display:block;font-size:1.6em}
img{max-width:100%;margin:.5em 0}.gen{display:grid;grid-template-columns:1fr 1fr;gap:1em;margin-bottom:1.2em}
.gen div{background:#fafafa;border:1px solid #e6e6e6;border-radius:6px;padding:.6em .9em;white-space:pre-wrap}
.q{font-weight:600;margin-top:1.2em}.tag{color:#777;font-size:.85em}"""


def _ci(m: dict[str, Any], key: str) -> str:
    if f"{key}_ci_low" not in m:
        return ""
    return f"95% CI {m[key + '_ci_low']:.3f}–{m[key + '_ci_high']:.3f}, n={m.get('pairs', m.get('examples'))}"


def _html(result: dict[str, Any], plots, out: Path) -> str:
    m = result["metrics"]["policy"]
    e = html.escape
    cards = [(label, m[key], _ci(m, key)) for key, label in (("accuracy", "Reward accuracy (tuned)"),
             ("reference_ranking_accuracy", "Reference ranking accuracy"), ("margin_mean", "Mean reward margin"))
             if key in m]
    j = result.get("judge") or {}
    if j:
        cards.append(("Judge win rate", j["win_rate"], f"95% CI {j['ci_low']:.3f}–{j['ci_high']:.3f}, n={j['prompts']}"))
    if "lc_win_rate" in j:
        cards.append(("Length-controlled win rate", j["lc_win_rate"], f"95% CI {j['lc_ci_low']:.3f}–{j['lc_ci_high']:.3f}"))
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>dpolab evaluation</title><style>{CSS}</style></head><body>",
             f"<h1>Evaluation of {e(str(result['model']))}</h1>",
             f"<div class='sub'>method <code>{e(result.get('method', 'dpo'))}</code> · reference "
             f"{e(str(result['reference']))} · template <code>{e(result['template'])}</code> · "
             f"β = {result['beta']} · {e(held_out(m))}</div><div class='cards'>"]
    parts += [f"<div class='card'>{e(label)}<b>{value:.3f}</b><span class='tag'>{e(sub)}</span></div>"
              for label, value, sub in cards]
    parts.append("</div><table><tr><th>metric</th><th>value</th></tr>")
    parts += [f"<tr><td>{e(label)}</td><td class='num'>{e(metric_text(m, key))}</td></tr>" for key, label in metric_rows(m)]
    for who in ("base", "tuned"):
        stats = result["lengths"][who]
        parts.append(f"<tr><td>Response length, {who} (mean / median tokens)</td><td class='num'>{stats['mean']:.1f} / {stats['median']:.1f}</td></tr>")
    if "judge" in result:
        parts += [f"<tr><td>{e(label)}</td><td class='num'>{e(text)}</td></tr>" for label, text in judge_rows(result["judge"])]
    parts.append("</table>")
    parts.append(_score_table_html(result.get("judge") or {}))
    for name, title in plots:
        data = base64.b64encode((out / name).read_bytes()).decode()
        parts.append(f"<h2>{e(title)}</h2><img alt='{e(title)}' src='data:image/png;base64,{data}'>")
    parts.append("<h2>Generations</h2><p class='tag'>Same prompt, seed and settings for both models.</p>")
    for g in result["generations"]:
        parts.append(f"<div class='q'>{e(g['question'])}</div><div class='gen'>"
                     f"<div><span class='tag'>base · {g['base_tokens']} tokens</span><br>{e(g['base'].strip())}</div>"
                     f"<div><span class='tag'>tuned · {g['tuned_tokens']} tokens</span><br>{e(g['tuned'].strip())}</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def write_report(result: dict[str, Any], out: Path, info) -> None:
    from dpolab.folders.run import EVAL_JSON

    out.mkdir(parents=True, exist_ok=True)
    history = info.run.read_log_history() if info.run is not None else None
    (out / EVAL_JSON).write_text(json.dumps(result, indent=2))
    plots = _plots(result, out, history)
    (out / "report.md").write_text(_markdown(result, plots))
    (out / "report.html").write_text(_html(result, plots, out))
