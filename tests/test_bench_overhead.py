"""`apar-rt bench overhead`: its rows, and contexts measured side by side."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

from apar_rt.bench import overhead
from apar_rt.bench.overhead import bench_overhead, ratios

DEMO = str(Path(__file__).resolve().parents[1] / "samples" / "models" / "apar-tiny")


def test_rows_cover_the_grid_with_every_rounds_steps():
    """One row per (seqs, context, variant), each with every step of its rounds; the first
    context's ratio to itself is 1 exactly; stop checks are counted only where stop strings are
    on, over every timed token (a stop string ending in a space is checked after every token)."""
    rows = bench_overhead(DEMO, seqs=(3,), contexts=(16, 48), steps=4, repeats=2, stops=("x ",),
                          log=lambda m: None)
    assert [(r["seqs"], r["context"], r["stop"], r["stream"]) for r in rows] == [
        (3, c, stop, stream) for stop, stream in ((False, False), (True, False), (False, True), (True, True))
        for c in (16, 48)]
    assert all(r["steps"] == 8 and r["ms_per_step_min"] <= r["ms_per_step"] for r in rows)
    assert all(r["ratio"] == 1.0 for r in rows if r["context"] == 16)
    assert all((r["stop_checks_per_token"] == 1.0) if r["stop"] else r["stop_checks_per_token"] is None
               for r in rows)
    assert ratios(rows).count("context 48/16") == 4


def test_each_configurations_engines_are_reclaimed(monkeypatch):
    """The heap is frozen before a configuration's engines are made, never while earlier ones are
    alive (frozen objects are never collected): once the run is over, every engine it made can be
    collected, so no row ran beside the garbage of the rows before it."""
    made = []
    make = overhead._engine

    def watched(*args, **kwargs):
        eng, backend = make(*args, **kwargs)
        made.append(weakref.ref(eng))
        return eng, backend

    monkeypatch.setattr(overhead, "_engine", watched)
    bench_overhead(DEMO, seqs=(2,), contexts=(16, 32), steps=2, repeats=1, log=lambda m: None)
    gc.collect()
    assert len(made) == 8 and not [r for r in made if r() is not None]


def test_stream_interval_streams_each_request_every_nth_step_staggered():
    """With --stream-interval 2 a request's streamer runs after every second step, half of the
    requests after one step and half after the next; the streaming rows say their interval."""
    load = overhead._Load(DEMO, 4, 16, stop=False, stream=True, steps=4, vocab=None, seed=0,
                          stops=overhead.DEFAULT_STOPS, stream_interval=2)
    order = list(load.streamers)
    load.timed_step()
    assert [load.streamers[r]._started for r in order] == [True, False, True, False]
    load.timed_step()
    assert all(load.streamers[r]._started for r in order)
    load.close()
    rows = bench_overhead(DEMO, seqs=(2,), contexts=(16,), steps=2, repeats=1, stream_interval=3,
                          log=lambda m: None)
    assert [r["stream_interval"] for r in rows] == [None, None, 3, 3]
