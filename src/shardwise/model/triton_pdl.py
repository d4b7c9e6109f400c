"""Programmatic dependent launch for shardwise's Triton kernels (imported only
where Triton is installed): :func:`await_inputs` is the first statement of
every kernel a decode step launches that reads memory; :func:`prefetch_l2`
may come before it for what no earlier kernel writes (the weights)."""
import triton
import triton.language as tl


@triton.jit
def await_inputs(PDL: tl.constexpr):
    """With ``PDL`` (a launch with ``launch_pdl``, Hopper and later), the
    program waits here until the grid launched before it on the stream has
    finished and its writes are visible (``griddepcontrol.wait``), and then
    lets the next grid start (``griddepcontrol.launch_dependents``): the next
    kernel's programs are scheduled while this kernel's last ones run, and
    wait at their own first statement. Nothing is read or written before
    the wait, so the kernels run in stream order as without it; what
    overlaps is one kernel's launch with another's tail."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs, keep, base):
    """Ask for the 128-byte lines at ``ptrs`` (where ``keep``; ``base``, a
    line the kernel reads anyway, elsewhere) to be brought
    into L2 (PTX ``prefetch.global.L2``), and go on without waiting for them.
    Only on a GPU (inline PTX), and only for memory that no kernel of the
    step writes: before :func:`await_inputs` a program may read the weights,
    which then stream from HBM during the tail of the kernel before it."""
    safe = tl.where(keep, ptrs, base)
    tl.inline_asm_elementwise("mov.u32 $0, 0;\n\tprefetch.global.L2 [$1];", "=r,l", [safe],
                              dtype=tl.int32, is_pure=False, pack=1)
