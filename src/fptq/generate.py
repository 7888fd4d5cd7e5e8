"""``fptq generate``: text generation from an fptq checkpoint (or a float model), streamed."""
from __future__ import annotations

import argparse

import torch


def generate_text(model, tokenizer, prompt: str, max_new_tokens: int = 64, chat: bool = True, sample: bool = False,
                  temperature: float = 0.7, top_p: float = 0.9, seed: int = 0, stream: bool = True) -> str:
    """Generate a continuation of ``prompt`` (through the chat template when the tokenizer has one)."""
    from transformers import TextStreamer

    if chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
    device = next(model.parameters()).device
    torch.manual_seed(seed)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=sample, streamer=streamer,
                  pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    if sample:
        kwargs.update(temperature=temperature, top_p=top_p)
    with torch.inference_mode():
        out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), **kwargs)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def cmd_generate(args) -> int:
    from .workflow import load_any

    model, tok, kind = load_any(args.model, device=args.device or "cpu", backend=args.backend)
    generate_text(model, tok, args.prompt, args.max_new_tokens, chat=not args.no_chat, sample=args.sample,
                  temperature=args.temperature, top_p=args.top_p, seed=args.seed, stream=True)
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
    g.add_argument("--device", default=None)
    g.set_defaults(func=cmd_generate)
