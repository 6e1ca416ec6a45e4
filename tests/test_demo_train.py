"""The toy trainer: every step is a pure function of the seed and the step, so a run that was
stopped and resumed from its checkpoint ends with exactly the weights of one that was not."""

from __future__ import annotations

import pytest
import torch

from backend.demo.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # runs compared bit for bit

# Small batches at a small size: the architecture is the shipped one, the steps are cheap.
CFG = TrainConfig(vae_steps=4, vae_batch=2, vae_crop=16, unet_steps=4, unet_batch=4,
                  unet_size=32, warmup=2)


def _steps(trainer: Trainer, n_vae: int, n_unet: int) -> None:
    for _ in range(n_vae):
        trainer.vae_step_once()
    trainer.vae_ema.register_to_config(scaling_factor=0.5)  # skip the 256-image measurement
    for _ in range(n_unet):
        trainer.unet_step_once()


def _weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {**{f"vae.{k}": v for k, v in trainer.vae_ema.state_dict().items()},
            **{f"unet.{k}": v for k, v in trainer.ema.state_dict().items()}}


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_weights_of_a_straight_one(tmp_path):
    straight = Trainer(CFG, tmp_path / "straight", "cpu")
    _steps(straight, 4, 4)

    first = Trainer(CFG, tmp_path / "resumed", "cpu")
    _steps(first, 2, 0)
    first.save()
    resumed = Trainer(CFG, tmp_path / "resumed", "cpu")
    assert resumed.load() and resumed.vae_step == 2
    for _ in range(2):
        resumed.vae_step_once()
    resumed.vae_ema.register_to_config(scaling_factor=0.5)
    resumed.unet_step_once()
    resumed.save()
    again = Trainer(CFG, tmp_path / "resumed", "cpu")
    assert again.load() and (again.vae_step, again.unet_step) == (4, 1)
    for _ in range(3):
        again.unet_step_once()

    a, b = _weights(straight), _weights(again)
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    # and training moved them: the EMA is not still the initial weights
    fresh = _weights(Trainer(CFG, tmp_path / "fresh", "cpu"))
    assert any(not torch.equal(a[k], fresh[k]) for k in a)
