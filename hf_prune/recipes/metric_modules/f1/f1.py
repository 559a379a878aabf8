"""Offline fallback for the Hub's `f1` metric (binary by default; macro / micro / weighted averages)."""

import datasets
import evaluate


def _prf(tp, fp, fn):
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


class F1(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Harmonic mean of precision and recall.",
            citation="",
            inputs_description="predictions: list of int; references: list of int",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, labels=None, pos_label=1, average="binary", sample_weight=None):
        classes = sorted(set(references) | set(predictions)) if labels is None else list(labels)
        if average == "binary":
            classes = [pos_label]
        scores, supports = [], []
        total_tp = total_fp = total_fn = 0
        for c in classes:
            tp = sum(1 for p, r in zip(predictions, references, strict=False) if p == c and r == c)
            fp = sum(1 for p, r in zip(predictions, references, strict=False) if p == c and r != c)
            fn = sum(1 for p, r in zip(predictions, references, strict=False) if p != c and r == c)
            total_tp, total_fp, total_fn = total_tp + tp, total_fp + fp, total_fn + fn
            scores.append(_prf(tp, fp, fn))
            supports.append(tp + fn)
        if average == "micro":
            return {"f1": float(_prf(total_tp, total_fp, total_fn))}
        if average == "weighted":
            total = sum(supports)
            return {"f1": float(sum(s * w for s, w in zip(scores, supports, strict=False)) / total if total else 0.0)}
        if average is None:
            return {"f1": [float(s) for s in scores]}
        return {"f1": float(sum(scores) / len(scores)) if scores else 0.0}
