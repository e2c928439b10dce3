"""Per-step trace of an offline run (``cacheflow bench throughput --step-trace PATH``): where a
workload's time goes, step by step, next to each step's floor.

Every step the engine starts is recorded as it is launched: the preemptions made while it was
planned, its decode rows (sequences with one new token; a prompt's one-token chunk counts as
one, as it does for attention) and their context tokens, its prompt tokens (every other
scheduled token) and their attention work, and, on a GPU, a CUDA event recorded on the
launching stream. The event of step i+1 completes when the device has finished everything
enqueued before it, so the time between consecutive events is step i's share of the device
timeline (its kernels plus any wait for the host to enqueue the next step). Each step gets two
floors, from the copy bandwidth and the matmul rate measured in the same process:

- ``floor_s``, the larger of memory (the weights plus the decode rows' K/V read once) and
  compute (2 x parameters FLOPs per scheduled token plus the prompt tokens' attention FLOPs,
  4 x layers x heads x head size per (query, key) pair): the floor if the step's memory-bound
  and compute-bound work overlapped perfectly;
- ``serial_floor_s``, the same work with the decode rows' K/V read (attention) and the
  projections (the larger of reading the weights and their FLOPs) one after another, each at
  its own floor, plus the prompt attention FLOPs: the floor of kernels that run in sequence,
  as the engine's do. A mixed step's K/V read cannot hide under its GEMMs this way.

On the CPU the host clock between launches stands in for the events; the step composition of
a CPU run with the same scheduler settings is the GPU run's, so floors for another card follow
from the trace file alone (:func:`floors_from_trace`).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

#: Step kinds of the summary.
DECODE, MIXED, PROMPT = "decode", "mixed", "prompt"


@dataclass
class StepRecord:
    """One launched step; ``seconds`` and ``floor_s`` are filled in by :meth:`StepTrace.finish`."""

    decode_rows: int
    decode_context_tokens: int
    prompt_tokens: int
    prompt_attention_pairs: int
    host_time: float
    preemptions: int = 0  # requests the scheduler preempted while planning this step
    seconds: float = 0.0
    floor_s: float = 0.0
    serial_floor_s: float = 0.0

    @property
    def kind(self) -> str:
        """decode (decode rows only), prompt (prompt tokens only) or mixed."""
        if not self.prompt_tokens:
            return DECODE
        return MIXED if self.decode_rows else PROMPT


def plan_counts(plan: Any) -> tuple[int, int, int, int]:
    """(decode rows, their context tokens, prompt tokens, prompt (query, key) pairs) of a
    ``SchedulerOutput``: a sequence with one scheduled token is a decode row."""
    decodes = plan.decodes
    rows = len(decodes.seq_ids)
    context = sum(decodes.num_computed_tokens) + rows
    prompt_tokens = pairs = 0
    for request in plan.scheduled:
        for seq in request.seqs:
            new = len(seq.token_ids)  # the tokens this step computes
            if new == 1:
                rows += 1
                context += seq.num_computed_tokens + 1
            else:
                prompt_tokens += new
                # query j (0-based) of the chunk sees num_computed + j + 1 keys
                pairs += new * seq.num_computed_tokens + new * (new + 1) // 2
    return rows, context, prompt_tokens, pairs


class StepTrace:
    """Records every step an ``LLM``'s executor starts (see the module docstring)."""

    def __init__(self, llm: Any, cuda: bool) -> None:
        self._executor = llm.engine.executor
        self._scheduler = llm.engine.scheduler
        self._preemptions = self._scheduler.num_preemptions
        self._launch = self._executor.execute_model_async
        self._cuda = cuda
        self.records: list[StepRecord] = []
        self._events: list[Any] = []
        self._end_event: Any = None
        self._end_time = 0.0
        self._executor.execute_model_async = self._traced

    def _traced(self, plan: Any) -> Any:
        if self._cuda:
            import torch

            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self._events.append(event)
        rows, context, prompt_tokens, pairs = plan_counts(plan)
        preemptions = self._scheduler.num_preemptions
        self.records.append(StepRecord(rows, context, prompt_tokens, pairs, time.perf_counter(),
                                       preemptions - self._preemptions))
        self._preemptions = preemptions
        return self._launch(plan)

    def stop(self) -> None:
        """Ends the trace at the end of the run (call right after the run's last
        synchronization): stops recording (the executor's own method again) and marks the end
        of the last step."""
        self._executor.execute_model_async = self._launch
        self._end_time = time.perf_counter()
        if self._cuda:
            import torch

            self._end_event = torch.cuda.Event(enable_timing=True)
            self._end_event.record()

    def finish(self, summary: dict[str, Any], bandwidth: float, flops: float) -> None:
        """Fills in each step's time and floor (after :meth:`stop`)."""
        if self._cuda:
            self._end_event.synchronize()
            marks = self._events + [self._end_event]
            times = [a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])]
        else:
            stamps = [r.host_time for r in self.records] + [self._end_time]
            times = [b - a for a, b in zip(stamps, stamps[1:])]
        for record, seconds in zip(self.records, times):
            record.seconds = seconds
            record.floor_s, record.serial_floor_s = step_floors(record, summary, bandwidth, flops)

    def by_kind(self) -> dict[str, dict[str, float]]:
        """Per step kind: steps, seconds, floor seconds, mean decode rows and prompt tokens."""
        return summarize_by_kind(self.records)

    def write(self, path: Path) -> None:
        """One JSON line per step (in launch order)."""
        with open(path, "w") as f:
            for record in self.records:
                f.write(json.dumps({**asdict(record), "kind": record.kind}) + "\n")


def step_floors(record: StepRecord, summary: dict[str, Any], bandwidth: float,
                flops: float) -> tuple[float, float]:
    """(overlapped floor, serial floor) of one step in seconds (module docstring), for a model
    ``summary`` (``bench_common.model_summary``) at ``bandwidth`` bytes/s and ``flops`` FLOP/s."""
    kv_read = record.decode_context_tokens * summary["kv_bytes_per_token"] / bandwidth
    weights_read = summary["parameter_bytes"] / bandwidth
    projections = 2 * summary["parameters"] * (record.decode_rows + record.prompt_tokens) / flops
    prompt_attention = (4 * summary["num_layers"] * summary["num_attention_heads"]
                        * summary["head_size"] * record.prompt_attention_pairs / flops)
    overlapped = max(weights_read + kv_read, projections + prompt_attention)
    serial = kv_read + max(weights_read, projections) + prompt_attention
    return overlapped, serial


def summarize_by_kind(records: list[StepRecord]) -> dict[str, dict[str, float]]:
    """Per step kind: steps, seconds, both floors' seconds, mean decode rows and prompt
    tokens."""
    table: dict[str, dict[str, float]] = {}
    for record in records:
        row = table.setdefault(record.kind, {"steps": 0, "seconds": 0.0, "floor_s": 0.0,
                                             "serial_floor_s": 0.0, "decode_rows": 0,
                                             "prompt_tokens": 0})
        row["steps"] += 1
        row["seconds"] += record.seconds
        row["floor_s"] += record.floor_s
        row["serial_floor_s"] += record.serial_floor_s
        row["decode_rows"] += record.decode_rows
        row["prompt_tokens"] += record.prompt_tokens
    for row in table.values():
        row["mean_decode_rows"] = row.pop("decode_rows") / row["steps"]
        row["mean_prompt_tokens"] = row.pop("prompt_tokens") / row["steps"]
    return table


def floors_from_trace(path: Path, summary: dict[str, Any], bandwidth: float,
                      flops: float) -> dict[str, dict[str, float]]:
    """The per-kind summary of a trace file with its floors recomputed for another model shape
    or card (``summary`` as :func:`step_floors` takes it); each step keeps its recorded
    seconds."""
    records = []
    for line in Path(path).read_text().splitlines():
        fields = json.loads(line)
        fields.pop("kind", None)
        record = StepRecord(**fields)
        record.floor_s, record.serial_floor_s = step_floors(record, summary, bandwidth, flops)
        records.append(record)
    return summarize_by_kind(records)


def format_trace(table: dict[str, dict[str, float]], path: Optional[Path]) -> str:
    """The per-kind summary as a plain-text table, with a total row."""
    lines = [f"{'steps':<8}{'count':>7}{'seconds':>10}{'floor s':>10}{'ratio':>7}"
             f"{'serial s':>10}{'ratio':>7}{'ms/step':>9}{'decode rows':>13}{'prompt tok':>12}"]
    rows = [(kind, table[kind]) for kind in (DECODE, MIXED, PROMPT) if kind in table]
    if len(rows) > 1:
        total = {key: sum(row[key] for _, row in rows)
                 for key in ("steps", "seconds", "floor_s", "serial_floor_s")}
        total["mean_decode_rows"] = sum(r["mean_decode_rows"] * r["steps"]
                                        for _, r in rows) / total["steps"]
        total["mean_prompt_tokens"] = sum(r["mean_prompt_tokens"] * r["steps"]
                                          for _, r in rows) / total["steps"]
        rows.append(("all", total))
    for kind, row in rows:
        ratio = row["seconds"] / row["floor_s"] if row["floor_s"] else float("nan")
        serial = row["seconds"] / row["serial_floor_s"] if row["serial_floor_s"] else float("nan")
        lines.append(f"{kind:<8}{row['steps']:>7}{row['seconds']:>10.2f}{row['floor_s']:>10.2f}"
                     f"{ratio:>7.2f}{row['serial_floor_s']:>10.2f}{serial:>7.2f}"
                     f"{1e3 * row['seconds'] / row['steps']:>9.2f}"
                     f"{row['mean_decode_rows']:>13.1f}{row['mean_prompt_tokens']:>12.1f}")
    if path is not None:
        lines.append(f"per-step trace: {path}")
    return "\n".join(lines)
