"""Programmatic dependent launch for shardwise's Triton kernels (imported only
where Triton is installed): :func:`await_inputs` is the first statement of
every kernel a decode step launches."""
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
