"""Layer-by-layer execution: capture the inputs of the first decoder layer
once, then run one decoder layer at a time on the device over the cached
activations, and collect per-Linear input statistics with forward hooks.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import FptqError
from .quant.gptq import HessianAccumulator

__all__ = ["LayerInputs", "InputStats", "capture_layer0_inputs", "run_layer", "collect_input_stats"]


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Cached hidden states entering the current decoder layer, in batches,
    and the keyword arguments (rotary embeddings, masks) that each batch needs."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]

    @property
    def num_windows(self) -> int:
        return sum(h.shape[0] for h in self.hidden)


def _move(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple):
        return tuple(_move(o, device) for o in obj)
    if isinstance(obj, list):
        return [_move(o, device) for o in obj]
    if isinstance(obj, dict):
        return {k: _move(v, device) for k, v in obj.items()}
    return obj


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a is b or (not isinstance(a, (torch.Tensor, tuple)) and a == b)


@torch.inference_mode()
def capture_layer0_inputs(
    model: nn.Module,
    adapter,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    store_device: torch.device | None = None,
) -> LayerInputs:
    """Run the embedding stage only, keeping what enters decoder layer 0."""
    store_device = store_device or device
    layers = adapter.layers(model)
    captured: dict = {}

    def hook(_mod, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        captured["hidden"] = hs
        captured["kwargs"] = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        raise _StopForward

    pre = [model.get_submodule(n) for n in adapter.pre_modules]
    orig = [next(iter(m.parameters()), next(iter(m.buffers()), None)) for m in pre]
    orig_devices = [t.device if t is not None else None for t in orig]
    for m in pre:
        m.to(device)
    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    hidden, kwargs_list = [], []
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids[i: i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the hook always fires
                raise FptqError("internal error: decoder layer 0 was never called")
            hidden.append(captured["hidden"].to(store_device))
            kw = {k: v for k, v in captured["kwargs"].items() if k not in ("past_key_values", "past_key_value", "cache")}
            kw["use_cache"] = False
            if kwargs_list:  # share identical tensors between batches
                prev = kwargs_list[0]
                kw = {k: (prev[k] if k in prev and _same(prev[k], v) else v) for k, v in kw.items()}
            kwargs_list.append(kw)
    finally:
        handle.remove()
        for m, d in zip(pre, orig_devices):
            if d is not None:
                m.to(d)
    return LayerInputs(hidden=hidden, kwargs=kwargs_list)


def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device, name: str = "layer",
              replace: bool = False) -> list[torch.Tensor] | None:
    """Run ``layer`` on every cached batch; return the outputs, or write them
    into ``inputs`` in place when ``replace``. Non-finite outputs are refused."""
    outs = []
    with torch.inference_mode():
        for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs)):
            store = h.device
            out = layer(h.to(device), **_move(kw, device))
            if isinstance(out, tuple):
                out = out[0]
            if not torch.isfinite(out.sum()):  # one cheap reduction; NaN/Inf anywhere propagate
                raise FptqError(f"non-finite values (NaN or Inf) in the output of {name}; check the model's weights and dtype")
            out = out.to(store)
            if replace:
                inputs.hidden[i] = out
            else:
                outs.append(out)
    return None if replace else outs


@dataclass
class InputStats:
    """Statistics of the input of one Linear (or of a group sharing it)."""

    in_features: int
    window_channel_max: list[torch.Tensor] = field(default_factory=list)  # per window [K]
    samples: list[torch.Tensor] = field(default_factory=list)  # sampled rows
    hessian: HessianAccumulator | None = None
    nonfinite: bool = False

    def channel_max_matrix(self) -> torch.Tensor:
        return torch.cat(self.window_channel_max, dim=0)  # [W, K]

    def channel_absmax(self) -> torch.Tensor:
        return self.channel_max_matrix().amax(dim=0)

    def sample(self) -> torch.Tensor:
        return torch.cat(self.samples, dim=0).float() if self.samples else torch.empty(0, self.in_features)


@contextmanager
def collect_input_stats(
    modules: dict[str, nn.Module],
    rows_per_batch: int,
    generator: torch.Generator,
    hessian: bool = False,
):
    """Forward pre-hooks that fill an :class:`InputStats` per module name."""
    stats = {n: InputStats(m.in_features) for n, m in modules.items()}
    handles = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            st = stats[name]
            xf = x.detach().float()
            wcm = xf.abs().reshape(xf.shape[0], -1, xf.shape[-1]).amax(dim=1) if xf.dim() == 3 else xf.abs().amax(dim=0, keepdim=True)
            if not torch.isfinite(wcm).all():  # NaN/Inf propagate into the maxima
                st.nonfinite = True
            st.window_channel_max.append(wcm.cpu())
            flat = xf.reshape(-1, xf.shape[-1])
            if rows_per_batch > 0:
                idx = torch.randint(0, flat.shape[0], (min(rows_per_batch, flat.shape[0]),), generator=generator)
                # kept in the input's dtype (half the memory for bf16 models); sample() converts exactly
                raw = x.detach().reshape(-1, x.shape[-1])
                st.samples.append(raw[idx.to(raw.device)].cpu())
            if hessian:
                if st.hessian is None:
                    st.hessian = HessianAccumulator(flat.shape[-1], device=flat.device)
                st.hessian.add(flat)
        return hook

    for n, m in modules.items():
        handles.append(m.register_forward_pre_hook(make_hook(n)))
    try:
        yield stats
    finally:
        for h in handles:
            h.remove()


def rows_per_batch(max_rows: int, num_batches: int) -> int:
    return max(1, math.ceil(max_rows / max(num_batches, 1)))
