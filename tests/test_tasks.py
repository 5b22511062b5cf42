"""The harness's one rule for which loss a method gets from a task (harness.tasks.method_loss)."""

from __future__ import annotations

import pytest
import torch

from lossguide.harness.methods import method_config
from lossguide.harness.tasks import method_loss


def _clean(x):
    return (x - 1.0).pow(2).flatten(1).sum(1)


def _noisy(x_t, t):
    return x_t.flatten(1).sum(1) * 0 + 7.0


@pytest.mark.parametrize("spec", ["freedom", "shen2024-ra", "dps+polyak", "ggdm"])
def test_a_method_that_guides_through_x0_hat_gets_the_clean_loss_itself(spec):
    assert method_loss(method_config(spec), _clean, lambda: pytest.fail("built the noise-aware loss")) is _clean


def test_classifier_guidance_gets_the_noise_aware_loss():
    assert method_loss(method_config("cg"), _clean, lambda: _noisy) is _noisy
    assert method_loss(method_config("cg+polyak"), _clean, lambda: _noisy) is _noisy


def test_naive_grad_reads_the_clean_loss_at_x_t_not_the_noise_aware_classifier():
    loss = method_loss(method_config("naive_grad"), _clean, lambda: pytest.fail("built the noise-aware loss"))
    x_t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(loss(x_t, torch.tensor(500)), _clean(x_t))


def test_on_the_oracle_naive_grad_is_no_longer_classifier_guidance():
    """It was handed the exact noise-aware loss, which made it cg (the same SW to the last bit)."""
    from lossguide.harness.tasks import oracle as oracle_task
    from lossguide.schedule import NoiseSchedule

    schedule = NoiseSchedule.linear()
    task = {t.name.split("-")[0]: t for t in oracle_task.oracle_tasks(schedule)}["linear"]
    post = oracle_task.posterior_samples(task, 512)
    rows = {m: oracle_task.run_one(task, m, {}, schedule, range(64), 10, post) for m in ("cg", "naive_grad")}
    assert rows["naive_grad"]["sw_to_posterior"] != rows["cg"]["sw_to_posterior"]
    assert rows["naive_grad"]["loss"] != rows["cg"]["loss"]


def _recipe(tmp_path, method, params):
    import numpy as np
    import yaml
    from PIL import Image

    from lossguide import recipes

    img = (np.random.RandomState(0).rand(28, 28) * 255).astype("uint8")
    Image.fromarray(img).convert("RGB").save(tmp_path / "ref.png")
    r = {"name": "t", "model": {"kind": "pixel", "path": "mnist-ddpm"}, "method": method, "params": params,
         "loss": {"kind": "measurement", "operator": "super_resolution", "factor": 4, "reference": "ref.png"},
         "sampler": {"steps": 3}, "seeds": "0-1", "batch": 2, "device": "cpu"}  # fmt: skip
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(r))
    return recipes.build(recipes.load(tmp_path / "r.yaml"))


def test_recipes_follow_the_same_rule(tmp_path):
    """A recipe's naive_grad reads the recipe's loss at x_t (it used to fail: the loss takes x0 only); cg, whose
    noise-aware classifier a recipe cannot have, is one line naming the methods that fit."""
    naive, dps = _recipe(tmp_path, "naive_grad", {"scale": 0.01}), _recipe(tmp_path, "dps", {})
    x_t = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.equal(naive.loss(x_t, torch.tensor(500)), dps.loss(x_t))  # dps gets the recipe's loss itself
    with pytest.raises(ValueError, match="method 'cg' guides with a noise-aware classifier .* or naive_grad"):
        _recipe(tmp_path, "cg", {})
