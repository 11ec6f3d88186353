"""methods registry, config building, Budget, trackers, advantage normalisation, optimizer and checkpoints."""

from __future__ import annotations

import dataclasses
import random

import numpy as np
import pytest
import torch

import methods
from methods.common import (
    Budget,
    BudgetExhausted,
    NullTracker,
    PerPromptStatTracker,
    batch_advantages,
    build_config,
    build_optimizer,
    clip_grad_norm,
    group_advantages,
    load_checkpoint,
    sample_nfe,
    save_checkpoint,
)
from tasks.registry import UnknownNameError

ALL_METHODS = ["base", "ddpo", "diffusion_dpo", "diffusion_dpo_online", "grpo", "inference_scaling", "nft", "pso",
               "pso_offline", "sdpo", "sdpo_t_eq_k", "sft", "sharpening", "sharpening_sft", "spo", "spo_reward_x0"]


# ---------------------------------------------------------------------------------------------- registry
def test_names_lists_every_method():
    assert methods.names() == ALL_METHODS


def test_every_method_class_has_one_spelling_and_names_its_deviations():
    """One registry spelling per class, `<Name>Method`, and no alias left in the module; each class's deviations are
    `Deviation`s with all three parts filled, and the Markdown table has one row per deviation."""
    import importlib

    from methods.common import Deviation

    rows = 0
    for name in methods.names():
        cls = methods.method_class(name)
        assert cls.__name__.endswith("Method") and cls.name == name, name
        module = importlib.import_module(cls.__module__)
        aliases = [k for k, v in vars(module).items() if v is cls and k != cls.__name__]
        assert aliases == [], f"{name}: aliases {aliases}"
        for dev in getattr(cls, "deviations", ()):
            assert isinstance(dev, Deviation) and dev.what and dev.why and dev.where, name
            rows += 1
    for name in ("diffusion_dpo", "diffusion_dpo_online", "pso", "pso_offline", "sdpo", "sdpo_t_eq_k"):
        assert methods.method_class(name).deviations and methods.method_class(name).paper, name
    table = methods.deviations_markdown()
    assert table.count("\n") == rows + 1 and "| sdpo_t_eq_k |" in table


def test_unknown_method_name_lists_valid_names():
    with pytest.raises(UnknownNameError) as err:
        methods.load("ppo")
    assert str(err.value) == "unknown method 'ppo'; available: " + ", ".join(ALL_METHODS)


@pytest.mark.parametrize("name", ["base", "ddpo", "inference_scaling"])
def test_load_builds_config_and_method(name):
    method = methods.load(name)
    assert method.name == name
    assert dataclasses.is_dataclass(method.config)
    assert isinstance(method, methods.Method)
    assert isinstance(method.config.search_space(), dict)


def test_unknown_override_names_key_and_valid_fields():
    with pytest.raises(ValueError) as err:
        methods.load("ddpo", learning_rate=1e-4)
    message = str(err.value)
    assert "'learning_rate'" in message and "valid fields:" in message and "clip_range" in message


def test_overrides_and_presets_layer_in_order():
    method = methods.load("ddpo", preset="toy", lr=1e-4)
    assert method.config.lr == 1e-4  # override beats preset
    assert method.config.samples_per_prompt == 8 and method.config.advantage == "group"  # from the preset
    assert methods.load("ddpo").config.lr == 3e-4  # paper default
    with pytest.raises(ValueError, match="unknown preset 'gpu'"):
        methods.load("ddpo", preset="gpu")


def test_every_config_field_is_documented():
    """One docstring per field (style.md): the source has a string literal right after each field."""
    import inspect

    for name in ["ddpo", "inference_scaling"]:
        cls = methods.config_class(name)
        lines = inspect.getsource(cls).splitlines()
        for field in dataclasses.fields(cls):
            at = next(i for i, line in enumerate(lines) if line.strip().startswith(f"{field.name}:"))
            assert lines[at + 1].strip().startswith('"""'), f"{name}.{field.name} has no docstring"


def test_build_config_turns_lists_into_tuples():
    @dataclasses.dataclass
    class C:
        betas: tuple = (0.9, 0.999)
        """betas"""

    assert build_config(C, betas=[0.5, 0.6]).betas == (0.5, 0.6)


def test_impossible_values_fail_loudly():
    with pytest.raises(ValueError, match="clip_range"):
        methods.load("ddpo", clip_range=0.0)
    with pytest.raises(ValueError, match="advantage"):
        methods.load("ddpo", advantage="ranks")
    with pytest.raises(ValueError, match="multiple"):
        methods.load("ddpo", prompts_per_epoch=10, train_batch_size=4, gradient_accumulation_steps=1)


# ---------------------------------------------------------------------------------------------- budget
def test_budget_counts_and_fits():
    budget = Budget(max_nfe=100, max_reward_calls=10)
    budget.spend(sample_nfe=40, reward_calls=4)
    budget.spend(grad_nfe=30)
    assert (budget.sample_nfe, budget.grad_nfe, budget.total_nfe, budget.reward_calls) == (40, 30, 70, 4)
    assert budget.remaining_nfe == 30 and not budget.exhausted
    assert budget.fits(nfe=30, reward_calls=6) and not budget.fits(nfe=31) and not budget.fits(reward_calls=7)
    with pytest.raises(BudgetExhausted):
        budget.require(nfe=31)
    budget.spend(sample_nfe=30)
    assert budget.exhausted
    assert budget.as_dict() == {"max_nfe": 100, "max_reward_calls": 10, "sample_nfe": 70, "grad_nfe": 30,
                                "total_nfe": 100, "reward_calls": 4}
    unlimited = Budget(None)
    unlimited.spend(sample_nfe=10**9)
    assert not unlimited.exhausted and unlimited.fits(nfe=10**12)


def test_budget_rejects_negative():
    with pytest.raises(ValueError):
        Budget(max_nfe=-1)
    with pytest.raises(ValueError):
        Budget(10).spend(grad_nfe=-1)


def test_sample_nfe_counts_per_sample_and_cfg():
    assert sample_nfe(8, 4, 1) == 32
    assert sample_nfe(8, 4, 2) == 64


def test_null_tracker_records():
    tracker = NullTracker()
    tracker.log_metrics({"train/loss": torch.tensor(0.5)}, step=12)
    with tracker.progress(3, "x") as advance:
        advance(1)
    assert tracker.records == [(12, {"train/loss": 0.5})]
    assert tracker.series("train/loss") == [0.5] and tracker.steps("train/loss") == [12]


# ---------------------------------------------------------------------------------------------- advantages
def test_stat_tracker_worked_value_from_spec():
    """Spec §1.5: buffer [1, 2, 3, 4], value 4 -> (4 - 2.5) / 1.1180 = 1.3416."""
    tracker = PerPromptStatTracker(buffer_size=16, min_count=4)
    tracker.update(["p"] * 3, torch.tensor([1.0, 2.0, 3.0]))  # 3 < min_count: batch statistics
    adv = tracker.update(["p"], torch.tensor([4.0]))
    assert adv.item() == pytest.approx(1.341640, abs=1e-5)  # (4-2.5)/(sqrt(1.25)+1e-6)


def test_stat_tracker_below_min_count_uses_whole_batch():
    tracker = PerPromptStatTracker(buffer_size=16, min_count=16)
    rewards = torch.tensor([1.0, 3.0, 5.0, 7.0])
    adv = tracker.update(["a", "a", "b", "b"], rewards)
    expected = (rewards - 4.0) / (np.sqrt(5.0) + 1e-6)  # batch mean 4, population std sqrt(5)
    assert torch.allclose(adv, expected.float(), atol=1e-6)


def test_stat_tracker_buffer_is_fifo_and_persists():
    tracker = PerPromptStatTracker(buffer_size=2, min_count=2)
    tracker.update(["p", "p"], torch.tensor([0.0, 10.0]))
    adv = tracker.update(["p"], torch.tensor([2.0]))  # buffer now [10, 2]: mean 6, std 4
    assert adv.item() == pytest.approx((2 - 6) / (4 + 1e-6), rel=1e-6)
    state = tracker.state_dict()
    clone = PerPromptStatTracker(1, 1)
    clone.load_state_dict(state)
    assert clone.state_dict() == state and clone.buffers["p"].maxlen == 2


def test_group_advantages_per_prompt_in_batch():
    prompts = ["a"] * 4 + ["b"] * 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(prompts, rewards)
    # group a: mean 0.25, population std sqrt(0.1875) = 0.433013
    assert adv[0].item() == pytest.approx(0.75 / (0.4330127 + 1e-6), rel=1e-6)
    assert adv[1].item() == pytest.approx(-0.25 / (0.4330127 + 1e-6), rel=1e-6)
    assert torch.equal(adv[4:], torch.zeros(4))  # all-equal group -> 0


def test_batch_advantages_zscore():
    adv = batch_advantages(torch.tensor([0.0, 2.0]))
    assert torch.allclose(adv, torch.tensor([-1.0, 1.0]), atol=1e-7)


# ---------------------------------------------------------------------------------------------- optimisation
@dataclasses.dataclass
class _OptCfg:
    lr: float = 0.1
    optimizer: str = "adamw"
    weight_decay: float = 0.01
    adam_beta1: float = 0.8
    adam_beta2: float = 0.9
    adam_eps: float = 1e-6


def test_build_optimizer_reads_config():
    param = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer([param], _OptCfg())
    assert isinstance(opt, torch.optim.AdamW)
    group = opt.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"]) == (0.1, (0.8, 0.9), 1e-6, 0.01)
    assert isinstance(build_optimizer([param], _OptCfg(optimizer="adam")), torch.optim.Adam)
    with pytest.raises(ValueError, match="unknown optimizer"):
        build_optimizer([param], _OptCfg(optimizer="lion"))
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer([torch.nn.Parameter(torch.zeros(1), requires_grad=False)], _OptCfg())


def test_clip_grad_norm_returns_preclip_norm():
    param = torch.nn.Parameter(torch.zeros(2))
    param.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm([param], 1.0) == pytest.approx(5.0)
    assert torch.allclose(param.grad, torch.tensor([0.6, 0.8]))
    param.grad = torch.tensor([3.0, 4.0])
    assert clip_grad_norm([param], None) == pytest.approx(5.0) and param.grad[0] == 3.0


# ---------------------------------------------------------------------------------------------- checkpoints
class _FakePolicy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lora = torch.nn.Linear(3, 2)

    def adapter_state_dict(self):
        return {k: v.detach().clone() for k, v in self.lora.state_dict().items()}

    def load_adapter_state_dict(self, state):
        self.lora.load_state_dict(state)


@dataclasses.dataclass
class _Cfg:
    lr: float = 0.1
    """lr"""


def test_checkpoint_roundtrip_restores_everything(tmp_path):
    torch.manual_seed(0)
    policy = _FakePolicy()
    opt = torch.optim.Adam(policy.parameters(), lr=0.1)
    policy.lora(torch.ones(1, 3)).sum().backward()
    opt.step()
    budget = Budget(1000)
    budget.spend(sample_nfe=7, grad_nfe=5, reward_calls=3)
    gen = torch.Generator().manual_seed(3)
    torch.rand(1, generator=gen)
    random.seed(5)
    np.random.seed(6)
    path = save_checkpoint(tmp_path / "state.pt", policy=policy, optimizer=opt, step=4, config=_Cfg(),
                           budget=budget, generators={"g": gen}, extra={"tracker": {"p": [1.0]}})
    expected = (policy.adapter_state_dict(), torch.rand(2), torch.rand(2, generator=gen), random.random(),
                np.random.rand())

    fresh, fresh_gen, fresh_budget = _FakePolicy(), torch.Generator(), Budget(1000)
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=0.1)
    state = load_checkpoint(path, policy=fresh, optimizer=fresh_opt, config=_Cfg(), budget=fresh_budget,
                            generators={"g": fresh_gen})
    assert state == {"step": 4, "extra": {"tracker": {"p": [1.0]}}}
    for key, value in expected[0].items():
        assert torch.equal(fresh.adapter_state_dict()[key], value)
    assert torch.equal(torch.rand(2), expected[1]) and torch.equal(torch.rand(2, generator=fresh_gen), expected[2])
    assert random.random() == expected[3] and np.random.rand() == expected[4]
    assert fresh_budget.as_dict() == budget.as_dict()
    assert fresh_opt.state_dict()["state"][0]["step"] == 1


def test_checkpoint_refuses_mismatched_config(tmp_path):
    policy = _FakePolicy()
    path = save_checkpoint(tmp_path / "s.pt", policy=policy, optimizer=None, step=1, config=_Cfg(lr=0.1))
    with pytest.raises(ValueError, match="lr: saved 0.1 vs now 0.2"):
        load_checkpoint(path, policy=policy, optimizer=None, config=_Cfg(lr=0.2))


def test_readme_row_vs_paper_table_is_the_methods_records():
    """The README's "row vs paper" table is `methods.deviations_markdown()` verbatim, between its markers."""
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    start, end = "<!-- row-vs-paper:start -->\n", "\n<!-- row-vs-paper:end -->"
    assert start in readme and end in readme
    table = readme[readme.index(start) + len(start):readme.index(end)]
    assert table == methods.deviations_markdown(), "regenerate the README table from methods.deviations_markdown()"
