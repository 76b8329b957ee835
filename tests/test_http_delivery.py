"""How the HTTP server takes the engine's deltas: one event-loop wake-up per burst (LoopMailbox), and a stream that
fell behind sends the tokens queued meanwhile in one chunk (Job.deltas). The metrics see every token before that, on
the engine loop (EngineFrontend.observe_requests; tests/test_http_server.py counts them)."""

import asyncio
import threading

from rapid.entrypoints.openai.mailbox import LoopMailbox
from rapid.entrypoints.openai.serving import Job, merged, mergeable
from rapid.protocol.engine import RequestDelta


def test_mailbox_delivers_in_order_with_one_wakeup_per_burst():
    """Two threads post 2,000 items each while the event loop is busy (a blocking callback): every item arrives once,
    each thread's in its posting order, in a handful of loop turns instead of 4,000."""
    import time

    async def main():
        loop = asyncio.get_running_loop()
        box = LoopMailbox(loop)
        got, wakeups = [], []
        deliver = box._deliver

        def counting_deliver():
            wakeups.append(1)
            deliver()

        box._deliver = counting_deliver

        def producer(name):
            for i in range(2000):
                box.post(got.append, (name, i))

        threads = [threading.Thread(target=producer, args=(name,)) for name in "ab"]
        loop.call_soon(time.sleep, 0.5)  # the loop is busy while the threads post
        for t in threads:
            t.start()
        await asyncio.sleep(0)
        for t in threads:
            await asyncio.to_thread(t.join)
        await asyncio.sleep(0.05)
        return got, len(wakeups)

    got, wakeups = asyncio.run(main())
    for name in "ab":
        assert [i for n, i in got if n == name] == list(range(2000))
    # one loop turn per post would be 4,000; the bound leaves room for threads a loaded machine runs slowly
    assert len(got) == 4000 and wakeups <= 200, wakeups


def delta(ids, text, finished=False, logprobs=None, error=None):
    return RequestDelta("r", ids, text, new_logprobs=logprobs, finished=finished,
                        finish_reason="length" if finished else None, error=error, last_token_time=float(len(ids)))


def test_a_stream_behind_the_engine_merges_a_choices_queued_deltas():
    async def main():
        job = Job.__new__(Job)  # the queue side of a Job, without a server
        job.queue, job.unfinished = asyncio.Queue(), {0, 1}
        for item in [(0, delta([1], "a")), (0, delta([2], "b")), (0, delta([3], "c")), (1, delta([9], "z")),
                     (0, delta([4], "d", logprobs=[{4: -0.1}])), (0, delta([5], "e", finished=True)),
                     (1, delta([8], "y", finished=True))]:
            job.queue.put_nowait(item)
        return [(i, d.new_token_ids, d.new_text, d.finished) async for i, d in job.deltas()]

    out = asyncio.run(main())
    assert out == [(0, [1, 2, 3], "abc", False), (1, [9], "z", False), (0, [4], "d", False), (0, [5], "e", True),
                   (1, [8], "y", True)]
    assert not mergeable(delta([1], "a", finished=True), delta([2], "b"))
    assert not mergeable(delta([1], "a"), delta([2], "b", error="boom"))
    m = merged(delta([1], "a"), delta([2, 3], "bc", finished=True))
    assert (m.new_token_ids, m.new_text, m.finished, m.finish_reason, m.last_token_time) == ([1, 2, 3], "abc", True,
                                                                                             "length", 2.0)
