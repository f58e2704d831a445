"""The embedded default: what ``accelerate launch train_danceopd.py`` runs with no model argument.

A CFG-absorption distillation on a tiny SD3 pipeline built offline: the student (a LoRA, no CFG) learns the
base model's guided field ``u + 3.5 (c - u)``. Short, but real: the loss it prints comes from the same code
path as a run on SD3.5.
"""

from __future__ import annotations

DEMO_PROMPTS = [
    "a red circle on a white background",
    "a blue square next to a green triangle",
    "two yellow stars",
    "a small purple diamond above a large orange circle",
    "three cyan squares in a row",
    "a green circle inside a red square",
    "a white triangle on a black background",
    "an orange star left of a blue circle",
]

#: flag -> value used when the user did not set that flag (printed at start)
DEMO_DEFAULTS = {
    "cfg_scale": 3.5,
    "max_train_steps": 120,
    "train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "rank": 16,
    "learning_rate": 3e-3,
    "num_rollout_steps": 8,
    "max_sequence_length": 32,
    "validation_steps": 60,
    "checkpointing_steps": 60,
    "validation_prompt": ["a red circle on a white background", "two yellow stars"],
}


def demo_dataset():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": DEMO_PROMPTS, "task": ["t2i"] * len(DEMO_PROMPTS)})
