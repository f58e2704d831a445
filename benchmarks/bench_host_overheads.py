#!/usr/bin/env python
"""Host time of two things the training loop does around every rollout, on the ShapesWorld pipeline with its
r32 student: switching the transformer between eval and train (``nn.Module.train``, recursive, against
``student.mode_switch``, one flat loop), and the pipeline's ``_execution_device`` (diffusers' module walk against
``rollout.execution_device``'s pinned value). Milliseconds per call, averaged over ``--repeats``; CPU only needed.

    python benchmarks/bench_host_overheads.py --repeats 200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args()
    from diffusers import DiffusionPipeline

    from danceopd_diffusers.families.flux import FluxKontextFamily
    from danceopd_diffusers.rollout import execution_device
    from danceopd_diffusers.student import add_student_lora, mode_switch

    pipe = DiffusionPipeline.from_pretrained(
        str(REPO / "danceopd_diffusers" / "shapesworld" / "sources" / "base")
    )
    transformer = pipe.transformer
    add_student_lora(transformer, 32, 32, FluxKontextFamily().default_lora_targets)
    result = {"modules": sum(1 for _ in transformer.modules()), "repeats": args.repeats}
    for name, switch in (("recursive_ms", transformer.train), ("mode_switch_ms", mode_switch(transformer))):
        start = time.perf_counter()
        for _ in range(args.repeats):
            switch(False)
            switch(True)
        result[name] = (time.perf_counter() - start) / args.repeats * 1e3  # one eval + train pair

    def device_ms() -> float:
        start = time.perf_counter()
        for _ in range(args.repeats):
            _ = pipe._execution_device
        return (time.perf_counter() - start) / args.repeats * 1e3

    result["execution_device_ms"] = device_ms()
    with execution_device(pipe, "cpu"):
        result["execution_device_pinned_ms"] = device_ms()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
