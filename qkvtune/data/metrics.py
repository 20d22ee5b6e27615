"""GLUE-convention metrics as `Trainer` compute_metrics functions (scikit-learn / scipy, no hub)."""
import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import f1_score, matthews_corrcoef


def _arrays(p):
    preds = p.predictions[0] if isinstance(p.predictions, (tuple, list)) else p.predictions
    return np.asarray(preds), np.asarray(p.label_ids)


def _classes(p):
    preds, labels = _arrays(p)
    # Logits are argmaxed; already-decoded class ids (preprocess_logits_for_metrics) pass through.
    return (preds.argmax(-1) if preds.ndim > 1 else preds), labels


def accuracy(p) -> dict:
    preds, labels = _classes(p)
    return {"accuracy": float((preds == labels).mean())}


def accuracy_f1(p) -> dict:
    preds, labels = _classes(p)
    acc, f1 = float((preds == labels).mean()), float(f1_score(labels, preds))
    return {"accuracy": acc, "f1": f1, "accuracy_and_f1": (acc + f1) / 2}


def matthews(p) -> dict:
    preds, labels = _classes(p)
    return {"matthews_correlation": float(matthews_corrcoef(labels, preds)),
            "accuracy": float((preds == labels).mean())}


def correlations(p) -> dict:
    preds, labels = _arrays(p)
    preds, labels = preds.reshape(len(labels), -1)[:, 0], labels.reshape(-1)
    # A constant prediction has no correlation; report 0 rather than NaN, which would
    # poison best-checkpoint tracking (NaN compares false with everything).
    if np.std(preds) == 0 or np.std(labels) == 0:
        return {"pearson": 0.0, "spearmanr": 0.0}
    return {"pearson": float(pearsonr(preds, labels)[0]), "spearmanr": float(spearmanr(preds, labels)[0])}


# task -> (compute_metrics, metric_for_best); all GLUE metrics are greater-is-better
GLUE_METRICS = {
    "cola": (matthews, "matthews_correlation"),
    "stsb": (correlations, "pearson"),
    "mrpc": (accuracy_f1, "f1"),
    "qqp": (accuracy_f1, "f1"),
}


def glue_metrics(task: str):
    return GLUE_METRICS.get(task, (accuracy, "accuracy"))
