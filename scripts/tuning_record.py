"""The parts of a tuning record's ``tuning.md`` that ``scripts/tune_toy.py`` does not write, rendered from tuning.json.

``tune_toy.py`` writes ``tuning.json`` (every trial of every study) and the top of ``tuning.md``. This script appends,
from ``tuning.json`` alone:

* **Edge check**: the learning rates tried below the searched range (``edge_check`` in tuning.json: the command, and
  each method's fixed knob and trials) against the value each study chose, and whether every lower rate scored lower.
* **clip_eps of eopd and reopold**: their trials in learning-rate order with the ε drawn alongside, next to the
  fact that ε cannot act with one update per fresh batch (``scripts/check_clip_eps.py``).

Everything from ``## Edge check`` to the end of ``tuning.md`` is replaced; run it after every ``tune_toy.py``.

Usage::

    python scripts/tuning_record.py experiments/2026-11-30_miniature_v2
    python scripts/tuning_record.py RECORD --collect tm_opd=logs/toy_tune/multiruns/<time> ...   # store edge sweeps first
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from tune_toy import format_params, read_trials  # noqa: E402

EDGE = "## Edge check"
#: the edge sweeps' command, one per method (``<m>``; the knob at its chosen value)
EDGE_COMMAND = ("opd-train -m experiment=toy_tune method=<m> [method.clip_eps=<chosen>] hydra/sweeper/sampler=grid "
                "hydra.sweeper.n_trials=2 'trainer.lr=choice(1e-5,3e-5)'")
CLIPPED = ("eopd", "reopold")


def _rate(rate: float) -> str:
    """``1e-5``, not ``1e-05``."""
    return f"{rate:g}".replace("e-0", "e-")


def _listing(names: list[str]) -> str:
    return " and ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)


def collect_edge(tuning: dict[str, Any], sweeps: dict[str, Path]) -> None:
    """Store each method's edge sweep (a finished ``opd-train -m`` directory) in ``tuning["edge_check"]``."""
    edge = tuning.setdefault("edge_check", {"command": EDGE_COMMAND, "methods": {}})
    for method, sweep in sweeps.items():
        space = {"trainer.lr": "", **{key: "" for key in tuning["results"][method]["space"] if key != "trainer.lr"}}
        trials = read_trials(sweep, space)
        fixed = {key: value for key, value in trials[0]["params"].items() if key != "trainer.lr"} if trials else {}
        edge["methods"][method] = {"fixed": fixed, "source": str(sweep),
                                   "trials": [{"params": {"trainer.lr": t["params"]["trainer.lr"]},
                                               "validation_accuracy": t["validation_accuracy"]} for t in trials]}


def edge_section(tuning: dict[str, Any]) -> list[str]:
    """The edge check's table (validation accuracy in %) and its reading."""
    edge = tuning["edge_check"]
    methods = edge["methods"]
    rates = sorted({t["params"]["trainer.lr"] for m in methods.values() for t in m["trials"]})
    lines = [EDGE + " (below the searched range)", "",
             f"{_listing(list(methods))} chose the smallest learning rate searched, so each was also run at lr "
             f"{_listing([_rate(r) for r in rates])} (knob at its chosen value; Optuna grid, the same validation "
             f"split):", f"`{edge['command']}`", "",
             f"| method | {' | '.join(f'lr {_rate(r)}' for r in rates)} | chosen |", "|---|" + "---|" * (len(rates) + 1)]
    lower = []
    for method, result in methods.items():
        best = tuning["results"][method]["best"]
        scores = {t["params"]["trainer.lr"]: t["validation_accuracy"] for t in result["trials"]}
        knob = f" ({format_params(result['fixed'])})" if result["fixed"] else ""
        cells = [f"{100 * scores[r]:.1f}" if r in scores else "–" for r in rates]
        lines.append(f"| {method}{knob} | {' | '.join(cells)} | {100 * best['validation_accuracy']:.1f} "
                     f"({format_params({'trainer.lr': best['params']['trainer.lr']})}) |")
        lower += [(method, rate, score < best["validation_accuracy"]) for rate, score in scores.items()]
    higher = [f"{method} at lr {_rate(rate)}" for method, rate, below in lower if not below]
    lines += ["", "Every lower rate scores lower than the chosen one: the chosen values stand." if not higher
              else f"Lower rates that score at least as well as the chosen one: {', '.join(higher)}."]
    sources = {result.get("source", "") for result in methods.values()}
    lines += ["", f"Edge trials: {'; '.join(sorted(sources))}."] if any(sources) else []
    return lines


def clip_section(tuning: dict[str, Any]) -> list[str]:
    """EOPD's and REOPOLD's trials in learning-rate order, with the clip ε that was drawn with each."""
    lines = ["## clip_eps of eopd and reopold", "",
             "Both studies searched `method.clip_eps` with the learning rate, but with one update per fresh rollout batch "
             "the importance ratio is exactly 1 and the clip never acts: `scripts/check_clip_eps.py` trains each a few "
             "steps at ε = 0.05, 0.5 and unclipped from one seed and gets bitwise-identical losses, gradient norms and "
             "weights (output: `clip_eps_check.txt`). A run is therefore a function of its learning rate (and seed) "
             "alone, and the differences below are the learning rate's. No two trials share a learning rate (TPE draws "
             "both together), so the data cannot show equal scores at equal rates; the trials are listed in "
             "learning-rate order, so the nearest rates sit next to each other.", ""]
    for method in CLIPPED:
        if method not in tuning["results"]:
            continue
        trials = sorted(tuning["results"][method]["trials"], key=lambda t: t["params"]["trainer.lr"])
        lines += [f"**{method}**", "", "| trial | lr | clip_eps | val. acc. (%) |", "|---|---|---|---|"]
        lines += [f"| {t['trial']} | {t['params']['trainer.lr']:.4g} | {t['params']['method.clip_eps']:.3f} | "
                  f"{100 * t['validation_accuracy']:.1f} |" for t in trials]
        lines.append("")
    return lines


def render(record: Path) -> str:
    """Rewrite everything from ``## Edge check`` on in ``record/tuning.md``; returns the new part."""
    tuning = json.loads((record / "tuning.json").read_text())
    command = f"python scripts/tuning_record.py {record.relative_to(ROOT) if record.is_relative_to(ROOT) else record}"
    part = [*(edge_section(tuning) if tuning.get("edge_check") else []), "", *clip_section(tuning),
            f"(The edge check and this section: `{command}`, from tuning.json.)", ""]
    text = (record / "tuning.md").read_text()
    head = text[:text.index(EDGE)] if EDGE in text else text.rstrip("\n") + "\n\n"
    (record / "tuning.md").write_text(head + "\n".join(part))
    return "\n".join(part)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("record", type=Path, help="the record directory holding tuning.json and tuning.md")
    p.add_argument("--collect", nargs="+", default=[], metavar="METHOD=DIR",
                   help="first store these edge sweeps (finished opd-train -m directories) in tuning.json")
    args = p.parse_args(argv)
    record = args.record.resolve()
    if args.collect:
        tuning = json.loads((record / "tuning.json").read_text())
        collect_edge(tuning, {m: Path(d) for m, _, d in (item.partition("=") for item in args.collect)})
        (record / "tuning.json").write_text(json.dumps(tuning, indent=2) + "\n")
    print(render(record))


if __name__ == "__main__":
    main()
