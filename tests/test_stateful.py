"""Random sequences of everything a user does, on every architecture that breaks naive tools.

After every step: evaluate() equals a plain forward pass, nonzeros equal an independent count,
and reset() is bit-exact (then the state is restored and must equal what it was)."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test

import prune_lab as pl
from prune_lab.lab_model import LabModel
from tests import zoo_extra
from tests.conftest import snapshot, state_equal, zoo_model
from tests.oracles import nonzeros, plain

STEPS_PER_MODEL = 200
LEVELS = [0.0, 0.1, 0.37, 0.5, 0.9, 1.0]


def _digits_models():
    return {
        "mlp": lambda d: zoo_model("mlp", d),
        "lenet5": lambda d: zoo_model("lenet5", d),
        "resnet": lambda d: zoo_model("resnet", d),
        "skip_concat_reuse": lambda d: zoo_extra.SkipConcat(),
        "depthwise_grouped_inplace": lambda d: zoo_extra.DepthwiseGrouped(),
        "attention": lambda d: zoo_extra.TinyTransformer(),
        "optional_arg": lambda d: zoo_extra.OptionalArg(),
        "untraceable": lambda d: zoo_extra.Untraceable(),
        "lstm": lambda d: zoo_extra.LSTMClassifier(),
        "mobilenet_se": lambda d: zoo_extra.MobileSE(),
        "convnext": lambda d: zoo_extra.ConvNeXtBlock(),
        "densenet": lambda d: zoo_extra.DenseBlock(),
        "vit_masked": lambda d: zoo_extra.ViTMasked(),
        "resnext": lambda d: zoo_extra.ResNeXtBlock(),
        "regnet": lambda d: zoo_extra.RegNetBlock(),
    }


MODELS = list(_digits_models()) + ["tied_embedding_head"]


def build(name: str, digits):
    torch.manual_seed(0)
    if name == "tied_embedding_head":
        x, y = zoo_extra.lm_data(32)
        return zoo_extra.TiedHeadLM(), (x, y), (x, y)
    x, y = digits.test.tensors
    tx, ty = digits.train.tensors
    return _digits_models()[name](digits), (x[:48], y[:48]), (tx[:64], ty[:64])


def machine_for(name: str, digits):
    model0, eval_data, train_data = build(name, digits)

    class SessionMachine(RuleBasedStateMachine):
        steps = 0

        @invariant()
        def count(self):
            type(self).steps += 1

        @initialize()
        def start(self):
            self.model = copy.deepcopy(model0)
            self.x, self.y = eval_data
            self.s = pl.Session(self.model, eval_data, device="cpu", check=False, batch_size=16)
            self.lab = LabModel(self.s, preview="never")
            self.original = snapshot(self.model)
            self.recorded = None
            self.names = [i.name for i in self.s.layers]

        def channel_layers(self) -> set:
            return {n for n, r in self.s.state.records.items() if r.pattern == "channels"}

        def refused(self, call, match: str) -> None:
            """Unstructured pruning over removed channels: a clear error, nothing changed."""
            before, snap = snapshot(self.model), self.s.snapshot()
            with pytest.raises(ValueError, match=match):
                call()
            assert state_equal(snapshot(self.model), before) and self.s.snapshot() == snap

        @rule(data=st.data(), level=st.sampled_from(LEVELS), criterion=st.sampled_from(["magnitude", "random"]))
        def set_sparsity(self, data, level, criterion):
            name = data.draw(st.sampled_from(self.names))
            if name in self.channel_layers():
                return self.refused(lambda: self.s.set_sparsity({name: level}, criterion=criterion), "whole channels removed")
            self.s.set_sparsity({name: level}, criterion=criterion)
            assert self.s.pruned_counts[name] == round(level * self.s.layer(name).n_params)

        @rule(level=st.sampled_from([0.0, 0.3, 0.8, 0.95]), allocation=st.sampled_from(["uniform", "global", "erk", "lamp", "random"]),
              criterion=st.sampled_from(["magnitude", "random"]))
        def set_global_sparsity(self, level, allocation, criterion):
            if self.channel_layers():
                return self.refused(lambda: self.s.set_global_sparsity(level, allocation=allocation, criterion=criterion),
                                    "whole channels removed")
            self.s.set_global_sparsity(level, allocation=allocation, criterion=criterion)
            total = sum(i.n_params for i in self.s.layers)
            assert sum(self.s.pruned_counts.values()) == round(level * total)

        @rule(level=st.sampled_from([0.0, 0.25, 0.5, 0.9]), allocation=st.sampled_from(["uniform", "global"]),
              criterion=st.sampled_from(["l1", "l2", "random"]))
        def channels(self, level, allocation, criterion):
            groups = self.s.groups.groups
            if not groups:
                return
            self.s.set_global_sparsity(level, allocation=allocation, criterion=criterion, pattern="channels")
            held = self.s.channels
            period = {g: groups[g].period for g in held}  # channels tied across a grouped convolution go p at a time
            assert all((n - k) % period[g] == 0 for g, (k, n) in held.items())
            if allocation == "global":
                total = sum(n for _, n in held.values())
                target = min(round(level * total), total - sum(period.values()))
                removed = sum(n - k for k, n in held.values())
                assert target - max(period.values()) < removed <= target  # exactly the target when nothing is tied
            else:
                assert all(n - k == min(period[g] * round(level * n / period[g]), n - period[g])
                           for g, (k, n) in held.items())

        @rule()
        def compact(self):
            if not self.s.state.channels:
                return
            small = self.s.compact(measure=False)  # checks its outputs against the masked model itself
            self.model.eval(), small.eval()
            with torch.no_grad():
                a, b = self.model(self.x), small(self.x)
            assert float((a - b).abs().max()) <= 1e-4 * max(float(a.abs().max()), 1e-12)

        @rule(data=st.data(), level=st.sampled_from(LEVELS))
        def lab_move(self, data, level):
            name = data.draw(st.sampled_from(self.names))
            if name not in self.channel_layers():
                self.lab.set_layer(name, level)

        @rule()
        def lab_undo(self):
            self.lab.undo()

        @rule()
        def lab_redo(self):
            self.lab.redo()

        @rule(data=st.data())
        def sensitivity(self, data):
            before = snapshot(self.model)
            layer = data.draw(st.sampled_from(self.names))
            r = self.s.sensitivity(levels=(0.0, 0.5), layers=[layer], progress=False)
            assert r.complete and len(r.records) == 2
            assert state_equal(snapshot(self.model), before)

        @rule()
        def finetune(self):
            self.s.finetune(train_data, steps=2, lr=0.01, batch_size=16, progress=False)
            for name in self.names:
                w, m = self.s.state.weights[name], self.s.mask(name)
                assert int((w[~m] != 0).sum()) == 0  # pruned weights stay exactly zero

        @rule()
        def record(self):
            self.recorded = snapshot(self.model)

        @precondition(lambda self: self.recorded is not None)
        @rule()
        def rewind(self):
            masks = {n: self.s.mask(n).clone() for n in self.names}
            self.s.rewind_to(self.recorded)
            for n in self.names:
                assert torch.equal(self.s.mask(n), masks[n])

        @rule()
        def recipe_roundtrip(self):
            masks = {n: self.s.mask(n).clone() for n in self.names}
            self.s.apply_recipe(self.s.recipe())
            for n in self.names:
                assert torch.equal(self.s.mask(n), masks[n])

        @rule()
        def reset(self):
            self.s.reset()
            assert state_equal(snapshot(self.model), self.original)

        @invariant()
        def numbers_are_true(self):
            if not hasattr(self, "s"):
                return
            acc, loss = plain(self.model, self.x, self.y, batch=16)
            ev = self.s.evaluate()
            assert ev["accuracy"] == acc
            assert abs(ev["loss"] - loss) <= 1e-5 * max(1.0, abs(loss))
            st_ = self.s.stats()
            for name in self.names:
                assert st_.layers[name]["nonzeros"] == nonzeros(self.s.state.weights[name])
            for key, (t, m) in self.s.state.member_masks().items():  # removed channels: biases and BatchNorm zero
                assert int((t[~m] != 0).sum()) == 0, key

        @invariant()
        def reset_is_exact_and_restorable(self):
            if not hasattr(self, "s"):
                return
            before, snap = snapshot(self.model), self.s.snapshot()
            self.s.reset()
            assert state_equal(snapshot(self.model), self.original)
            self.s.restore(snap)
            assert state_equal(snapshot(self.model), before)

    SessionMachine.__name__ = f"SessionMachine_{name}"
    return SessionMachine


@pytest.mark.parametrize("name", MODELS)
def test_random_sequences_keep_every_number_true(name, digits):
    """Hypothesis draws runs of up to 25 steps; runs repeat until the model has seen at least
    STEPS_PER_MODEL steps, each one followed by the invariants."""
    machine = machine_for(name, digits)
    rounds = 0
    while machine.steps < STEPS_PER_MODEL:
        run_state_machine_as_test(
            machine,
            settings=settings(max_examples=10, stateful_step_count=25, deadline=None, database=None,
                              suppress_health_check=list(__import__("hypothesis").HealthCheck)),
        )
        rounds += 1
    assert machine.steps >= STEPS_PER_MODEL
