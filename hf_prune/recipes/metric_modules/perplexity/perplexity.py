"""`perplexity` from per-token negative log-likelihoods (the Hub metric of that name runs a model itself; here the
recipe runner passes the losses it already computed, so the metric works offline and for any model)."""

import math

import datasets
import evaluate


class Perplexity(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="exp of the mean token negative log-likelihood.",
            citation="",
            inputs_description="predictions: per-token negative log-likelihoods (float); references: token counts",
            features=datasets.Features(
                {"predictions": datasets.Value("float64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        total_tokens = sum(references)
        nll = sum(p * n for p, n in zip(predictions, references, strict=False))
        return {"perplexity": float(math.exp(nll / total_tokens)) if total_tokens else float("nan")}
