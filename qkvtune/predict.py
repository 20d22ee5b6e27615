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
import tempfile

import torch

from .errors import QkvtuneError, check_output_file


class PredictError(QkvtuneError):
    """A model or input that cannot be predicted on."""


OUTPUT_FORMATS = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


# --- the model ------------------------------------------------------------------------------------------

def load_predictor(source: str, overrides: dict):
    """(model, tokenizer, kind, label_names, cfg or None) for a run folder or a model folder."""
    from .runs import open_run

    if os.path.exists(os.path.join(source, "config.yaml")):
        run = open_run(source, overrides, with_task=False)
        return run.model.eval(), run.tokenizer, run.info.kind, run.info.label_names, run.cfg
    from .config import build_config
    from .io import read_json
    from .models import load_model, load_tokenizer, resolve

    name, source = source, resolve(source)  # an offline alias (smollm2-135m, minilm) names a folder too
    if not os.path.isdir(source) or not os.path.exists(os.path.join(source, "config.json")):
        raise PredictError(f"{name}: neither a qkvtune run folder (config.yaml) nor a model folder (config.json)")

    cfg = build_config({"model": source, **overrides})
    archs = read_json(os.path.join(source, "config.json"), PredictError).get("architectures") or []
    if any(a.endswith("ForCausalLM") for a in archs):
        kind, names = "causal_lm", None
    elif any(a.endswith("ForSequenceClassification") for a in archs):
        config = read_json(os.path.join(source, "config.json"), PredictError)
        id2label = config.get("id2label") or {}
        names = [id2label.get(str(i), f"LABEL_{i}") for i in range(len(id2label))] or None
        kind = "regression" if config.get("problem_type") == "regression" or len(id2label) == 1 else "classification"
    else:
        raise PredictError(f"{source}/config.json: architectures {archs} are neither a sequence classifier nor a causal LM")
    tokenizer = load_tokenizer(source, cfg.trust_remote_code)
    from .data.sft import set_chat_template

    set_chat_template(tokenizer, cfg.chat_template)
    model, tokenizer, _ = load_model(source, kind, len(names) if names else 1, cfg.dtype, cfg.trust_remote_code,
                                     tokenizer, cfg.allow_pickle)
    if kind == "regression":
        names = None
    return model.eval(), tokenizer, kind, names, cfg


# --- the input ------------------------------------------------------------------------------------------

def read_input(path: str):
    """The input rows as a ``data.files.Table``: a data file, or one text per line of a .txt file (column
    ``text``, rows numbered by line)."""
    from .data import DataError, read_text
    from .data.files import FORMATS, Table, read_table

    if path.lower().endswith(".txt"):
        kept = [(i + 1, line) for i, line in enumerate(read_text(path).splitlines()) if line.strip()]
        if not kept:
            raise DataError(f"{path}: no lines of text")
        return Table({"text": [t for _, t in kept]}, [(path, n) for n, _ in kept])
    if os.path.splitext(path)[1].lower() not in FORMATS:
        raise DataError(f"{path}: unsupported input type (expected .txt, {', '.join(FORMATS)})")
    return read_table(path, "INPUT")


def _text_columns(columns: dict, cfg) -> list[str]:
    wanted = list(cfg.text_columns or []) if cfg is not None else []
    if not wanted:
        wanted = [next((c for c in ("text", "sentence", "prompt") if c in columns), None)]
        if wanted[0] is None:
            raise PredictError(f"text_columns: name the input's text column(s); the columns are {', '.join(columns)}")
    for c in wanted:
        if c not in columns:
            raise PredictError(f"text_columns: no column {c!r}; the columns are {', '.join(columns)}")
    return wanted


# --- predicting -----------------------------------------------------------------------------------------

@torch.no_grad()
def classify(model, tokenizer, texts: list[list[str]], *, batch_size: int, max_length: int, progress: bool = True):
    """Logits of a sequence classifier for each text (or text pair), batched in input order."""
    from tqdm.auto import tqdm

    from .data import PadCollator

    device = next(model.parameters()).device
    keep = set(tokenizer.model_input_names)
    collate = PadCollator(tokenizer)
    out = []
    for s in tqdm(range(0, len(texts[0]), batch_size), desc="predict", unit="batch", disable=not progress):
        parts = [t[s:s + batch_size] for t in texts]
        enc = tokenizer(*parts, truncation=True, max_length=max_length)
        feats = [{k: enc[k][i] for k in enc if k in keep} for i in range(len(parts[0]))]
        batch = {k: v.to(device) for k, v in collate(feats).items()}
        out.append(model(**batch).logits.float().cpu())
    return torch.cat(out)


def _prompts(table, tokenizer) -> list[str]:
    from .data import DataError
    from .data.files import texts

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


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], *, batch_size: int, max_length: int, max_new_tokens: int,
             do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0, progress: bool = True) -> list[str]:
    """Completions of each prompt (left-padded batches; only the new tokens are decoded)."""
    from tqdm.auto import tqdm

    device = next(model.parameters()).device
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    out = []
    try:
        for s in tqdm(range(0, len(prompts), batch_size), desc="generate", unit="batch", disable=not progress):
            enc = tokenizer(prompts[s:s + batch_size], return_tensors="pt", padding=True, truncation=True,
                            max_length=max_length, add_special_tokens=False).to(device)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                 max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
            out += tokenizer.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return out


def predict_rows(model, tokenizer, kind: str, names, cfg, table, *, batch_size: int, max_length: int,
                 max_new_tokens: int, sampling: dict | None = None) -> list[dict]:
    """Each input row of ``table`` (as a dict) with its prediction added."""
    from .data.files import texts

    columns = table.columns
    rows = [{c: columns[c][i] for c in columns} for i in range(len(table.where))]
    if kind == "causal_lm":
        completions = generate(model, tokenizer, _prompts(table, tokenizer), batch_size=batch_size,
                               max_length=max_length, max_new_tokens=max_new_tokens, **(sampling or {}))
        for r, c in zip(rows, completions):
            r["completion"] = c
        return rows
    logits = classify(model, tokenizer, [texts(table, c) for c in _text_columns(columns, cfg)], batch_size=batch_size,
                      max_length=max_length)
    if kind == "regression":
        for r, v in zip(rows, logits[:, 0].tolist()):
            r["score"] = v
        return rows
    probs = torch.softmax(logits, -1)
    names = names or [f"LABEL_{i}" for i in range(logits.shape[1])]
    for r, p in zip(rows, probs.tolist()):
        r["label"] = names[max(range(len(p)), key=p.__getitem__)]
        r["probabilities"] = dict(zip(names, p))
    return rows


# --- writing --------------------------------------------------------------------------------------------

def write_rows(rows: list[dict], path: str) -> None:
    """Rows to ``path`` in the format of its extension, atomically."""
    ext = os.path.splitext(path)[1].lower()
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".predict-", suffix=ext, dir=folder)
    os.close(fd)
    try:
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
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def cmd_predict(args) -> int:
    from .config import parse_override

    if os.path.splitext(args.output)[1].lower() not in OUTPUT_FORMATS:
        raise PredictError(f"--output: {args.output} must end in one of {', '.join(OUTPUT_FORMATS)}")
    check_output_file(args.output, "--output")
    overrides = dict(parse_override(o) for o in args.overrides)
    if overrides.get("batch_size") is not None and (not isinstance(overrides["batch_size"], int) or overrides["batch_size"] < 1):
        raise PredictError(f"batch_size: must be a positive integer, got {overrides['batch_size']!r}")
    table = read_input(args.input)
    model, tokenizer, kind, names, cfg = load_predictor(args.source, overrides)
    batch = overrides.get("batch_size") or cfg.eval_batch_size  # eval's batches by default: eval's exact logits
    rows = predict_rows(model, tokenizer, kind, names, cfg, table,
                        batch_size=batch, max_length=cfg.max_length, max_new_tokens=cfg.max_new_tokens,
                        sampling={"do_sample": args.do_sample, "temperature": args.temperature, "top_p": args.top_p})
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
    p.set_defaults(func=cmd_predict)
