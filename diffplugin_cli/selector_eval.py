"""Selector metrics as the paper defines them (Sec. 5.1, Eq. 7).

A plugin is predicted for a sample iff its score > threshold. Per-class precision/recall over
the task plugins (null excluded) give CP, CR, CF1; pooled counts give OP, OR, OF1; mAP is the
mean over classes of the average precision of the ranking by score. ZTA counts a sample as
correct only if every wanted plugin scores > threshold and every other one <= threshold.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

from .errors import DiffPluginError


def read_cases(path: str | Path) -> list[dict]:
    """JSON Lines of {"text": ..., "labels": [...], "kind": optional}."""
    cases = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            case = json.loads(line)
            if not isinstance(case["text"], str) or not isinstance(case["labels"], list):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise DiffPluginError(f"{path}:{number}: expected {{\"text\": str, \"labels\": [str, ...]}}") from None
        cases.append(case)
    if not cases:
        raise DiffPluginError(f"{path}: no cases")
    return cases


def metrics(scores: Sequence[dict[str, float]], labels: Sequence[Sequence[str]], classes: Sequence[str], threshold: float = 0.0) -> dict[str, float]:
    wanted = [set(l) for l in labels]
    predicted = [{c for c in classes if s.get(c, 0.0) > threshold} for s in scores]
    zta = sum(p == (w & set(classes)) for p, w in zip(predicted, wanted)) / len(scores)
    precisions, recalls, aps = [], [], []
    tp_all = pred_all = pos_all = 0
    for c in classes:
        tp = sum(c in p and c in w for p, w in zip(predicted, wanted))
        n_pred = sum(c in p for p in predicted)
        n_pos = sum(c in w for w in wanted)
        tp_all, pred_all, pos_all = tp_all + tp, pred_all + n_pred, pos_all + n_pos
        precisions.append(tp / n_pred if n_pred else 0.0)
        recalls.append(tp / n_pos if n_pos else 0.0)
        if n_pos:
            aps.append(_average_precision([s.get(c, 0.0) for s in scores], [c in w for w in wanted]))
    cp, cr = _mean(precisions), _mean(recalls)
    op = tp_all / pred_all if pred_all else 0.0
    orr = tp_all / pos_all if pos_all else 0.0
    return {
        "ZTA": zta,
        "mAP": _mean(aps),
        "CP": cp,
        "CR": cr,
        "CF1": _f1(cp, cr),
        "OP": op,
        "OR": orr,
        "OF1": _f1(op, orr),
        "cases": len(scores),
    }


def evaluate(cases: Sequence[dict], score_many: Callable[[Sequence[str]], list[dict[str, float]]], classes: Sequence[str],
             threshold: float = 0.0) -> dict:
    """Metrics overall and per `kind` (when the cases carry one); `score_many` scores all the texts in one call."""
    all_scores = score_many([case["text"] for case in cases])
    report = {"overall": metrics(all_scores, [c["labels"] for c in cases], classes, threshold)}
    for kind in sorted({c["kind"] for c in cases if "kind" in c}):
        picked = [i for i, c in enumerate(cases) if c.get("kind") == kind]
        report[kind] = metrics([all_scores[i] for i in picked], [cases[i]["labels"] for i in picked], classes, threshold)
    return report


def _average_precision(scores: list[float], relevant: list[bool]) -> float:
    ranked = sorted(zip(scores, relevant), key=lambda pair: -pair[0])
    hits, total = 0, 0.0
    for rank, (_, is_relevant) in enumerate(ranked, 1):
        if is_relevant:
            hits += 1
            total += hits / rank
    return total / hits if hits else 0.0


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _f1(p: float, r: float) -> float:
    return 2 * p * r / (p + r) if p + r else 0.0
