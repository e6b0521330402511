"""benchmarks/_timing.time_fns: the interleaved rounds, the warm-up, the flush and the clocks."""

import statistics
import sys
from pathlib import Path

import pytest
import torch
from conftest import CUDA_AVAILABLE

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import _timing as timing  # noqa: E402


class FakeClock:
    """A clock whose every call takes the next of `durations`, read at the end of each round."""

    device = "cpu"

    def __init__(self, events, durations):
        self.events, self.durations = events, list(durations)

    def start(self):
        self.events.append("start")
        return len(self.events)

    def stop(self, started):
        self.events.append("stop")
        return self.durations.pop(0)

    def seconds(self, readings):
        self.events.append("round")
        return list(readings)


def test_rounds_interleave_the_variants_with_the_flush_before_each_timed_call(gen):
    events = []
    durations = torch.rand(12, generator=gen, dtype=torch.float64).tolist()
    fns = {name: (lambda name=name: events.append(name)) for name in ("a", "b", "c")}
    timings = timing.time_fns(
        fns, warmup=2, repeats=4, flush=lambda: events.append("flush"), clock=FakeClock(events, durations)
    )
    assert events[:6] == ["a", "a", "b", "b", "c", "c"]  # the warm-up, untimed
    one_round = [e for name in "abc" for e in ("flush", "start", name, "stop")] + ["round"]
    assert events[6:] == one_round * 4
    for k, name in enumerate("abc"):  # each variant's samples are its calls' durations, in order
        assert timings[name].samples == durations[k::3]
        assert timings[name].median == statistics.median(durations[k::3])


def test_the_budget_stops_the_rounds_after_min_repeats():
    calls = []
    fns = {"x": lambda: calls.append("x"), "y": lambda: calls.append("y")}
    timings = timing.time_fns(fns, warmup=0, repeats=50, min_repeats=3, max_seconds=0.0)
    assert calls == ["x", "y"] * 3 and len(timings["x"].samples) == 3


def test_the_default_clock_is_the_wall_clock():
    t = timing.time_fn(lambda: sum(range(20000)), warmup=1, repeats=3)
    assert len(t.samples) == 3 and all(s > 0 for s in t.samples)
    clock = timing.WallClock("cpu")
    reading = clock.stop(clock.start())
    assert clock.seconds([reading]) == [reading] and reading >= 0


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA_AVAILABLE, reason="no CUDA device")
def test_the_cuda_event_clock_times_gpu_work():
    x = torch.randn(2048, 2048, device="cuda")
    small, big = timing.time_fns(
        {"small": lambda: x[:64] @ x[:, :64], "big": lambda: x @ x @ x},
        clock=timing.CudaEventClock(),
        warmup=2,
        repeats=5,
    ).values()
    assert len(small.samples) == len(big.samples) == 5
    assert 0 < small.median < big.median


BATCHED_BENCH = """
main: n_kv_max = 8192, n_batch = 2048, n_ubatch = 512, flash_attn = -1, is_pp_shared = 0, n_gpu_layers = -1

|    PP |     TG |    B |   N_KV |   T_PP s | S_PP t/s |   T_TG s | S_TG t/s |      T s |    S t/s |
|-------|--------|------|--------|----------|----------|----------|----------|----------|----------|
|    32 |     32 |   32 |   2048 |    8.401 |   121.90 |   15.394 |    66.52 |   23.795 |    86.07 |

llama_perf_context_print:        load time =     123.45 ms
"""


def test_llama_batched_bench_table_is_read():
    import _throughput_gguf as g

    assert g.parse_batched_bench(BATCHED_BENCH) == pytest.approx(66.52)
    with pytest.raises(RuntimeError, match="no S_TG row"):
        g.parse_batched_bench("error: failed to load model\n")
