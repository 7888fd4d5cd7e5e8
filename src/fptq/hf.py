"""Loading fptq checkpoints with ``transformers.AutoModelForCausalLM.from_pretrained``.

Importing :mod:`fptq` registers, through transformers' public quantizer registry
(``transformers.quantizers.register_quantization_config`` / ``register_quantizer``),
a quantization config and a quantizer for ``quant_method: "fptq"``::

    import fptq
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained("out")   # same model as fptq.load("out")

After the weights load, the model's forward and ``generate`` run on fptq's runtime where it covers the
architecture and device (:mod:`fptq.runtime.hf_fast`), as for :func:`fptq.load`.

Before the weights load, the quantizer verifies the weights files against the sizes and
sha256 recorded in ``quantize_report.json`` (as :func:`fptq.load` does), reads
``fptq_plan.json`` and swaps the Linears the plan quantizes for empty
:class:`~fptq.nn.QuantLinear` modules (:func:`fptq.io.replace_linears`, shared with
:func:`fptq.load`); transformers then loads the checkpoint's tensors (``qweight``,
``w_scales``, ``act_scale``, ``bias``) into their buffers under the same names, keeping
each buffer's dtype. Nothing in transformers is patched.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from .io import PLAN_NAME, QUANT_METHOD, REPORT_NAME, read_plan, replace_linears, verify_files
from .stored_head import head_spec, untie_stored_head

log = logging.getLogger(__name__)

__all__ = ["FptqConfig", "FptqHfQuantizer", "register", "set_backend"]

try:  # transformers is a dependency; the guard keeps `import fptq` working on versions without the registry
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError:  # pragma: no cover
    HfQuantizer = QuantizationConfigMixin = None


if QuantizationConfigMixin is not None:

    class FptqConfig(QuantizationConfigMixin):
        """The ``quantization_config`` that :func:`fptq.save` writes into ``config.json``.

        The per-layer decisions live in the checkpoint's plan file, not here. (transformers 5 ignores a
        config passed to ``from_pretrained`` for a checkpoint that has one, except for its own built-in
        methods, so there are no loading options: the weights are always verified, and the backend is
        ``auto``, the fastest integer kernels for the device; change it afterwards with :func:`set_backend`,
        e.g. to ``reference`` for the simulated float32 numerics.)
        """

        def __init__(self, plan_file: str = PLAN_NAME, format_version: int = 1, method: str | None = None,
                     wbits: int = 4, abits: int = 8, group_size: int = 128, thresholds: Any = None,
                     **kwargs: Any) -> None:
            self.quant_method = QUANT_METHOD
            self.plan_file = plan_file
            self.format_version = format_version
            self.method = method
            self.wbits = wbits
            self.abits = abits
            self.group_size = group_size
            self.thresholds = thresholds
            for k, v in kwargs.items():  # keys written by a newer fptq are kept, not lost
                if k != "quant_method":
                    setattr(self, k, v)

    class FptqHfQuantizer(HfQuantizer):
        """Loads pre-quantized fptq checkpoints (it cannot quantize a float model: use ``fptq quantize``)."""

        requires_calibration = True

        def _checkpoint_file(self, model, checkpoint_files: list[str] | None, name: str) -> Path | None:
            """``name`` next to the weights files, fetched from the Hub when the model came from there."""
            if checkpoint_files:
                p = Path(checkpoint_files[0]).parent / name
                if p.is_file():
                    return p
            from transformers.utils import cached_file

            src = getattr(model.config, "name_or_path", None)
            if not src:
                return None
            found = cached_file(src, name, _raise_exceptions_for_missing_entries=False)
            return Path(found) if found else None

        def _process_model_before_weight_loading(self, model, checkpoint_files: list[str] | None = None, **kwargs):
            from .errors import FptqError

            plan_name = Path(getattr(self.quantization_config, "plan_file", None) or PLAN_NAME).name
            plan_path = self._checkpoint_file(model, checkpoint_files, plan_name)
            if plan_path is None:
                raise FptqError(f"{getattr(model.config, 'name_or_path', '?')} has an fptq quantization_config "
                                f"but no {plan_name}: the checkpoint is incomplete")
            report = self._checkpoint_file(model, checkpoint_files, REPORT_NAME)
            if report is not None:
                verify_files(report.parent)
            self._fptq_dir = plan_path.parent
            plan = read_plan(plan_path)
            replace_linears(model, plan)
            model.fptq_plan = plan
            spec = head_spec(vars(self.quantization_config))
            if spec is not None:  # the checkpoint's head transform loads into a buffer of the head module
                head_module, _, leaf = spec["transform"].rpartition(".")
                head = model.get_submodule(head_module)
                h = head.weight.shape[1]
                head.register_buffer(leaf, torch.empty(h, h, dtype=torch.float32, device=head.weight.device))
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            from .runtime.hf_fast import use_runtime

            spec = head_spec(vars(self.quantization_config))
            if spec is not None:  # tied as loaded: the head becomes the embedding times the transform
                untie_stored_head(model, spec)
            set_backend(model, "auto")  # also drops any cache filled before the weights arrived
            reason = use_runtime(model, getattr(self, "_fptq_dir", None))  # as fptq.load: forward on fptq's runtime
            if reason is not None:
                log.info("fptq checkpoint: transformers' forward with fptq's kernels (fptq's runtime: %s)", reason)
            return model

        def is_serializable(self, *args, **kwargs) -> bool:
            # save_pretrained would not write the plan; fptq.save(model, model.fptq_plan, out) does
            return False

        @property
        def is_trainable(self) -> bool:
            return False

else:  # pragma: no cover
    FptqConfig = FptqHfQuantizer = None


def set_backend(model, backend: str):
    """Run every :class:`~fptq.nn.QuantLinear` of ``model`` with ``backend`` (``reference`` or a
    kernel name, see :mod:`fptq.kernels`); returns ``model``."""
    from .nn import QuantLinear

    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.set_backend(backend)
    return model


def register() -> bool:
    """Register :class:`FptqConfig` and :class:`FptqHfQuantizer` for ``quant_method: "fptq"``.
    Idempotent: a second call (or a second import) changes nothing. Returns whether fptq's
    classes are the ones registered."""
    if FptqConfig is None:  # pragma: no cover
        return False
    from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING

    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(FptqConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(FptqHfQuantizer)
    ours = (AUTO_QUANTIZATION_CONFIG_MAPPING[QUANT_METHOD].__qualname__ == FptqConfig.__qualname__
            and AUTO_QUANTIZER_MAPPING[QUANT_METHOD].__qualname__ == FptqHfQuantizer.__qualname__)
    if not ours:  # pragma: no cover - another package took the name first
        log.warning("transformers already has a quantizer registered for %r; fptq's was not registered", QUANT_METHOD)
    return ours


register()
