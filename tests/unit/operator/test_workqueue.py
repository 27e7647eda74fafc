"""Reconciles of one object coalesce and never overlap (finetune_operator.workqueue)."""

import asyncio

from finetune_operator.workqueue import KeyedQueue


def test_requests_while_a_run_waits_join_it_and_one_object_never_runs_twice_at_once():
    async def scenario():
        q = KeyedQueue(workers=1)
        gate = asyncio.Event()
        runs: list[str] = []
        active: set[str] = set()

        def work(key, tag):
            async def go():
                assert key not in active  # one run per object at a time
                active.add(key)
                runs.append(tag)
                if tag == "a1":
                    await gate.wait()
                active.discard(key)
            return go

        first = asyncio.create_task(q.run("a", work("a", "a1")))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # a1 holds the only slot
        joined = [asyncio.create_task(q.run("a", work("a", f"a{i}"))) for i in (2, 3, 4)]  # one run after a1 serves all three
        other = asyncio.create_task(q.run("b", work("b", "b1")))
        await asyncio.sleep(0.01)
        assert runs == ["a1"] and q.pending() == 3  # a1 running; a2 and b1 waiting
        gate.set()
        await asyncio.gather(first, *joined, other)
        return runs, q.pending()

    runs, pending = asyncio.run(scenario())
    assert sorted(runs) == ["a1", "a2", "b1"] and pending == 0


def test_an_error_reaches_every_request_the_run_served_and_the_next_request_runs_again():
    async def scenario():
        q = KeyedQueue(workers=1)
        gate = asyncio.Event()
        calls = []

        async def blocker():
            await gate.wait()

        async def boom():
            calls.append("boom")
            raise RuntimeError("api down")

        running = asyncio.create_task(q.run("a", blocker))
        await asyncio.sleep(0)
        waiters = [asyncio.create_task(q.run("a", boom)) for _ in range(2)]
        await asyncio.sleep(0)
        gate.set()
        await running
        results = await asyncio.gather(*waiters, return_exceptions=True)

        async def ok():
            calls.append("ok")
        await q.run("a", ok)
        return calls, results

    calls, results = asyncio.run(scenario())
    assert calls == ["boom", "ok"]
    assert all(isinstance(r, RuntimeError) for r in results)


def test_at_most_workers_run_at_once():
    async def scenario():
        q = KeyedQueue(workers=3)
        live, peak = [0], [0]

        async def work():
            live[0] += 1
            peak[0] = max(peak[0], live[0])
            await asyncio.sleep(0.01)
            live[0] -= 1

        await asyncio.gather(*(q.run(i, work) for i in range(10)))
        return peak[0]

    assert asyncio.run(scenario()) == 3


def test_a_cancelled_request_leaves_the_run_for_the_others():
    async def scenario():
        q = KeyedQueue(workers=1)
        done = []

        async def work():
            await asyncio.sleep(0.01)
            done.append(1)

        a = asyncio.create_task(q.run("k", work))
        b = asyncio.create_task(q.run("k", work))
        await asyncio.sleep(0)
        a.cancel()
        await b
        return done

    assert asyncio.run(scenario()) == [1]
