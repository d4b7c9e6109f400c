"""One schedule for every plan: the ranks' recorded steps played out in time.

Each rank has a host, which issues its calls one after another, and two
device streams: the compute stream, which runs kernels in issue order (a
kernel starts when the stream is free and the host has issued it), and the
communication stream, on which asynchronous collectives and point-to-point
transfers run. A collective starts when every rank of its group has issued
it and the streams it waits for are free, and ends its time later on all of
them: blocking, the compute stream waits for it; asynchronous, only a later
wait on its request does. A point-to-point transfer starts when both ends
have posted it, each after the work its rank had issued (NCCL orders its
stream after the current one); a receive waited on stalls the compute stream
until the data is there (a pipeline's fill and drain: its bubbles). A kernel that runs
while the communication stream is busy loses (1 - ``overlap_efficiency``) of
the time they share (the collective's kernels take SMs and memory
bandwidth). A device-to-host read stops the host until the compute stream is
done. In a CUDA graph there is no host.

The step takes, from a common start (bench brackets each step with a
barrier), until the last rank's host and streams are done. A layer loop's
body (:class:`~shardwise.perf.trace.Repeat`) is played twice and its
steady-state advance taken for the remaining layers.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .costs import Costs
from .events import Call, Coll, Repeat, Wait


@dataclass
class RankTime:
    """One rank's step: the clocks, and its work summed by kind."""

    host: float = 0.0  # the host's clock
    compute: float = 0.0  # the compute stream's clock
    comm: float = 0.0  # the communication stream's clock
    host_s: float = 0.0  # host time spent issuing calls
    compute_s: float = 0.0  # kernels' device time
    comm_s: float = 0.0  # collectives' device time
    bubble_s: float = 0.0  # compute stream waiting for data from another rank
    syncs: float = 0.0
    ops: dict = field(default_factory=dict)  # kernel class -> [flops, bytes, seconds]
    comms: dict = field(default_factory=dict)  # "op/axis" -> [calls, bytes, seconds, link]
    calls: dict = field(default_factory=dict)  # host kind -> calls
    busy: list = field(default_factory=list)  # the communication stream's (start, end)
    done: dict = field(default_factory=dict)  # request -> when it completes

    @property
    def end(self) -> float:
        return max(self.host, self.compute, self.comm)

    _SCALARS = ("host", "compute", "comm", "host_s", "compute_s", "comm_s", "bubble_s", "syncs")

    def snapshot(self) -> tuple:
        return (tuple(getattr(self, k) for k in self._SCALARS),
                {k: list(v) for k, v in self.ops.items()},
                {k: list(v[:3]) for k, v in self.comms.items()},
                dict(self.calls))

    def advance(self, a: tuple, b: tuple, times: float) -> None:
        """Move every clock and sum on by ``times`` x its change from ``a`` to ``b``."""
        for k, x, y in zip(self._SCALARS, a[0], b[0]):
            setattr(self, k, getattr(self, k) + times * (y - x))
        for store, old, new in ((self.ops, a[1], b[1]), (self.comms, a[2], b[2])):
            for key, vals in new.items():
                prev = old.get(key, [0.0] * len(vals))
                for i in range(len(vals)):
                    store[key][i] += times * (vals[i] - prev[i])
        for key, n in b[3].items():
            self.calls[key] += times * (n - a[3].get(key, 0))
        self.busy = []


class _Run:
    """Calls in a row with no other event between them (one object for every
    such run of the same calls: :func:`compile_events`)."""

    __slots__ = ("calls",)

    def __init__(self, calls: tuple):
        self.calls = calls


@dataclass
class _Segment:
    """A run of calls priced, played at once: the host's time, the kernels'
    time, and the latest a kernel can end relative to the segment's start on
    the host (the max over its kernels of the host time up to its issue plus
    the device time from it on); its calls by kind and kernels by class
    (``ops``: class -> (flops, bytes, seconds)) as item tuples."""

    host: float = 0.0
    device: float = 0.0
    latest: float = 0.0
    ops: tuple = ()
    calls: tuple = ()

    @staticmethod
    def of(calls, costs: Costs) -> "_Segment":
        seg = _Segment()
        issued = []  # (host time when issued, device time)
        ops: dict = {}
        kinds: dict = {}
        for c in calls:
            host, times, kind = costs.call(c)
            seg.host += host
            kinds[kind] = kinds.get(kind, 0) + 1
            if times:
                issued.append((seg.host, sum(times)))
                for k, dt in zip(c.kernels, times):
                    acc = ops.setdefault(k.cls, [0.0, 0.0, 0.0])
                    acc[0] += k.flops
                    acc[1] += k.bytes
                    acc[2] += dt
        after = 0.0
        for at, dt in reversed(issued):
            after += dt
            seg.latest = max(seg.latest, at + after)
        seg.device = after
        seg.ops = tuple((k, *v) for k, v in ops.items())
        seg.calls = tuple(kinds.items())
        return seg


# What a compiled step is made of (:func:`compile_events`): tagged tuples.
_SEGMENT, _READ, _COLL, _P2P, _WAIT, _LOOP = range(6)
_RUNS: dict = {}  # the calls' ids -> their _Run (the calls held by it: ids stay theirs)
RUNS_KEPT = 65536
_PROGRAMS: dict = {}  # id of a list of events -> (the list, its compiled form)
PROGRAMS_KEPT = 8192


def compile_events(events: list) -> tuple:
    """``events`` as the schedule plays them, costs aside (one form serves
    every price of a step: the duty cycle's second play, prefill's and
    decode's costs): each run of calls up to a device-to-host read one
    :class:`_Run`, the same object for every rank and step making the same
    calls (twin ranks' steps differ in their collectives' ranks only, and
    plans of like shapes run like layers), priced once per ``Costs``
    (``costs.segments``); a read, a collective, a wait and a loop (its body
    compiled) each an item of its own."""
    got = _PROGRAMS.get(id(events))
    if got is not None and got[0] is events:
        return got[1]
    out, run = [], []

    def flush() -> None:
        key = tuple(map(id, run))
        got = _RUNS.get(key)
        if got is None:
            if len(_RUNS) >= RUNS_KEPT:  # a long process: runs made later are shared anew
                _RUNS.clear()
            got = _RUNS[key] = _Run(tuple(run))
        out.append((_SEGMENT, got))
        run.clear()

    for e in events:
        kind = type(e)
        if kind is Call and e.kind != "syncs":
            run.append(e)
            continue
        if run:
            flush()
        if kind is Call:
            out.append((_READ, e))
        elif kind is Coll:
            # the comm table's key: the collective's, or a p2p's sends'
            out.append((_P2P, e, f"send/{e.axis}") if e.op == "p2p"
                       else (_COLL, e, f"{e.op}/{e.axis}"))
        elif kind is Wait:
            out.append((_WAIT, e.handle))
        else:
            handles = tuple(x.handle for x in e.body if type(x) is Coll and x.handle is not None)
            out.append((_LOOP, compile_events(e.body), e.times, e.carry, e.every, handles))
    if run:
        flush()
    prog = tuple(out)
    if len(_PROGRAMS) >= PROGRAMS_KEPT:
        _PROGRAMS.clear()
    _PROGRAMS[id(events)] = (events, prog)
    return prog


class _Rank:
    """One rank playing its events; yields when it needs other ranks."""

    def __init__(self, rank: int, costs: Costs, overlap: float):
        self.rank, self.costs, self.keep = rank, costs, 1.0 - overlap
        self.t = RankTime()
        self.seq: dict = {}  # group or (src, dst) -> calls so far
        self.priced = costs.segments  # _Run -> its _Segment on these costs

    def segment(self, seg: _Segment) -> None:
        t = self.t
        start = t.host
        t.host += seg.host
        t.host_s += seg.host
        calls = t.calls
        for k, n in seg.calls:
            calls[k] = calls.get(k, 0) + n
        device = seg.device
        if not device:
            return
        end = max(t.compute + device, start + seg.latest)
        if self.keep and t.busy:
            first = end - device
            shared = sum(max(0.0, min(b, end) - max(a, first)) for a, b in t.busy)
            t.busy = [(a, b) for a, b in t.busy if b > first]
            end += self.keep * shared
        t.compute = end
        t.compute_s += device
        ops = t.ops
        for k, f, nb, dt in seg.ops:
            acc = ops.get(k)
            if acc is None:
                acc = ops[k] = [0.0, 0.0, 0.0]
            acc[0] += f
            acc[1] += nb
            acc[2] += dt

    def read(self, c: Call) -> None:
        """A call the host waits for: its kernel, then the read."""
        self.segment(_Segment.of([c], self.costs))
        t = self.t
        t.host = max(t.host, t.compute) + self.costs.host["sync"]
        t.syncs += 1

    def run(self, prog: tuple, carry: dict | None = None):
        priced = self.priced
        for item in prog:
            tag = item[0]
            if tag == _SEGMENT:
                seg = priced.get(item[1])
                if seg is None:
                    seg = priced[item[1]] = _Segment.of(item[1].calls, self.costs)
                self.segment(seg)
            elif tag == _COLL:
                yield from self.coll(item[1], item[2])
            elif tag == _P2P:
                yield from self.p2p(item[1], item[2])
            elif tag == _WAIT:
                h = carry.get(item[1], item[1]) if carry else item[1]
                t = self.t
                when = t.done.get(h, 0.0)
                if when > t.compute:
                    if t.done.get(("recv", h)):
                        t.bubble_s += when - t.compute
                    t.compute = when
            elif tag == _READ:
                self.read(item[1])
            else:
                yield from self.repeat(*item[1:])

    def repeat(self, body: tuple, times: int, carry: dict, every: bool, handles: tuple):
        if times <= 2 or every:
            for i in range(times):
                yield from self.run(body, carry if i else None)
            return
        yield from self.run(body)
        a, seq_a = self.t.snapshot(), dict(self.seq)
        yield from self.run(body, carry)
        b = self.t.snapshot()
        times -= 2
        self.t.advance(a, b, times)
        for key, n in self.seq.items():  # the calls the skipped layers would make
            self.seq[key] = n + times * (n - seq_a.get(key, 0))
        shift = times * (b[0][2] - a[0][2])
        done = self.t.done
        for h in handles:
            if h in done:
                done[h] += shift

    def _begin(self, c: Coll):
        """The host's call of a collective: (device seconds, link)."""
        t = self.t
        host, times, link = self.costs.coll(c, self.rank)
        t.host += host
        t.host_s += host
        t.calls[c.op] = t.calls.get(c.op, 0) + 1
        return times, link

    def coll(self, c: Coll, key: str):
        times, link = self._begin(c)
        t = self.t
        ready = max(t.host, t.compute, t.comm if not c.fused else 0.0)
        n = self.seq[c.ranks] = self.seq.get(c.ranks, 0) + 1
        start = yield ("group", (c.ranks, n), ready, len(c.ranks))
        dev = times[0]
        end = start + dev
        t.comm_s += dev
        acc = t.comms.get(key)
        if acc is None:
            acc = t.comms[key] = [0, 0, 0.0, link]
        acc[0] += 1
        acc[1] += c.bytes
        acc[2] += dev
        if c.handle is not None:  # asynchronous
            t.comm = end
            t.done[c.handle] = end
            t.busy.append((start, end))
        else:
            t.compute = end
            if not c.fused:
                t.comm = end

    def p2p(self, c: Coll, send: str):
        times, link = self._begin(c)
        t = self.t
        ready = max(t.host, t.compute, t.comm)
        pairs = []
        for (peer, nbytes), dur in zip(c.sends, times):
            n = self.seq[(self.rank, peer)] = self.seq.get((self.rank, peer), 0) + 1
            pairs.append(((self.rank, peer, n), dur))
            acc = t.comms.setdefault(send, [0, 0, 0.0, link])
            acc[0] += 1
            acc[1] += nbytes
            acc[2] += dur
            t.comm_s += dur
        for peer, _ in c.recvs:
            n = self.seq[(peer, self.rank)] = self.seq.get((peer, self.rank), 0) + 1
            pairs.append(((peer, self.rank, n), None))
        end = yield ("pairs", pairs, ready)
        t.comm = max(t.comm, end)
        t.done[c.handle] = end
        if c.recvs:
            t.done[("recv", c.handle)] = True
        t.busy.append((ready, end))


def play(steps, costs: Costs, overlap: float,
         images: tuple[tuple[int, ...], ...] = ()) -> list[RankTime]:
    """Every rank's events played together (module docstring); ``steps[r]``
    are rank r's events (a list of lists, or any sequence: only the played
    ranks' are read).

    ``images``: permutations of the ranks under which the steps and their
    prices are symmetric (:func:`~.twins.symmetries`: a group with the
    identity left out; rank g[r]'s steps are rank r's renamed by g, at the
    same prices). Rank g[r] then plays exactly as rank r: the schedule's
    values are maxima and sums of the ranks' own clocks, whatever the order
    the ranks are resumed in. Only one rank of each orbit is played (the
    lowest); each collective it reaches and each transfer it posts is also
    entered for each image, as that rank would enter it, so a group or a
    pair completes at the time it would with every rank played, and the
    others' times are their played rank's (the same object)."""
    world = len(steps)
    played = [r for r in range(world) if all(g[r] > r for g in images)]
    ranks = {r: _Rank(r, costs, overlap) for r in played}
    gens = {r: ranks[r].run(compile_events(steps[r])) for r in played}
    groups: dict = {}  # (ranks, n) -> {rank: ready}
    pairs: dict = {}  # (src, dst, n) -> {"send": (ready, dur), "recv": ready, "end": t}
    parked: dict = {}  # rank -> its request
    posted: dict = {}  # rank waiting for transfers -> [how many unmatched, its request]
    waiting: dict = {}  # (src, dst, n) unmatched -> the ranks waiting for it
    moved: dict = {}  # (image's index, a group's ranks) -> the image's group
    todo = deque((r, None) for r in played)
    while todo:
        r, value = todo.popleft()
        try:
            req = gens[r].send(value)
        except StopIteration:
            continue
        parked[r] = req
        if req[0] == "group":
            _, (members, n), ready, size = req
            for i, g in enumerate(images, 1):
                key = moved.get((i, members))
                if key is None:
                    key = moved[i, members] = tuple(sorted(g[x] for x in members))
                _arrive(groups, (key, n), g[r], ready, size, parked, todo)
            _arrive(groups, (members, n), r, ready, size, parked, todo)
            continue
        _, wanted, ready = req
        matched, unmatched = [], 0
        for key, dur in wanted:
            if _post(pairs, key, ready, dur, waiting, posted, matched):
                continue
            waiting.setdefault(key, []).append(r)
            unmatched += 1
        posted[r] = [unmatched, req]
        for g in images:
            for (src, dst, n), dur in wanted:
                _post(pairs, (g[src], g[dst], n), ready, dur, waiting, posted, matched)
        if not posted[r][0]:
            matched.append(r)
        if matched:
            _release(set(matched), parked, posted, pairs, todo)
    if parked:
        raise RuntimeError(f"the recorded steps wait for each other: ranks {sorted(parked)} "
                           f"never meet ({list(parked.values())[:2]})")
    times = {}
    for r in played:
        times[r] = ranks[r].t
        for g in images:
            times[g[r]] = ranks[r].t
    return [times[r] for r in range(world)]


def _arrive(groups: dict, key: tuple, rank: int, ready: float, size: int, parked: dict,
            todo: deque) -> None:
    """``rank`` ready for the collective ``key`` at ``ready``; the last of
    its ``size`` ranks starts it, resuming those that are played."""
    arrived = groups.get(key)
    if arrived is None:
        arrived = groups[key] = {}
    arrived[rank] = ready
    if len(arrived) == size:
        start = max(arrived.values())
        del groups[key]
        for q in arrived:
            if q in parked:
                del parked[q]
                todo.append((q, start))


def _post(pairs: dict, key: tuple, ready: float, dur, waiting: dict, posted: dict,
          matched: list) -> bool:
    """One end of the transfer ``key`` posted at ``ready`` (``dur``: the
    send's time; None: the receive): whether the transfer is matched. The
    end that matches it also counts it off for the ranks waiting for it,
    noting in ``matched`` those with nothing left to wait for."""
    p = pairs.setdefault(key, {})
    p["send" if dur is not None else "recv"] = (ready, dur)
    if "end" in p:
        return True
    if "send" not in p or "recv" not in p:
        return False
    (s_ready, s_dur), (r_ready, _) = p["send"], p["recv"]
    p["end"] = max(s_ready, r_ready) + s_dur
    for q in waiting.pop(key, ()):
        posted[q][0] -= 1
        if not posted[q][0]:
            matched.append(q)
    return True


def _release(matched: set, parked: dict, posted: dict, pairs: dict, todo: deque) -> None:
    """Resume the ranks ``matched`` (whose point-to-point transfers have all
    been matched), in the order they parked."""
    for r in [q for q in posted if q in matched]:
        req = posted.pop(r)[1]
        del parked[r]
        todo.append((r, max((pairs[key]["end"] for key, _ in req[1]), default=req[2])))
