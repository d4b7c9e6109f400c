"""What every command prints: tables that fit 80, 120 and 200 columns with
every plan name and number whole, and JSON, CSV and Markdown that parse back
to the rows the command built.

Each command runs through ``cli.main`` as a user types it; the sheets it
prints are caught on their way to ``output.emit``. run, verify and bench
launch their ranks once (tiny models on CPU), and the same results are then
replayed to the command at each width and format. report, reproduce and
report --fidelity read the committed GPU results (large numbers, long plan
names).
"""
import contextlib
import csv
import io
import json
import re
from pathlib import Path

import pytest

from shardwise import cli, output
from shardwise.output import Sheet
from shardwise.runtime import launcher

ROOT = Path(__file__).resolve().parents[1]
BENCH = str(ROOT / "results" / "bench-h200x2.jsonl")
VERIFY = str(ROOT / "results" / "verify-h200x2.jsonl")

COMMANDS = {
    "presets": ["presets"],
    "models": ["models"],
    "clusters": ["clusters"],
    "plan": ["plan", "--model", "seed-layerwise-30b", "--cluster", "h100-sxm-8", "--ranks", "4",
             "--batch", "4", "--seq", "2048"],
    "plan --all": ["plan", "--model", "llama-3.1-8b", "--cluster", "h100-sxm-8", "--all",
                   "--phase", "both"],
    "predict": ["predict", "--model", "seed-helix-4l", "--plan", "helix:4x4"],
    "partition": ["partition", "--model", "seed-layerwise-30b", "--capacity", "HBM", "--ranks",
                  "4", "--batch", "4", "--seq", "2048"],
    "reproduce": ["reproduce", "004", "--cluster", "h200-x2", "--results", BENCH,
                  "--profile", "h200-x2"],
    "report": ["report", BENCH, VERIFY],
    "report --fidelity": ["report", "--fidelity", "--profile", "h200-x2", BENCH],
}
# Commands that launch ranks: run once for real, then replayed (see `launched`).
LAUNCHED = {
    "run": ["run", "--nproc", "2", "--plan", "tp_pp:2x1", "--plan", "ring:2",
            "--plan", "layerwise:cap=1.04MB"],
    "verify": ["verify", "--model", "tiny-moe", "--plan", "ep:2"],
    "bench": ["bench", "--model", "tiny-dense", "--plan", "tp_pp:1x1", "--plan", "helix:2x1",
              "--iters", "2", "--warmup", "1", "--batch", "2", "--seq", "16"],
}
WIDTHS = (80, 120, 200)


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Each launching command run once for real: the results of its launches."""
    real, recorded = launcher.launch, {}
    try:
        for name, argv in LAUNCHED.items():
            outs = recorded[name] = []

            def record(job, *args, _outs=outs, **kwargs):
                _outs.append(real(job, *args, **kwargs))
                return _outs[-1]

            launcher.launch = record
            rc, _, err = _main(argv + _out_flag(name, tmp_path_factory))
            assert rc == 0, err
    finally:
        launcher.launch = real
    return recorded


def _out_flag(name: str, tmp_path_factory) -> list[str]:
    return (["--out", str(tmp_path_factory.mktemp("bench") / "bench.jsonl")]
            if name == "bench" else [])


def _main(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(argv)
    return rc, out.getvalue(), err.getvalue()


def run_command(name: str, fmt: str, monkeypatch, launched, tmp_path) -> tuple[list, str]:
    """(the parts the command emitted, what it printed) for command ``name``."""
    parts = []
    real_emit = output.emit

    def spy(ps, fmt="table", *args, **kwargs):
        ps = list(ps)
        parts.extend(ps)
        return real_emit(ps, fmt, *args, **kwargs)

    monkeypatch.setattr(cli, "emit", spy)
    argv = COMMANDS.get(name)
    if argv is None:
        replay = iter(launched[name])
        monkeypatch.setattr(launcher, "launch", lambda job, *a, **k: next(replay))
        argv = LAUNCHED[name] + (["--out", str(tmp_path / "b.jsonl")] if name == "bench" else [])
    rc, out, err = _main(argv + ["--format", fmt])
    assert rc == 0, err
    assert parts, f"{name} emitted nothing"
    return parts, out


ALL = sorted(COMMANDS) + sorted(LAUNCHED)


@pytest.mark.parametrize("name", ALL)
def test_every_table_fits_with_plan_names_and_numbers_whole(name, monkeypatch, launched,
                                                            tmp_path):
    for width in WIDTHS:
        monkeypatch.setenv("COLUMNS", str(width))
        parts, out = run_command(name, "table", monkeypatch, launched, tmp_path)
        lines = out.splitlines()
        too_wide = [line for line in lines if len(line) > width]
        assert not too_wide, f"{name} at {width} columns:\n" + "\n".join(too_wide)
        # A cell is whole when it is the whole text between two rules of one line.
        cells = {cell.strip() for line in lines if "│" in line
                 for cell in line.split("│")[1:-1]}
        sheets = [p for p in parts if isinstance(p, Sheet) and p.rows]
        assert sheets, f"{name} printed no table"
        for sheet in sheets:
            for col in sheet.cols:
                if col.wrap:
                    continue  # prose: wraps at spaces
                for row in sheet.rows:
                    text = col.text(row)
                    assert not text or text in cells, (
                        f"{name} at {width} columns: {col.header} {text!r} is not whole\n{out}")
            first = sheet.cols[0]
            assert all(first.text(r) in cells for r in sheet.rows)


def test_tables_keep_the_long_plan_names_and_large_numbers_of_the_gpu_results(
        monkeypatch, launched, tmp_path):
    """The committed results hold what tests on CPU cannot make: 6-digit
    tokens/s, names like tp_pp:2x1,overlap=4; they are among the whole cells."""
    monkeypatch.setenv("COLUMNS", "80")
    _, out = run_command("report", "table", monkeypatch, launched, tmp_path)
    cells = {cell.strip() for line in out.splitlines() for cell in line.split("│")}
    assert {"tp_pp:2x1,overlap=4", "layerwise:cap=HBM", "torch_eager:1", "329,387"} <= cells


# -- machine formats --------------------------------------------------------------------

# A raw value as the machine formats hold it (non-finite floats as null, tuples as lists).
_raw = output._clean


def _same_cell(cell: str, v) -> bool:
    """A CSV cell read back as the raw value ``v``."""
    v = _raw(v)
    if v is None:
        return cell == ""
    if isinstance(v, bool):
        return cell == str(v)
    if isinstance(v, (int, float)):
        return float(cell) == v
    if isinstance(v, dict) or (isinstance(v, list) and any(isinstance(x, (list, dict))
                                                           for x in v)):
        return json.loads(cell) == v
    if isinstance(v, list):
        return cell.split(";") == [str(x) for x in v] if v else cell == ""
    return cell == str(v)


def _sheets_and_notes(parts) -> tuple[list[Sheet], list[str]]:
    sheets = [p for p in parts if isinstance(p, Sheet)]
    notes = [p for p in parts if not isinstance(p, Sheet)] + [n for s in sheets for n in s.notes]
    return sheets, notes


def check_json(out: str, parts) -> None:
    sheets, notes = _sheets_and_notes(parts)
    doc = json.loads(out)
    if len(sheets) == 1 and not notes:
        doc = {sheets[0].name: doc}
    else:
        assert doc.get("notes", []) == notes
    for sheet in sheets:
        rows = doc[sheet.name]
        assert len(rows) == len(sheet.rows)
        for got, row in zip(rows, sheet.rows):
            for col in sheet.cols:
                assert got[col.key] == _raw(row.get(col.key)), (sheet.name, col.key)


def check_csv(out: str, parts) -> None:
    sheets, _ = _sheets_and_notes(parts)
    sections = re.split(r"\n?^# (\S+)\n", out, flags=re.M)
    if len(sheets) == 1:
        assert len(sections) == 1
        by_name = {sheets[0].name: sections[0]}
    else:
        assert sections[0] == ""
        by_name = dict(zip(sections[1::2], sections[2::2]))
    assert list(by_name) == [s.name for s in sheets]
    for sheet in sheets:
        table = list(csv.reader(io.StringIO(by_name[sheet.name])))
        assert table[0] == [c.key for c in sheet.cols]
        assert len(table) - 1 == len(sheet.rows)
        for cells, row in zip(table[1:], sheet.rows):
            for cell, col in zip(cells, sheet.cols):
                assert _same_cell(cell, row.get(col.key)), (sheet.name, col.key, cell)


def _md_cells(line: str) -> list[str]:
    cells = re.split(r"(?<!\\)\|", line.strip())[1:-1]
    return [c.strip().replace("\\|", "|") for c in cells]


def check_markdown(out: str, parts) -> None:
    sheets, notes = _sheets_and_notes(parts)
    lines = out.splitlines()
    tables, i = [], 0
    while i < len(lines):
        if lines[i].startswith("| ") and i + 1 < len(lines) and lines[i + 1].startswith("| ---"):
            j = i + 2
            while j < len(lines) and lines[j].startswith("| "):
                j += 1
            tables.append((_md_cells(lines[i]), [_md_cells(x) for x in lines[i + 2:j]]))
            i = j
        else:
            i += 1
    assert len(tables) == len(sheets)
    for (header, rows), sheet in zip(tables, sheets):
        assert header == [c.header for c in sheet.cols]
        assert rows == [[c.text(r).replace("\n", " ") for c in sheet.cols] for r in sheet.rows]
    for note in notes:
        assert note.replace("\n", " ") in out.replace("\n", " ")


CHECKS = {"json": check_json, "csv": check_csv, "markdown": check_markdown}


@pytest.mark.parametrize("fmt", sorted(CHECKS))
@pytest.mark.parametrize("name", ALL)
def test_every_format_parses_back_to_the_rows(name, fmt, monkeypatch, launched, tmp_path):
    parts, out = run_command(name, fmt, monkeypatch, launched, tmp_path)
    CHECKS[fmt](out, parts)


# -- numbers stay numbers ------------------------------------------------------------------

FIDELITY = COMMANDS["report --fidelity"]


def _measured_figures(path: str) -> set[float]:
    from shardwise.bench.records import read_records

    return {float(r[k]) for r in read_records(path)
            for k in ("tps", "prefill_tokens_per_s", "tpot_ms") if r.get(k)}


def test_fidelity_json_carries_numbers_the_table_writes_for_people():
    """report --fidelity --format json: measured and predicted are the
    record's figure and the model's, the error is predicted / measured - 1 as
    a fraction, the spread a ratio; the summary's median and max are
    fractions of those errors (the table writes them as +5% and 5%)."""
    import statistics

    rc, out, err = _main(FIDELITY + ["--format", "json"])
    assert rc == 0, err
    doc = json.loads(out)
    rows, summary = doc["records"], doc["summary"]
    assert rows and summary
    figures = _measured_figures(BENCH)
    errors: dict = {}
    for r in rows:
        for key in ("measured", "predicted", "error", "p90_p10"):
            assert isinstance(r[key], float), (key, r)
        assert r["measured"] in figures
        assert abs(r["error"] - (r["predicted"] / r["measured"] - 1)) <= 1e-12
        errors.setdefault((r["plan"].split(":")[0], r["metric"]), []).append(
            abs(r["error"]))
    assert {(s["strategy"], s["metric"]) for s in summary} == set(errors)
    for s in summary:
        v = errors[(s["strategy"], s["metric"])]
        assert isinstance(s["records"], int) and s["records"] == len(v)
        assert isinstance(s["median"], float) and abs(s["median"] - statistics.median(v)) <= 1e-12
        assert isinstance(s["max"], float) and abs(s["max"] - max(v)) <= 1e-12
        assert s["verdict"] in ("PASS", "FAIL")


def test_fidelity_csv_reads_back_with_float():
    rc, out, err = _main(FIDELITY + ["--format", "csv"])
    assert rc == 0, err
    sections = dict(zip(*[iter(re.split(r"\n?^# (\S+)\n", out, flags=re.M)[1:])] * 2))
    records = list(csv.DictReader(io.StringIO(sections["records"])))
    summary = list(csv.DictReader(io.StringIO(sections["summary"])))
    assert records and summary
    for r in records:
        measured, predicted, error = (float(r[k]) for k in ("measured", "predicted", "error"))
        float(r["p90_p10"])
        assert abs(error - (predicted / measured - 1)) <= 1e-12
    for s in summary:
        assert int(s["records"]) >= 1 and 0 <= float(s["median"]) <= float(s["max"])
