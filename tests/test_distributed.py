"""Engine settings the script cannot honour are refused before any weights load; the export's unsharded copy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from accelerate.utils import DistributedType

from danceopd_diffusers.config import ConfigError
from danceopd_diffusers.distributed import (
    check_engine,
    end_training,
    gathered,
    is_sharded,
    unsharded_copy,
)


def _accelerator(kind, fsdp_version=2, zero_stage=2):
    return SimpleNamespace(
        distributed_type=kind,
        is_fsdp2=kind == DistributedType.FSDP and fsdp_version == 2,
        state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=zero_stage)),
    )


@pytest.mark.parametrize("flag", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_engine_config_on_cpu_processes_is_refused(monkeypatch, flag):
    monkeypatch.setenv(flag, "true")
    with pytest.raises(ConfigError, match="only on GPUs.*ddp.yaml"):
        check_engine(_accelerator(DistributedType.MULTI_CPU), False, False)


def test_fsdp1_zero3_and_cuda_graphs_are_refused(monkeypatch):
    monkeypatch.delenv("ACCELERATE_USE_FSDP", raising=False)
    monkeypatch.delenv("ACCELERATE_USE_DEEPSPEED", raising=False)
    with pytest.raises(ConfigError, match="fsdp_version: 2"):
        check_engine(_accelerator(DistributedType.FSDP, fsdp_version=1), False, False)
    with pytest.raises(ConfigError, match="ZeRO-3"):
        check_engine(_accelerator(DistributedType.DEEPSPEED, zero_stage=3), True, False)
    with pytest.raises(ConfigError, match="--cuda_graphs"):
        check_engine(_accelerator(DistributedType.FSDP), False, True)
    for kind in (
        DistributedType.NO,
        DistributedType.MULTI_GPU,
        DistributedType.MULTI_CPU,
        DistributedType.FSDP,
    ):
        check_engine(_accelerator(kind), True, kind != DistributedType.FSDP)
    check_engine(_accelerator(DistributedType.DEEPSPEED, zero_stage=2), False, False)


def test_unsharded_model_passes_through(tiny_pipe):
    transformer = tiny_pipe.transformer
    assert not is_sharded(transformer)
    with gathered(transformer):  # nothing to gather
        pass


def test_unsharded_copy_rebuilds_class_adapters_and_buffers(tiny_pipe):
    from danceopd_diffusers.student import add_student_lora

    transformer = tiny_pipe.transformer
    add_student_lora(transformer, 4, 4, ["to_q", "to_k"])
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_()
    copy = unsharded_copy(transformer, transformer.state_dict())
    assert type(copy) is type(transformer) and copy.peft_config.keys() == transformer.peft_config.keys()
    cfg = transformer.config
    kwargs = dict(
        hidden_states=torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size),
        timestep=torch.tensor([300.0]),
        encoder_hidden_states=torch.randn(1, 5, cfg.joint_attention_dim),
        pooled_projections=torch.randn(1, cfg.pooled_projection_dim),
        return_dict=False,
    )
    with torch.no_grad():
        assert torch.equal(copy(**kwargs)[0], transformer(**kwargs)[0])
    with pytest.raises(RuntimeError, match="does not fit"):
        unsharded_copy(transformer, {k: v for k, v in transformer.state_dict().items() if "lora_A" not in k})


def test_end_training_waits_for_every_process_before_the_teardown():
    calls = []
    accelerator = SimpleNamespace(
        wait_for_everyone=lambda: calls.append("barrier"), end_training=lambda: calls.append("teardown")
    )
    end_training(accelerator)
    assert calls == ["barrier", "teardown"]
