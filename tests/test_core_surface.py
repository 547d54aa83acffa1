"""The declared extension surface: every member the core reads is declared in ``components.py``,
read through ``capability`` (declared names only), and a plugin's component is checked against its
contract: a missing or misspelled member is one error line naming the plugin, the component and
the member. The plugins here are small in-process ones (``registry.registry_from``)."""

from __future__ import annotations

import ast
import types
from pathlib import Path

import attrs
import pytest
import torch

from specforge_core import components as C
from specforge_core import hookimpl
from specforge_core.config import load_config, option
from specforge_core.registry import RegistryError, registry_from

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- small plugins
class GoodLoss:
    def prepare(self, final_hidden, head):
        return final_hidden

    def __call__(self, draft_hidden, draft_head, prepared, target_rows, valid):
        n = valid.sum()
        return C.LossOutput(loss_sum=draft_hidden.sum() * 0, correct=n * 0, count=n)


class MisspelledLoss(GoodLoss):
    def weighted_group(self, prepared, valid, weights):  # the contract says weighted_groups
        raise AssertionError("never called")


class NoPrepareLoss:
    def prepar(self, final_hidden, head):  # required ``prepare``, misspelled
        return final_hidden

    def __call__(self, *args):
        raise AssertionError("never called")


def loss_plugin(name: str, cls: type, config: type | None = None, **factory_attrs) -> types.SimpleNamespace:
    def factory(options):
        return cls()

    factory.__dict__.update(factory_attrs)

    @hookimpl
    def register_losses(register):
        register(name, factory, config=config, description="a test loss")

    return types.SimpleNamespace(register_losses=register_losses)


def test_a_conforming_component_builds():
    reg = registry_from([("good-plugin", loss_plugin("good", GoodLoss))], with_entry_points=False)
    loss = reg.create("loss", "good")
    assert isinstance(loss, C.Loss) and not reg.broken
    assert C.capability(loss, "Loss.weighted_groups") is None  # optional, absent: its default
    assert C.capability(loss, "Loss.needs_full_vocab") is False


def test_misspelled_optional_member_is_one_line_with_did_you_mean():
    reg = registry_from([("typo-plugin", loss_plugin("typo", MisspelledLoss))], with_entry_points=False)
    with pytest.raises(RegistryError) as err:
        reg.create("loss", "typo")
    msg = str(err.value)
    assert "\n" not in msg
    for part in ("plugin 'typo-plugin'", "loss 'typo'", "'weighted_group'", "did you mean 'weighted_groups'"):
        assert part in msg, msg


def test_missing_required_member_names_it_and_the_near_miss():
    reg = registry_from([("p", loss_plugin("half", NoPrepareLoss))], with_entry_points=False)
    with pytest.raises(RegistryError, match=r"plugin 'p': loss 'half' .*lacks 'prepare'.*it has 'prepar'"):
        reg.create("loss", "half")


@attrs.define
class TypoOptions:
    chunk: int = option(4, "chunk")

    def plan_note(self, config, plan):  # the contract says plan_notes
        return C.PlanNotes()


def test_misspelled_options_method_leaves_the_plugin_out_at_registration(tmp_path):
    reg = registry_from([("opt-plugin", loss_plugin("opt", GoodLoss, TypoOptions)),
                         ("good-plugin", loss_plugin("good", GoodLoss))])
    assert "good" in reg.names("loss") and "opt" not in reg.names("loss")  # the others still load
    [(info, why)] = reg.broken
    assert info.name == "opt-plugin"
    assert "loss 'opt'" in why and "'plan_note'" in why and "did you mean 'plan_notes'" in why
    cfg = tmp_path / "c.toml"
    cfg.write_text('[training]\nloss = "opt"\n')
    with pytest.raises(Exception, match=r"no loss named 'opt'.*Not loaded: plugin 'opt-plugin'.*'plan_notes'"):
        load_config([cfg], registry=reg)


def test_misspelled_factory_flag_is_caught():
    reg = registry_from([("p", loss_plugin("x", GoodLoss, needs_proces_group=True))], with_entry_points=False)
    [(_info, why)] = reg.broken
    assert "factory" in why and "did you mean 'needs_process_group'" in why


def test_every_bundled_component_conforms():
    reg = registry_from([])
    assert not reg.broken, reg.broken
    cfg = load_config()
    built = 0
    for kind, args in (("draft_algorithm", (cfg,)), ("loss", ()), ("lr_scheduler", (10, 2))):
        for name in reg.names(kind):
            assert isinstance(reg.create(kind, name, None, *args), object)  # checked inside create
            built += 1
    for name in ("local", "shm"):
        assert isinstance(reg.create("transfer_store", name), C.TransferStoreProvider)
    assert built >= 7


# ----------------------------------------------------------------------------- the helper
def test_capability_accepts_declared_names_only():
    with pytest.raises(C.UndeclaredMember, match="did you mean 'weighted_groups'"):
        C.capability(GoodLoss(), "Loss.weighted_group")
    with pytest.raises(C.UndeclaredMember, match="no contract 'Los'"):
        C.capability(GoodLoss(), "Los.weighted_groups")


def test_a_subclass_of_the_protocol_does_not_inherit_optional_stubs():
    class Explicit(GoodLoss, C.Loss):
        pass

    loss = Explicit()
    assert C.capability(loss, "Loss.weighted_groups") is None
    assert C.capability(loss, "Loss.needs_full_vocab") is False
    assert not C.has_capability(loss, "Loss.workspace_bytes")


def test_members_lists_required_and_optional():
    m = C.members("TransferStoreProvider")
    assert {n for n, x in m.items() if x.required} == {"start", "connect", "stop"}
    assert {"configure", "supplies_features", "feature_source", "encode", "decode"} <= set(m)
    assert C.members("Proposer")["teacher_forced"].required is False
    assert C.members("ComponentOptions").keys() == {"validate_with", "plan_notes", "engine_nodes", "train_state_split"}


# --------------------------------------------------------------------------- the core's call sites
def _calls(tree: ast.AST, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == name:
            yield node


def test_core_reads_optional_members_only_through_capability():
    """Every ``capability(x, "Contract.member")`` in the core names a declared member, and no core
    module probes a declared optional member with getattr/hasattr (it would bypass the table)."""
    optional_names = {n for c in C.CONTRACTS for n, m in C.members(c).items() if not m.required}
    bad, probes = [], []
    for path in sorted((ROOT / "specforge_core").rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        where = path.relative_to(ROOT)
        for call in [*_calls(tree, "capability"), *_calls(tree, "has_capability")]:
            arg = call.args[1] if len(call.args) > 1 else None
            if isinstance(arg, ast.Constant):
                contract, _, member = str(arg.value).partition(".")
                if contract not in C.CONTRACTS or member not in C.members(contract):
                    bad.append(f"{where}:{call.lineno}: {arg.value}")
        for call in [*_calls(tree, "getattr"), *_calls(tree, "hasattr")]:
            if len(call.args) > 1 and isinstance(call.args[1], ast.Constant) and call.args[1].value in optional_names:
                probes.append(f"{where}:{call.lineno}: {ast.unparse(call)}")
    assert not bad, "undeclared members:\n" + "\n".join(bad)
    assert not probes, "use components.capability for declared optional members:\n" + "\n".join(probes)


def test_batch_is_typed_for_algorithms():
    from specforge_core.training.batch import Batch

    hints = C.DraftAlgorithm.objective.__annotations__
    assert hints["batch"] in ("Batch", Batch)
    assert {a.name for a in attrs.fields(Batch)} >= {"input_ids", "loss_mask", "aux_hidden", "final_hidden",
                                                     "target_argmax", "doc_ids", "position_ids"}
    assert torch.is_tensor(torch.zeros(1))


def test_the_plugin_guide_lists_every_declared_member():
    text = (ROOT / "docs" / "writing-plugins.md").read_text()
    missing = [f"{c}.{n}" for c in C.CONTRACTS for n in C.members(c)
               if c not in ("EvalTarget", "WeightedGroups") and n != "__call__" and f"`{n}`" not in text]
    assert not missing, f"docs/writing-plugins.md does not mention: {missing}"


class _Stub:
    features = C.FeatureSpec()

    def build(self, target, vocab, weights=None): ...
    def count_targets(self, batch, head): ...
    def objective(self, draft, batch, ctx): ...
    def summarize(self, totals): ...
    def export(self, draft, vocab): ...
    def plan(self, config, target): ...


class _BadProposer:
    aux_layers = None

    def begin(self, prompts): ...
    def observe(self, tokens, features): ...
    def propose(self, k): ...
    def kep(self, rows): ...  # the contract says keep


def test_eval_checks_the_proposer_an_algorithm_returns(tmp_path):
    from specforge_core.evaluation.proposers import load_proposer

    class WithProposer(_Stub):
        def proposer(self, export_dir, target, device):
            return _BadProposer()

    @hookimpl
    def register_draft_algorithms(register):
        register("stub-draft", lambda options, config: WithProposer())

    reg = registry_from([("stub-plugin", types.SimpleNamespace(register_draft_algorithms=register_draft_algorithms))],
                        with_entry_points=False)
    with pytest.raises(ValueError, match=r"'stub-draft': its proposer \(_BadProposer\) lacks 'keep'.*it has 'kep'"):
        load_proposer(tmp_path, types.SimpleNamespace(num_layers=8), "cpu", name="stub-draft", registry=reg)


def test_every_kind_names_a_declared_contract():
    for kind, row in C.KINDS.items():
        assert row.contract in C.CONTRACTS or row.contract == "LRLambda", kind


def test_misspelled_hook_name_leaves_the_plugin_out_with_did_you_mean():
    @hookimpl
    def register_loss(register):  # the hook is register_losses
        register("lost", lambda options: GoodLoss())

    reg = registry_from([("hook-typo", types.SimpleNamespace(register_loss=register_loss))], with_entry_points=False)
    [(info, why)] = reg.broken
    assert info.name == "hook-typo" and "'register_loss' is marked @hookimpl but is no specforge hook" in why
    assert "did you mean 'register_losses'" in why and reg.names("loss") == []
