"""fptq: FPTQ (fine-grained post-training quantization, W4A8) for Hugging Face causal LMs.

Python API::

    import fptq
    model, tok, _ = fptq.load_float_model(None)          # the default model
    windows = fptq.calibration_windows(tok, fptq.read_text(None), 128, 512)
    plan = fptq.quantize(model, fptq.method_config("fptq", group_size=64), windows)
    fptq.save(model, plan, "out", tokenizer=tok)
    qmodel = fptq.load("out")                             # a transformers model; forward/generate on fptq's runtime
    engine = fptq.Engine.from_checkpoint("out")           # fptq's runtime: engine.generate(ids, 64)
    # or, once fptq is imported: transformers.AutoModelForCausalLM.from_pretrained("out")
"""
__version__ = "0.1.0"

from .config import ActPolicy, Equalization, QuantConfig, Strategy  # noqa: E402
from .data import calibration_windows, read_text  # noqa: E402
from .errors import FptqError  # noqa: E402
from .io import save  # noqa: E402
from . import hf  # noqa: E402,F401  (registers quant_method "fptq" with transformers)
from .methods import METHODS, method_config  # noqa: E402
from .models.loading import load_float_model  # noqa: E402
from .nn import QuantLinear  # noqa: E402
from .pipeline import quantize  # noqa: E402
from .plan import LayerPlan, Plan  # noqa: E402
from .runtime import Engine  # noqa: E402
from .runtime.hf_fast import load  # noqa: E402

__all__ = [
    "ActPolicy", "Engine", "Equalization", "FptqError", "LayerPlan", "METHODS", "Plan", "QuantConfig", "QuantLinear",
    "Strategy", "calibration_windows", "load", "load_float_model", "method_config", "quantize", "read_text", "save",
    "__version__",
]
