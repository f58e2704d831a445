"""The fast paths compute what the plain paths compute: adapter switching without peft's requires_grad walk,
and the routed fields queried once per rollout on every recorded state instead of once per state index."""

from __future__ import annotations

import pytest
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


def test_cuda_graph_wrapper_runs_eagerly_off_cuda_and_with_gradients(tiny_pipe):
    """The graph path itself needs a GPU (benchmarks/bench_shapesworld_step.py --cuda_graphs checks it there);
    on a CPU the wrapper must be invisible, and it must come off cleanly."""
    from danceopd_diffusers.cuda_graphs import GraphedNoGradForward

    transformer = tiny_pipe.transformer
    add_student_lora(transformer, 4, 4, FAMILY.default_lora_targets)
    _perturb_student(transformer)
    with torch.no_grad():
        cond, _, x = _inputs(tiny_pipe)
    sigma = torch.full((2,), 0.4)
    with torch.no_grad():
        plain = FAMILY.velocity(transformer, x, sigma, cond)
    graphed = GraphedNoGradForward(transformer)
    with torch.no_grad():
        assert torch.equal(FAMILY.velocity(transformer, x, sigma, cond), plain)
    pred = FAMILY.velocity(transformer, x, sigma, cond)  # with gradients: eager, and they flow
    pred.square().mean().backward()
    assert any(p.grad is not None for p in transformer.parameters() if p.requires_grad)
    assert not graphed.graphs
    graphed.remove()
    assert "forward" not in vars(transformer)


def test_cuda_graphs_flag_needs_cuda(tmp_path):
    import pytest

    import train_danceopd
    from danceopd_diffusers.config import ConfigError

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match="--cuda_graphs needs a CUDA device"):
        train_danceopd.parse_args(["--cuda_graphs", "--output_dir", str(tmp_path / "o")])


def _edit_data(folder):
    """Kontext data: 3 t2i prompts, 5 edits of two source sizes (the chunks must split by size), one
    repeated prompt."""
    import json

    from PIL import Image

    rows = [{"prompt": p, "task": "t2i", "target_image": "t.png"} for p in ("a", "b c", "a")]
    Image.new("RGB", (40, 40), (200, 30, 30)).save(folder / "t.png")
    for i, size in enumerate([(64, 32), (64, 32), (32, 32), (64, 32), (32, 32)]):
        Image.new("RGB", size, (40 * i, 200, 30)).save(folder / f"s{i}.png")
        rows.append(
            {"prompt": f"edit {i}", "task": "edit", "source_image": f"s{i}.png", "target_image": "t.png"}
        )
    path = folder / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_precomputed_encodings_equal_first_use_encodings(tmp_path):
    """--cache_latents fills the caches chunk by chunk before training: the same prompt, source and target
    encodings as one-at-a-time encoding on first use (fp32, within batching round-off), far fewer encoder calls."""
    from diffusers import DiffusionPipeline

    from danceopd_diffusers.caches import PromptCache, SourceCache, TargetCache, precompute_encodings
    from danceopd_diffusers.data import DataColumns, TaskBuckets, fit_image, load_training_dataset
    from danceopd_diffusers.families import edit_size
    from danceopd_diffusers.families.flux import FluxKontextFamily
    from danceopd_diffusers.tiny import tiny_pipeline_path

    pipe = DiffusionPipeline.from_pretrained(tiny_pipeline_path("flux-kontext", tmp_path / "kontext"))
    family = FluxKontextFamily(max_sequence_length=16)
    dataset, base_dir = load_training_dataset(str(_edit_data(tmp_path)))
    buckets = TaskBuckets(dataset, DataColumns(), base_dir)
    calls = {"encode_prompts": 0, "encode_sources": 0, "encode_images": 0}
    for name in calls:
        original = getattr(family, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(family, name, counted)
    filled = [
        PromptCache(pipe, family, "cpu"),
        SourceCache(pipe, family, "cpu"),
        TargetCache(pipe, family, "cpu"),
    ]
    line = precompute_encodings(buckets, ["t2i", "edit"], 32, *filled, chunk=3)
    assert "8 prompts, 5 edit sources and 8 targets" in line, line  # "", a, b c, edit 0-4; all 8 rows
    # prompts: 8 unique in chunks of 3; sources: chunks (0,1,2), (3,4) split by size: 2 + 2 calls; targets:
    # chunks (0, 1, 2) at 32 x 32, then (3, 4, 5) and (6, 7), each split by edit size: 1 + 2 + 2 calls
    assert calls == {"encode_prompts": 3, "encode_sources": 4, "encode_images": 5}, calls

    lazy = [
        PromptCache(pipe, family, "cpu"),
        SourceCache(pipe, family, "cpu"),
        TargetCache(pipe, family, "cpu"),
    ]
    for task in ("t2i", "edit"):
        for row in buckets.buckets[task]:
            prompt = buckets.prompts([row])
            for cache in (filled[0], lazy[0]):
                got = cache(prompt)
            assert torch.allclose(
                filled[0](prompt).tensors["encoder_hidden_states"],
                got.tensors["encoder_hidden_states"],
                atol=1e-5,
            )
            size = (32, 32)
            if task == "edit":
                source = buckets.images([row], "source_image")[0]
                size = edit_size(source.width, source.height, 32)
                fitted = [fit_image(source, *size)]
                a, b = filled[1]([row], fitted, *size), lazy[1]([row], fitted, *size)
                assert torch.allclose(a.tensors["source_latents"], b.tensors["source_latents"], atol=1e-5)
            target = [fit_image(buckets.images([row], "target_image")[0], *size)]
            before = filled[2].encoded
            ta, tb = filled[2]([row], target, *size), lazy[2]([row], target, *size)
            assert torch.allclose(ta, tb, atol=1e-4), (row, size, (ta - tb).abs().max())  # same noise draw
            assert filled[2].encoded == before  # every row's target was filled at the size it is used at
    assert filled[0].encoded == 8 and filled[1].encoded == 5  # nothing was encoded again on use


@pytest.mark.parametrize("method", ["danceopd", "dense"])
def test_batched_rollouts_give_the_sequential_micro_steps_gradients(tiny_path, tmp_path, monkeypatch, method):
    """--batch_rollouts rolls out the 3 micro-steps of each optimizer step in one pipeline call and trains the student
    on all their states in one forward and backward: the same losses and the same student as 3 micro-steps one
    after the other (fp32; the only differences are the batch sizes)."""
    import json

    from conftest import run_train
    from safetensors.torch import load_file

    import train_danceopd

    data = tmp_path / "p.csv"
    data.write_text("prompt\na red circle\ntwo blue squares\na green star\none yellow triangle\n")
    config = tmp_path / "f.yaml"
    config.write_text(
        "fields:\n  base: {type: base}\n  c2: {type: cfg, of: base, scale: 2.0}\n  c4: {type: cfg, of: base, "
        "scale: 4.0}\nroutes:\n  - {field: c2}\n  - {field: c4}\n"
    )
    from danceopd_diffusers.families import SD3Family

    rollouts, student_rows = [], []
    original = train_danceopd.on_policy_states
    monkeypatch.setattr(
        train_danceopd,
        "on_policy_states",
        lambda *a, **k: rollouts.append(a[4].shape[0]) or original(*a, **k),
    )
    velocity = SD3Family.velocity

    def counted(self, transformer, x, sigma, cond):
        if torch.is_grad_enabled():  # the student's forward (fields and rollouts run without gradients)
            student_rows.append(len(x))
        return velocity(self, transformer, x, sigma, cond)

    monkeypatch.setattr(SD3Family, "velocity", counted)
    out = {}
    for batched in (False, True):
        folder = tmp_path / f"batched-{batched}"
        rollouts.clear()
        student_rows.clear()
        run_train(
            [
                "--pretrained_model_name_or_path",
                tiny_path,
                "--dataset_name",
                str(data),
                "--fields_config",
                str(config),
            ]
            + [
                "--output_dir",
                str(folder),
                "--method",
                method,
                "--max_train_steps",
                "3",
                "--num_rollout_steps",
                "4",
            ]
            + ["--rank", "4", "--train_batch_size", "2", "--gradient_accumulation_steps", "3", "--seed", "11"]
            + [
                "--max_sequence_length",
                "16",
                "--per_sample_routing",
                "--report_to",
                "none",
                "--skip_pipeline_export",
            ]
            + ["--batch_rollouts"] * batched
        )
        assert rollouts == ([6] * 3 if batched else [2] * 9)  # one call of 3 x 2 samples per optimizer step
        rows = 2 * (4 if method == "dense" else 1)  # a micro-step's rows: K = 1, or all 4 states
        # and one student forward (and backward) of all the optimizer step's rows
        assert student_rows == ([3 * rows] * 3 if batched else [rows] * 9)
        losses = [
            json.loads(line)["loss"]
            for line in (folder / "logs" / "routes_rank0.jsonl").read_text().splitlines()
        ]
        out[batched] = losses, load_file(folder / "pytorch_lora_weights.safetensors")
    (seq_losses, seq), (joint_losses, joint) = out[False], out[True]
    assert len(seq_losses) == 3 and torch.allclose(
        torch.tensor(seq_losses), torch.tensor(joint_losses), rtol=1e-5
    )
    assert any(v.abs().sum() > 0 for k, v in joint.items() if "lora_B" in k)
    for key in seq:
        assert torch.allclose(seq[key], joint[key], atol=1e-6), (key, (seq[key] - joint[key]).abs().max())


def test_mode_switch_sets_every_module_as_train_does(tiny_pipe):
    from danceopd_diffusers.student import mode_switch

    transformer = tiny_pipe.transformer
    add_student_lora(transformer, 4, 4, FAMILY.default_lora_targets)
    switch = mode_switch(transformer)
    assert switch is not transformer.train  # the flat loop
    for mode in (False, True, False):
        transformer.train(not mode)
        switch(mode)
        assert all(m.training is mode for m in transformer.modules())

    class Own(torch.nn.Module):
        def train(self, mode: bool = True):  # an override must still run
            return super().train(mode)

    wrapper = torch.nn.Sequential(torch.nn.Linear(2, 2), Own())
    assert mode_switch(wrapper) == wrapper.train


def test_pinned_execution_device_skips_the_module_walks_and_restores_the_class(tiny_pipe):
    """Inside `execution_device` a pipeline call walks no module tree for its device; the pipeline keeps its class
    name (save_pretrained writes it) and gets its own class back, also after an error."""
    import diffusers.hooks.group_offloading as offloading

    from danceopd_diffusers.rollout import execution_device

    walks = []
    original = offloading._get_top_level_group_offload_hook
    offloading._get_top_level_group_offload_hook = lambda m: walks.append(1) or original(m)
    try:
        cls = type(tiny_pipe)
        assert tiny_pipe._execution_device == torch.device("cpu") and walks
        walks.clear()
        with execution_device(tiny_pipe, "cpu") as pipe:
            assert type(pipe).__name__ == cls.__name__ and isinstance(pipe, cls)
            assert pipe._execution_device == torch.device("cpu")
            with execution_device(pipe, "cpu"):  # nested: still pinned
                assert pipe._execution_device == torch.device("cpu")
        assert walks == [] and type(tiny_pipe) is cls
        with pytest.raises(RuntimeError):
            with execution_device(tiny_pipe, "cpu"):
                raise RuntimeError("a failed rollout")
        assert type(tiny_pipe) is cls and "_danceopd_execution_device" not in vars(tiny_pipe)
    finally:
        offloading._get_top_level_group_offload_hook = original


def ragged_and_full_rollouts(pipe, family, cond, noise, indices, num_steps, size):
    """The same rollout with and without dropping finished samples: (states, transformer batch sizes) of each."""
    targets = lambda samples, x, sigma, index, max_rows=None: 2 * x  # noqa: E731 (any function of the state)
    out = []
    for ragged in (True, False):
        sizes: list[int] = []

        def count(module, args, kwargs, sizes=sizes):
            x = kwargs.get("hidden_states", args[0] if args else kwargs.get("x"))
            sizes.append(len(x))

        hook = pipe.transformer.register_forward_pre_hook(count, with_kwargs=True)
        try:
            with torch.no_grad():
                states = on_policy_states(
                    pipe, family, targets, cond, noise, num_steps, indices, size, size, ragged=ragged
                )
        finally:
            hook.remove()
        out.append((states, sizes))
    return out


def assert_same_states(ragged, full):
    order_r, order_f = ragged.samples.argsort(stable=True), full.samples.argsort(stable=True)
    assert torch.equal(ragged.samples[order_r], full.samples[order_f])
    torch.testing.assert_close(ragged.x[order_r], full.x[order_f], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ragged.sigma[order_r], full.sigma[order_f])
    assert ragged.steps_run == full.steps_run


def test_ragged_rollout_drops_each_sample_after_its_last_query(tiny_pipe):
    """A sample leaves the rollout's batch once its last state is recorded; every recorded state is the one the
    full-batch rollout records (K = 2 rows included)."""
    prompts = ("a red circle", "two blue squares", "a green cross", "a small star")
    with torch.no_grad():
        cond, _, _ = _inputs(tiny_pipe, prompts)
    noise = torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    indices = torch.tensor([[1, 3], [2, 5], [0, 3], [1, 1]])
    (ragged, ragged_sizes), (full, full_sizes) = ragged_and_full_rollouts(
        tiny_pipe, FAMILY, cond, noise, indices, 6, 128
    )
    assert full_sizes == [4] * 5 and full.sample_steps == 20
    # after state 1 sample 3 is done, after state 3 samples 0 and 2: only sample 1 runs the last two steps
    assert ragged_sizes == [4, 3, 3, 1, 1] and ragged.sample_steps == 12
    assert_same_states(ragged, full)
    assert len(ragged.samples) == 8
