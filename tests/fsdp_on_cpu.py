"""Run ``train_danceopd.py`` under accelerate's FSDP2 engine in gloo CPU processes (tests only).

accelerate 1.15 switches to FSDP only on accelerator devices: on CPU processes its state stays ``MULTI_CPU`` and an
FSDP config would train as DDP. torch's ``fully_shard`` itself runs on gloo, so this launcher lifts that one gate
and the tests run the same accelerate code as a GPU run: ``prepare`` shards the transformer, ``accumulate`` turns
gradient sync off on non-final micro-steps, checkpoints are saved and loaded as sharded state dicts.

    accelerate launch --config_file accelerate_configs/fsdp2_lora.yaml --num_processes 2 \
        tests/fsdp_on_cpu.py <train_danceopd.py arguments>
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

_init = AcceleratorState.__init__


def _init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        PartialState._shared_state["distributed_type"] = (
            DistributedType.FSDP
        )  # AcceleratorState() re-reads it
        self.fsdp_plugin = fsdp_plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)


AcceleratorState.__init__ = _init_fsdp_on_cpu

if __name__ == "__main__":
    script = str(Path(__file__).resolve().parents[1] / "train_danceopd.py")
    sys.argv = [script, *sys.argv[1:]]
    runpy.run_path(script, run_name="__main__")
