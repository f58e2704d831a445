"""The fast paths compute what the plain paths compute: adapter switching without peft's requires_grad walk,
and the routed fields queried once per rollout on every recorded state instead of once per state index."""

from __future__ import annotations

import torch
from conftest import make_lora_file
from test_fields import FAMILY, _inputs, _perturb_student

from danceopd_diffusers.config import parse_fields_config
from danceopd_diffusers.field_loading import build_fields
from danceopd_diffusers.fields import FieldQuery
from danceopd_diffusers.objectives import RoutedTargets, on_policy_states
from danceopd_diffusers.student import STUDENT_ADAPTER, AdapterScope, add_student_lora


def _student_with_expert(tiny_pipe, tiny_path, tmp_path):
    lora = make_lora_file(tiny_path, tmp_path / "expert")
    transformer = tiny_pipe.transformer
    add_student_lora(transformer, 4, 4, FAMILY.default_lora_targets)
    _perturb_student(transformer)
    scope = AdapterScope(transformer)
    config = parse_fields_config(
        {
            "fields": {
                "base": {"type": "base"},
                "expert": {"type": "lora", "path": str(lora)},
                "expert_cfg": {"type": "cfg", "of": "expert", "scale": 3.0},
            },
            "routes": [{"field": "expert_cfg"}],
        }
    )
    return (
        transformer,
        scope,
        build_fields(config, FAMILY, tiny_path, transformer, scope, torch.float32, "cpu"),
    )


def test_scope_switching_equals_peft_switching_and_keeps_the_trainable_set(tiny_pipe, tiny_path, tmp_path):
    transformer, scope, fields = _student_with_expert(tiny_pipe, tiny_path, tmp_path)
    cond, _, x = _inputs(tiny_pipe)
    sigma = torch.full((2,), 0.6)
    trainable = [n for n, p in transformer.named_parameters() if p.requires_grad]
    with torch.no_grad():
        fast = {name: fields[name].velocity(FieldQuery(x, sigma, cond)) for name in ("base", "expert")}
        student = FAMILY.velocity(transformer, x, sigma, cond)
        transformer.set_adapter("expert")  # peft's own switching
        peft_expert = FAMILY.velocity(transformer, x, sigma, cond)
        transformer.disable_adapters()
        peft_base = FAMILY.velocity(transformer, x, sigma, cond)
        scope.restore()
        assert torch.equal(FAMILY.velocity(transformer, x, sigma, cond), student)
    assert torch.equal(fast["expert"], peft_expert)
    assert torch.equal(fast["base"], peft_base)
    assert not torch.equal(fast["expert"], student)
    assert [n for n, p in transformer.named_parameters() if p.requires_grad] == trainable
    assert transformer.active_adapters() == [STUDENT_ADAPTER]


def test_one_query_per_rollout_equals_one_query_per_state(tiny_pipe, tiny_path, tmp_path):
    """States, targets and the student's gradients equal those of querying each state on its own."""
    transformer, _, fields = _student_with_expert(tiny_pipe, tiny_path, tmp_path)
    prompts = ("a red circle", "two blue squares", "a green cross", "a small star")
    with torch.no_grad():
        cond, uncond, _ = _inputs(tiny_pipe, prompts)
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    indices = torch.tensor([[3], [5], [3], [1]])  # two rows share a state index, the others do not
    targets = RoutedTargets([fields["expert_cfg"]] * 4, cond, uncond, num_steps=6)
    calls = []
    velocity = fields["expert_cfg"].velocity
    fields["expert_cfg"].velocity = lambda q: calls.append(len(q.x)) or velocity(q)
    states = on_policy_states(tiny_pipe, FAMILY, targets, cond, noise, 6, indices, 128, 128)
    assert calls == [4]  # one field call for the whole rollout
    fields["expert_cfg"].velocity = velocity
    assert states.steps_run == 5
    # the plain path: each row's state from a manual Euler rollout of the student, its target alone
    sigmas = FAMILY.sigmas(tiny_pipe, 6, noise.shape, "cpu")
    with torch.no_grad():
        x, plain_states = noise, [noise]
        for i in range(5):
            v = FAMILY.velocity(transformer, x, torch.full((4,), float(sigmas[i])), cond)
            x = x + (sigmas[i + 1] - sigmas[i]) * v
            plain_states.append(x)
    for row, sample in enumerate(states.samples.tolist()):
        index = int(indices[sample, 0])
        torch.testing.assert_close(states.x[row], plain_states[index][sample], atol=1e-5, rtol=1e-5)
        alone = targets(torch.tensor([sample]), states.x[row : row + 1], float(sigmas[index]), index)
        torch.testing.assert_close(states.target[row], alone[0], atol=1e-5, rtol=1e-5)

    def grads(target):
        transformer.zero_grad(set_to_none=True)
        pred = FAMILY.velocity(transformer, states.x, states.sigma, cond.select(states.samples))
        (pred - target).pow(2).mean().backward()
        return [p.grad.clone() for p in transformer.parameters() if p.requires_grad]

    per_state = torch.cat(
        [
            targets(
                states.samples[r : r + 1], states.x[r : r + 1], states.sigma[r : r + 1], int(indices[s, 0])
            )
            for r, s in enumerate(states.samples.tolist())
        ]
    )
    for a, b in zip(grads(states.target), grads(per_state)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
