"""A Qwen2-VL processor for images and text only: ``Qwen2VLProcessor`` without its video-processor slot.

``Qwen2VLProcessor`` carries a video processor, which needs torchvision; Qwen-Image-Edit reads images only. A
pipeline folder saved with this processor (the offline test pipelines are) names it in ``model_index.json`` by this
module, and diffusers resolves such a component class only from modules already imported:
:mod:`.pipeline_qwenimage_edit_latents` imports this one, so every process that loads a Qwen-Image-Edit folder
through the family's pipeline class can load it. Checkpoints with the stock processor keep theirs.
"""

from __future__ import annotations

from transformers import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor without the video processor slot (which needs torchvision); text + images only.

    ``DiffusionPipeline.from_pretrained`` finds this class, and the ``ProcessorMixin`` it loads through, by
    name in this module (the ``model_index.json`` entry is ``["danceopd_diffusers.pipelines.qwen2vl_image_processor",
    "Qwen2VLImageProcessor"]``).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)


__all__ = ["Qwen2VLImageProcessor"]
