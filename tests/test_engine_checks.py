"""sftbench.engine_checks: the loss scale read from DeepSpeed's optimizers, the ZeRO-0 fp16 defect check."""
from __future__ import annotations

import pytest
import torch

from sftbench import engine_checks as ec


class ZeroOpt:  # DeepSpeed's ZeRO optimizers: a plain attribute
    cur_scale = 2.0 ** 18


class Fp16Opt:  # DeepSpeed 0.19's FP16_Optimizer: the scale behind a property, no cur_scale
    @property
    def loss_scale(self):
        return 4294967296.0


class NoScaleOpt:
    loss_scale = None


class Engine:
    """Shaped like DeepSpeed 0.19's engine: backward scales the loss for ZeRO optimizers only."""

    def __init__(self, optimizer, fp16=True, zero=False, gradscaler=None):
        self.optimizer, self._fp16, self._zero, self.torch_autocast_z0_gradscaler = optimizer, fp16, zero, gradscaler

    def fp16_enabled(self):
        return self._fp16

    def zero_optimization(self):
        return self._zero

    def backward(self, loss):
        if self._zero:
            loss = self.optimizer.scale_if_loss(loss)
        loss.backward()


class OldEngine(Engine):
    """Shaped like DeepSpeed before 0.19 (and the upstream fix): the optimizer scales the loss."""

    def backward(self, loss):
        self.optimizer.backward(loss)


def test_loss_scale_from_each_optimizer_shape():
    assert ec.loss_scale(Engine(ZeroOpt())) == 2.0 ** 18
    assert ec.loss_scale(Engine(Fp16Opt())) == 2.0 ** 32
    assert ec.loss_scale(Engine(NoScaleOpt())) is None
    assert ec.loss_scale(object()) is None

    class TensorOpt:
        cur_scale = torch.tensor(1024.0)
    assert ec.loss_scale(Engine(TensorOpt())) == 1024.0


def test_fp16_zero0_defect_only_where_backward_drops_the_scale():
    msg = ec.fp16_zero0_scale_defect(Engine(Fp16Opt()))
    assert msg and "ZeRO stage 0" in msg and "4.29497e+09" in msg and "pull request 8393" in msg
    assert ec.fp16_zero0_scale_defect(Engine(ZeroOpt(), zero=True)) is None      # ZeRO scales its own loss
    assert ec.fp16_zero0_scale_defect(Engine(Fp16Opt(), fp16=False)) is None    # bf16 / fp32: no scale
    assert ec.fp16_zero0_scale_defect(Engine(NoScaleOpt())) is None
    assert ec.fp16_zero0_scale_defect(OldEngine(Fp16Opt())) is None             # the optimizer scales the loss
    assert ec.fp16_zero0_scale_defect(Engine(Fp16Opt(), gradscaler=object())) is None  # torch autocast's scaler
    assert ec.fp16_zero0_scale_defect(object()) is None                          # not a DeepSpeed engine


def test_the_installed_deepspeed_is_the_one_checked():
    # 0.19.x's engine.backward never hands the loss to the optimizer: the check must fire for it. A DeepSpeed with
    # the upstream fix routes fp16 ZeRO-0 through optimizer.backward and must not be flagged.
    ds = pytest.importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine
    has_defect = not ec._backward_scales_fp16_optimizer(DeepSpeedEngine)
    if ds.__version__.startswith("0.19."):
        assert has_defect


def test_warnings_of_meta():
    assert ec.warnings_of({"warnings": ["x"]}) == ["x"]
    assert ec.warnings_of({"warnings": []}) == []
    old = {"precision": "fp16", "zero_stage": 0, "optimizations": {"engine": "deepspeed"},
           "versions": {"deepspeed": "0.19.8"}}
    assert len(ec.warnings_of(old)) == 1 and "0.19.8" in ec.warnings_of(old)[0]
    assert ec.warnings_of({**old, "zero_stage": 1}) == []
    assert ec.warnings_of({**old, "precision": "bf16"}) == []
    assert ec.warnings_of({**old, "versions": {"deepspeed": "0.18.0"}}) == []
    assert ec.warnings_of({**old, "optimizations": {"engine": "torch"}}) == []


def test_deepspeeds_scheduler_start_up_message_is_silenced_and_other_warnings_stay():
    """WarmupLR's constructor warns 'Attempting to get learning rate from scheduler before it has started' on every
    rank: filtered; any other DeepSpeed warning still reaches the handlers."""
    import logging

    import torch
    from deepspeed.runtime.lr_schedules import WarmupLR
    from deepspeed.utils import logger

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    h = Keep(level=logging.DEBUG)
    logger.addHandler(h)
    try:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        WarmupLR(opt, warmup_num_steps=10)
        assert seen == ["Attempting to get learning rate from scheduler before it has started"]  # DeepSpeed's noise
        seen.clear()
        ec.silence_startup_noise()
        ec.silence_startup_noise()  # once is enough; twice adds no second filter
        WarmupLR(opt, warmup_num_steps=10)
        logger.warning("ZeRO: something that matters")
        assert seen == ["ZeRO: something that matters"]
        assert sum(isinstance(f, ec._NoiseFilter) for f in logger.filters) == 1
        import warnings
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("default")
            ec.silence_startup_noise()
            warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use "
                          "`torch.distributed.all_gather_single` instead.", FutureWarning)
            warnings.warn("`torch.distributed.something_else` is deprecated.", FutureWarning)
        assert [str(w.message) for w in caught] == ["`torch.distributed.something_else` is deprecated."]
    finally:
        logger.removeHandler(h)
        for f in [f for f in logger.filters if isinstance(f, ec._NoiseFilter)]:
            logger.removeFilter(f)


def test_a_non_finite_update_is_an_error_only_where_nothing_skipped_it():
    z1 = {"bf16": {"enabled": True, "check_grad_overflow": False}, "zero_optimization": {"stage": 1}}
    ec.check_finite_update(3, 2.5, False, z1, "z1.json")  # finite: nothing to say
    ec.check_finite_update(3, float("nan"), True, z1, "z1.json")  # skipped by the engine: it goes on
    with pytest.raises(ec.NonFiniteUpdate, match=r"^step 3: the loss is inf .*; z1\.json sets "
                                                            r"bf16\.check_grad_overflow to false"):
        ec.check_finite_update(3, float("inf"), False, z1, "z1.json")
    # Where the key is not what let it through (ZeRO-3 ignores it; --ds none has no config), no hint about it.
    for cfg in ({**z1, "zero_optimization": {"stage": 3}}, None):
        with pytest.raises(ec.NonFiniteUpdate) as e:
            ec.check_finite_update(5, float("nan"), False, cfg, None)
        assert str(e.value).endswith("so the weights are no longer finite; the run stopped")

