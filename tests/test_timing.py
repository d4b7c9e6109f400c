"""The timed prompt's CUDA graph (runtime.timing.prefill_graph): captured
where the step never waits on the device from the host, replayed with the
eager step's result, and left out where the step does wait."""
import pytest
import torch

from shardwise.runtime.timing import BenchSettings, prefill_graph, time_prefill

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class OneRank:
    """The two calls of ``Comm`` that timing makes, for one rank."""

    def barrier(self):
        pass

    def gather_floats(self, values, device):
        return [values]


class Step:
    """A prompt's step: ``out = relu(x @ w) @ w.T``, read back to the host
    midway (``.item()``: the step waits on the device) when ``waits``."""

    def __init__(self, waits: bool, first: bool = False):
        self.waits, self.first, self.out = waits, first, None
        self.w = torch.randn(256, 256, device="cuda")

    def step(self, x, pos):
        h = torch.relu(x @ self.w)
        if self.first:  # what a first call makes once, copied from the host (a rope table)
            self.first = False
            self.w += torch.zeros(256).to("cuda")
        if self.waits and h.sum().item() < 0:  # never true: only the wait matters
            h = -h
        self.out = h @ self.w.t()
        return self.out


@pytest.mark.gpu
@cuda
def test_a_prompt_that_never_waits_replays_its_graph():
    torch.manual_seed(0)
    model, x = Step(waits=False), torch.randn(64, 256, device="cuda")
    want = model.step(x, 0).clone()
    replay, why = prefill_graph(model, x, BenchSettings(warmup=2), torch.device("cuda"),
                                OneRank())
    assert replay is not None and why == ""
    captured = model.out  # the graph's output buffer, written by each replay
    captured.zero_()
    replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, want)
    times, again, _ = time_prefill(model, x, BenchSettings(warmup=1, iters=3),
                                   torch.device("cuda"), OneRank())
    assert again is not None and len(times) == 3 and all(t > 0 for t in times)


@pytest.mark.gpu
@cuda
def test_what_a_first_call_makes_once_does_not_keep_the_graph_out():
    model, x = Step(waits=False, first=True), torch.randn(64, 256, device="cuda")
    replay, why = prefill_graph(model, x, BenchSettings(warmup=3), torch.device("cuda"),
                                OneRank())
    assert replay is not None and why == ""


@pytest.mark.gpu
@cuda
def test_a_prompt_that_waits_on_the_device_runs_eagerly():
    model, x = Step(waits=True), torch.randn(64, 256, device="cuda")
    s = BenchSettings(warmup=1, iters=2)
    replay, why = prefill_graph(model, x, s, torch.device("cuda"), OneRank())
    # the line of the step that waits: Step.step's .item()
    assert replay is None and why.startswith("the step waits on the device at test_timing.py:")
    times, replay, why = time_prefill(model, x, s, torch.device("cuda"), OneRank())
    assert replay is None and len(times) == 2
    # --no-graphs: eager whatever the step.
    off = BenchSettings(warmup=1, iters=2, graphs=False)
    assert prefill_graph(Step(waits=False), x, off, torch.device("cuda"), OneRank()) == (
        None, "graphs off")
