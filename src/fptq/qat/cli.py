"""Command line of :mod:`fptq.qat`: ``fptq generate-data``, the QAT flags of ``fptq quantize`` and
``--calib self``."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import FptqError
from .config import GenerationRecipe, QATConfig

log = logging.getLogger(__name__)

__all__ = ["register", "add_qat_args", "qat_config_from_args", "cmd_quantize_qat", "self_calibration_file"]


def _int_list(s: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in s.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 3,4,5, got {s!r}") from None


def _recipe(args, length: int) -> GenerationRecipe:
    return GenerationRecipe(length=length, seed=args.gen_seed, greedy_lengths=args.greedy, top_k=args.top_k,
                            dtype=args.gen_dtype)


def _add_recipe_args(p: argparse.ArgumentParser, seed_flag: str) -> None:
    p.add_argument(seed_flag, dest="gen_seed", type=int, default=0, help="seed of the generated data (default 0)")
    p.add_argument("--greedy", type=_int_list, default=(3, 4, 5),
                   help="tokens taken by argmax at the start of sequence i: the (i mod n)-th of this list, the "
                        "random first token included (default 3,4,5, LLM-QAT's)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: full softmax)")
    p.add_argument("--gen-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="generate under bfloat16 autocast (faster where the CPU/GPU has bf16 units; default float32)")


def cmd_generate_data(args) -> int:
    import time

    import torch

    from ..models.loading import load_float_model
    from .datagen import load_or_generate, sidecar_path

    recipe = _recipe(args, args.length)
    model, tok, src = load_float_model(args.model, trust_remote_code=args.trust_remote_code)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    t0 = time.perf_counter()
    ids = load_or_generate(args.out, model, args.num, recipe, tokenizer=tok, source=src, batch_size=args.batch_size,
                           device=device, force=args.force)
    dt = time.perf_counter() - t0
    print(f"{ids.shape[0]} sequences x {ids.shape[1]} tokens in {args.out} ({dt:.1f} s this run; recipe in "
          f"{sidecar_path(args.out)})")
    sample = tok.decode(ids[0, :64].tolist(), skip_special_tokens=False).replace("\n", "\\n")
    print(f"sequence 0: {sample[:200]}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate-data", help="generate data-free training/calibration text with the float model",
                       description="LLM-QAT's data-free data: a random start token, the next tokens greedy, the rest "
                                   "sampled from the model's softmax (see fptq.qat.datagen). Cached: a second run "
                                   "with the same recipe reuses (or extends) FILE.")
    g.add_argument("model", nargs="?", default=None, help="float model (default: the default model)")
    g.add_argument("-o", "--out", required=True, help="safetensors file of token ids (a FILE.json sidecar is written beside it)")
    g.add_argument("--num", type=int, default=256, help="number of sequences (default 256)")
    g.add_argument("--length", type=int, default=512, help="tokens per sequence (default 512)")
    _add_recipe_args(g, "--seed")
    g.add_argument("--batch-size", type=int, default=32, help="sequences generated together (default 32)")
    g.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    g.add_argument("--force", action="store_true", help="replace FILE when it holds data of another recipe or model")
    g.add_argument("--trust-remote-code", action="store_true")
    g.set_defaults(func=cmd_generate_data)


def add_qat_args(p: argparse.ArgumentParser) -> None:
    """Flags of ``fptq quantize`` read by the QAT methods (llm-qat-w4a8, fptq-qat)."""
    q = p.add_argument_group("advanced: quantization-aware training (--method llm-qat-w4a8 or fptq-qat)")
    d = QATConfig()
    q.add_argument("--qat-steps", type=int, default=None, help=f"optimizer steps (default {d.steps})")
    q.add_argument("--qat-batch-size", type=int, default=None, help=f"sequences per step (default {d.batch_size})")
    q.add_argument("--qat-lr", type=float, default=None, help=f"AdamW learning rate of the weights (default {d.lr})")
    q.add_argument("--qat-scale-lr", dest="qat_act_scale_lr", type=float, default=None,
                   help=f"learning rate of static activation scales (default {d.act_scale_lr})")
    q.add_argument("--qat-num", type=int, default=None, help=f"generated training sequences (default {d.num_sequences})")
    q.add_argument("--qat-length", type=int, default=None, help=f"tokens per training sequence (default {d.recipe.length})")
    q.add_argument("--qat-data", default=None, help="cache file of the generated training data (see fptq generate-data; "
                                                    "default: one per model and recipe in $FPTQ_CACHE/generated)")
    q.add_argument("--learn-act-scales", action="store_true",
                   help="train the static activation scales too (LSQ gradients; default: keep them from calibration)")
    q.add_argument("--qat-dtype", default=None, choices=("float32", "bfloat16"),
                   help=f"autocast dtype of the training forward/backward (default {d.dtype})")
    _add_recipe_args(q, "--qat-data-seed")


def qat_config_from_args(args) -> QATConfig:
    d = QATConfig()
    recipe = _recipe(args, args.qat_length or d.recipe.length)
    return d.replace(steps=args.qat_steps, batch_size=args.qat_batch_size, lr=args.qat_lr,
                     act_scale_lr=args.qat_act_scale_lr, num_sequences=args.qat_num, dtype=args.qat_dtype,
                     learn_act_scales=True if args.learn_act_scales else None, recipe=recipe)


def cmd_quantize_qat(args, config) -> int:
    from ..report import quantize_summary
    from .run import qat_quantize_to_dir

    if args.resume:
        raise FptqError("--resume is not supported by the QAT methods (training is one run); drop --resume")
    qat = qat_config_from_args(args)
    plan, report = qat_quantize_to_dir(
        args.model, args.out, config, qat, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
        seed=args.seed, device=args.device, batch_size=args.batch_size, data_file=args.qat_data, force=args.force,
        trust_remote_code=args.trust_remote_code)
    print(quantize_summary(plan, report))
    c = report["training"]
    print(f"training   {c['steps']} steps, {c['tokens']} tokens, {c['train_s']:.0f} s "
          f"({c['tokens_per_s']:.0f} tok/s); KL to the float model {c['kl_first']:.4f} -> {c['kl_last']:.4f}")
    print(f"report     {Path(args.out) / 'quantize_report.json'}")
    return 0


def self_calibration_file(args) -> str:
    """``--calib self`` for the PTQ methods: generate (or reuse) calibration text with the float model and
    return the path of a text file holding it (beside the cached token ids)."""
    import torch

    from ..models.loading import load_float_model
    from .datagen import default_cache_file, model_id
    from .run import self_calibration_text

    model, tok, src = load_float_model(args.model, trust_remote_code=args.trust_remote_code)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    text = self_calibration_text(model, tok, args.nsamples, args.seqlen, seed=args.seed, source=src, device=device)
    path = default_cache_file(model_id(model, src), GenerationRecipe(length=args.seqlen, seed=args.seed))
    path = path.with_name(path.stem + f"-n{args.nsamples}.txt")
    path.write_text(text, encoding="utf-8")
    return str(path)
