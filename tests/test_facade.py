"""get_peft_model: a PEFT-style nn.Module over the functional core, and short training runs."""

import torch
import torch.nn.functional as F

import funclora as fl
from conftest import assert_unchanged, snapshot
from funclora.demo import MLP, make_data

CONFIG = dict(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"])


def test_parameters_are_exactly_the_adapter():
    model = MLP(64)
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    names = [n for n, _ in peft_model.named_parameters()]
    assert names == ["seq.0.lora_A", "seq.0.lora_B", "seq.2.lora_A", "seq.2.lora_B", "seq.4.weight", "seq.4.bias"]
    assert all(p.requires_grad for p in peft_model.parameters())
    assert sum(p.numel() for p in peft_model.parameters()) == peft_model.get_nb_trainable_parameters()[0]
    assert peft_model.base_model is model and peft_model.targeted_module_names == ["seq.0", "seq.2"]
    assert set(peft_model.state_dict()) == {"adapters." + n for n in names}


def _train_facade(model, steps=60):
    X, y = make_data(512)
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(peft_model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        loss = F.nll_loss(peft_model(X), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return peft_model, losses


def test_training_through_the_facade_cuts_the_loss_by_more_than_half():
    model = MLP(64)
    before = snapshot(model)
    peft_model, losses = _train_facade(model)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    assert_unchanged(before, model)


def test_training_with_torch_func_grad_cuts_the_loss_by_more_than_half():
    model = MLP(64)
    lora = fl.LoRA(model, fl.LoraConfig(**CONFIG))
    adapter = lora.init(generator=torch.Generator().manual_seed(0))
    X, y = make_data(512)
    loss_fn = lambda a: F.nll_loss(lora(a, X), y)
    grad_and_loss = torch.func.grad_and_value(loss_fn)
    state = {p: {k: (torch.zeros_like(v), torch.zeros_like(v)) for k, v in d.items()} for p, d in adapter.items()}
    losses = []
    for t in range(1, 61):  # Adam written as a pure update over the pytree
        grads, loss = grad_and_loss(adapter)
        losses.append(loss.item())
        for p, d in adapter.items():
            for k, v in d.items():
                m, s = state[p][k]
                m = 0.9 * m + 0.1 * grads[p][k]
                s = 0.999 * s + 0.001 * grads[p][k] ** 2
                state[p][k] = (m, s)
                d[k] = v - 3e-3 * (m / (1 - 0.9 ** t)) / ((s / (1 - 0.999 ** t)).sqrt() + 1e-8)
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_merge_and_unload_returns_a_new_model_with_the_same_outputs():
    model = MLP(64)
    peft_model, _ = _train_facade(model, steps=5)
    merged = peft_model.merge_and_unload()
    assert merged is not model
    X, _ = make_data(16)
    torch.testing.assert_close(merged(X), peft_model(X))
    assert not torch.allclose(merged(X), model(X))


def test_disable_adapter_and_modes():
    model = MLP(64).eval()
    peft_model, _ = _train_facade(model, steps=5)
    X, _ = make_data(16)
    with peft_model.disable_adapter():
        torch.testing.assert_close(peft_model(X), model(X))
    peft_model.train()
    peft_model(X)
    assert not model.training  # the façade's mode is used for its calls only
    peft_model.eval()
    assert not peft_model.training


def test_facade_class_carries_the_base_forward_signature():
    """transformers' Trainer reads the forward signature from the class (find_labels, column pruning)."""
    import inspect

    model = MLP(64)
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    assert isinstance(peft_model, fl.PeftModel) and type(peft_model).__name__ == "PeftModel[MLP]"
    assert inspect.signature(type(peft_model).forward) == inspect.signature(type(model).forward)
    assert type(fl.get_peft_model(MLP(64), fl.LoraConfig(**CONFIG))) is type(peft_model)  # one class per base class
    assert repr(peft_model).startswith("PeftModel(")
    X, _ = make_data(4)
    torch.testing.assert_close(peft_model(X), fl.LoRA(model, fl.LoraConfig(**CONFIG))(
        {p: {k: v.detach() for k, v in ls.items()} for p, ls in peft_model.adapter.items()}, X))


def test_named_children_name_parameters_as_named_parameters_does():
    """Trainer's weight-decay groups walk named_children and match named_parameters."""
    from transformers.trainer_pt_utils import get_parameter_names

    peft_model = fl.get_peft_model(MLP(64), fl.LoraConfig(**CONFIG))
    names = [n for n, _ in peft_model.named_parameters()]
    assert get_parameter_names(peft_model, [], ["bias"]) == [n for n in names if not n.endswith("bias")]
    peft_model.to(torch.float64)  # .to / .train still reach every adapter parameter
    assert {p.dtype for p in peft_model.parameters()} == {torch.float64}


def test_unknown_attributes_come_from_the_base_model_without_changing_it():
    model = MLP(64)
    model.note = "mine"
    before = snapshot(model)
    peft_model = fl.get_peft_model(model, fl.LoraConfig(**CONFIG))
    assert peft_model.note == "mine" and peft_model.seq is model.seq
    peft_model.add_model_tags(["a", "b"])
    assert peft_model.model_tags == ["a", "b"] and not hasattr(model, "model_tags")
    assert_unchanged(before, model)


def test_a_forward_set_on_the_facade_instance_runs_with_the_adapter():
    """accelerate wraps ``model.forward`` (autocast), TRL replaces it (fused LM head): such a forward runs
    with the call's view of the model as ``self``, so the adapter applies and the model stays untouched."""
    import functools
    from types import MethodType

    model = MLP(64)
    before = snapshot(model)
    peft_model, _ = _train_facade(model, steps=3)
    X, _ = make_data(8)
    want = peft_model(X)
    calls = []
    plain = type(peft_model).forward

    @functools.wraps(plain)
    def wrapped(self, *args, **kwargs):  # accelerate-style: wraps the façade's own forward
        calls.append(type(self).__name__)
        return plain(self, *args, **kwargs)

    peft_model.forward = MethodType(wrapped, peft_model)
    torch.testing.assert_close(peft_model(X), want)

    def head(self, x):  # TRL-style: written for the model, reads its submodules
        return self.seq(x)

    peft_model.forward = MethodType(head, peft_model)
    torch.testing.assert_close(peft_model(X), want)
    assert calls == ["MLP"]
    assert_unchanged(before, model)
