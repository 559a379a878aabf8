"""Offline fallback for the Hub's `matthews_correlation` metric (multiclass Matthews correlation)."""

import math

import datasets
import evaluate


class MatthewsCorrelation(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Matthews correlation coefficient (Gorodkin's multiclass form).",
            citation="",
            inputs_description="predictions: list of int; references: list of int",
            features=datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}),
        )

    def _compute(self, predictions, references, sample_weight=None):
        classes = sorted(set(references) | set(predictions))
        n = len(predictions)
        correct = sum(1 for p, r in zip(predictions, references, strict=False) if p == r)
        pred_counts = [sum(1 for p in predictions if p == c) for c in classes]
        true_counts = [sum(1 for r in references if r == c) for c in classes]
        cov_ytyp = correct * n - sum(p * t for p, t in zip(pred_counts, true_counts, strict=False))
        cov_ypyp = n * n - sum(p * p for p in pred_counts)
        cov_ytyt = n * n - sum(t * t for t in true_counts)
        denom = math.sqrt(cov_ypyp * cov_ytyt)
        return {"matthews_correlation": float(cov_ytyp / denom) if denom else 0.0}
