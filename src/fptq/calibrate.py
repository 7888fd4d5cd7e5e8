"""Layer-by-layer execution: capture the inputs of the first decoder layer
once, then run one decoder layer at a time on the device over the cached
activations, and collect per-Linear input statistics with forward hooks.
"""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from .config import QuantConfig
from .errors import FptqError
from .kernels import fast_bfloat16
from .memory import trim_heap
from .quant.gptq import HessianAccumulator, token_cap_weights

__all__ = ["LayerInputs", "InputStats", "capture_layer0_inputs", "run_layer", "collect_input_stats",
           "execution_choices", "float_pass_dtype"]

log = logging.getLogger(__name__)


def execution_choices(config: QuantConfig, device: torch.device) -> QuantConfig:
    """``config`` with its execution choices fitted to ``device`` (what the plan then records): a bfloat16
    statistics pass only where bfloat16 is fast; ``propagate_backend="auto"`` is the native CPU kernels where
    they run, else the simulated path (the int8 fallbacks and the GPU kernels are not faster there)."""
    changes = {}
    if config.calib_dtype == "bfloat16" and not fast_bfloat16(device):
        log.warning("no fast bfloat16 matrix products on this %s: the statistics pass runs in float32", device.type)
        changes["calib_dtype"] = "float32"
    if config.propagate_backend == "auto":
        from .kernels import default_backend

        if device.type != "cpu" or default_backend(device) != "native":
            changes["propagate_backend"] = "reference"
    return config.replace(**changes) if changes else config


def float_pass_dtype(config: QuantConfig, model_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the float pass (:func:`fptq.residual.float_pass_maxima`: the residual order, the dynamic budget's
    prediction) computes in: the statistics pass's bfloat16 for a float16 model when ``config`` (fitted to the
    device by :func:`execution_choices`) calibrates in bfloat16 -- a CPU has no fast float16 matrix products
    (one 7B-shaped layer's float pass over 16 x 512 tokens took 100 s in float16 on 2 Zen 4 cores, the
    statistics pass over the same tokens in bfloat16 25 s); ``None`` (the model's own dtype) otherwise, which
    leaves float32 and bfloat16 models' passes as they were."""
    if config.calib_dtype == "bfloat16" and model_dtype == torch.float16:
        return torch.bfloat16
    return None


class _StopForward(Exception):
    pass


@dataclass
class LayerInputs:
    """Cached hidden states entering the current decoder layer, in batches,
    and the keyword arguments (rotary embeddings, masks, ALiBi) that each batch
    needs: ``kwargs[b]`` for decoder layer 0, ``layer_kwargs[i][b]`` for layer
    ``i`` where layers get different ones (Gemma's sliding-window and global
    layers; ``None`` when every layer gets ``kwargs``). ``layer_index`` is the
    layer that ``hidden`` enters; running a layer with ``replace`` advances it."""

    hidden: list[torch.Tensor]
    kwargs: list[dict]
    layer_kwargs: list[list[dict]] | None = None
    layer_index: int = 0

    @property
    def num_windows(self) -> int:
        return sum(h.shape[0] for h in self.hidden)

    def kwargs_for(self, index: int) -> list[dict]:
        """The per-batch keyword arguments of decoder layer ``index``."""
        if self.layer_kwargs is None or index >= len(self.layer_kwargs):
            return self.kwargs
        return self.layer_kwargs[index]


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
    if a is b:
        return True
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and a.dtype == b.dtype and a.device == b.device and torch.equal(a, b)
    if isinstance(a, tuple) and isinstance(b, tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return not isinstance(a, (torch.Tensor, tuple)) and a == b


# caches are never replayed: each cached batch runs every layer once, without a KV cache
_DROPPED_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


def _pooled(v, pool: list):
    """An equal tensor (or tuple) kept earlier, so that batches and layers share one copy."""
    if not isinstance(v, (torch.Tensor, tuple)):
        return v
    for p in pool:
        if _same(p, v):
            return p
    pool.append(v)
    return v


class _LayerStandIn(nn.Module):
    """Takes the place of a decoder layer while the embedding stage runs: records
    the arguments the model passes to the layer and hands the hidden states on
    unchanged (the layer itself never runs: its weights may not be loaded yet).
    The last one stops the forward. Attributes the model's loop may read from
    a layer (e.g. ``attention_type``) come from the layer it stands in for."""

    def __init__(self, layer: nn.Module, index: int, seen: dict, last: bool, returns_tuple: bool):
        super().__init__()
        self.__dict__["_layer"] = layer  # not a submodule: the stand-ins hold no weights
        self.__dict__["_seen"] = seen
        self.index, self.last, self.returns_tuple = index, last, returns_tuple

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            layer = self.__dict__.get("_layer")
            if layer is None:
                raise
            return getattr(layer, name)

    def forward(self, *args, **kwargs):
        if len(args) > 1:
            raise FptqError("decoder layers called with positional arguments besides the hidden states are not "
                            "supported")
        hidden = args[0] if args else kwargs.pop("hidden_states")
        self._seen[self.index] = (hidden, kwargs)
        if self.last:
            raise _StopForward
        return (hidden, None) if self.returns_tuple else hidden


@torch.inference_mode()
def capture_layer0_inputs(
    model: nn.Module,
    adapter,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
    store_device: torch.device | None = None,
) -> LayerInputs:
    """Run the embedding stage only, keeping what enters decoder layer 0 and the
    keyword arguments the model passes to every decoder layer.

    The decoder layers are replaced by stand-ins for the duration (see
    :class:`_LayerStandIn`), so no decoder layer runs and the weights of the
    layers need not be loaded.
    """
    store_device = store_device or device
    layers = adapter.layers(model)
    n = len(layers)
    seen: dict[int, tuple] = {}
    stand_ins = nn.ModuleList(
        [_LayerStandIn(layer, i, seen, i == n - 1, adapter.layer_returns_tuple) for i, layer in enumerate(layers)]
    )
    parent_name, _, child = adapter.layers_path.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model

    pre = [model.get_submodule(name) for name in adapter.present_pre_modules(model)]
    orig = [next(iter(m.parameters()), next(iter(m.buffers()), None)) for m in pre]
    orig_devices = [t.device if t is not None else None for t in orig]
    for m in pre:
        m.to(device)
    hidden: list[torch.Tensor] = []
    per_layer: list[list[dict]] = [[] for _ in range(n)]
    pool: list = []
    setattr(parent, child, stand_ins)
    try:
        for i in range(0, input_ids.shape[0], batch_size):
            seen.clear()
            try:
                model(input_ids[i: i + batch_size].to(device), use_cache=False)
            except _StopForward:
                pass
            else:  # pragma: no cover - the last stand-in always stops the forward
                raise FptqError("internal error: the last decoder layer was never called")
            if len(seen) != n:
                raise FptqError(f"the model called {len(seen)} of its {n} decoder layers; fptq needs every layer "
                                "to be called once per forward")
            hidden.append(seen[0][0].to(store_device))
            raw0 = seen[0][1]
            for li in range(n):
                raw = seen[li][1]
                if li and raw.keys() == raw0.keys() and all(raw[k] is raw0[k] for k in raw):
                    per_layer[li].append(per_layer[0][-1])  # the same arguments as layer 0 (LLaMA: every layer)
                    continue
                kw = {k: v for k, v in raw.items() if k not in _DROPPED_KWARGS}
                kw["use_cache"] = False
                per_layer[li].append({k: _pooled(v, pool) for k, v in kw.items()})
    finally:
        setattr(parent, child, layers)
        seen.clear()
        for m, d in zip(pre, orig_devices):
            if d is not None:
                m.to(d)
    shared = all(per_layer[li][b] is per_layer[0][b] for li in range(n) for b in range(len(hidden)))
    return LayerInputs(hidden=hidden, kwargs=per_layer[0], layer_kwargs=None if shared else per_layer)


def run_layer(layer: nn.Module, inputs: LayerInputs, device: torch.device, name: str = "layer",
              replace: bool = False, keep: bool = True) -> list[torch.Tensor] | None:
    """Run ``layer`` (decoder layer ``inputs.layer_index``) on every cached batch; return the
    outputs, or write them into ``inputs`` in place (and advance ``inputs.layer_index``)
    when ``replace``, or drop each batch's as soon as it is checked when ``keep`` is false (a pass run for
    its hooks: the outputs of every calibration token would be one more copy of the hidden states held
    until the pass ends). Non-finite outputs are refused."""
    outs = []
    with torch.inference_mode():
        for i, (h, kw) in enumerate(zip(inputs.hidden, inputs.kwargs_for(inputs.layer_index))):
            store = h.device
            out = layer(h.to(device), **_move(kw, device))
            if isinstance(out, tuple):
                out = out[0]
            # one cheap reduction (NaN/Inf anywhere propagate), accumulated and returned in float32: a float16
            # sum of finite outputs overflows to Inf past 65504 (a 7B model's batch of hidden states easily does)
            if not torch.isfinite(out.sum(dtype=torch.float32)):
                raise FptqError(f"non-finite values (NaN or Inf) in the output of {name}; check the model's weights and dtype")
            out = out.to(device=store, dtype=h.dtype)  # an autocast pass keeps the cache's dtype
            if replace:
                inputs.hidden[i] = out
            elif keep:
                outs.append(out)
            del out
            # the batch's temporaries (activations of a few MiB, which glibc serves from its heap once its mmap
            # threshold has risen) go back to the OS now: held until the layer's end, they grew the resident
            # set by 0.8 GB on the README quickstart's statistics pass (128 x 512 tokens)
            trim_heap()
    if replace:
        inputs.layer_index += 1
    return None if replace or not keep else outs


@dataclass
class InputStats:
    """Statistics of the input of one Linear (or of a group sharing it)."""

    in_features: int
    window_channel_max: list[torch.Tensor] = field(default_factory=list)  # per window [K]
    samples: list[torch.Tensor] = field(default_factory=list)  # sampled rows
    hessian: HessianAccumulator | None = None
    nonfinite: bool = False
    channel_min: torch.Tensor | None = None  # signed per-channel minimum over every token [K]
    channel_max: torch.Tensor | None = None  # signed per-channel maximum [K]
    # max |x| per channel over the first token of every window (the attention sink) [K]; None if unknown
    first_token_absmax: torch.Tensor | None = None

    def channel_range(self) -> torch.Tensor:
        """``max - min`` per channel over every calibration token (llm-compressor's smoothing statistic)."""
        if self.channel_min is None:
            return torch.zeros(self.in_features)
        return self.channel_max - self.channel_min

    def channel_max_matrix(self) -> torch.Tensor:
        return torch.cat(self.window_channel_max, dim=0)  # [W, K]

    def channel_absmax(self) -> torch.Tensor:
        return self.channel_max_matrix().amax(dim=0)

    def sample(self, max_rows: int | None = None) -> torch.Tensor:
        """The sampled rows as one float32 ``[rows, K]`` tensor; with ``max_rows``, only the first that many
        (``sample()[:max_rows]``, without concatenating the others: the power search's rows)."""
        if not self.samples:
            return torch.empty(0, self.in_features)
        parts, n = [], 0
        for x in self.samples:
            if max_rows is not None and n >= max_rows:
                break
            parts.append(x if max_rows is None else x[: max_rows - n])
            n += len(parts[-1])
        return torch.cat(parts, dim=0).float()


def hessian_rows(n: int, k: int, first: torch.Tensor | None, generator: torch.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Which ``k`` of ``n`` rows a sampled GPTQ Hessian takes, and their weights in [0, 1].

    The first token of every window (``first``: the attention sink, a few rows far larger than the
    others that GPTQ must fit, bench/results/exp_gptq_sink.md) is always taken, with weight
    ``m / (n - n_first)``; the other ``m = k - n_first`` rows are drawn without replacement with weight 1.
    The weighted sum is then, in expectation, ``m / (n - n_first)`` times the sum over every row: the
    same Hessian up to a scale, which GPTQ ignores (its dampening is relative to the diagonal)."""
    if first is None or not bool(first.any()):
        return torch.randperm(n, generator=generator)[:k], torch.ones(k)
    first = first.cpu()
    sink = first.nonzero().squeeze(1)
    rest = (~first).nonzero().squeeze(1)
    m = max(k - len(sink), 1)
    drawn = rest[torch.randperm(len(rest), generator=generator)[:m]]
    weight = len(drawn) / max(len(rest), 1)
    return torch.cat([sink, drawn]), torch.cat([torch.full((len(sink),), weight), torch.ones(len(drawn))])


def _first_token_mask(x: torch.Tensor, seq_len: int | None) -> torch.Tensor | None:
    """Which rows of ``x`` flattened to ``[tokens, K]`` are the first token of their window
    (``[B, T, K]`` inputs, or 2-D inputs of whole windows of ``seq_len`` tokens); ``None`` if unknown."""
    if x.dim() == 3:
        return (torch.arange(x.shape[1], device=x.device) == 0).repeat(x.shape[0])
    if x.dim() == 2 and seq_len and x.shape[0] % seq_len == 0:
        return (torch.arange(seq_len, device=x.device) == 0).repeat(x.shape[0] // seq_len)
    return None


@contextmanager
def collect_input_stats(
    modules: dict[str, nn.Module],
    rows_per_batch: int,
    generator: torch.Generator,
    hessian: bool = False,
    seq_len: int | None = None,
    hessian_token_cap: float = 0.0,
    hessian_first_token_weight: float = 1.0,
    hessian_rows_per_batch: int = 0,
    hessian_dtype: str = "float32",
):
    """Forward pre-hooks that fill an :class:`InputStats` per module name.

    The Hessian (GPTQ) is accumulated from every token, or from ``hessian_rows_per_batch`` rows
    of each batch drawn without replacement when that is positive and smaller.

    Per-window maxima are taken over the tokens of each window; a 2-D input
    ``[tokens, K]`` (OPT flattens the batch before fc1) is split into windows of
    ``seq_len`` tokens when given."""
    stats = {n: InputStats(m.in_features) for n, m in modules.items()}
    handles = []

    def make_hook(name):
        def hook(mod, args):
            x = args[0]
            st = stats[name]
            xf = x.detach().float()
            if xf.dim() == 3:
                wcm = xf.abs().reshape(xf.shape[0], -1, xf.shape[-1]).amax(dim=1)
            elif xf.dim() == 2 and seq_len and xf.shape[0] % seq_len == 0:
                wcm = xf.abs().reshape(-1, seq_len, xf.shape[-1]).amax(dim=1)
            else:
                wcm = xf.abs().amax(dim=0, keepdim=True)
            if not torch.isfinite(wcm).all():  # NaN/Inf propagate into the maxima
                st.nonfinite = True
            st.window_channel_max.append(wcm.cpu())
            flat = xf.reshape(-1, xf.shape[-1])
            first = _first_token_mask(xf, seq_len)
            if first is not None:
                fm = flat[first].abs().amax(dim=0).cpu()
                st.first_token_absmax = fm if st.first_token_absmax is None else torch.maximum(st.first_token_absmax, fm)
            lo, hi = flat.amin(dim=0).cpu(), flat.amax(dim=0).cpu()
            st.channel_min = lo if st.channel_min is None else torch.minimum(st.channel_min, lo)
            st.channel_max = hi if st.channel_max is None else torch.maximum(st.channel_max, hi)
            if rows_per_batch > 0:
                n = flat.shape[0]  # rows without replacement; every row when the batch has no more than asked
                idx = torch.arange(n) if rows_per_batch >= n else torch.randperm(n, generator=generator)[:rows_per_batch]
                # kept in the input's dtype (half the memory for bf16 models); sample() converts exactly
                raw = x.detach().reshape(-1, x.shape[-1])
                st.samples.append(raw[idx.to(raw.device)].cpu())
            if hessian:
                if st.hessian is None:
                    st.hessian = HessianAccumulator(flat.shape[-1], device=flat.device, dtype=hessian_dtype)
                w = token_cap_weights(flat, hessian_token_cap) if hessian_token_cap > 0 else None
                if hessian_first_token_weight != 1.0:
                    if first is not None:
                        w = torch.where(first, hessian_first_token_weight, 1.0) * (1.0 if w is None else w)
                if 0 < hessian_rows_per_batch < flat.shape[0]:
                    pick, pw = hessian_rows(flat.shape[0], hessian_rows_per_batch, first, generator)
                    pick, pw = pick.to(flat.device), pw.to(flat.device)
                    st.hessian.add(flat[pick], pw if w is None else pw * w[pick])
                else:
                    st.hessian.add(flat, w)
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
