"""Per layer: split a micro-batch's q/k/v over the shards that hold it, and merge what comes back.

A micro-batch is planned once per step: every (peer, kv-head range) that holds
a shard of one of its sequences becomes a Group with the rows, shard-local
context lengths and append flags it needs. Per layer the dense thread cuts q/k/v
into one AttendRequest per group, the transports carry them (in-process or over
the wire), and the dense thread merges the (out, lse) partials exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lamina_p2p.attention.service import AttendRequest
from lamina_p2p.compute.placement import Shard
from lamina_p2p.compute.sequence import Sequence


@dataclass
class Group:
    peer: str
    h0: int
    h1: int
    seq_ids: np.ndarray  # int64 [n], shard keys (Shard.key)
    ctx: np.ndarray  # int64 [n], shard-local tokens already cached
    n_q: np.ndarray  # int64 [n]
    n_kv: np.ndarray  # int64 [n], n_q for the tail shard, 0 for an earlier one
    rows: torch.Tensor | None  # micro-batch rows of the group's queries; None = all rows in order
    kv_rows: torch.Tensor | None  # rows whose K/V are appended; None = same as rows
    replica: bool = False  # a copy kept for failover: sent the same request, its result unused
    meta: np.ndarray | None = None  # int64 [n, 4] (seq_ids, ctx, n_q, n_kv): the wire's, built once a step


@dataclass
class MicroBatch:
    seqs: list[Sequence]
    n: list[int]  # chunk length per sequence this step
    tokens: torch.Tensor  # [T]
    positions: torch.Tensor  # [T]
    groups: list[Group]  # primaries first, then replicas (see num_primary)
    overlapping: bool  # some (row, head) is covered by more than one group: needs the LSE merge
    sample_rows: torch.Tensor  # rows whose logits are sampled (the chunk ends its pending tokens)
    sample_seqs: list[Sequence]
    index: int = 0  # position in the step, for traces
    num_primary: int = 0  # groups[:num_primary] give the results; the rest are replica writes
    sent_at: float = 0.0  # when the layer in flight was sent, for traces

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def plan_micro_batch(seqs: list[Sequence], n: list[int], num_kv_heads: int) -> MicroBatch:
    tokens, positions, sample_rows, sample_seqs = [], [], [], []
    starts, row = [], 0
    by_group: dict[tuple[str, int, int, bool], list] = {}
    for seq, count in zip(seqs, n):
        start = seq.cached
        toks = seq.tokens[start : start + count]
        tokens.extend(toks)
        positions.extend(range(start, start + count))
        starts.append(row)
        if start + count == seq.length:
            sample_rows.append(row + count - 1)
            sample_seqs.append(seq)
        end = start + count
        # Every shard a peer holds of this sequence goes in that peer's one request: one request
        # per peer per layer, whatever the number of shards. Shards stored under one key make one
        # run of entries over the chunk; partials of different keys or peers are merged by LSE.
        stored: dict[tuple, list[Shard]] = {}
        for shard in seq.shards:
            for peer, replica in ((shard.peer, False), *((r, True) for r in shard.replicas)):
                stored.setdefault((peer, shard.h0, shard.h1, replica, shard.key(seq.seq_id)), []).append(shard)
        for (peer, h0, h1, replica, key), shards in stored.items():
            by_group.setdefault((peer, h0, h1, replica), []).extend(
                (key, *e) for e in _slot_entries(shards, start, end, row))
        row += count
    T = row
    groups = []
    coverage = np.zeros((T, num_kv_heads), np.int32)
    # Primaries first: their results are merged; replicas only keep a copy of the KV.
    for (peer, h0, h1, replica), members in sorted(by_group.items(), key=lambda kv: kv[0][3]):
        seq_ids = np.array([m[0] for m in members], np.int64)
        ctx = np.array([m[1] for m in members], np.int64)
        n_q = np.array([m[2] for m in members], np.int64)
        n_kv = np.array([m[3] for m in members], np.int64)
        rows = _rows([(m[4], m[2]) for m in members], T)
        kv_rows = rows if n_kv.all() else _rows([(m[4], m[2]) for m in members if m[3]], None)
        groups.append(Group(peer, h0, h1, seq_ids, ctx, n_q, n_kv, rows, kv_rows, replica,
                            np.stack([seq_ids, ctx, n_q, n_kv], axis=1)))
        if replica:
            continue
        for m in members:
            coverage[m[4] : m[4] + m[2], h0:h1] += 1
    overlapping = bool((coverage > 1).any())
    return MicroBatch(seqs, n, torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                      groups, overlapping, torch.tensor(sample_rows, dtype=torch.long), sample_seqs,
                      num_primary=sum(not g.replica for g in groups))


def _slot_entries(shards: list[Shard], start: int, end: int, row: int) -> list[tuple[int, int, int, int]]:
    """Entries (ctx, n_q, n_kv, first row) for a chunk of positions [start, end), whose first row is
    `row`, against one storage holding these shards' tokens in position order.

    The chunk's positions that land in the storage are appended and attend causally; the runs
    between them attend over the tokens stored before them (an attend-only entry whose ctx is
    that count: the kernel appends everything before it attends, and reads [0, ctx)). Each
    query row is in at most one entry of a storage."""
    count = sum(s.tokens_before(start) for s in shards)
    spans = []
    for s in shards:
        a0, a1 = max(s.t0, start), end if s.t1 is None else min(s.t1, end)
        if a1 > a0:
            spans.append((a0, a1))
    entries, pos = [], start
    for a0, a1 in sorted(spans):
        if a0 > pos and count > 0:
            entries.append((count, a0 - pos, 0, row + pos - start))
        entries.append((count, a1 - a0, a1 - a0, row + a0 - start))
        count += a1 - a0
        pos = a1
    if pos < end and count > 0:
        entries.append((count, end - pos, 0, row + pos - start))
    return entries


def _rows(spans: list[tuple[int, int]], total: int | None) -> torch.Tensor | None:
    """Row index for the spans, or None when they are all rows 0..total-1 in order."""
    if total is not None and len(spans) and spans[0][0] == 0:
        end, contiguous = 0, True
        for s, c in spans:
            contiguous &= s == end
            end = s + c
        if contiguous and end == total:
            return None
    if not spans:
        return torch.empty(0, dtype=torch.long)
    return torch.cat([torch.arange(s, s + c) for s, c in spans])


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy in the attention storage encoding (16-bit floats as uint16 bits)."""
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    raise TypeError(f"unsupported activation dtype {t.dtype}")


def build_requests(owner: str, layer: int, mb: MicroBatch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   group_size: int, trace: bool = False) -> list[AttendRequest]:
    """Cut one layer's q [T,Hq,D], k/v [T,Hkv,D] into the micro-batch's per-group requests."""
    reqs = []
    for g in mb.groups:
        qg = q if g.rows is None else q.index_select(0, g.rows)
        qg = qg[:, g.h0 * group_size : g.h1 * group_size]
        if g.n_kv.any():
            kv_rows = g.rows if g.kv_rows is None else g.kv_rows
            kg = k if kv_rows is None else k.index_select(0, kv_rows)
            vg = v if kv_rows is None else v.index_select(0, kv_rows)
            kg, vg = kg[:, g.h0 : g.h1], vg[:, g.h0 : g.h1]
        else:
            kg = vg = k[:0, g.h0 : g.h1]
        reqs.append(AttendRequest(owner, layer, g.seq_ids, g.ctx, g.n_q, g.n_kv, g.h0, g.h1,
                                  to_wire(qg), to_wire(kg), to_wire(vg), trace, g.meta))
    return reqs


def merge_results(mb: MicroBatch, results: list[tuple[np.ndarray, np.ndarray]], num_heads: int, head_dim: int,
                  group_size: int) -> torch.Tensor:
    """Assemble the micro-batch's attention output [T, Hq, D] (float32) from the groups' partials.

    A group's rows may repeat (several shards of one sequence in one request): such partials,
    and those of different peers covering the same rows, are merged exactly by LSE."""
    T = mb.num_tokens
    primaries = mb.groups[: mb.num_primary]
    parts = [(g, torch.from_numpy(np.asarray(o, dtype=np.float32)), l) for g, (o, l) in zip(primaries, results)]
    if not mb.overlapping:
        if len(parts) == 1 and parts[0][0].rows is None and parts[0][1].shape[1] == num_heads \
                and np.asarray(results[0][0]).flags.writeable:
            return parts[0][1]  # one peer holds every head of every row (in process): its output as it is
        out = torch.zeros(T, num_heads, head_dim, dtype=torch.float32)
        for g, o, _ in parts:
            hs = slice(g.h0 * group_size, g.h1 * group_size)
            if g.rows is None:
                out[:, hs] = o
            else:
                out[g.rows, hs] = o
        return out
    # Exact LSE merge (DESIGN.md section 4): m = max lse, w = exp(lse - m), out = sum w o / sum w.
    # Scatter-adds, so repeated rows inside one partial merge like rows of different partials.
    m = torch.full((T, num_heads), float("-inf"))
    lses = []
    for g, o, l in parts:
        l = torch.from_numpy(np.asarray(l, dtype=np.float32))
        hs = slice(g.h0 * group_size, g.h1 * group_size)
        rows = g.rows if g.rows is not None else torch.arange(T)
        mh = m[:, hs].contiguous()
        mh.scatter_reduce_(0, rows[:, None].expand(-1, l.shape[1]), l, "amax")
        m[:, hs] = mh
        lses.append((rows, hs, l))
    if torch.isinf(m).any():
        raise RuntimeError("attention saw no tokens for some query (every shard empty)")
    num = torch.zeros(T, num_heads, head_dim, dtype=torch.float32)
    den = torch.zeros(T, num_heads, dtype=torch.float32)
    for (g, o, _), (rows, hs, l) in zip(parts, lses):
        w = torch.exp(l - m[rows, hs])  # lse = -inf (an empty shard) gives weight 0
        nh = num[:, hs].contiguous()
        nh.index_add_(0, rows, o * w[..., None])
        num[:, hs] = nh
        dh = den[:, hs].contiguous()
        dh.index_add_(0, rows, w)
        den[:, hs] = dh
    return num / den[..., None]
