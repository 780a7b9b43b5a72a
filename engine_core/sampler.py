"""Per-request sampling inside one batched step.

Greedy rows take the argmax. The others apply their own temperature, top-k and top-p, then draw
with the Gumbel-max trick (argmax of probs / Exp(1) noise) so each request's noise comes from its
own generator: a seeded request gives the same tokens whatever else shares the batch.
"""
from __future__ import annotations

import torch

from engine_core.scheduler import Sequence


class Sampler:
    def __init__(self, device: torch.device):
        self.device = device

    def generator_for(self, seq: Sequence) -> torch.Generator:
        if seq.generator is None:
            gen = torch.Generator(device=self.device)
            if seq.params.seed is not None:
                gen.manual_seed(seq.params.seed)
            else:
                gen.seed()
            seq.generator = gen
        return seq.generator

    def sample(self, logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
        tokens = torch.argmax(logits, dim=-1)
        rows = [i for i, s in enumerate(seqs) if s.params.temperature > 0]
        if rows:
            index = torch.tensor(rows, device=logits.device)
            params = [seqs[i].params for i in rows]
            scaled = logits[index] / torch.tensor([p.temperature for p in params], device=logits.device)[:, None]
            scaled = self._filter(scaled, params)
            probs = torch.softmax(scaled, dim=-1)
            noise = torch.empty_like(probs)
            for j, i in enumerate(rows):
                noise[j].exponential_(generator=self.generator_for(seqs[i]))
            tokens[index] = torch.argmax(probs / noise, dim=-1)
        return tokens.tolist()

    @staticmethod
    def _filter(scaled: torch.Tensor, params: list) -> torch.Tensor:
        """Mask logits outside each row's top-k and nucleus (top-p); no-op rows cost nothing."""
        vocab = scaled.shape[-1]
        top_k = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
        top_p = [p.top_p for p in params]
        if all(k == vocab for k in top_k) and all(p >= 1.0 for p in top_p):
            return scaled
        sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
        rank = torch.arange(vocab, device=scaled.device)[None, :]
        remove = rank >= torch.tensor(top_k, device=scaled.device)[:, None]
        probs = torch.softmax(sorted_logits.masked_fill(remove, float("-inf")), dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs  # drop a token once the mass before it reaches top_p
        remove |= mass_before >= torch.tensor(top_p, device=scaled.device)[:, None]
        remove[:, 0] = False
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        return torch.empty_like(scaled).scatter_(-1, order, sorted_logits)
