"""ModelRunner: turns a list of SeqWork into one forward pass over the paged KV pool, then samples.

It owns no scheduling state. The weights and the KV pool are given to it (worker/model_setup.py builds them), so
two runners in two processes can share one copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch

from rapid.attention.metadata import AttentionMetadata
from rapid.model.llama import LlamaModel
from rapid.protocol.worker import SampledToken, SeqWork
from rapid.worker.device_timer import DeviceTimer, Span
from rapid.worker.sampler import PendingSample, SamplingBatch, sample_async
from rapid.worker.sampler_ops import logprob_entries
from rapid.worker.transfer import to_device

MAX_PARTIAL_PROMPT_LOGPROBS = 256  # requests whose chunked prompt logprobs are being gathered (bounds a leak on abort)

logger = logging.getLogger(__name__)


@dataclass
class Launched:
    """A forward pass and its sampling, enqueued on the device and not yet read back (see ModelRunner.launch)."""

    sampling: list[SeqWork]  # the rows that sample, in order
    sample: PendingSample | None  # None when no row samples
    grammar_rows: bool  # structured-output matchers advance when it is collected
    span: Span | None = None  # its device-time events (rapid.worker.device_timer)
    eager: bool = False  # it ran outside the process's CUDA graphs (captured ones, none of which fits the batch)


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_pool: torch.Tensor, block_size: int, seed: int = 0,
                 graph_runners=(), eos_token_ids: tuple[int, ...] = ()):
        self.model = model
        self.kv_pool = kv_pool  # [L, 2, NB, BS, KVH, D]
        self.block_size = block_size
        self.device = kv_pool.device
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.graph_runners = list(graph_runners)  # CUDA-graph runners (rapid.compile), tried in order
        self.last_eager = False  # the latest forward pass ran outside the graphs although some were captured
        self.eos_token_ids = eos_token_ids  # masked while a request is below min_tokens
        # params.prompt_logprobs: request id -> (next prompt position, {token: logprob} per position, ranks),
        # gathered chunk by chunk in this process and sent with the first sampled token
        self.prompt_logprobs: dict[str, tuple[int, list[dict[int, float]], list[int]]] = {}
        self.grammars = None  # structured outputs: the process's rapid.worker.grammar.GrammarBook, set by its worker
        self.timer = DeviceTimer(self.device)

    def build_inputs(self, work: list[SeqWork]) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flatten the batch: input_ids [T], positions [T], metadata, and the rows that produce logits."""
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        starts = [0]
        seq_lens: list[int] = []
        logit_rows: list[int] = []
        num_decodes = 0
        for w in work:
            n = len(w.token_ids)
            if n == 1 and len(starts) - 1 == num_decodes:
                num_decodes += 1
            input_ids.extend(w.token_ids)
            pos = range(w.start_pos, w.start_pos + n)
            positions.extend(pos)
            slots.extend(w.block_ids[p // bs] * bs + p % bs for p in pos)
            starts.append(starts[-1] + n)
            seq_lens.append(w.start_pos + n)
            if w.sample:
                logit_rows.append(starts[-1] - 1)
        tables = np.zeros((len(work), max(len(w.block_ids) for w in work)), dtype=np.int32)  # [S, max blocks]
        for row, w in zip(tables, work):
            row[: len(w.block_ids)] = w.block_ids  # a row at a time: 3.5x faster than torch.tensor of nested lists
        dev = self.device
        meta = AttentionMetadata(
            slot_mapping=to_device(slots, torch.int64, dev),
            query_start_loc=to_device(starts, torch.int32, dev),
            seq_lens=to_device(seq_lens, torch.int32, dev),
            block_tables=to_device(torch.from_numpy(tables), torch.int32, dev),
            num_decodes=num_decodes,
            max_seq_len=max(seq_lens),
            query_start_loc_host=starts,
            seq_lens_host=seq_lens,
        )
        ids = to_device(input_ids, torch.int64, dev)
        pos_t = to_device(positions, torch.int64, dev)
        return ids, pos_t, meta, logit_rows

    @torch.inference_mode()
    def forward_logits(self, work: list[SeqWork], inputs_from: tuple[torch.Tensor, list[int], list[int]] | None = None
                       ) -> torch.Tensor:
        """Run the forward pass; return float32 logits [S_sample, vocab] for the sampling rows (and gather
        the prompt logprobs of the requests that ask for them).

        inputs_from = (tokens [B'] on the device, rows, source rows): those rows' input token is
        tokens[source row], a previous step's sample that the host has not read back yet."""
        ids, positions, meta, rows = self.build_inputs(work)
        if inputs_from is not None:
            tokens, dst, src = inputs_from
            ids[to_device(dst, torch.int64, self.device)] = tokens[to_device(src, torch.int64, self.device)]
        graphs = next((g for g in self.graph_runners if g.can_run(meta, ids.shape[0])), None)
        self.last_eager = graphs is None and bool(self.graph_runners)
        if graphs is not None:
            hidden = graphs.run(ids, positions, meta)
        else:
            hidden = self.model(ids, positions, self.kv_pool, meta)
        self._gather_prompt_logprobs(work, hidden, meta.query_start_loc_host)
        logits = self.model.compute_logits(hidden[to_device(rows, torch.int64, self.device)]) if rows else None
        return logits

    def _gather_prompt_logprobs(self, work: list[SeqWork], hidden: torch.Tensor, starts: list[int]) -> None:
        """Logprobs of the prompt tokens this chunk predicts (position p predicts prompt token p + 1)."""
        for i, w in enumerate(work):
            if w.params is None or w.params.prompt_logprobs is None:
                continue
            last = len(w.prompt_token_ids) - 1  # positions 0 .. last - 1 predict prompt tokens 1 .. last
            n = min(w.start_pos + len(w.token_ids), last) - w.start_pos
            if n <= 0:
                continue
            rid = w.request_id
            if w.start_pos == 0 or rid not in self.prompt_logprobs:
                self.prompt_logprobs.pop(rid, None)
                while len(self.prompt_logprobs) >= MAX_PARTIAL_PROMPT_LOGPROBS:
                    self.prompt_logprobs.pop(next(iter(self.prompt_logprobs)))
                self.prompt_logprobs[rid] = (0, [], [])
            pos, entries, ranks = self.prompt_logprobs[rid]
            if pos != w.start_pos:  # a chunk ran elsewhere: this process cannot give the full list
                continue
            logits = self.model.compute_logits(hidden[starts[i] : starts[i] + n]).float()  # [n, V]
            targets = torch.tensor(w.prompt_token_ids[w.start_pos + 1 : w.start_pos + 1 + n], device=self.device)
            e, r = logprob_entries(torch.log_softmax(logits, dim=-1), targets, [w.params.prompt_logprobs] * n)
            self.prompt_logprobs[rid] = (pos + n, entries + e, ranks + r)

    def _take_prompt_logprobs(self, w: SeqWork) -> tuple[list[dict[int, float]] | None, list[int] | None]:
        if w.params.prompt_logprobs is None:
            return None, None
        pos, entries, ranks = self.prompt_logprobs.pop(w.request_id, (0, [], []))
        if pos != len(w.prompt_token_ids) - 1:
            return None, None
        return entries, ranks

    @torch.inference_mode()
    def launch(self, work: list[SeqWork], inputs_from: tuple[Launched, list[int], list[int]] | None = None
               ) -> Launched:
        """Enqueue the forward pass and the sampling of `work` without waiting for the device.

        inputs_from = (a previous, uncollected step, rows of `work`, that step's sampling rows): those rows'
        input token is what the previous step samples (the decode executor runs one step ahead).
        """
        span = self.timer.begin()
        source = None
        if inputs_from is not None:
            prev, dst, src = inputs_from
            source = (prev.sample.tokens, dst, src)
        logits = self.forward_logits(work, source)
        sampling = [w for w in work if w.sample]
        if not sampling:
            self.timer.finish(span)
            return Launched([], None, False, span, self.last_eager)
        grammars = self.grammars
        bitmask = grammars.bitmask(sampling, self.vocab_size, self.device) if grammars is not None else None
        batch = SamplingBatch.build(
            params=[w.params for w in sampling],
            output_token_ids=[w.output_token_ids for w in sampling],
            prompt_token_ids=[w.prompt_token_ids for w in sampling],
            step_indices=[w.step_index for w in sampling],
            vocab_size=self.vocab_size,
            device=self.device,
            eos_token_ids=self.eos_token_ids,
            grammar_bitmask=bitmask,
        )
        launched = Launched(sampling, sample_async(logits, batch, self.generator), bitmask is not None, span,
                            self.last_eager)
        self.timer.finish(span)
        return launched

    def device_time(self, launched: Launched) -> tuple[float, float] | None:
        """(busy_s, idle_s) of a collected step on the device. A step that sampled was waited for up to its
        samples' copy, which its end event directly follows; one that sampled nothing was not waited for, and
        is not now: None while it is still running."""
        span = launched.span
        if span is None or span.end is None or (launched.sample is None and not span.end.query()):
            return None
        return self.timer.read(span)

    def wait(self, launched: Launched) -> None:
        """Wait until a launched step's device work (its KV writes included) is complete; not for anything enqueued
        after it, as a stream synchronize would (the fallback, should a step have no end event)."""
        if launched.span is not None and launched.span.end is not None:
            launched.span.end.synchronize()
        elif self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def collect(self, launched: Launched) -> list[SampledToken]:
        """Wait for a launched step's samples (not for anything enqueued after it) and return them."""
        if launched.sample is None:
            return []
        out = launched.sample.result()
        sampling = launched.sampling
        if launched.grammar_rows:
            self.grammars.advance(sampling, out.token_ids)
        return [
            SampledToken(w.request_id, tok, lp, top, rank, *self._take_prompt_logprobs(w))
            for w, tok, lp, top, rank in zip(sampling, out.token_ids, out.sampled_logprob, out.logprobs, out.ranks)
        ]
