"""Metrics, computed: GLUE-convention ``compute_metrics`` functions for Trainer (scikit-learn / scipy, no hub),
facts about a metric by its name (which way is better, a constant predictor's score), and fast numpy forms of
the same metrics for bootstraps. Which metric a task is judged by is its family's to say (``families.main_metric``)."""
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


def classification_metrics(num_labels: int):
    """Your own classification data: accuracy, macro F1, and Matthews' correlation for two classes."""
    def compute(p) -> dict:
        preds, labels = _classes(p)
        out = {"accuracy": float((preds == labels).mean()),
               "f1": float(f1_score(labels, preds, average="macro", labels=list(range(num_labels)), zero_division=0))}
        if num_labels == 2:
            out["matthews_correlation"] = float(matthews_corrcoef(labels, preds))
        return out

    return compute


def regression_metrics(p) -> dict:
    preds, labels = _arrays(p)
    preds, labels = preds.reshape(len(labels), -1)[:, 0], labels.reshape(-1)
    return {**correlations(p), "mse": float(((preds - labels) ** 2).mean())}


# --- metrics by name ------------------------------------------------------------------------------------------

def greater_is_better(metric: str) -> bool:
    return metric != "loss"


# --- numpy forms (a bootstrap calls them thousands of times; tests hold them to sklearn's / scipy's) -----------

def f1_of(y, p) -> float:
    y, p = np.asarray(y) == 1, np.asarray(p) == 1
    tp = float(np.sum(y & p))
    denom = 2 * tp + float(np.sum(~y & p)) + float(np.sum(y & ~p))
    return 2 * tp / denom if denom else 0.0


def matthews_of(y, p) -> float:
    y, p = np.asarray(y) == 1, np.asarray(p) == 1
    tp, tn = float(np.sum(y & p)), float(np.sum(~y & ~p))
    fp, fn = float(np.sum(~y & p)), float(np.sum(y & ~p))
    denom = np.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom else 0.0


def pearson_of(y, p) -> float:
    y, p = np.asarray(y, dtype=float), np.asarray(p, dtype=float)
    if np.std(p) == 0 or np.std(y) == 0:
        return 0.0
    return float(np.corrcoef(y, p)[0, 1])


def token_loss_of(tokens, nll) -> float:
    """A language-model loss from per-example (trained-token count, summed loss): Σ loss / Σ tokens."""
    total = float(np.sum(np.asarray(tokens, dtype=float)))
    return float(np.sum(np.asarray(nll, dtype=float)) / total) if total else float("nan")


# metric -> fn(labels, predictions); for the loss the labels are token counts and the predictions summed losses
PER_EXAMPLE = {"f1": f1_of, "matthews_correlation": matthews_of, "pearson": pearson_of, "loss": token_loss_of}


def constant_score(metric: str, labels, choices=None) -> float:
    """The best score of a constant prediction on these labels, by a task's main metric: the majority class's
    share (accuracy; the most frequent answer's rate), the best F1 of always answering one class (or one of
    ``choices``), 0 for correlations and MCC. (Not for ``loss``: a language model's baseline is the pretrained
    model itself.)"""
    if metric == "loss":
        return float("nan")
    labels = np.asarray(labels)
    if metric in ("pearson", "spearmanr", "matthews_correlation"):
        return 0.0
    values = np.unique(labels)
    if metric == "f1":
        values = sorted(set(values.tolist()) | set(choices or []), key=str)
        return max(f1_of(labels, np.full(len(labels), v)) for v in values)
    return max(float(np.mean(labels == v)) for v in values)
