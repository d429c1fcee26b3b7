"""A short text sample from a model at the end of training (the full generation API is separate)."""

from __future__ import annotations

import torch

from ..models import MegalodonLM


@torch.no_grad()
def sample_text(
    model: MegalodonLM, tokenizer, prompt: str, max_new_tokens: int, temperature: float = 0.8, top_k: int = 40,
    seed: int = 0,
) -> str:
    """Prefill `prompt` once, then decode token by token through the streaming state (O(1) per token)."""
    was_training = model.training
    model.eval()
    device = model.embed.weight.device
    ids = tokenizer.encode(prompt) or [tokenizer.eos_id]
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = model(torch.tensor([ids], device=device), return_state=True)
    state, logits = out.state, out.logits[0, -1].float().cpu()
    new: list[int] = []
    for _ in range(max_new_tokens):
        if temperature <= 0:
            nxt = int(logits.argmax())
        else:
            scaled = logits / temperature
            if top_k and top_k < scaled.numel():
                kth = torch.topk(scaled, top_k).values[-1]
                scaled = scaled.masked_fill(scaled < kth, float("-inf"))
            nxt = int(torch.multinomial(torch.softmax(scaled, -1), 1, generator=gen))
        if nxt == tokenizer.eos_id:
            break
        new.append(nxt)
        out = model(torch.tensor([[nxt]], device=device), state=state)
        state, logits = out.state, out.logits[0, -1].float().cpu()
    model.train(was_training)
    return prompt + tokenizer.decode(new)
