"""Worker of test_multiprocess (two gloo processes, accelerate's FSDP2): the shared base and its LoRA adapters on a
sharded transformer. Writes, per rank, the all-gathers each call made and whether the outputs match the unsharded
model's."""

from __future__ import annotations

import json
import sys

import fsdp_on_cpu  # noqa: F401  (accelerate's FSDP2 on CPU processes)
import torch
from accelerate import Accelerator
from diffusers import SD3Transformer2DModel
from torch.distributed.fsdp import FSDPModule
from torch.distributed.fsdp._fully_shard import _fsdp_param_group

from danceopd_diffusers.distributed import gathered
from danceopd_diffusers.student import AdapterScope, add_student_lora

all_gathers = 0
_foreach_all_gather = _fsdp_param_group.foreach_all_gather


def _counted(*args, **kwargs):
    global all_gathers
    all_gathers += 1
    return _foreach_all_gather(*args, **kwargs)


_fsdp_param_group.foreach_all_gather = _counted


def main(tiny_path: str, out: str) -> None:
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel.from_pretrained(tiny_path, subfolder="transformer").requires_grad_(
        False
    )
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    add_student_lora(transformer, 4, 4, targets, adapter_name="expert")
    add_student_lora(transformer, 4, 4, targets)
    with torch.no_grad():  # B != 0: base, expert and student differ
        for name, p in transformer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    scope = AdapterScope(transformer)
    cfg = transformer.config
    x = torch.randn(2, cfg.in_channels, cfg.sample_size, cfg.sample_size)
    kwargs = dict(
        hidden_states=x,
        timestep=torch.tensor([500.0, 800.0]),
        encoder_hidden_states=torch.randn(2, 5, cfg.joint_attention_dim),
        pooled_projections=torch.randn(2, cfg.pooled_projection_dim),
        return_dict=False,
    )
    settings = {"base": None, "expert": ["expert"], "student": ["student"]}

    def outputs() -> dict[str, torch.Tensor]:
        result = {}
        for name, adapters in settings.items():
            with torch.no_grad(), scope.use(adapters):
                result[name] = transformer(**kwargs)[0]
        return result

    reference = outputs()
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params)
    transformer, optimizer = accelerator.prepare(transformer, optimizer)
    scope.refresh()
    units = [m for m in transformer.modules() if isinstance(m, FSDPModule)]
    groups = sum(len(m._get_fsdp_state()._fsdp_param_groups) for m in units)
    report = {"groups": groups, "sharded_calls": [], "gathered": {}}
    for adapters in settings.values():  # sharded: one all-gather of each group per call
        before = all_gathers
        with torch.no_grad(), scope.use(adapters):
            transformer(**kwargs)
        report["sharded_calls"].append(all_gathers - before)
    for unit in units:  # accelerate keeps the root and the last blocks unsharded after forward
        unit.reshard()
    before = all_gathers
    with gathered(transformer):
        entered = all_gathers - before
        sharded = outputs()
        if accelerator.process_index == 1:  # ranks may make different numbers of calls inside the scope
            outputs()
    report["gathered"] = {"on_entry": entered, "inside": all_gathers - before - entered}
    report["match"] = {n: bool(torch.allclose(sharded[n], reference[n], atol=1e-5)) for n in settings}
    report["adapters_differ"] = not torch.allclose(reference["base"], reference["expert"], atol=1e-3)
    with open(f"{out}/rank{accelerator.process_index}.json", "w") as f:
        json.dump(report, f)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    main(*sys.argv[1:3])
