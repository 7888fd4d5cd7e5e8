"""``fptq generate``: text generation from an fptq checkpoint (or a float model), streamed.

On the CPU, models fptq's runtime supports (LLaMA-shaped: LLaMA/SmolLM2, Mistral, Qwen2/3) generate through it
(:class:`fptq.runtime.Engine`); on a GPU every model decodes on a static KV cache with each step replayed as a
CUDA graph (:mod:`fptq.runtime.graphs`); others, or ``--no-runtime``, through transformers' ``generate``.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from .runtime.head import HEADS


def _prompt_ids(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    return tokenizer(prompt, return_tensors="pt").input_ids


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, sample: bool = False,
                  temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, stream: bool = True,
                  runtime: bool = True, stats: dict | None = None, head: str = "auto") -> str:
    """Generate a continuation of ``prompt`` (through the chat template when the tokenizer has one) with
    fptq's runtime where ``runtime`` and the model allow it, else transformers' ``generate``. ``stats``, if
    given, receives ``path``, ``new_tokens`` and ``seconds``. ``head``: the runtime's output head
    (:class:`~fptq.runtime.Engine`)."""
    from transformers import TextStreamer

    from .runtime import Engine, engine_unsupported_reason

    ids = _prompt_ids(tokenizer, prompt, chat)
    device = next(model.parameters()).device
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    eos = tokenizer.eos_token_id
    t0 = time.perf_counter()
    if runtime and device.type == "cpu" and engine_unsupported_reason(model) is None:
        gen = torch.Generator().manual_seed(seed)
        if streamer is not None:
            streamer.put(ids)
        on_token = (lambda tok: streamer.put(tok)) if streamer is not None else None
        out = Engine(model, head=head).generate(ids, max_new_tokens, do_sample=sample, temperature=temperature,
                                                top_p=top_p, eos_token_id=eos, generator=gen, on_token=on_token)
        if streamer is not None:
            streamer.end()
        path = "fptq runtime"
    elif runtime and device.type == "cuda":  # static KV cache, each decode step a CUDA graph replay
        from .runtime.graphs import static_generate

        gen = torch.Generator().manual_seed(seed)
        if streamer is not None:
            streamer.put(ids)
        on_token = (lambda tok: streamer.put(tok)) if streamer is not None else None
        out, dec = static_generate(model, ids.to(device), max_new_tokens, do_sample=sample, temperature=temperature,
                                   top_p=top_p, eos_token_id=eos, generator=gen, on_token=on_token)
        if streamer is not None:
            streamer.end()
        path = (f"static KV cache, {dec.step_path}, "
                + ("CUDA graphs" if dec.uses_graph else f"eager steps ({dec.graph_reason})"))
    else:
        torch.manual_seed(seed)
        kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, streamer=streamer,
                      pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        if sample:
            kwargs.update(temperature=temperature, top_p=top_p)
        with torch.inference_mode():
            out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), **kwargs)
        path = "transformers generate"
    new = out[0, ids.shape[1]:]
    if stats is not None:
        stats.update(path=path, new_tokens=int(new.numel()), seconds=time.perf_counter() - t0)
    return tokenizer.decode(new, skip_special_tokens=True)


def cmd_generate(args) -> int:
    from transformers import AutoTokenizer

    from .io import PLAN_NAME
    from .runtime import load_for_runtime
    from .workflow import load_any

    device = args.device or "cpu"
    if (args.model is not None and (Path(args.model) / PLAN_NAME).is_file() and device == "cpu"
            and not args.no_runtime and args.backend == "auto"):
        model, tok = load_for_runtime(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        model, tok, _ = load_any(args.model, device=device, backend=args.backend)
    stats: dict = {}
    generate_text(model, tok, args.prompt, args.max_new_tokens, chat=not args.no_chat, sample=args.sample,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=True,
                  runtime=not args.no_runtime, stats=stats, head=args.head)
    if stats["new_tokens"]:
        print(f"\n[{stats['new_tokens']} tokens in {stats['seconds']:.2f} s "
              f"({stats['new_tokens'] / stats['seconds']:.1f} tokens/s, prompt included), {stats['path']}]")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a quantized checkpoint (streams to the terminal)")
    g.add_argument("model", nargs="?", default=None, help="fptq output directory or float model (default: default model)")
    g.add_argument("--prompt", required=True, help="user message (wrapped in the chat template if the tokenizer has one)")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top-p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--no-chat", action="store_true", help="do not apply the chat template")
    g.add_argument("--backend", default="auto", help="QuantLinear backend (default auto: integer kernels)")
    g.add_argument("--no-runtime", action="store_true", help="use transformers' generate instead of fptq's runtime")
    g.add_argument("--head", choices=HEADS, default="auto",
                   help="the runtime's output head: auto (a quantized model's head requantized to int8 at load while "
                        "decoding: half the bytes per token), int8 (every call), or stored (the checkpoint's own); "
                        "default auto")
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)
