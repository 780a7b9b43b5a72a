"""Per-request sampling inside one batched step.

Rows that ask for them get their logit processors first (repetition, presence and frequency
penalties, logit bias, end of sequence masked until `min_tokens`); rows that ask for nothing cost
nothing. Guided rows (constrained decoding, engine_core/guided.py) then lose every token their grammar
does not allow next; their grammar, not `min_tokens`, decides when end of sequence may come (a complete
output has nothing else to add). Then greedy rows take the argmax; the others apply their own
temperature, top-k and top-p and draw with the Gumbel-max trick (argmax of probs / Exp(1) noise) so
each request's noise comes from its own generator: a seeded request gives the same tokens whatever
else shares the batch.

Log-probabilities are the model's own: log_softmax of the raw logits, before any processing.
"""

from __future__ import annotations

import torch

from engine_core.guided import SequenceGuide, allowed_tokens
from engine_core.scheduler import Sequence
from ipc.messages import SamplingParams, TokenLogprobs


def _processes(params: SamplingParams, eos_pending: bool) -> bool:
    return bool(
        params.repetition_penalty != 1.0
        or params.presence_penalty
        or params.frequency_penalty
        or params.logit_bias
        or eos_pending
    )


def token_logprobs(logits: torch.Tensor, targets: list[int], k: int) -> list[TokenLogprobs]:
    """Row i's log-probability of targets[i], and its k most likely tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    index = torch.tensor(targets, device=logits.device)[:, None]
    chosen = logprobs.gather(-1, index)[:, 0].tolist()
    if k > 0:
        top_values, top_ids = torch.topk(logprobs, k, dim=-1)
        top_values, top_ids = top_values.tolist(), top_ids.tolist()
        for target, ids, values in zip(targets, top_ids, top_values):
            _target_first_among_ties(target, ids, values)
    else:
        top_values = top_ids = [[] for _ in targets]
    return [TokenLogprobs(t, c, i, v) for t, c, i, v in zip(targets, chosen, top_ids, top_values)]


def _target_first_among_ties(target: int, ids: list[int], values: list[float]) -> None:
    """topk orders equal values arbitrarily; 16-bit logits tie often enough that a greedy token (argmax:
    the first of equals) could be listed second. Put the chosen token first among the values equal to it."""
    if target in ids:
        at = ids.index(target)
        first = values.index(values[at])
        if first < at:
            ids.insert(first, ids.pop(at))
            values.insert(first, values.pop(at))


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

    def sample(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: set[int] = frozenset(),
        guides: list[SequenceGuide | None] | None = None,  # per row; None when no row is guided
    ) -> list[int]:
        processed = self._process(logits, seqs, eos_token_ids, guides)
        if guides is not None and any(g is not None for g in guides):
            processed = self._constrain(processed if processed is not logits else logits.clone(), guides)
        logits = processed
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
    def logprobs(logits: torch.Tensor, seqs: list[Sequence], tokens: list[int]) -> list[TokenLogprobs | None]:
        """Each sampled token's log-probability (and top k) for the rows that asked; None for the others."""
        rows = [i for i, s in enumerate(seqs) if s.params.logprobs is not None]
        out: list[TokenLogprobs | None] = [None] * len(seqs)
        if rows:
            k = max(seqs[i].params.logprobs for i in rows)
            index = torch.tensor(rows, device=logits.device)
            for i, lp in zip(rows, token_logprobs(logits[index], [tokens[i] for i in rows], k)):
                wanted = seqs[i].params.logprobs
                out[i] = TokenLogprobs(lp.token_id, lp.logprob, lp.top_ids[:wanted], lp.top_logprobs[:wanted])
        return out

    @staticmethod
    def _constrain(logits: torch.Tensor, guides: list[SequenceGuide | None]) -> torch.Tensor:
        """Guided rows keep only the tokens their grammar allows next (in place: `logits` is a copy)."""
        rows = [i for i, g in enumerate(guides) if g is not None]
        allowed = allowed_tokens([guides[i] for i in rows], logits.shape[-1]).to(logits.device, non_blocking=True)
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill_(~allowed, float("-inf"))
        return logits

    def _process(
        self,
        logits: torch.Tensor,
        seqs: list[Sequence],
        eos_token_ids: set[int],
        guides: list[SequenceGuide | None] | None = None,
    ) -> torch.Tensor:
        """Penalties, bias and the min_tokens mask (unguided rows), on a copy, for the rows that ask for any."""
        guides = guides or [None] * len(seqs)
        eos_pending = [len(s.output_ids) < s.params.min_tokens and g is None for s, g in zip(seqs, guides)]
        rows = [i for i, s in enumerate(seqs) if _processes(s.params, eos_pending[i])]
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[-1]
        eos = torch.tensor(sorted(t for t in eos_token_ids if t < vocab), dtype=torch.long, device=logits.device)
        for i in rows:
            seq, row = seqs[i], logits[i]
            p = seq.params
            if p.repetition_penalty != 1.0:  # HF's rule, over prompt and output: shrink toward "less likely"
                seen = torch.tensor(seq.prompt_ids + seq.output_ids, device=logits.device).unique()
                values = row[seen]
                row[seen] = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            if (p.presence_penalty or p.frequency_penalty) and seq.output_ids:  # OpenAI's: generated tokens only
                counts = torch.bincount(torch.tensor(seq.output_ids, device=logits.device), minlength=vocab)[:vocab]
                row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0)
            bias = {t: b for t, b in (p.logit_bias or {}).items() if 0 <= t < vocab}
            if bias:
                row[torch.tensor(list(bias), device=logits.device)] += torch.tensor(
                    list(bias.values()), device=logits.device, dtype=row.dtype
                )
            if eos_pending[i] and eos.numel():
                row[eos] = float("-inf")
        return logits

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
