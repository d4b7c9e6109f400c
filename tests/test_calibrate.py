"""calibrate end to end on CPU (gloo, 2 ranks, quick sizes), and its fit of
latency and bus bandwidth from timings."""
import json

import pytest

from shardwise.perf.calibrate import calibrate, link_profile
from shardwise.perf.clusters import COLLECTIVES, load_cluster
from shardwise.perf.costmodel import predict
from shardwise.presets import get_preset


def test_link_profile_recovers_alpha_and_beta():
    # Synthetic alpha-beta timings: 20 us + 2(n-1)/n x S / 100 GB/s on 4 ranks.
    alpha, bw, f = 20e-6, 100e9, 2 * 3 / 4
    sizes = [2**13 * 4**k for k in range(8)]
    c = link_profile("all_reduce", [[s, alpha + f * s / bw] for s in sizes], 4)
    # The latency is the smallest message's time (8 KB adds 0.12 us to alpha).
    assert c["latency_us"] == pytest.approx(20.0, rel=0.01)
    big = [b for s, b in c["table"] if s >= 2**20]
    assert big and all(b == pytest.approx(100.0, rel=0.01) for b in big)


def test_calibrate_on_cpu_writes_a_profile_the_cost_model_loads(tmp_path):
    out = tmp_path / "cpu.json"
    profile = calibrate(str(out), nproc=2, device="cpu", quick=True, deadline_s=240)
    on_disk = json.loads(out.read_text())
    assert on_disk == profile
    assert profile["source"]["summary"].startswith("calibrated on cpu")
    assert profile["gpus_per_node"] == 2 and profile["nodes"] == 1
    cl = load_cluster(str(out))
    assert cl.matmul_rate("fp32") > 0 and cl.hbm_rate > 0 and cl.launch_us > 0
    assert set(cl.links["nvlink"]) == set(COLLECTIVES)
    for op, link in cl.links["nvlink"].items():
        assert link.latency_us > 0 and link.busbw(1e6) > 0, op
    # Measured timings back every figure.
    assert len(profile["measurements"]["collectives_seconds"]["all_reduce"]) == 3
    tiny = get_preset("tiny-dense")
    pred = predict(tiny.model, tiny.reduced, "tp_pp:2x1", cl)
    assert pred.prefill.seconds > 0 and pred.prefill.comms["all_reduce/tp"].link == "nvlink"
