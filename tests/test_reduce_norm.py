"""All-reduce + residual add + norm in one kernel (decode steps on GPUs)
against the all-reduce followed by the fused add + norm, on 2 GPUs; and the
fallback on CPU ranks (gloo), which is the same two calls."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from shardwise.model.kernels import add_norm
from shardwise.parallel.comm import Comm
from shardwise.parallel.topology import Topology

two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2,
                              reason="needs 2 CUDA GPUs (symmetric memory over NVLink)")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _norms(d, dtype, device):
    torch.manual_seed(1)
    ln = nn.LayerNorm(d, eps=1e-5).to(device, dtype)
    rms = nn.RMSNorm(d, eps=1e-6).to(device, dtype)
    with torch.no_grad():
        for p in (ln.weight, ln.bias, rms.weight):
            p.copy_(torch.randn_like(p) * 0.5 + 1)
    return [ln, rms, None]


def _worker(rank, world, port, device_type, errors):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = device_type == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world,
                            **({"device_id": device} if cuda else {}))
    try:
        topo = Topology(("tp",), (world,), rank=rank, device_type=device_type).build()
        comm = Comm(topo)
        dtype = torch.bfloat16 if cuda else torch.float32
        ulp = 2.0 ** -7 if cuda else 1e-6
        for rows, d in ((1, 4096), (16, 4096), (64, 2048), (5, 1000)):
            for pdtype in (dtype, torch.float32):
                for module in _norms(d, dtype, device):
                    g = torch.Generator().manual_seed(100 * rows + d)
                    x = torch.randn(rows, d, generator=g).to(device, dtype)  # replicated
                    p = (torch.randn(world, rows, d, generator=g)[rank]).to(device, pdtype)
                    h, y = comm.all_reduce_add_norm(p.clone(), x, module, "tp")
                    # The unfused calls: NCCL (or gloo) all-reduce, then add + norm.
                    s = p.clone()
                    dist.all_reduce(s)
                    h2, y2 = (x + s.to(dtype), None) if module is None else add_norm(
                        module, x, s.to(dtype))
                    assert torch.equal(h, h2), (rows, d, pdtype, module)
                    if module is not None:
                        assert ((y.float() - y2.float()).abs().max()
                                <= ulp * y2.float().abs().max()), (rows, d, pdtype, module)
                    else:
                        assert y is None
        if cuda:
            # In a CUDA graph replayed many times: the epochs advance on the
            # device, and each replay sees the inputs of its turn.
            ln = _norms(4096, dtype, device)[0]
            x = torch.zeros(16, 4096, device=device, dtype=dtype)
            p = torch.zeros(16, 4096, device=device, dtype=dtype)
            comm.all_reduce_add_norm(p, x, ln, "tp")  # buffers made outside capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                h, y = comm.all_reduce_add_norm(p, x, ln, "tp")
                h, y = comm.all_reduce_add_norm(p, h, ln, "tp")  # a second call, as layers do
            for i in range(50):
                g = torch.Generator().manual_seed(i)
                x.copy_(torch.randn(16, 4096, generator=g))
                p.copy_(torch.randn(world, 16, 4096, generator=g)[rank])
                graph.replay()
                s = p.clone()
                dist.all_reduce(s)
                h1, _ = add_norm(ln, x, s)
                h2, y2 = add_norm(ln, h1, s)
                torch.cuda.synchronize()
                assert torch.equal(h, h2), i
                assert (y.float() - y2.float()).abs().max() <= ulp * y2.float().abs().max(), i
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        errors.put(f"rank {rank}: {e!r}")
        raise
    finally:
        dist.destroy_process_group()


def _run(world, device_type):
    ctx = mp.get_context("spawn")
    errors = ctx.Queue()
    port = _port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, device_type, errors))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    msgs = [errors.get() for _ in range(errors.qsize())] if not errors.empty() else []
    assert all(p.exitcode == 0 for p in procs) and not msgs, msgs


@pytest.mark.parametrize("world", [2, 3])
def test_fallback_on_cpu_is_reduce_then_add_norm(world):
    _run(world, "cpu")


@two_gpus
def test_fused_kernel_matches_reduce_then_add_norm():
    _run(2, "cuda")
