"""``qkvtune bench speed|memory|claims`` — measurements people choose a tool by.

``speed``: step time, tokens/s and peak memory of qkvtune next to PEFT, full fine-tuning and the bare model,
measured side by side in one run (``speed.py``). ``memory``: peak memory with gradient checkpointing and a 4-bit base
next to PEFT's, a fresh process per configuration (``memory.py``). ``claims``: one experiment per claim of the four papers,
3 seeds each, a verdict by a stated rule, and a Markdown report with plots (``claims.py``). ``plan``: ``qkvtune
plan``'s predictions against a real grid trained with the claims suite's fair rates (``plan_grid.py``, ``plan_report.py``). ``sft``: chat
SFT tokens/s and memory of qkvtune's layouts and losses next to TRL's SFTTrainer + PEFT (``sft.py``). ``gguf``:
the round trip to llama.cpp, checked by llama.cpp itself (``gguf.py``). ``lr``: ``lr: auto`` against a real grid of
rates and the fixed rules practitioners use (``lr.py``).
"""

from __future__ import annotations

import argparse


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("bench", help="benchmarks: speed against PEFT, reproduction of the papers' claims")
    sub = p.add_subparsers(dest="bench", required=True)
    from . import claims, gguf, lr, memory, plan_report, sft, speed

    speed.register(sub)
    memory.register(sub)
    claims.register(sub)
    plan_report.register(sub)
    sft.register(sub)
    gguf.register(sub)
    lr.register(sub)
    return p
