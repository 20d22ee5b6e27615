"""Parameter groups carry exactly the learning rates asked for, per matrix kind (attention and MLP), built from the
deltas."""

import pytest
import torch

from conftest import tiny
from qkvtune import attach
from qkvtune.config import TrainConfig
from qkvtune.optim import param_groups
from qkvtune.targets import find_targets


def _by_param(groups):
    return {id(p): g for g in groups for p in g["params"]}


@pytest.mark.parametrize("arch,labels", [("bert", 2), ("gpt2", None), ("neox", None)])
def test_lr_ratio_and_explicit_rates(arch, labels):
    model = tiny(arch, labels)
    attach.add_adapter(model, find_targets(model, ["q", "k", "v", "o"]), "dora", rank=2)
    rates = TrainConfig(lr=1e-4, lr_ratio=4.0, lr_o=3e-5, lr_head=2e-3, weight_decay=0.1)
    groups = param_groups(model, rates)
    lookup = _by_param(groups)
    expect = {"q": 1e-4, "k": 1e-4, "v": 4e-4, "o": 3e-5}
    n = 0
    for _, d in attach.iter_deltas(model):
        for role, p, decay in d.param_roles():
            g = lookup[id(p)]
            assert g["lr"] == pytest.approx(expect[d.kind]) and g["name"] == f"{d.kind}.{role}"
            assert g["weight_decay"] == (0.1 if role in ("A", "B") else 0.0)  # never on DoRA magnitudes
            n += 1
    for p in attach.head_modules(model).values():
        for q in p.parameters():
            assert lookup[id(q)]["lr"] == 2e-3
            assert lookup[id(q)]["weight_decay"] == (0.1 if q.ndim == 2 else 0.0)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(lookup) == len(trainable) and all(id(p) in lookup for p in trainable)


def test_loraplus_and_explicit_v():
    model = tiny("llama")
    attach.add_adapter(model, find_targets(model, ["q", "v"]), "lora", rank=2)
    groups = {g["name"]: g["lr"] for g in param_groups(model, TrainConfig(lr=1e-3, lr_ratio=8, lr_v=5e-3,
                                                                           loraplus_ratio=16))}
    assert groups == {"q.A": 1e-3, "q.B": 1.6e-2, "v.A": 5e-3, "v.B": 8e-2}


def test_groups_do_not_depend_on_parameter_names():
    """A module literally named 'value' that holds q must get η_Q, not η_V (name matching would fail)."""
    net = torch.nn.Module()
    net.value = torch.nn.Linear(4, 4)
    attach.add_adapter(net, find_targets(net, ["q"], target_modules={"value": "q"}), "lora", rank=2, heads=[])
    groups = param_groups(net, TrainConfig(lr=1e-3, lr_ratio=10))
    assert {g["name"]: g["lr"] for g in groups} == {"q.A": 1e-3, "q.B": 1e-3}
    # all-linear names an unrecognised module after itself: a module called "ratio" is not lr_ratio's
    net = torch.nn.Module()
    net.ratio = torch.nn.Linear(4, 4)
    attach.add_adapter(net, find_targets(net, "all-linear"), "lora", rank=2, heads=[])
    assert {g["lr"] for g in param_groups(net, TrainConfig(lr=1e-3, lr_ratio=10))} == {1e-3}


def test_stray_trainable_parameter_is_an_error():
    model = tiny("bert", 2)
    attach.add_adapter(model, find_targets(model, ["v"]), "lora", rank=2)
    model.bert.embeddings.word_embeddings.weight.requires_grad_(True)
    with pytest.raises(ValueError, match="word_embeddings"):
        param_groups(model, TrainConfig())


@pytest.mark.parametrize("arch,labels", [("llama", None), ("bert", 2)])
def test_mlp_kinds_take_lr_mlp_ratio(arch, labels):
    """all-linear: gate, up and down at lr_mlp_ratio·lr, v at λ·lr, explicit lr_k kept, and whatever all-linear
    takes whole besides (BERT's pooler, kind "dense") at lr."""
    model = tiny(arch, labels)
    attach.add_adapter(model, find_targets(model, "all-linear"), "lora", rank=2)
    groups = param_groups(model, TrainConfig(lr=1e-3, lr_ratio=4, lr_mlp_ratio=2.5, lr_k=5e-4, lr_head=1e-2))
    rates = {g["name"].split(".")[0]: g["lr"] for g in groups}
    mlp = {"gate": 2.5e-3, "up": 2.5e-3, "down": 2.5e-3} if arch == "llama" else {"up": 2.5e-3, "down": 2.5e-3}
    other = {"dense": 1e-3, "head": 1e-2} if arch == "bert" else {}
    assert rates == pytest.approx({"q": 1e-3, "k": 5e-4, "v": 4e-3, "o": 1e-3, **mlp, **other})
    assert len(_by_param(groups)) == sum(p.requires_grad for p in model.parameters())


def test_adamw_applies_group_rates():
    """One AdamW step moves each parameter by ≈ its group's lr (Adam's first step is lr·sign(g))."""
    model = tiny("bert", 2)
    attach.add_adapter(model, find_targets(model, ["q", "v", "up", "down"]), "dense", heads=[])
    rates = TrainConfig(lr=1e-3, lr_ratio=4, lr_mlp_ratio=2)
    opt = torch.optim.AdamW(param_groups(model, rates), eps=1e-12, weight_decay=0)
    before = {id(p): p.detach().clone() for g in opt.param_groups for p in g["params"]}
    model(torch.randint(2, 64, (2, 5)), labels=torch.tensor([0, 1])).loss.backward()
    opt.step()
    for _, d in attach.iter_deltas(model):
        step = (d.weight - before[id(d.weight)]).abs()
        moved = step[d.weight.grad.abs() > 1e-8]
        assert moved.numel() > 0
        step = {"v": 4e-3, "up": 2e-3, "down": 2e-3}.get(d.kind, 1e-3)
        assert torch.allclose(moved, torch.full_like(moved, step), rtol=1e-3), d.kind
