"""Warnings every run printed that say nothing about the run, silenced one by one (each by its exact message).

Those with a cause in this project are fixed there instead (``dtype=`` rather than the deprecated
``torch_dtype=`` of ``from_pretrained``). What remains comes from the libraries:

- transformers: "`CLIPImageProcessor` requires torchvision (not installed); falling back to
  `CLIPImageProcessorPil`" (also Siglip, Siglip2), logged when diffusers resolves the image processors its pipeline
  modules name; the PIL fallback is exactly what those pipelines used before, and no training path uses them.
- diffusers: "No LoRA keys associated to CLIPTextModel found with the prefix='text_encoder'" (and T5EncoderModel,
  'text_encoder_2'), logged by ``load_lora_weights`` for every LoRA that adapts only the transformer, which is
  every LoRA this project writes; the message itself says it is safe to ignore then.
- peft: "Already found a `peft_config` attribute in the model. This will lead to having multiple adapters":
  the student's LoRA and the LoRA experts are deliberately adapters of one transformer (see ``student.py``).
"""

from __future__ import annotations

import logging
import re
import warnings

_TRANSFORMERS_MESSAGES = (
    re.compile(r"ImageProcessor` requires torchvision \(not installed\); falling back to"),
)


_DIFFUSERS_MESSAGES = (
    re.compile(r"^No LoRA keys associated to \w+ found with the prefix='text_encoder(_2)?'"),
)


class _DropMessages(logging.Filter):
    def __init__(self, patterns: tuple[re.Pattern, ...]):
        super().__init__()
        self.patterns = patterns

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def silence_known_warnings() -> None:
    """Install the filters (idempotent). Anything else, including other warnings of the same libraries, still
    shows."""
    warnings.filterwarnings(
        "ignore",
        message=r"Already found a `peft_config` attribute in the model\. This will lead to having multiple adapters",
        category=UserWarning,
    )
    for name, patterns in (
        ("transformers.utils.import_utils", _TRANSFORMERS_MESSAGES),
        ("diffusers.loaders.lora_base", _DIFFUSERS_MESSAGES),
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropMessages) for f in logger.filters):
            logger.addFilter(_DropMessages(patterns))
