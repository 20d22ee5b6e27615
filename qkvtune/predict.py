"""``qkvtune predict RUN_OR_MODEL INPUT --output OUT``: apply a finished run (its adapter, unmerged) or an
exported / any Hugging Face model folder to the rows of a file (CSV, TSV, JSON, JSONL, Parquet) or to lines
of text (.txt), batched, and write every input row back with its prediction, in the input's order:

* a classifier adds ``label`` (the label name) and ``probabilities`` (label name → probability);
* a regressor adds ``score``;
* a causal LM adds ``completion`` for each ``prompt`` (or chat ``messages``, rendered with the tokenizer's
  chat template), greedy unless sampling is asked for.

The output format follows OUT's extension; it is written to a temporary file and renamed, so a failed run
leaves nothing behind.
"""

from __future__ import annotations

import json
import os

import torch

from .errors import QkvtuneError, check_output_file


class PredictError(QkvtuneError):
    """A model or input that cannot be predicted on."""


OUTPUT_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


# --- the model ------------------------------------------------------------------------------------------

def load_predictor(source: str, overrides: dict):
    """(model, tokenizer, task info, cfg) for a run folder or a model folder."""
    from .runs import open_run

    if os.path.exists(os.path.join(source, "config.yaml")):
        run = open_run(source, overrides, with_task=False)
        return run.model.eval(), run.tokenizer, run.info, run.cfg
    from .config import build_config
    from .models import load_model, resolve
    from .runs import tokenizer_of
    from .task import TaskInfo

    name, source = source, resolve(source)  # an offline alias (smollm2-135m, minilm) names a folder too
    if not os.path.isdir(source) or not os.path.exists(os.path.join(source, "config.json")):
        raise PredictError(f"{name}: neither a qkvtune run folder (config.yaml) nor a model folder (config.json)")
    cfg = build_config({"model": source, **overrides})
    info = TaskInfo.of_model(source, PredictError, trained_head=True)
    model, tokenizer, _ = load_model(source, info.kind, info.model_labels(), cfg.dtype, cfg.trust_remote_code,
                                     tokenizer_of(cfg), cfg.allow_pickle)
    return model.eval(), tokenizer, info, cfg


# --- the input ------------------------------------------------------------------------------------------

def read_input(path: str):
    """The input rows as a ``data.tables.Table``: a data file, or one text per line of a .txt file (column
    ``text``, rows numbered by line)."""
    from .data import DataError, read_text
    from .data.tables import FORMATS, Table, read_table

    if path.lower().endswith(".txt"):
        kept = [(i + 1, line) for i, line in enumerate(read_text(path).splitlines()) if line.strip()]
        if not kept:
            raise DataError(f"{path}: no lines of text")
        return Table({"text": [t for _, t in kept]}, [(path, n) for n, _ in kept])
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise DataError(f"{path}: unsupported input type (expected .txt, {', '.join(FORMATS)})")
    return read_table(path, "INPUT")


# --- predicting -----------------------------------------------------------------------------------------

def classify(model, tokenizer, texts: list[list[str]], *, batch_size: int, max_length: int, progress: bool = True):
    """Logits of a sequence classifier for each text (or text pair), batched in input order."""
    from .data import PadCollator
    from .inference import forward

    keep, collate = set(tokenizer.model_input_names), PadCollator(tokenizer)

    def chunks():
        for s in range(0, len(texts[0]), batch_size):
            parts = [t[s:s + batch_size] for t in texts]
            enc = tokenizer(*parts, truncation=True, max_length=max_length)
            yield collate([{k: enc[k][i] for k in enc if k in keep} for i in range(len(parts[0]))])

    return forward(model, chunks(), desc="predict" if progress else None)


def _prompts(table, tokenizer) -> list[str]:
    from .data import DataError
    from .data.tables import texts

    columns = table.columns
    if "messages" in columns:
        if not getattr(tokenizer, "chat_template", None):
            raise PredictError("messages: the model's tokenizer has no chat template (set chat_template: <file>)")
        out = []
        for i, m in enumerate(columns["messages"]):
            if not isinstance(m, list) or not all(isinstance(x, dict) and "role" in x and "content" in x for x in m):
                raise DataError(f"{table.at(i)}: messages must be a list of {{role, content}} objects")
            out.append(tokenizer.apply_chat_template(m, tokenize=False, add_generation_prompt=True))
        return out
    column = "prompt" if "prompt" in columns else ("text" if "text" in columns else None)
    if column is None:
        raise PredictError(f"INPUT: a causal LM needs a prompt, messages or text column; the columns are "
                           f"{', '.join(columns)}")
    return texts(table, column)


def predict_rows(model, tokenizer, info, cfg, table, *, batch_size: int, max_length: int,
                 max_new_tokens: int, sampling: dict | None = None) -> list[dict]:
    """Each input row of ``table`` (as a dict) with its prediction added."""
    from .data.rows import text_columns
    from .data.tables import texts
    from .inference import generate

    columns = table.columns
    rows = [{c: columns[c][i] for c in columns} for i in range(len(table.where))]
    if info.causal_lm:
        prompts = tokenizer(_prompts(table, tokenizer), add_special_tokens=False, truncation=True,
                            max_length=max_length)["input_ids"]
        completions = generate(model, tokenizer, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               sampling=sampling)
        for r, c in zip(rows, completions):
            r["completion"] = c
        return rows
    wanted = text_columns(cfg.text_columns, columns, table.where[0][0], guess=True)
    logits = classify(model, tokenizer, [texts(table, c) for c in wanted], batch_size=batch_size,
                      max_length=max_length)
    if info.regression:
        for r, v in zip(rows, logits[:, 0].tolist()):
            r["score"] = v
        return rows
    probs = torch.softmax(logits, -1)
    names = info.label_names or [f"LABEL_{i}" for i in range(logits.shape[1])]
    for r, p in zip(rows, probs.tolist()):
        r["label"] = names[max(range(len(p)), key=p.__getitem__)]
        r["probabilities"] = dict(zip(names, p))
    return rows


# --- writing --------------------------------------------------------------------------------------------

def write_rows(rows: list[dict], path: str) -> None:
    """Rows to ``path`` in the format of its extension, atomically."""
    from .files import atomic_write

    ext = os.path.splitext(path)[1].lower()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def write(tmp):
        if ext == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
        elif ext == ".json":
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump(rows, f, ensure_ascii=False, indent=1)
        else:
            import pandas as pd

            frame = pd.DataFrame([{k: json.dumps(v) if isinstance(v, (dict, list)) else v for k, v in r.items()}
                                  for r in rows]) if ext != ".parquet" else pd.DataFrame(rows)
            if ext == ".parquet":
                frame.to_parquet(tmp, index=False)
            else:
                frame.to_csv(tmp, index=False, sep="\t" if ext == ".tsv" else ",")
    atomic_write(path, write)


def cmd_predict(args) -> int:
    from .config import parse_override

    if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:
        raise PredictError(f"--output: {args.output} must end in one of {', '.join(OUTPUT_FORMATS)}")
    check_output_file(args.output, "--output")
    overrides = dict(parse_override(o) for o in args.overrides)
    if overrides.get("batch_size") is not None and (not isinstance(overrides["batch_size"], int) or overrides["batch_size"] < 1):
        raise PredictError(f"batch_size: must be a positive integer, got {overrides['batch_size']!r}")
    table = read_input(args.input)
    model, tokenizer, info, cfg = load_predictor(args.source, overrides)
    if "max_eval_samples" in overrides and cfg.max_eval_samples is not None:  # the first N rows, as eval reads
        table = table.select(list(range(min(cfg.max_eval_samples, len(table.where)))))
    batch = overrides.get("batch_size") or cfg.eval_batch_size  # eval's batches by default: eval's exact logits
    rows = predict_rows(model, tokenizer, info, cfg, table,
                        batch_size=batch, max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens,
                        sampling={"do_sample": True, "temperature": args.temperature, "top_p": args.top_p}
                        if args.do_sample else None)
    write_rows(rows, args.output)
    print(f"{len(rows)} predictions written to {args.output}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("predict", help="apply a run or a model to a file: qkvtune predict RUN_OR_MODEL INPUT "
                                              "--output OUT [key=value ...]")
    p.add_argument("source", metavar="RUN_OR_MODEL", help="a qkvtune run folder, or a (merged) model folder")
    p.add_argument("input", metavar="INPUT", help="CSV, TSV, JSON, JSONL or Parquet rows, or .txt (one text per line)")
    p.add_argument("overrides", nargs="*", help="key=value as for train: eval_batch_size, max_length, "
                                                "max_new_tokens, text_columns, dtype …")
    p.add_argument("--output", "-o", required=True, help="OUT.jsonl | .json | .csv | .tsv | .parquet")
    p.add_argument("--do-sample", action="store_true", help="causal LM: sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    from .config import LOADING_KEYS

    p.set_defaults(func=cmd_predict, honours=({*LOADING_KEYS, "eval_batch_size", "batch_size", "max_eval_samples",
                                               "max_length", "max_new_tokens", "text_columns", "chat_template"},
                                              "batch sizes, max_eval_samples, max_length, max_new_tokens, "
                                              "text_columns, chat_template and model-loading keys"))
