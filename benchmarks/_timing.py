"""Shared timing and reporting helpers for the benchmarks (their rules: CONTRIBUTING.md).

- `time_fns` / `time_fn`: warm up, repeat, take the median; variants are interleaved so that
  slow drift on a noisy machine hits every variant alike and ratios stay meaningful. Each call
  is timed by a clock: `WallClock` (perf_counter, the device synchronised) or `CudaEventClock`.
- `make_cache_flush`: evict the last-level cache before each timed call (cold-cache timing).
- `measure_copy_bandwidth`: the measured memory ceiling that achieved GB/s is quoted against;
  `copy_ceiling` / `combine_copy_ceilings`: measured before and after the figures, the higher kept.
- `OtherLoad`: how busy other processes kept the CPU while a figure was taken.
- `environment`: torch version, threads, device name, for the JSON header.
- `write_json_atomic`, `format_table`: output.
"""

import os
import platform
import statistics
import time
from dataclasses import dataclass

import torch

COPY_BANDWIDTH_DEFINITION = (
    "dst.copy_(src) of a preallocated float32 tensor; bandwidth = (bytes read + bytes written) "
    "/ median time = 2 * nbytes / t"
)


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


@dataclass
class Timing:
    """Per-call wall times of one variant, in seconds."""

    samples: list

    @property
    def median(self):
        return statistics.median(self.samples)

    @property
    def iqr(self):
        """Interquartile range: the spread of the middle half of the samples."""
        if len(self.samples) < 4:
            return max(self.samples) - min(self.samples)
        q = statistics.quantiles(self.samples, n=4)
        return q[2] - q[0]

    def to_json(self):
        return {
            "median_ms": self.median * 1e3,
            "min_ms": min(self.samples) * 1e3,
            "iqr_ms": self.iqr * 1e3,
            "samples": len(self.samples),
        }


def synchronize(device):
    """Wait for queued device work (a no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def last_level_cache_bytes(default=64 << 20):
    """Size of the CPU's largest cache from sysfs (Linux), else `default`."""
    sizes = []
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in os.listdir(base):
            with open(os.path.join(base, entry, "size")) as f:
                text = f.read().strip()
            scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1], 1)
            sizes.append(int(text.rstrip("KMG")) * scale)
    except (OSError, ValueError):
        pass
    return max(sizes) if sizes else default


def make_cache_flush(device):
    """A callable that evicts the data of earlier calls from the last-level cache.

    CPU: reads a buffer of twice the LLC size (reads leave no dirty lines to write back inside
    the next timed call). CUDA: zeroes 256 MiB, more than any current L2.
    """
    if torch.device(device).type == "cuda":
        buffer = torch.empty(256 << 20, dtype=torch.uint8, device=device)
        return buffer.zero_
    buffer = torch.ones(2 * last_level_cache_bytes() // 4, dtype=torch.float32)
    return buffer.sum


def warm_up(fn, *, device, calls, max_seconds=None):
    """Call fn up to `calls` times, untimed; stop after the first call once `max_seconds` pass."""
    start = time.perf_counter()
    for _ in range(calls):
        fn()
        synchronize(device)
        if max_seconds is not None and time.perf_counter() - start > max_seconds:
            break


class WallClock:
    """Wall time of each call (time.perf_counter), the device synchronised before and after it:
    the host's launch and synchronisation costs count."""

    def __init__(self, device="cpu"):
        self.device = device

    def start(self):
        synchronize(self.device)
        return time.perf_counter()

    def stop(self, started):
        synchronize(self.device)
        return time.perf_counter() - started

    def seconds(self, readings):
        """The seconds of a round's readings (stop's results), in their order."""
        return list(readings)


class CudaEventClock:
    """GPU time of each call: CUDA events recorded around it on the current stream, read after
    the round (one synchronisation per round). Event times leave out the host's launch and
    synchronisation costs that fall outside the GPU's work."""

    device = "cuda"

    def start(self):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        return begin, end

    def stop(self, events):
        events[1].record()
        return events

    def seconds(self, readings):
        torch.cuda.synchronize()
        return [begin.elapsed_time(end) / 1e3 for begin, end in readings]


def time_fns(fns, *, device="cpu", warmup, repeats, min_repeats=3, max_seconds=None, flush=None, clock=None):
    """Time several variants, interleaved: each round calls every variant once.

    fns: {name: zero-argument callable}. Each variant is first called `warmup` times (fewer if
    they take over a quarter of `max_seconds`). Then up to `repeats` rounds follow; after
    `min_repeats` rounds they stop early once `max_seconds` of wall time (flushes included) have
    passed. `flush`, if given, runs untimed before every timed call. `clock` times each call:
    WallClock(device) by default, or CudaEventClock(). Returns {name: Timing} in seconds.
    """
    clock = clock if clock is not None else WallClock(device)
    warmup_seconds = None if max_seconds is None else max_seconds / 4 / len(fns)
    for fn in fns.values():
        warm_up(fn, device=clock.device, calls=warmup, max_seconds=warmup_seconds)
    samples = {name: [] for name in fns}
    start = time.perf_counter()
    for round_index in range(repeats):
        readings = []
        for fn in fns.values():
            if flush is not None:
                flush()
            started = clock.start()
            fn()
            readings.append(clock.stop(started))
        for name, seconds in zip(fns, clock.seconds(readings)):
            samples[name].append(seconds)
        over_budget = max_seconds is not None and time.perf_counter() - start > max_seconds
        if round_index + 1 >= min_repeats and over_budget:
            break
    return {name: Timing(values) for name, values in samples.items()}


def time_fn(fn, *, device="cpu", warmup, repeats, min_repeats=3, max_seconds=None, flush=None, clock=None):
    """Time one zero-argument callable; see `time_fns`. Returns a Timing."""
    timings = time_fns(
        {"fn": fn},
        device=device,
        warmup=warmup,
        repeats=repeats,
        min_repeats=min_repeats,
        max_seconds=max_seconds,
        flush=flush,
        clock=clock,
    )
    return timings["fn"]


def measure_copy_bandwidth(device, *, nbytes=256 << 20, warmup=3, repeats=10):
    """Large-copy bandwidth ceiling: dst.copy_(src) for float32 tensors of `nbytes` each.

    The warm-up also faults in every page of both tensors. Returns a JSON-ready dict;
    `gb_per_s` counts read + write bytes (see COPY_BANDWIDTH_DEFINITION).
    """
    numel = nbytes // 4
    src = torch.randn(numel, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    timing = time_fn(lambda: dst.copy_(src), device=device, warmup=warmup, repeats=repeats)
    moved = 2 * numel * 4
    return {
        "gb_per_s": moved / timing.median / 1e9,
        "bytes_per_tensor": numel * 4,
        "definition": COPY_BANDWIDTH_DEFINITION,
        **timing.to_json(),
    }


def copy_ceiling(device, *, repeats=10):
    """`measure_copy_bandwidth`, with how many cores other processes kept busy meanwhile
    (`other_load_cores`, see OtherLoad)."""
    with OtherLoad() as other_load:
        copy = measure_copy_bandwidth(device, repeats=repeats)
    copy["other_load_cores"] = other_load.cores
    return copy


def combine_copy_ceilings(start, end):
    """One ceiling from copy bandwidths measured before and after the figures: bandwidth drifts
    with the machine's neighbours, so take the higher (the conservative choice for a fraction
    of the ceiling). `gb_per_s` counts read + write bytes, as in measure_copy_bandwidth."""
    return {
        "gb_per_s": max(start["gb_per_s"], end["gb_per_s"]),
        "definition": COPY_BANDWIDTH_DEFINITION + "; the higher of the start and end runs",
        "start": start,
        "end": end,
    }


def _machine_busy_seconds():
    """CPU seconds all processes have spent busy since boot (Linux /proc/stat), or None.
    Steal time counts as busy: on a VM it is time taken by other guests."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds():
    times = os.times()
    return times.user + times.system


class OtherLoad:
    """Context manager: how many CPU cores other processes kept busy, on average, during the
    block (`cores`; None where /proc/stat is missing). Figures taken while this is well above
    zero are not to be trusted: on a small machine another process stalls every parallel region.
    """

    def __enter__(self):
        self.cores = None
        self._start = (time.perf_counter(), _machine_busy_seconds(), _own_cpu_seconds())
        return self

    def __exit__(self, *exc_info):
        wall0, busy0, own0 = self._start
        wall, busy = time.perf_counter() - wall0, _machine_busy_seconds()
        if busy0 is not None and busy is not None and wall > 0:
            others = (busy - busy0) - (_own_cpu_seconds() - own0)
            self.cores = max(0.0, others / wall)
        return False


# ---------------------------------------------------------------------------------------------
# Environment and output
# ---------------------------------------------------------------------------------------------


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_matmul_features():
    """The CPU flags that decide low-precision matmul speed (Linux only; empty elsewhere)."""
    wanted = {"avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile"}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(wanted & set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def environment(device):
    """What the JSON header records about where the figures come from."""
    info = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "device": torch.device(device).type,
        "cpu": cpu_name(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_matmul_features": cpu_matmul_features(),
        "cpu_flags": cpu_simd_flags(),
        "quant_isa": _quant_isa(),
        # Other load on the machine at the start (1, 5, 15 min); compare it with the thread count.
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    if torch.device(device).type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        info["device_name"] = info["cpu"]
    return info


def cpu_simd_flags():
    """The SIMD and matrix flags of /proc/cpuinfo (avx2, avx512*, amx*, ...): what the kernels
    could choose from on this machine."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = line.split(":", 1)[1].split()
                    keep = ("avx", "fma", "f16c", "amx", "vnni", "bf16")
                    return sorted({x for x in flags if x.startswith(keep) or any(k in x for k in keep[4:])})
    except OSError:
        pass
    return None


def _quant_isa():
    try:
        from moa_engine import _C

        return _C._quant_isa()
    except (ImportError, AttributeError):
        return None


def quant_isa_available(name):
    """Whether this CPU runs the quantized kernel level `name` (MOA_ENGINE_QUANT_ISA's values);
    the choice in use is kept."""
    from moa_engine import _C

    previous = _C._quant_isa()
    try:
        _C._set_quant_isa(name)
        return True
    except ValueError:
        return False
    finally:
        _C._set_quant_isa(previous)


def write_json_atomic(path, payload):
    """Write `payload` as JSON to `path` atomically (moa_engine._io); creates the folder."""
    from moa_engine._io import atomic_write_json

    atomic_write_json(path, payload)


def format_table(headers, rows):
    """A plain-text table: headers and rows of already formatted cells; text columns are
    left-aligned, the rest right-aligned."""
    cells = [list(map(str, headers))] + [list(map(str, row)) for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_looks_numeric(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row):
        parts = [cell.rjust(w) if num else cell.ljust(w) for cell, w, num in zip(row, widths, numeric)]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(cells[0]), rule] + [line(row) for row in cells[1:]])


def _looks_numeric(cell):
    text = cell.strip().rstrip("x%")
    if text in ("", "-"):
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True
