"""One base model shared by many threads: every call sees exactly its own adapter, the model never
changes, not even for an instant during a call (DESIGN.md invariant 1; funclora/core/shadow.py)."""

import functools
import threading

import pytest
import torch
from torch import nn

import funclora as fl
from conftest import assert_unchanged, random_adapter, snapshot

ROUNDS = 60


def _run_threads(jobs: dict, rounds: int = ROUNDS) -> dict[str, int]:
    """Run each ``job()`` ``rounds`` times in its own thread, all starting together; count wrong results."""
    start = threading.Barrier(len(jobs))
    wrong = {name: 0 for name in jobs}
    errors = []

    def worker(name, job):
        try:
            start.wait()
            for _ in range(rounds):
                if not job():
                    wrong[name] += 1
        except BaseException as e:  # reported below; a thread's exception would otherwise vanish
            errors.append((name, e))

    threads = [threading.Thread(target=worker, args=item) for item in jobs.items()]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0][1]
    return wrong


def _same(a, b) -> bool:
    return torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def test_threads_share_one_model(mlp):
    """Forward, torch.func.grad training, route, two façades and a plain model(x), all at once."""
    mlp.train(False)
    before = snapshot(mlp)
    config = fl.LoraConfig(target_modules=["seq.0", "seq.2"], modules_to_save=["seq.4"], r=4)
    lora = fl.LoRA(mlp, config)
    a, b, c = (random_adapter(lora, 0.3, seed=s) for s in (1, 2, 3))
    x, y = torch.randn(8, 20), torch.randint(0, 2, (8,))
    stacked, index = fl.stack([a, b, c]), torch.tensor([2, 0, 1, 1, 0, 2, 2, 0])
    facade_b, facade_c = fl.PeftModel(mlp, config, b), fl.PeftModel(mlp, config, c)

    def loss(adapter):
        return nn.functional.nll_loss(lora(adapter, x), y)

    want = {"a": lora(a, x), "route": lora.route(stacked, index, x), "base": mlp(x),
            "grad": torch.func.grad(loss)(b), "b": lora(b, x), "c": lora(c, x)}
    assert not _same(want["a"], want["base"]) and not _same(want["b"], want["c"])

    def grads_ok():
        got = torch.func.grad(loss)(b)
        return all(_same(got[p][k], want["grad"][p][k]) for p in got for k in got[p])

    with torch.no_grad():
        wrong = _run_threads({
            "forward a": lambda: _same(lora(a, x), want["a"]),
            "route": lambda: _same(lora.route(stacked, index, x), want["route"]),
            "façade b": lambda: _same(facade_b(x), want["b"]),
            "façade c": lambda: _same(facade_c(x), want["c"]),
            "plain model": lambda: _same(mlp(x), want["base"]),
        })
    wrong.update(_run_threads({"grad b": grads_ok, "forward a": lambda: _same(lora(a, x), want["a"]),
                               "plain model": lambda: _same(mlp(x), want["base"])}, rounds=ROUNDS // 3))
    assert wrong == dict.fromkeys(wrong, 0)
    assert_unchanged(before, mlp)


def test_model_is_untouched_at_every_instant_of_a_call():
    """A hook on the user's model looks at it mid-call: its own weights, flags and dicts, every time."""
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], modules_to_save=["1"], r=2))
    adapter = random_adapter(lora, 0.5)
    own = {n: p for n, p in model.named_parameters()}
    seen = []

    def look(module, args, output):
        seen.append(module is not model[0]                                   # the hook runs on the call's view
                    and all(model.get_parameter(n) is p for n, p in own.items())
                    and not model[0].training and "forward" not in model[0].__dict__)

    model[0].register_forward_hook(look)
    before = snapshot(model)
    x = torch.randn(5, 4)
    lora(adapter, x)
    lora.route(fl.stack([adapter, adapter]), [0, 1, 0, 1, 1], x)
    fl.PeftModel(model, lora.config, adapter).train()(x)                     # training flags on the view only
    lora.bind(adapter, training=True)(x)
    assert seen == [True] * 4
    assert_unchanged(before, model)


def test_training_mode_threads_keep_their_own_flags_and_buffers():
    """BatchNorm in training mode in one thread, eval in another: statistics and flags stay per call."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).eval()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0", "2"], r=2))
    adapter = random_adapter(lora, 0.5)
    x = torch.randn(16, 6)
    want_train, want_eval = lora.run(None, adapter, (x,), {}, True), lora(adapter, x)
    assert not _same(want_train, want_eval)
    before = snapshot(model)
    with torch.no_grad():
        wrong = _run_threads({
            "train": lambda: _same(lora.run(None, adapter, (x,), {}, True), want_train),
            "eval": lambda: _same(lora(adapter, x), want_eval),
            "façade train": lambda: _same(fl.PeftModel(model, lora.config, adapter).train()(x), want_train),
        }, rounds=30)
    assert wrong == dict.fromkeys(wrong, 0)
    assert_unchanged(before, model)


def _hooked_forward(module, *args, **kwargs):
    return module._old_forward(*args, **kwargs)


class _Referrer(nn.Module):
    """Reaches its layers through plain attributes too, as some models do."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
        self.last = self.layers[1]                    # registered twice: a second path to one module
        object.__setattr__(self, "first", self.layers[0])                 # a plain attribute, not registered
        object.__setattr__(self, "pair", (self.layers[0], self.layers[1]))
        object.__setattr__(self, "run_first", self.layers[0].forward)     # a bound method
        object.__setattr__(self, "by_name", {"second": self.layers[1]})  # a plain dict
        # accelerate's hooks replace forward by a partial holding the module (device_map="auto")
        hooked = self.layers[0]
        hooked._old_forward = hooked.forward
        hooked.forward = functools.update_wrapper(functools.partial(_hooked_forward, hooked), hooked._old_forward)

    def forward(self, x):
        return self.last(self.first(x)) + self.pair[1](self.run_first(x)) + self.by_name["second"](x)


def test_plain_attribute_references_see_the_adapter():
    model = _Referrer()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["layers.0", "layers.1"], r=2))
    adapter, x = random_adapter(lora, 0.5), torch.randn(3, 4)
    merged = torch.func.functional_call(model, lora.merge(adapter), (x,), tie_weights=False)
    torch.testing.assert_close(lora(adapter, x), merged)
    with torch.no_grad():
        torch.testing.assert_close(lora(adapter, x), merged)
    object.__setattr__(model, "first", model.layers[1])        # rewired after fl.LoRA: the view follows
    rewired = torch.func.functional_call(model, lora.merge(adapter), (x,), tie_weights=False)
    assert not torch.allclose(rewired, merged)
    torch.testing.assert_close(lora(adapter, x), rewired)


class _HiddenReference(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        object.__setattr__(self, "run", lambda x: self.fc(x) * 2)    # a closure over the module itself

    def forward(self, x):
        return self.run(x)


def test_a_reference_the_view_cannot_redirect_is_refused_up_front():
    """A closure or partial holding a module would run the base weights: fl.LoRA raises, naming it."""
    with pytest.raises(fl.UnsupportedModuleError, match=r"'<root>' \(_HiddenReference\).*'run'.*closure"):
        fl.LoRA(_HiddenReference(), fl.LoraConfig(target_modules=["fc"]))
    nested = nn.Sequential(nn.Linear(4, 4))
    object.__setattr__(nested, "groups", [[nested[0]]])                       # a module in a list in a list
    with pytest.raises(fl.UnsupportedModuleError, match=r"'<root>' \(Sequential\).*'groups' \(a list\)"):
        fl.LoRA(nested, fl.LoraConfig(target_modules=["0"]))
    with pytest.raises(fl.UnsupportedModuleError, match=r"OptimizedModule.*torch.compile\(lora\)"):
        fl.LoRA(torch.compile(nn.Sequential(nn.Linear(4, 4))), fl.LoraConfig(target_modules=["_orig_mod.0"]))


def test_a_model_compiled_in_place_still_gets_the_adapter():
    """``model.compile()`` compiles the original module's call; the view runs its own (eager) call."""
    model = nn.Sequential(nn.Linear(4, 4))
    model.compile()
    lora = fl.LoRA(model, fl.LoraConfig(target_modules=["0"], r=2))
    adapter, x = random_adapter(lora, 0.5), torch.randn(3, 4)
    merged = lora.merge(adapter)
    with torch.no_grad():
        torch.testing.assert_close(lora(adapter, x), nn.functional.linear(x, merged["0.weight"], merged["0.bias"]))


@pytest.mark.slow
def test_a_compiled_call_leaves_the_model_alone_while_it_runs(mlp):
    """Under torch.compile the forward traces functional_call; the compiled graph takes the weights
    as inputs and never swaps them into the model, so a plain model(x) beside it stays the base."""
    mlp.eval()
    lora = fl.LoRA(mlp, fl.LoraConfig(target_modules=["seq.0", "seq.2"], r=4))
    adapter, x = random_adapter(lora, 0.3), torch.randn(8, 20)
    torch._dynamo.reset()
    step = torch.compile(lambda a: lora(a, x), fullgraph=True)
    with torch.no_grad():
        want, base = step(adapter), mlp(x)
        assert not _same(want, base)
        wrong = _run_threads({"compiled": lambda: torch.equal(step(adapter), want),
                              "plain model": lambda: torch.equal(mlp(x), base)}, rounds=300)
    assert wrong == {"compiled": 0, "plain model": 0}
