"""packing: examples packed into rows compute, token by token, what they compute unpacked; no example sees
another; bins are filled as best-fit decreasing fills them; models that cannot keep examples apart are refused."""

import json

import datasets
import pytest
import torch
import transformers
from hypothesis import given, settings, strategies as st

from conftest import tiny
from qkvtune.config import ConfigError, build_config
from qkvtune.data import PadCollator
from qkvtune.packing import PackedCollator, PackingError, best_fit, check, pack


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 64), min_size=1, max_size=80), st.integers(64, 100))
def test_best_fit_keeps_every_example_whole_within_capacity(lengths, capacity):
    bins = best_fit(lengths, capacity)
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(b == sorted(b) for b in bins) and [b[0] for b in bins] == sorted(b[0] for b in bins)
    fills = [sum(lengths[i] for i in b) for b in bins]
    assert max(fills) <= capacity
    assert sum(f <= capacity / 2 for f in fills) <= 1  # any-fit: a new bin only when nothing else had room


def test_best_fit_decreasing_fills_where_first_fit_in_order_would_not():
    # longest first, each into the fullest bin it fits: 5+5 | 3+3+2+2 (first fit in order: 3+5+2 | 5+3+2)
    assert best_fit([3, 5, 2, 5, 3, 2], 10) == [[0, 2, 4, 5], [1, 3]]
    lengths = [6, 6, 4, 4]  # in order, first fit needs three bins: 6 | 6 | 4+4
    assert sorted(sum(lengths[i] for i in b) for b in best_fit(lengths, 10)) == [10, 10]


def _examples(n=7, seed=0, vocab=64):
    g = torch.Generator().manual_seed(seed)
    rows = {"input_ids": [], "attention_mask": [], "labels": []}
    for k in range(n):
        length = int(torch.randint(3, 12, (1,), generator=g))
        ids = torch.randint(5, vocab, (length,), generator=g).tolist()
        prompt = k % 3  # an sft-like example: the first tokens are prompt, not learned
        rows["input_ids"].append(ids)
        rows["attention_mask"].append([1] * length)
        rows["labels"].append([-100] * prompt + ids[prompt:])
    return datasets.Dataset.from_dict(rows)


class _Pad:
    pad_token_id, padding_side = 0, "right"


def _token_losses(model, batch):
    """Each labelled token's loss, as transformers' causal-LM loss sees it (label t+1 at position t)."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kwargs).logits
    labels = torch.nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    return losses[labels != -100], labels[labels != -100]


@pytest.mark.parametrize("flatten", [False, True])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_each_example_learns_in_a_packed_batch_what_it_learns_alone(arch, flatten):
    model = tiny(arch).eval()
    examples = _examples()
    rows = pack(examples, 24)
    assert len(rows) < len(examples) and max(len(r) for r in rows["input_ids"]) <= 24
    packed = PackedCollator(PadCollator(_Pad()), flatten=flatten)
    batch = packed([rows[i] for i in range(len(rows))])
    assert "attention_mask" not in batch and batch["input_ids"].shape[0] == (1 if flatten else len(rows))
    plain = packed([examples[i] for i in range(len(examples))])  # unpacked examples: the task's own padding
    assert "attention_mask" in plain
    with torch.no_grad():
        got, got_targets = _token_losses(model, batch)
        ref, ref_targets = _token_losses(model, plain)
    # the same tokens learned: example order differs between the layouts, so compare as multisets of (target, loss)
    assert sorted(got_targets.tolist()) == sorted(ref_targets.tolist())
    key = lambda t, l: sorted(zip(t.tolist(), l.tolist()))
    for (t1, l1), (t2, l2) in zip(key(got_targets, got), key(ref_targets, ref)):
        assert t1 == t2 and l1 == pytest.approx(l2, abs=1e-5)
    assert len(got) == sum(sum(y != -100 for y in ex[1:]) for ex in examples["labels"])


def test_one_example_never_changes_another():
    model = tiny("llama").eval()
    rows = pack(_examples(), 24)
    row = rows[0]
    starts = [i for i, p in enumerate(row["position_ids"]) if p == 0]
    assert len(starts) >= 2
    collate = PackedCollator(PadCollator(_Pad()))
    changed = dict(row, input_ids=[(t + 7) % 60 + 3 if i < starts[1] else t for i, t in enumerate(row["input_ids"])])
    with torch.no_grad():
        a = model(**{k: v for k, v in collate([row]).items() if k != "labels"}).logits[0]
        b = model(**{k: v for k, v in collate([changed]).items() if k != "labels"}).logits[0]
    assert (a[:starts[1]] - b[:starts[1]]).abs().max() > 1e-3  # the changed example did change
    torch.testing.assert_close(b[starts[1]:], a[starts[1]:], atol=1e-6, rtol=1e-6)


def test_models_that_cannot_keep_packed_examples_apart_are_refused():
    torch.manual_seed(0)
    opt = transformers.AutoModelForCausalLM.from_config(transformers.OPTConfig(  # positions from the attention mask
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, ffn_dim=48, word_embed_proj_dim=32))
    with pytest.raises(PackingError, match="packing: model type opt does not keep packed examples apart"):
        check(opt, PackedCollator(PadCollator(_Pad())))
    check(tiny("llama"), PackedCollator(PadCollator(_Pad())))
    with pytest.raises(ConfigError, match="packing: packs causal-LM examples \\(task sft or text/…\\), not glue/sst2"):
        build_config({"task": "glue/sst2", "packing": True})


def test_a_packed_run_trains_on_rows_and_evaluates_unpacked(tmp_path, tiny_llama_dir):
    from qkvtune.train import train

    f = tmp_path / "pc.jsonl"
    f.write_text("".join(json.dumps({"prompt": f"question {i} " + "word " * (i % 7), "completion": f"answer {i}"})
                         + "\n" for i in range(40)))
    common = dict(model=tiny_llama_dir, task="sft", train_file=str(f), epochs=1, batch_size=4, max_length=64,
                  eval_strategy="no", lr=1e-3)
    plain = train(build_config({**common, "output_dir": str(tmp_path / "plain")}))
    packed = train(build_config({**common, "packing": True, "output_dir": str(tmp_path / "packed")}))
    assert plain["global_step"] == 9  # 36 training examples in batches of 4
    assert packed["global_step"] < plain["global_step"] / 2  # rows of 64 tokens hold several examples each
    assert packed["eval_perplexity"] > 1 and packed["num_truncated"] == 0
