"""The cache of recordings (perf/tracecache.py): predictions read back from
it are the ones recorded, figure for figure; a change to the code the
recording runs misses it; a damaged entry is recorded again; it goes where
the environment says, or nowhere."""
import shutil

import pytest

from shardwise.perf import record, tracecache
from shardwise.perf.clusters import load_cluster
from shardwise.perf.costmodel import predict
from shardwise.presets import get_preset
from shardwise.spec import ModelSpec, Plan, Workload

H100_16 = load_cluster("h100-sxm-16")
LLAMA = ModelSpec(name="llama", n_layers=4, d_model=64, n_heads=4, n_kv_heads=2, head_dim=16,
                  d_ff=128, dtype="bf16", norm="rmsnorm", activation="swiglu",
                  rope_theta=10000.0, vocab_size=97)
MOE = get_preset("tiny-moe").model.replace(n_layers=3, dtype="bf16")
WL = Workload(batch=8, seq_len=16)
# What an entry is read back as: the recorder's classes, which it hands in.
TYPES = (record.RankTrace, record.StepTrace)
# A pipeline of tensor-parallel stages (twin ranks, renamed), a ring (every
# rank its own; eight, so that a rank's hops of one kind make a loop), expert parallelism on a MoE (routing, all-to-all), each
# with graph decode and eager.
CASES = [(LLAMA, "tp_pp:2x2,mb=2", None), (LLAMA, "ring:8", None), (LLAMA, "ring:8", False),
         (MOE, "ep:4", None), (MOE, "ep:2", False)]


def _fresh():
    """Forget this process's recordings: what follows reads the disk or records."""
    record.record_rank.cache_clear()
    record._alone.cache_clear()


def _predict_all():
    return [predict(spec, WL, plan, H100_16, graphs=graphs) for spec, plan, graphs in CASES]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("SHARDWISE_CACHE", str(folder))
    _fresh()
    yield folder / "recordings"
    _fresh()


def _recordings(monkeypatch) -> list:
    """Ranks recorded from now on (rank numbers), the recorder still run."""
    seen, real = [], record.record_alone

    def spy(*args, **kwargs):
        seen.append(args[4])
        return real(*args, **kwargs)

    monkeypatch.setattr(record, "record_alone", spy)
    return seen


def test_predictions_from_the_cache_are_the_recorded_ones(cache, monkeypatch):
    cold = _predict_all()
    entries = sorted(cache.iterdir())
    assert len(entries) == len(CASES)
    _fresh()

    def refuse(*args, **kwargs):
        raise AssertionError("recorded again where the cache holds the recording")

    monkeypatch.setattr(record, "record_alone", refuse)
    warm = _predict_all()
    for c, w in zip(cold, warm):
        assert w == c  # every figure, exactly (dataclass equality, floats included)
        assert repr(w) == repr(c)
    assert sorted(cache.iterdir()) == entries


def test_an_entry_holds_the_traces_exactly(cache):
    # tp_pp's stages and a ring's ranks (with a loop of hops), with their
    # facts (tuples stay tuples).
    for spec, plan, world, ranks in ((LLAMA, "tp_pp:2x2,mb=2", 4, (0, 2)),
                                     (LLAMA, "ring:8", 8, (0, 6))):
        p = Plan.parse(plan)
        traces = {r: record.record_alone(spec, WL, p, world, r) for r in ranks}
        text = tracecache.key(spec, WL, p, world, "nccl", None, record.PHASES)
        assert tracecache.decode(text, tracecache.encode(text, traces), *TYPES) == traces
        with pytest.raises(ValueError):
            tracecache.decode(text + " ", tracecache.encode(text, traces), *TYPES)


def test_another_code_version_misses(cache, monkeypatch):
    spec, plan, graphs = CASES[0]
    first = predict(spec, WL, plan, H100_16, graphs=graphs)
    _fresh()
    seen = _recordings(monkeypatch)
    monkeypatch.setattr(tracecache, "code_version", lambda: "0" * 64)
    again = predict(spec, WL, plan, H100_16, graphs=graphs)
    assert seen == [0, 2]  # tp_pp:2x2: a rank of each stage, its twin renamed
    assert again == first
    assert len(list(cache.iterdir())) == 2


def test_the_code_version_follows_the_sources_the_recording_runs(tmp_path, monkeypatch):
    package = tmp_path / "shardwise"
    shutil.copytree(tracecache._PACKAGE, package,
                    ignore=shutil.ignore_patterns("__pycache__", "*.json"))
    monkeypatch.setattr(tracecache, "_PACKAGE", package)
    version = tracecache.code_version.__wrapped__
    base = version()
    assert len(base) == 64 and version() == base
    # A strategy, a module the recorder imports (lowering), one the strategies
    # import from outside model/ and parallel/ (spec): each changes it.
    for name in ("parallel/ring.py", "perf/lowering.py", "spec.py"):
        path = package / name
        text = path.read_text()
        path.write_text(text + "\n# changed\n")
        assert version() != base, name
        path.write_text(text)
    assert version() == base
    # The command line and the schedule are not run by a recording.
    for name in ("cli.py", "perf/schedule.py"):
        (package / name).write_text((package / name).read_text() + "\n# changed\n")
    assert version() == base


def test_a_damaged_entry_is_recorded_again(cache, monkeypatch):
    spec, plan, graphs = CASES[3]
    first = predict(spec, WL, plan, H100_16, graphs=graphs)
    (entry,) = cache.iterdir()
    seen = _recordings(monkeypatch)
    text = tracecache.key(spec, WL, Plan.parse(plan), 4, "nccl", None, ("prefill", "static"))
    for damage in (b"", b"not gzip", entry.read_bytes()[:-20], b"\x1f\x8b" + b"\0" * 30):
        entry.write_bytes(damage)
        _fresh()
        seen.clear()
        assert tracecache.load(text, *TYPES) is None
        assert predict(spec, WL, plan, H100_16, graphs=graphs) == first
        assert seen  # recorded, not read
        assert tracecache.load(text, *TYPES) is not None  # written again, whole


def test_where_the_cache_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", str(tmp_path / "mine"))
    assert tracecache.directory() == tmp_path / "mine" / "recordings"
    monkeypatch.delenv("SHARDWISE_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert tracecache.directory() == tmp_path / "xdg" / "shardwise" / "recordings"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tracecache.directory() == tmp_path / "home" / ".cache" / "shardwise" / "recordings"


def test_off_writes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDWISE_CACHE", "off")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert tracecache.directory() is None
    _fresh()
    spec, plan, graphs = CASES[1]
    predict(spec, WL, plan, H100_16, graphs=graphs)
    _fresh()
    assert list(tmp_path.iterdir()) == []
