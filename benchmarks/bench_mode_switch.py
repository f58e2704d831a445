#!/usr/bin/env python
"""Host time of switching the ShapesWorld student's transformer between eval and train, as the training loop does
around every rollout: ``nn.Module.train`` (recursive) against ``student.mode_switch`` (one flat loop).

    python benchmarks/bench_mode_switch.py --repeats 200
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
    print(json.dumps(result))


if __name__ == "__main__":
    main()
