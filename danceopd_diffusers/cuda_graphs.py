"""CUDA graphs for the transformer's no-grad calls: the rollout's steps and the fields' targets.

At this method's batches the transformer forward is bound by the host, not the GPU: peft's per-layer Python and
the kernel launches of a small model (or of a large one at batch 1) take longer than the GPU work they issue. A
graph replays the whole forward with one launch. One graph is captured per distinct call: the shapes and dtypes
of the tensor inputs, the other arguments, the active adapters, train/eval mode and autocast. Parameters are
read in place at replay, so optimizer steps need no re-capture. Calls with gradients (the student's forward)
always run eagerly.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch.utils import _pytree as pytree

logger = logging.getLogger("danceopd")


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, inputs: list[torch.Tensor], outputs: Any):
        self.graph, self.inputs, self.outputs = graph, inputs, outputs


class GraphedNoGradForward:
    """Replaces ``module.forward``: no-grad CUDA calls replay a captured graph, everything else runs eagerly.

    Install after ``accelerator.prepare`` (its autocast wrapper is then captured too) and :meth:`remove` before
    the module's structure changes (fusing or unloading adapters).
    """

    def __init__(self, module: torch.nn.Module, warmup: int = 2, max_graphs: int = 16):
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.module = module
        self.eager = module.forward
        self._own_forward = vars(module).get("forward")  # accelerate's autocast wrapper, if it set one
        self.warmup = warmup
        # beyond max_graphs (e.g. edit sources of many aspect ratios) new calls run eagerly
        self.max_graphs = max_graphs
        self.graphs: dict[tuple, _Graph | None] = {}  # None: that call cannot be captured; it runs eagerly
        self._tuner = next((m for m in module.modules() if isinstance(m, BaseTunerLayer)), None)
        module.forward = self

    def remove(self) -> None:
        if self._own_forward is None:
            del self.module.forward
        else:
            self.module.forward = self._own_forward
        self.graphs.clear()

    def _key(self, spec: Any, leaves: list[Any]) -> tuple | None:
        parts: list[Any] = [str(spec), self.module.training]
        for leaf in leaves:
            if torch.is_tensor(leaf):
                if leaf.device.type != "cuda" or leaf.requires_grad:
                    return None
                parts.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device))
            else:
                parts.append(("V", repr(leaf)))
        if self._tuner is not None:
            parts.append((self._tuner.disable_adapters, tuple(self._tuner.active_adapters)))
        parts.append((torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")))
        return tuple(parts)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if torch.is_grad_enabled() or not torch.cuda.is_available():
            return self.eager(*args, **kwargs)
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = self._key(spec, leaves)
        if key is None:
            return self.eager(*args, **kwargs)
        if key not in self.graphs:
            if sum(g is not None for g in self.graphs.values()) >= self.max_graphs:
                return self.eager(*args, **kwargs)
            self.graphs[key] = self._capture(spec, leaves)
        entry = self.graphs[key]
        if entry is None:
            return self.eager(*args, **kwargs)
        for static, leaf in zip(entry.inputs, (x for x in leaves if torch.is_tensor(x))):
            static.copy_(leaf)
        entry.graph.replay()
        # the static outputs are overwritten by the next replay: hand out copies
        return pytree.tree_map(lambda t: t.clone() if torch.is_tensor(t) else t, entry.outputs)

    def _capture(self, spec: Any, leaves: list[Any]) -> _Graph | None:
        static = [leaf.clone() if torch.is_tensor(leaf) else leaf for leaf in leaves]
        inputs = [x for x in static if torch.is_tensor(x)]
        args, kwargs = pytree.tree_unflatten(static, spec)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        try:
            with torch.cuda.stream(stream):
                # a forward that syncs with the host (data-dependent shapes, .item()) cannot be captured: find out
                # before capturing, in the eager warm-up runs the capture needs anyway
                torch.cuda.set_sync_debug_mode("error")
                try:
                    for _ in range(self.warmup):
                        self.eager(*args, **kwargs)
                finally:
                    torch.cuda.set_sync_debug_mode("default")
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                outputs = self.eager(*args, **kwargs)
        except RuntimeError as exc:
            torch.cuda.current_stream().wait_stream(stream)
            logger.warning(f"CUDA graph: this call runs eagerly ({str(exc).splitlines()[0]})")
            return None
        if not all(torch.is_tensor(x) or x is None for x in pytree.tree_leaves(outputs)):
            return None
        return _Graph(graph, inputs, outputs)
