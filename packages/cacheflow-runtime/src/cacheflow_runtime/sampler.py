"""The sampler: from a batch's logits to the next token of every sequence.

One ``forward`` call handles a whole batch of requests (``SamplingGroup``), each with its own
``SamplingParams``. The work per step, vectorized over the rows of the batch:

1. ``allowed_token_ids`` (every other id's logit set to -inf) and ``logit_bias`` added to the
   logits of its token ids, then penalties on each sequence's row:
   repetition (HF semantics, prompt and output tokens), frequency and presence (OpenAI
   semantics, output tokens only), then ``min_tokens`` masking of the EOS and stop token ids
   and ``bad_words`` masking (a word's last token where the output ends with the rest);
2. division by the temperature (greedy and beam search rows use 1);
3. greedy rows: argmax; random rows: min-p, then top-k and top-p on what is left (vLLM's
   order), then one draw per sample by the exponential race (Gumbel-max); a seeded sample's
   noise is a hash of its seed key, the position of the token drawn and the vocabulary index
   (seeded_noise.py), so a seeded request draws the same tokens whatever else is in the batch,
   the others share one draw of the default generator; beam search groups: the ``2 * best_of``
   best (beam, token) pairs by cumulative log probability after steps 1-2, ranked as
   ``torch.topk`` over the flattened ``[num_beams * vocab]`` scores, as HF transformers does;
4. the values reported as logprobs (the chosen token's, the top ones, hence also
   ``cumulative_logprob``), chosen by the engine's ``logprobs_mode`` as vLLM's:
   ``raw_logprobs`` (the default: ``log_softmax`` of the model's logits before any of the
   above), ``raw_logits``, ``processed_logprobs`` (``log_softmax`` after steps 1-3: penalties,
   bias, masks, temperature, and min-p / top-k / top-p on random rows, whose dropped tokens
   report -inf) or ``processed_logits``; beam search reports and ranks by its own scores
   (``log_softmax`` after steps 1-2) whatever the mode;
5. ``prompt_logprobs`` from the raw logits of the prompt rows (logits rather than logprobs in
   the two ``*_logits`` modes).

``sample`` queues all of it on the device and returns a ``DeviceSamples``; reading its results
into Python (``DeviceSamples.assemble``, sampler_output.py) is the one device-to-host
synchronisation, and the model runner defers it so that the host can prepare the next step
meanwhile. Calling the sampler does both.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field

import torch

from cacheflow_runtime.config import LOGPROBS_MODES, parse_logprobs_mode
from cacheflow_runtime.sampler_output import (
    BeamBucket,
    DeviceSamples,
    PromptLogprobsOnDevice,
    SampleRow,
    cumulative_logprob_of,
)
from cacheflow_runtime.sampling_metadata import DecodeRows, GroupSampleResult, SamplingGroup
from cacheflow_runtime.seeded_noise import hashed_exponential

_PROMPT_LOGPROBS_CHUNK = 256  # rows per log_softmax over the vocab for prompt logprobs


@dataclass
class _RowParams:
    """Per-row parameters of the batch, in the order of the gathered rows."""

    rows: list[int] = field(default_factory=list)  # row of the input logits
    group: list[int] = field(default_factory=list)  # index of the group the row belongs to
    temperature: list[float] = field(default_factory=list)  # 1.0 for greedy and beam rows
    top_k: list[int] = field(default_factory=list)  # -1: off
    top_p: list[float] = field(default_factory=list)
    min_p: list[float] = field(default_factory=list)
    repetition: list[float] = field(default_factory=list)
    frequency: list[float] = field(default_factory=list)
    presence: list[float] = field(default_factory=list)
    prompt_ids: list[list[int]] = field(default_factory=list)
    output_ids: list[list[int]] = field(default_factory=list)  # the groups' lists, not copies
    banned_ids: list[list[int]] = field(default_factory=list)  # min_tokens and bad_words masking
    bias: list[dict[int, float] | None] = field(default_factory=list)  # logit_bias
    allowed: list[list[int] | None] = field(default_factory=list)  # allowed_token_ids
    num_top: list[int] = field(default_factory=list)  # top logprobs to report


class Sampler(torch.nn.Module):
    """Turns logits into ``GroupSampleResult``s, one per ``SamplingGroup``.

    ``vocab_size``, when given, drops logit columns past it (a vocabulary padded for tensor
    parallelism); otherwise every column is a token. ``logprobs_mode``: what the reported
    logprobs are (module docstring, step 4).
    """

    def __init__(self, vocab_size: int | None = None,
                 logprobs_mode: str = LOGPROBS_MODES[0]) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.logprobs_mode = parse_logprobs_mode(logprobs_mode)

    def forward(self, logits: torch.Tensor, groups: list[SamplingGroup],
                default_generator: torch.Generator | None = None,
                positions: torch.Tensor | None = None) -> list[GroupSampleResult]:
        """Samples the next token of every sequence of every group and returns the results
        (``sample``, then ``assemble``)."""
        return self.sample(logits, groups, default_generator, positions=positions).assemble()

    def sample(self, logits: torch.Tensor, groups: list[SamplingGroup],
               default_generator: torch.Generator | None = None,
               decode_rows: DecodeRows | None = None,
               positions: torch.Tensor | None = None) -> DeviceSamples:
        """Queues the sampling of the next token of every sequence of every group on the
        logits' device, without waiting for it.

        ``logits`` is ``[num_rows, vocab]`` in any float dtype (the work is done in float32);
        each group names its rows. ``decode_rows``, when given, are the first
        ``decode_rows.num_rows`` rows (a step's columnar decodes, sampled without a group each).
        ``positions`` (long, on the logits' device; needed when a sample has a seed key) holds
        the sequence position of the token each row draws. ``default_generator`` draws for the
        samples without a seed key (None: torch's global generator of the logits' device).
        """
        if self.vocab_size is not None:
            logits = logits[:, : self.vocab_size]
        raw = self.logprobs_mode.startswith("raw")
        as_logits = self.logprobs_mode.endswith("logits")
        decode_tokens = decode_chosen = None
        if decode_rows is not None:
            decode_tokens, decode_chosen = _sample_decode_rows(
                logits[:decode_rows.num_rows], decode_rows, default_generator, positions,
                self.logprobs_mode)
            if not groups:
                return DeviceSamples.of_decodes(decode_tokens, decode_chosen, logits.shape[1])
        params = _collect_row_params(groups)
        work = _gather_rows(logits, params.rows)
        reported: torch.Tensor | None = None
        if raw and (as_logits or _changes_logits(params)):
            reported = work.clone() if as_logits else torch.log_softmax(work, dim=-1)
        _apply_allowed_tokens(work, params.allowed)
        _apply_logit_bias(work, params.bias)
        _apply_penalties(work, params)
        _apply_banned_tokens(work, params.banned_ids)
        temperature = _float(params.temperature, work.device)
        work.div_(temperature.unsqueeze(1))
        logprobs = torch.log_softmax(work, dim=-1)

        first_rows = _first_rows(groups)
        samples, token_chunks, beams, beam_rows, truncated = _choose_tokens(
            work, logprobs, groups, params, first_rows, default_generator, positions)
        if reported is None:
            reported = logprobs if raw else _processed(work, logprobs, truncated, as_logits)
        if beams and reported is not logprobs:
            # Beam searches report the scores they rank by, whatever the mode.
            index = _long(_beam_group_rows(groups, first_rows), work.device)
            reported = reported.index_copy(0, index, logprobs.index_select(0, index))
        tokens = (torch.cat(token_chunks) if token_chunks
                  else torch.empty(0, dtype=torch.long, device=work.device))
        sample_rows = torch.cat([_long([s.row for s in samples], work.device), *beam_rows])
        chosen = reported[sample_rows, tokens]
        chosen_rank = (_ranks(reported.index_select(0, sample_rows), chosen)
                       if any(g.sampling_params.logprobs is not None for g in groups) else None)
        top_values, top_ids = _top_logprobs(reported, max(params.num_top, default=0))
        prompt = [_prompt_logprobs(logits, g, group, as_logits)
                  for g, group in enumerate(groups)
                  if group.prompt_logit_rows and group.sampling_params.prompt_logprobs is not None]
        return DeviceSamples(groups=groups, first_rows=first_rows, vocab=work.shape[1],
                             samples=samples, beams=beams, tokens=tokens, chosen=chosen,
                             num_top=params.num_top, top_values=top_values, top_ids=top_ids,
                             prompt=prompt, decode_tokens=decode_tokens,
                             decode_chosen=decode_chosen, chosen_rank=chosen_rank)


def _beam_group_rows(groups: list[SamplingGroup], first_rows: list[int]) -> list[int]:
    """The gathered rows of the beam search groups."""
    return [first_rows[g] + j for g, group in enumerate(groups)
            if group.sampling_params.use_beam_search for j in range(len(group.logit_rows))]


def _changes_logits(params: _RowParams) -> bool:
    """Whether steps 1-2 (module docstring) change any row's logprobs: otherwise the raw
    logprobs are the processed ones and need no second ``log_softmax``."""
    return (any(t != 1.0 for t in params.temperature)
            or any(r != 1.0 for r in params.repetition)
            or any(params.frequency) or any(params.presence)
            or any(params.bias) or any(a is not None for a in params.allowed)
            or any(params.banned_ids))


def _processed(work: torch.Tensor, logprobs: torch.Tensor,
               truncated: tuple[torch.Tensor, torch.Tensor] | None,
               as_logits: bool) -> torch.Tensor:
    """The processed values to report: ``work`` (logits after steps 1-2) or its ``logprobs``,
    with the random rows replaced by their truncated logits (``truncated``: their row index
    and those rows) where there are any."""
    if truncated is None:
        return work if as_logits else logprobs
    index, rows = truncated
    values = work.index_copy(0, index, rows)
    return values if as_logits else torch.log_softmax(values, dim=-1)


def _sample_decode_rows(logits: torch.Tensor, rows: DecodeRows,
                        default_generator: torch.Generator | None,
                        positions: torch.Tensor | None,
                        logprobs_mode: str = LOGPROBS_MODES[0],
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """The token and its reported value (``logprobs_mode``) for each of the columnar decode rows
    ``logits``: argmax for greedy rows, the exponential race after min-p, top-k and top-p for
    the others (as for a group's rows, with the same noise). ``positions``: see
    ``Sampler.sample``."""
    as_logits = logprobs_mode.endswith("logits")
    if rows.temperature is None:  # every row greedy: temperature 1, nothing to copy or divide
        work = logits.to(torch.float32)
        tokens = work.argmax(dim=-1)
        return tokens, _value_at(work, tokens, as_logits)
    work = logits.to(torch.float32, copy=True)
    raw = None  # the reported raw values, taken before the temperature
    if logprobs_mode.startswith("raw"):
        raw = logits if as_logits else torch.log_softmax(work, dim=-1)
    work.div_(rows.temperature)
    tokens = work.argmax(dim=-1)
    assert rows.random_rows is not None
    num = len(rows.top_k)
    params = _RowParams(top_k=rows.top_k, top_p=rows.top_p, min_p=rows.min_p)
    truncated = _truncate(work.index_select(0, rows.random_rows), params, list(range(num)))
    seeded_positions = None
    if rows.seed_keys is not None:
        assert positions is not None and rows.seeded_rows is not None, \
            "seeded decode rows need the positions of their tokens"
        seeded_positions = positions.index_select(0, rows.seeded_rows)
    noise = _exponential_noise(num, work.shape[1], rows.seeded, rows.seed_keys,
                               seeded_positions, default_generator, work.device)
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    tokens.index_copy_(0, rows.random_rows, (truncated - noise.log()).argmax(dim=-1))
    if raw is not None:
        return tokens, raw.gather(1, tokens.unsqueeze(1)).squeeze(1).float()
    work.index_copy_(0, rows.random_rows, truncated)
    return tokens, _value_at(work, tokens, as_logits)


def _value_at(values: torch.Tensor, tokens: torch.Tensor, as_logits: bool) -> torch.Tensor:
    """Each row's logit (``as_logits``) or logprob of its token in ``tokens`` (by
    ``log_softmax``, as the groups' rows, so that both paths give the same bits)."""
    if not as_logits:
        values = torch.log_softmax(values, dim=-1)
    return values.gather(1, tokens.unsqueeze(1)).squeeze(1)


def _num_logprobs(k: int | None) -> int:
    """The number of top tokens to report besides the chosen one."""
    return 0 if k is None else k


def _collect_row_params(groups: list[SamplingGroup]) -> _RowParams:
    """Gathers the per-row parameters of all groups, rows in group order."""
    params = _RowParams()
    for g, group in enumerate(groups):
        sp = group.sampling_params
        random = not sp.is_greedy and not sp.use_beam_search
        num_top = _num_logprobs(sp.logprobs)
        for j, row in enumerate(group.logit_rows):
            outputs = group.output_token_ids[j] if j < len(group.output_token_ids) else []
            banned = _banned_ids(group, len(outputs)) if sp.min_tokens else []
            if sp.bad_words_token_ids:
                banned = banned + _bad_word_bans(list(outputs), sp.bad_words_token_ids)
            params.rows.append(row)
            params.group.append(g)
            params.temperature.append(sp.temperature if random else 1.0)
            params.top_k.append(sp.top_k if random else -1)
            params.top_p.append(sp.top_p if random else 1.0)
            params.min_p.append(sp.min_p if random else 0.0)
            params.repetition.append(sp.repetition_penalty)
            params.frequency.append(sp.frequency_penalty)
            params.presence.append(sp.presence_penalty)
            params.prompt_ids.append(group.prompt_token_ids)
            params.output_ids.append(outputs)
            params.banned_ids.append(banned)
            params.bias.append(sp.logit_bias)
            params.allowed.append(sp.allowed_token_ids)
            params.num_top.append(num_top)
    return params


def _banned_ids(group: SamplingGroup, num_outputs: int) -> list[int]:
    """Token ids masked while a sequence is shorter than ``min_tokens`` (EOS even with
    ``ignore_eos``)."""
    sp = group.sampling_params
    if num_outputs >= sp.min_tokens:
        return []
    banned = list(sp.stop_token_ids or [])
    banned.extend(group.eos_token_ids)
    return banned


def _bad_word_bans(output_ids: list[int], sequences: list[list[int]]) -> list[int]:
    """The last token of each bad word sequence whose other tokens end ``output_ids``."""
    bans = []
    for seq in sequences:
        head = seq[:-1]
        if not head or (len(output_ids) >= len(head) and output_ids[-len(head):] == head):
            bans.append(seq[-1])
    return bans


def _gather_rows(logits: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """A float32 copy of the given rows of ``logits``."""
    index = _long(rows, logits.device)
    return logits.index_select(0, index).to(torch.float32)


def _apply_penalties(work: torch.Tensor, params: _RowParams) -> None:
    """Applies repetition, then frequency and presence penalties to ``work`` in place."""
    rep = [i for i, p in enumerate(params.repetition) if p != 1.0]
    if rep:
        _apply_repetition_penalty(work, rep, params)
    freq = [i for i, (f, p) in enumerate(zip(params.frequency, params.presence))
            if f != 0.0 or p != 0.0]
    if freq:
        _apply_frequency_presence(work, freq, params)


def _apply_repetition_penalty(work: torch.Tensor, rows: list[int], params: _RowParams) -> None:
    """HF repetition penalty on ``rows``: every token seen in the prompt or the output has its
    logit divided by the penalty when positive, multiplied by it otherwise."""
    history = [list(params.prompt_ids[i]) + list(params.output_ids[i]) for i in rows]
    seen = _token_counts(work, rows, history) > 0
    index = _long(rows, work.device)
    penalty = _float([params.repetition[i] for i in rows], work.device).unsqueeze(1)
    sub = work.index_select(0, index)
    penalized = torch.where(sub > 0, sub / penalty, sub * penalty)
    work.index_copy_(0, index, torch.where(seen, penalized, sub))


def _apply_frequency_presence(work: torch.Tensor, rows: list[int], params: _RowParams) -> None:
    """OpenAI penalties on ``rows``: ``logit -= frequency * count + presence * (count > 0)`` with
    counts over the output tokens only."""
    counts = _token_counts(work, rows, [params.output_ids[i] for i in rows])
    index = _long(rows, work.device)
    frequency = _float([params.frequency[i] for i in rows], work.device).unsqueeze(1)
    presence = _float([params.presence[i] for i in rows], work.device).unsqueeze(1)
    penalty = frequency * counts + presence * (counts > 0).to(torch.float32)
    work.index_copy_(0, index, work.index_select(0, index) - penalty)


def _token_counts(work: torch.Tensor, rows: list[int], tokens: list[list[int]]) -> torch.Tensor:
    """``[len(rows), vocab]`` float32 counts of each token id in ``tokens[i]`` (ids outside the
    vocabulary are ignored)."""
    counts = torch.zeros(len(rows), work.shape[1], dtype=torch.float32, device=work.device)
    r, t = _flat_token_index(tokens, work.shape[1], work.device)
    if t.numel():
        counts.index_put_((r, t), torch.ones_like(t, dtype=torch.float32), accumulate=True)
    return counts


def _flat_token_index(tokens: list[list[int]], vocab: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (row, token id) pairs of ``tokens`` as two long tensors, ids outside
    ``[0, vocab)`` dropped."""
    lengths = torch.tensor([len(ids) for ids in tokens], dtype=torch.long)
    if int(lengths.sum()) == 0:
        empty = torch.empty(0, dtype=torch.long, device=device)
        return empty, empty
    # array.fromlist reads Python lists about five times faster than torch.tensor does.
    buffer = array.array("q")
    for ids in tokens:
        buffer.fromlist(ids if isinstance(ids, list) else list(ids))
    flat = torch.frombuffer(buffer, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(len(tokens)), lengths)
    keep = (flat >= 0) & (flat < vocab)
    return _to(rows[keep], device), _to(flat[keep], device)


def _apply_allowed_tokens(work: torch.Tensor, allowed: list[list[int] | None]) -> None:
    """Sets ``work[i, t] = -inf`` for every ``t`` not in ``allowed[i]`` (rows with None keep
    every token)."""
    rows = [i for i, ids in enumerate(allowed) if ids is not None]
    if not rows:
        return
    keep = torch.zeros(len(rows), work.shape[1], dtype=torch.bool, device=work.device)
    r, t = _flat_token_index([allowed[i] or [] for i in rows], work.shape[1], work.device)
    keep[r, t] = True
    index = _long(rows, work.device)
    work.index_copy_(0, index, work.index_select(0, index).masked_fill_(~keep, float("-inf")))


def _apply_logit_bias(work: torch.Tensor, biases: list[dict[int, float] | None]) -> None:
    """Adds ``biases[i][t]`` to ``work[i, t]`` (ids outside the vocabulary ignored)."""
    if not any(biases):
        return
    rows, tokens, values = [], [], []
    vocab = work.shape[1]
    for i, bias in enumerate(biases):
        for token, value in (bias or {}).items():
            if token < vocab:
                rows.append(i)
                tokens.append(token)
                values.append(value)
    if rows:
        work.index_put_((_long(rows, work.device), _long(tokens, work.device)),
                        _float(values, work.device), accumulate=True)


def _apply_banned_tokens(work: torch.Tensor, banned: list[list[int]]) -> None:
    """Sets ``work[i, t] = -inf`` for every ``t`` in ``banned[i]`` (``min_tokens``,
    ``bad_words``)."""
    if any(banned):
        r, t = _flat_token_index(banned, work.shape[1], work.device)
        work[r, t] = float("-inf")


def _choose_tokens(work: torch.Tensor, logprobs: torch.Tensor, groups: list[SamplingGroup],
                   params: _RowParams, first_row: list[int],
                   default_generator: torch.Generator | None,
                   positions: torch.Tensor | None,
                   ) -> tuple[list[SampleRow], list[torch.Tensor], list[BeamBucket],
                              list[torch.Tensor], tuple[torch.Tensor, torch.Tensor] | None]:
    """Picks the tokens of all groups: greedy, then random, then beam search samples.

    Returns the greedy and random samples, the token ids of all samples (in chunks, greedy and
    random first, then the beam candidates bucket by bucket), the beam buckets, the gathered
    row of each beam candidate (one tensor per bucket) and the random samples' truncated rows
    (their index among the gathered rows and the rows; None without random samples).
    """
    greedy: list[SampleRow] = []
    random: list[SampleRow] = []
    random_keys: list[int | None] = []
    beam_buckets: dict[tuple[int, int], list[int]] = {}
    for g, group in enumerate(groups):
        sp = group.sampling_params
        if not group.logit_rows:
            continue
        if sp.use_beam_search:
            shape = (len(group.logit_rows), 2 * (sp.best_of or 1))
            beam_buckets.setdefault(shape, []).append(g)
        elif sp.is_greedy:
            greedy.extend(_decode_samples(group, g, first_row[g]))
        else:
            new = (_prompt_samples(group, g, first_row[g]) if group.is_prompt
                   else _decode_samples(group, g, first_row[g]))
            random.extend(new)
            random_keys.extend(_key_at(group, j) for j in range(len(new)))
    chunks: list[torch.Tensor] = []
    truncated = None
    if greedy:
        rows = _long([s.row for s in greedy], work.device)
        chunks.append(work.index_select(0, rows).argmax(dim=-1))
    if random:
        drawn, truncated = _sample_random(work, params, random, random_keys, default_generator,
                                          positions)
        chunks.append(drawn)
    beams: list[BeamBucket] = []
    beam_rows: list[torch.Tensor] = []
    for bucket in beam_buckets.values():
        found, tokens, rows = _beam_candidates(logprobs, groups, bucket, first_row)
        beams.append(found)
        chunks.append(tokens)
        beam_rows.append(rows)
    return greedy + random, chunks, beams, beam_rows, truncated


def _first_rows(groups: list[SamplingGroup]) -> list[int]:
    """The index of each group's first row among the gathered rows."""
    starts, total = [], 0
    for group in groups:
        starts.append(total)
        total += len(group.logit_rows)
    return starts


def _key_at(group: SamplingGroup, j: int) -> int | None:
    """The seed key of the group's j-th sample (None when not given)."""
    return group.seed_keys[j] if j < len(group.seed_keys) else None


def _decode_samples(group: SamplingGroup, g: int, first: int) -> list[SampleRow]:
    """One sample per row, extending the row's own sequence."""
    return [SampleRow(g, first + j, seq_id, cumulative_logprob_of(group, j))
            for j, seq_id in enumerate(group.seq_ids)]


def _prompt_samples(group: SamplingGroup, g: int, first: int) -> list[SampleRow]:
    """``best_of`` samples from the prompt's single row, all extending the prompt sequence."""
    best_of = group.sampling_params.best_of or 1
    return [SampleRow(g, first, group.seq_ids[0], cumulative_logprob_of(group, 0))
            for _ in range(best_of)]


def _sample_random(work: torch.Tensor, params: _RowParams, samples: list[SampleRow],
                   keys: list[int | None], default_generator: torch.Generator | None,
                   positions: torch.Tensor | None
                   ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Truncates the rows of the random samples (min-p, top-k, top-p) and draws one token per
    sample by the exponential race ``argmax(logit - log(E))``, ``E ~ Exp(1)`` drawn per sample
    (hashed from ``keys[i]`` and the token's position when that is not None). Returns the
    tokens and the truncated rows (their index among the gathered rows, and the rows)."""
    rows = sorted({s.row for s in samples})
    position = {r: i for i, r in enumerate(rows)}
    row_index = _long(rows, work.device)
    truncated = _truncate(work.index_select(0, row_index), params, rows)
    source = _long([position[s.row] for s in samples], work.device)
    seeded = [i for i, key in enumerate(keys) if key is not None]
    seed_keys = seed_positions = None
    if seeded:
        if positions is None:
            raise ValueError("seeded samples need the positions of their tokens")
        seed_keys = _long([keys[i] for i in seeded], work.device)
        logit_rows = _long([params.rows[samples[i].row] for i in seeded], positions.device)
        seed_positions = positions.index_select(0, logit_rows)
    noise = _exponential_noise(len(samples), work.shape[1], seeded, seed_keys, seed_positions,
                               default_generator, work.device)
    noise.clamp_(min=torch.finfo(torch.float32).tiny)
    return (truncated.index_select(0, source) - noise.log()).argmax(dim=-1), (row_index, truncated)


def _long(values: list[int], device: torch.device) -> torch.Tensor:
    """A long tensor on ``device``."""
    return _to(torch.tensor(values, dtype=torch.long), device)


def _float(values: list[float], device: torch.device) -> torch.Tensor:
    """A float32 tensor on ``device``."""
    return _to(torch.tensor(values, dtype=torch.float32), device)


def _to(cpu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copies a CPU tensor to ``device`` without waiting for the device's queued work (an
    asynchronous copy from pageable memory stages the data before it returns)."""
    return cpu.to(device, non_blocking=True)


def _truncate(logits: torch.Tensor, params: _RowParams, rows: list[int]) -> torch.Tensor:
    """Applies min-p, then top-k and top-p to what min-p left (vLLM's order; each only on the
    rows that set it) to temperature-scaled ``logits`` (row i is gathered row ``rows[i]``);
    dropped tokens get -inf."""
    top_k = [params.top_k[r] for r in rows]
    top_p = [params.top_p[r] for r in rows]
    min_p = [params.min_p[r] for r in rows]
    vocab = logits.shape[1]
    min_p_rows = [i for i in range(len(rows)) if min_p[i] > 0.0]
    if min_p_rows:
        index = _long(min_p_rows, logits.device)
        m = [min_p[i] for i in min_p_rows]
        logits.index_copy_(0, index, _min_p(logits.index_select(0, index), m))
    sort_rows = [i for i in range(len(rows)) if top_k[i] > 0 or top_p[i] < 1.0]
    if sort_rows:
        index = _long(sort_rows, logits.device)
        k = [min(top_k[i], vocab) if top_k[i] > 0 else vocab for i in sort_rows]
        p = [top_p[i] for i in sort_rows]
        logits.index_copy_(0, index, _top_k_top_p(logits.index_select(0, index), k, p))
    return logits


def _top_k_top_p(logits: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Keeps, per row, the tokens whose logit is at least the k-th largest (ties at the k-th
    value are kept), then the smallest prefix of those, by descending probability, whose mass
    reaches ``top_p`` (the top token always stays). The rest get -inf."""
    device = logits.device
    values, order = logits.sort(dim=-1, descending=True, stable=True)
    k = _long(top_k, device).unsqueeze(1)
    kth = values.gather(1, k - 1)
    values = values.masked_fill(values < kth, float("-inf"))
    probs = values.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    p = _float(top_p, device).unsqueeze(1)
    cut = mass_before >= p
    cut[:, 0] = False
    values = values.masked_fill(cut, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, values)


def _min_p(logits: torch.Tensor, min_p: list[float]) -> torch.Tensor:
    """Drops (-inf) the tokens whose probability is below ``min_p`` times the row's largest."""
    probs = logits.softmax(dim=-1)
    m = _float(min_p, logits.device).unsqueeze(1)
    threshold = m * probs.max(dim=-1, keepdim=True).values
    return logits.masked_fill(probs < threshold, float("-inf"))


def _exponential_noise(num: int, vocab: int, seeded: list[int],
                       seed_keys: torch.Tensor | None, seed_positions: torch.Tensor | None,
                       default_generator: torch.Generator | None,
                       device: torch.device) -> torch.Tensor:
    """``[num, vocab]`` Exp(1) noise: the rows ``seeded`` from ``hashed_exponential(seed_keys,
    seed_positions)`` (one key and position each, on ``device``), the others from
    ``default_generator`` in one draw."""
    if seeded:
        assert seed_keys is not None and seed_positions is not None
        hashed = hashed_exponential(seed_keys, seed_positions, vocab)
        if len(seeded) == num:
            return hashed
    noise = torch.empty(num, vocab, dtype=torch.float32, device=device)
    device = noise.device  # with its index, to compare with the generator's device
    if not seeded and (default_generator is None or _on(default_generator, device)):
        return noise.exponential_(generator=default_generator)
    taken = set(seeded)
    shared = [i for i in range(num) if i not in taken]
    noise[_long(shared, device)] = _draw_exponential((len(shared), vocab), default_generator,
                                                     device)
    if seeded:
        noise[_long(seeded, device)] = hashed
    return noise


def _on(generator: torch.Generator, device: torch.device) -> bool:
    """True when ``generator`` draws on ``device`` (a CUDA generator made with plain "cuda" is on
    the current CUDA device)."""
    where = generator.device
    if where.type != device.type:
        return False
    if where.index is None and where.type == "cuda":
        return device.index == torch.cuda.current_device()
    return where.index is None or where.index == device.index


def _draw_exponential(shape: tuple[int, ...], generator: torch.Generator | None,
                      device: torch.device) -> torch.Tensor:
    """Exp(1) noise of ``shape`` drawn on the generator's device, returned on ``device``."""
    where = device if generator is None else generator.device
    return _to(torch.empty(shape, dtype=torch.float32, device=where).exponential_(
        generator=generator), device)


def _beam_candidates(logprobs: torch.Tensor, groups: list[SamplingGroup], bucket: list[int],
                     first_row: list[int]) -> tuple[BeamBucket, torch.Tensor, torch.Tensor]:
    """The ``2 * best_of`` best (beam, token) pairs of each beam search group in ``bucket`` (groups
    with the same number of beams and width), best first, with their token ids and gathered
    rows.

    The score of a pair is the beam's cumulative logprob plus the token's logprob; the ranking is
    ``torch.topk`` over the beam-major ``[groups, num_beams * vocab]`` scores, as in HF
    transformers. At the prompt step the only beam is the prompt.
    """
    num_beams = len(groups[bucket[0]].logit_rows)
    width = 2 * (groups[bucket[0]].sampling_params.best_of or 1)
    vocab = logprobs.shape[1]
    rows = [first_row[g] + b for g in bucket for b in range(num_beams)]
    cumulative = _float([cumulative_logprob_of(groups[g], b)
                         for g in bucket for b in range(num_beams)], logprobs.device)
    scores = logprobs.index_select(0, _long(rows, logprobs.device)) + cumulative.unsqueeze(1)
    flat = torch.topk(scores.view(len(bucket), num_beams * vocab),
                      min(width, num_beams * vocab), dim=-1).indices
    starts = _long([first_row[g] for g in bucket], logprobs.device).unsqueeze(1)
    return (BeamBucket(bucket, flat), (flat % vocab).reshape(-1),
            (starts + flat // vocab).reshape(-1))


def _top_logprobs(logprobs: torch.Tensor, k: int
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The top ``k`` logprobs of every row and their token ids (None when k is 0)."""
    if k <= 0:
        return None, None
    values, ids = torch.topk(logprobs, min(k, logprobs.shape[1]), dim=-1)
    return values, ids


def _ranks(logprobs: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Each row's rank of ``values[i]`` in ``logprobs[i]``: 1 + the number of larger ones."""
    return (logprobs > values.unsqueeze(1)).sum(dim=1) + 1


def _prompt_logprobs(logits: torch.Tensor, g: int, group: SamplingGroup, as_logits: bool = False
                     ) -> PromptLogprobsOnDevice:
    """For each prompt logit row (prompt position p = ``prompt_logprobs_start`` + i), the logprob
    of prompt token p + 1 and the top ``prompt_logprobs`` tokens, from ``log_softmax`` of the raw
    logits (no penalties, no temperature; the raw logits themselves with ``as_logits``),
    computed ``_PROMPT_LOGPROBS_CHUNK`` rows at a time."""
    k = group.sampling_params.prompt_logprobs or 0
    rows = group.prompt_logit_rows
    first = group.prompt_logprobs_start + 1
    targets = group.prompt_token_ids[first: first + len(rows)]
    chosen, ranks, values, ids = [], [], [], []
    for start in range(0, len(targets), _PROMPT_LOGPROBS_CHUNK):
        chunk_rows = _long(rows[start: start + _PROMPT_LOGPROBS_CHUNK], logits.device)
        chunk_targets = targets[start: start + _PROMPT_LOGPROBS_CHUNK]
        lp = logits.index_select(0, chunk_rows).to(torch.float32)
        if not as_logits:
            lp = torch.log_softmax(lp, dim=-1)
        chosen.append(lp.gather(1, _long(chunk_targets, logits.device).unsqueeze(1)).squeeze(1))
        ranks.append(_ranks(lp, chosen[-1]))
        top_values, top_ids = _top_logprobs(lp, k)
        if top_values is not None and top_ids is not None:
            values.append(top_values)
            ids.append(top_ids)
    return PromptLogprobsOnDevice(
        group=g, targets=targets, k=k,
        chosen=torch.cat(chosen) if chosen else torch.empty(0, device=logits.device),
        rank=(torch.cat(ranks) if ranks
              else torch.empty(0, dtype=torch.long, device=logits.device)),
        top_values=torch.cat(values) if values else None,
        top_ids=torch.cat(ids) if ids else None)
