"""``qkvtune train|eval|export|serve|predict|analyze|bench|lm-eval-task`` — argument parsing and one-line errors; the work happens elsewhere."""

from __future__ import annotations

import argparse
import os
import shutil
import sys

from .config import DATA_KEYS, LOADING_KEYS
from .errors import QkvtuneError, check_output_dir


def cmd_train(args) -> int:
    from .checkpoints import last_complete
    from .config import load_command_config
    from .models import resolve

    cfg = load_command_config(args.config, args.overrides)  # a bad config is named before Trainer's slow import
    resolve(cfg.model)                                       # and so is a model folder that is not there
    from .train import dump_metrics, train

    fresh = not os.path.exists(cfg.output_dir)
    try:
        metrics = train(cfg)
    except BaseException:
        # nothing half-written: a run that failed before its first complete checkpoint leaves no folder
        if fresh and os.path.isdir(cfg.output_dir) and last_complete(cfg.output_dir) is None:
            shutil.rmtree(cfg.output_dir, ignore_errors=True)
        raise
    print(dump_metrics(metrics))
    return 0


def cmd_eval(args) -> int:
    from .config import parse_override
    from .runs import run_config

    overrides = dict(parse_override(o) for o in args.overrides)
    run_config(args.run_dir, overrides)  # a missing or malformed run folder is named before Trainer's slow import
    from .train import dump_metrics, evaluate_run

    print(dump_metrics(evaluate_run(args.run_dir, overrides)))
    return 0


def cmd_export(args) -> int:
    from .consumers import cannot_load
    from .errors import AdapterError
    from .runs import open_run

    check_output_dir(args.out_dir, "OUT_DIR")
    if os.path.exists(args.out_dir) and os.listdir(args.out_dir):
        raise AdapterError(f"{args.out_dir}: exists and is not empty")
    if args.format == "hf" and (args.gguf_base or args.gguf_type):
        raise AdapterError("--gguf-base/--gguf-type: belong to --format gguf")
    if args.gguf_base is not None and not os.path.isfile(args.gguf_base):
        raise AdapterError(f"--gguf-base: {args.gguf_base} is not a file")
    run = open_run(args.run_dir, with_task=False)  # the run folder and the base model: no training data
    if args.format == "hf" and run.cfg.pooling != "cls":
        raise AdapterError(f"{args.run_dir}/config.yaml: pooling: {run.cfg.pooling} has no place in a transformers "
                           "sequence-classification model; use the run folder itself (qkvtune predict / eval)")
    for line in cannot_load(run.model, run.adapter, run.info.causal_lm):
        print(f"note: {line}")
    tmp = args.out_dir.rstrip("/") + ".partial"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        os.makedirs(tmp)
        written = export_gguf(run, tmp, args) if args.format == "gguf" else export_hf(run, tmp)
        if os.path.exists(args.out_dir):
            os.rmdir(args.out_dir)
        os.replace(tmp, args.out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"{written} written to {args.out_dir}")
    return 0


def export_hf(run, out: str) -> str:
    from .io import export_merged

    export_merged(run.model, run.tokenizer, out, label_names=run.info.label_names)
    return "merged model"


def export_gguf(run, out: str, args) -> str:
    from .gguf_format import export
    from .models import gguf_file

    base = args.gguf_base or gguf_file(run.cfg.model)
    return ", ".join(export(run.model, out, base, adapter=run.adapter, dtype=args.gguf_type or "f16",
                            name=os.path.basename(os.path.abspath(args.run_dir))))


def cmd_serve(args) -> int:
    """llama.cpp's OpenAI-compatible server (llama-cpp-python's) on what ``export --format gguf`` wrote: the
    Modelfile's base and adapter (or the merged model.gguf), in the foreground until stopped."""
    import importlib.util

    from .errors import AdapterError

    modelfile = os.path.join(args.gguf_dir, "Modelfile")
    if not os.path.isfile(modelfile):
        raise AdapterError(f"{args.gguf_dir}: no Modelfile (write one with qkvtune export RUN OUT --format gguf)")
    lines = dict(line.split(" ", 1) for line in open(modelfile, encoding="utf-8").read().splitlines() if " " in line)
    files = {k: os.path.join(args.gguf_dir, v) if v.startswith("./") else v for k, v in lines.items()}
    for key in ("FROM", "ADAPTER"):
        if key in files and not os.path.isfile(files[key]):
            raise AdapterError(f"{modelfile}: {key} {files[key]} is not a file")
    if "FROM" not in files:
        raise AdapterError(f"{modelfile}: no FROM line")
    if importlib.util.find_spec("llama_cpp") is None:
        raise AdapterError("serve: needs llama-cpp-python's server: pip install 'qkvtune[serve]'")
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", files["FROM"], "--host", args.host,
            "--port", str(args.port), "--n_ctx", str(args.n_ctx)]
    if "ADAPTER" in files:
        argv += ["--lora_path", files["ADAPTER"]]
    print(f"serving {files['FROM']}" + (f" with {files['ADAPTER']}" if "ADAPTER" in files else "")
          + f" at http://{args.host}:{args.port}/v1", flush=True)
    os.execv(sys.executable, argv)


# --- the one command-line rule: key=value overrides anywhere among the flags, each one used or refused ---------

def place_overrides(args, extras: list[str], parser) -> None:
    """Words argparse left over: ``key=value`` overrides given after a flag (``predict RUN IN --output OUT
    max_length=64``) join the command's overrides; a config file given after a flag becomes its config."""
    for word in extras:
        if "=" in word and not word.startswith("-") and hasattr(args, "overrides"):
            args.overrides = [*(args.overrides or []), word]
        elif word.endswith((".yaml", ".yml")) and getattr(args, "config", False) is None:
            args.config = word
        else:
            parser.error(f"unrecognized arguments: {' '.join(extras)}")


def refuse_unused(args) -> None:
    """A key the command cannot honour is refused by name (one line, exit 2), never silently ignored. Commands
    that build a whole run config honour every key; the others declare theirs with ``honours=(keys, what)``."""
    from .config import ConfigError, canonical, parse_override

    honours = getattr(args, "honours", None)
    words = [w for w in [*(getattr(args, "overrides", None) or []), *(getattr(args, "adapters", None) or [])]
             if "=" in w]
    if getattr(args, "config", None) and "=" in args.config and not args.config.endswith((".yaml", ".yml")):
        words.append(args.config)
    if honours is None or not words:
        return
    keys, what = honours
    for key in canonical(dict(parse_override(w) for w in words)):
        if key not in keys:
            command = " ".join(filter(None, (args.command, getattr(args, "analysis", None), getattr(args, "bench", None))))
            raise ConfigError(f"{key}: qkvtune {command} does not use it (it takes {what})")


EVAL_HONOURS = ({*DATA_KEYS, *LOADING_KEYS, "eval_batch_size", "max_new_tokens", "seed"},
                "data, evaluation and model-loading keys")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qkvtune", description="Attention-centric fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="fine-tune: qkvtune train [CONFIG.yaml] [key=value ...]")
    p.add_argument("config", nargs="?", help="YAML config (optional: defaults + overrides)")
    p.add_argument("overrides", nargs="*", help="key=value, value read as YAML (targets=[q,v])")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a finished run: qkvtune eval RUN_DIR [key=value ...]")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*", help="e.g. task=glue/rte data_dir=... max_eval_samples=200")
    p.set_defaults(func=cmd_eval, honours=EVAL_HONOURS)
    p = sub.add_parser("export", help="write a merged Hugging Face model (or llama.cpp's GGUF files): "
                                      "qkvtune export RUN_DIR OUT_DIR [--format gguf]")
    p.add_argument("run_dir")
    p.add_argument("out_dir")
    p.add_argument("--format", choices=("hf", "gguf"), default="hf",
                   help="hf: a merged Hugging Face folder; gguf: adapter.gguf (llama.cpp LoRA, for a plain LoRA), "
                        "model.gguf (merged, when the base is a GGUF file) and an Ollama Modelfile")
    p.add_argument("--gguf-base", help="the base model as a GGUF file (default: the model alias's own GGUF)")
    p.add_argument("--gguf-type", choices=("f16", "f32", "base"),
                   help="merged tensors in model.gguf: f16 (default), f32, or the base tensor's own quantization "
                        "(can erase an update smaller than its step)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("serve", help="serve a GGUF export with llama.cpp's OpenAI-compatible server: "
                                     "qkvtune serve GGUF_DIR [--port 8000]")
    p.add_argument("gguf_dir", help="what qkvtune export RUN OUT --format gguf wrote")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--n-ctx", type=int, default=2048, help="the context length llama.cpp allocates")
    p.set_defaults(func=cmd_serve)
    from .analyze import register as register_analyze

    register_analyze(sub)  # qkvtune analyze ntk|stopping|subspace|amplification|task-vectors|samples
    from .bench import register as register_bench

    register_bench(sub)  # qkvtune bench speed|claims
    from .predict import register as register_predict

    register_predict(sub)  # qkvtune predict RUN_OR_MODEL INPUT --output OUT
    from .lmeval import register as register_lm_eval

    register_lm_eval(sub)  # qkvtune lm-eval-task OUT_DIR [CONFIG] [key=value ...]
    from .plan import register as register_plan

    register_plan(sub)  # qkvtune plan [CONFIG] [key=value ...] --out DIR
    args, extras = parser.parse_known_args(argv)
    try:
        place_overrides(args, extras, parser)
        refuse_unused(args)
        return args.func(args)
    except QkvtuneError as e:  # every user-caused failure, from every command: one line, exit 2
        print(f"qkvtune: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("qkvtune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
