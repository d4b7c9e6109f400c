"""report --plots: bars best first, labelled in human units, a log axis where
the figures span more than 10x, one legend for the device counts, and titles
that name the device and how many (CPU runs as CPU and ranks). Drawn from the
committed GPU results, and from CPU records of the same form."""
import copy
from pathlib import Path

import pytest

from shardwise.report import figures, plot_records, read_all

BENCH = str(Path(__file__).resolve().parents[1] / "results" / "bench-h200x2.jsonl")


def panels(records):
    out = []
    for phase, fig in figures(records):
        legend = [t.get_text() for leg in fig.legends for t in leg.get_texts()]
        for ax in fig.axes:
            out.append((phase, ax, legend))
    return out


@pytest.fixture(scope="module")
def gpu():
    return panels(read_all([BENCH]))


def test_bars_are_sorted_best_first(gpu):
    for phase, ax, _ in gpu:
        widths = [bar.get_width() for bar in ax.patches]
        assert len(widths) >= 2
        # The first bar is drawn at the top (the y axis is inverted).
        assert ax.yaxis_inverted()
        assert widths == sorted(widths, reverse=phase == "prefill"), ax.get_title()


def test_labels_are_in_human_units(gpu):
    for phase, ax, _ in gpu:
        labels = [t.get_text() for t in ax.texts]
        assert len(labels) == len(ax.patches)
        for text in labels:
            assert "e+" not in text and "e-" not in text, text
            assert text.endswith(("k", "M")) if phase == "prefill" else " ms" in text, text
        ticks = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert ticks and not any("e+" in t or "e-" in t for t in ticks), ticks


def test_a_log_axis_exactly_where_the_figures_span_more_than_10x(gpu):
    spans = []
    for phase, ax, _ in gpu:
        widths = [bar.get_width() for bar in ax.patches]
        spans.append(max(widths) / min(widths))
        assert ax.get_xscale() == ("log" if spans[-1] > 10 else "linear"), ax.get_title()
    assert max(spans) > 10  # the eager torch_tp:2 decode step: 39 ms beside ~1 ms


def test_titles_name_the_device_and_the_legend_the_gpu_counts(gpu):
    for phase, ax, legend in gpu:
        assert " on NVIDIA H200 x " in ax.get_title() and "GPU" in ax.get_title()
        assert legend == ["1 GPU", "2 GPUs"]
    assert any(ax.get_title().endswith("x 1-2 GPUs") for _, ax, _ in gpu)


def test_cpu_records_are_labelled_cpu_and_ranks():
    cpu = []
    for r in read_all([BENCH])[:6]:
        r = copy.deepcopy(r)
        r["device"] = "cpu"
        cpu.append(r)
    for _, ax, legend in panels(cpu):
        assert " on CPU (" in ax.get_title() and "GPU" not in ax.get_title()
        assert all(label.endswith(("rank", "ranks")) for label in legend)


def test_plot_records_writes_one_png_per_phase(tmp_path):
    paths = plot_records(read_all([BENCH]), str(tmp_path))
    assert [Path(p).name for p in paths] == ["prefill.png", "decode.png"]
    assert all(Path(p).read_bytes()[:4] == b"\x89PNG" for p in paths)
