"""relu_sparsity.bench.profile_mosaic's trace summary on a synthetic Mosaic GPU profiler trace."""

import pytest

from relu_sparsity.bench import profile_mosaic


def _events(tid, ranges):
    out = []
    for name, begin, end in ranges:
        out.append({"name": name, "ph": "B", "ts": begin, "pid": 1, "tid": tid})
        out.append({"name": name, "ph": "E", "ts": end, "pid": 1, "tid": tid})
    return out


def test_summary_phases_and_lockstep():
    # Block 0: warpgroups 0 and 1 (tids 1, 2), two tiles each; warpgroup 1 starts its
    # epilogues 0.5 (x 1e3 cycles) later. ts is in kilocycles, as the profiler writes it.
    events = []
    for tid, shift in ((1, 0.0), (2, 0.5)):
        for tile in range(2):
            t0 = 10.0 * tile + shift
            events += _events(tid, [("mainloop", t0, t0 + 7), ("epilogue_h", t0 + 7, t0 + 8),
                                    ("seq_count", t0 + 8, t0 + 9)])
    summary = profile_mosaic.summarize({"traceEvents": events})
    phases = summary["phases"]
    assert phases["mainloop"]["tiles"] == 4
    assert phases["mainloop"]["median_cycles"] == pytest.approx(7000)
    assert phases["epilogue_h"]["median_cycles"] == pytest.approx(1000)
    # span of each warpgroup: 19 kilocycles, of which 14 in the mainloop
    assert phases["mainloop"]["share_of_span"] == pytest.approx(14 / 19)
    assert summary["epilogue_start_delta_cycles_median"] == pytest.approx(500)


def test_nested_ranges_pair_correctly():
    events = [{"name": "outer", "ph": "B", "ts": 0.0, "tid": 1},
              {"name": "inner", "ph": "B", "ts": 1.0, "tid": 1},
              {"name": "inner", "ph": "E", "ts": 2.0, "tid": 1},
              {"name": "outer", "ph": "E", "ts": 5.0, "tid": 1}]
    ranges = profile_mosaic.ranges_by_trace({"traceEvents": events})[1]
    assert sorted(ranges) == [("inner", 1.0, 2.0), ("outer", 0.0, 5.0)]
