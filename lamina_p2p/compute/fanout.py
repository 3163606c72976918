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
from lamina_kernels.merge import merge_partials

from lamina_p2p.attention.service import AttendRequest
from lamina_p2p.compute.placement import Shard
from lamina_p2p.compute.sequence import Sequence


@dataclass
class Group:
    peer: str
    h0: int
    h1: int
    seq_ids: np.ndarray  # int64 [n], shard keys (Shard.key)
    context_lens: np.ndarray  # int64 [n], shard-local tokens already cached
    n_q: np.ndarray  # int64 [n]
    num_new_tokens: np.ndarray  # int64 [n], n_q for the tail shard, 0 for an earlier one
    rows: torch.Tensor | None  # micro-batch rows of the group's queries; None = all rows in order
    kv_rows: torch.Tensor | None  # rows whose K/V are appended; None = same as rows
    replica: bool = False  # a copy kept for failover: sent the same request, its result unused
    meta: np.ndarray | None = None  # int64 [n, 4] (seq_ids, context_lens, n_q, num_new_tokens), built once a step
    whole: bool = False  # every row in order, every kv head, every row appended: q/k/v go as they are


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
    whole: bool = False  # every group is `whole`: pre may hand q/k/v over in the storage encoding

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])


def plan_micro_batch(seqs: list[Sequence], n: list[int], num_kv_heads: int) -> MicroBatch:
    """Plan one micro-batch's step: its token rows and, per (peer, kv-head range, replica), one Group.

    seqs: the sequences; n[i]: how many of seqs[i]'s pending tokens this step runs (its chunk,
    starting at seq.cached); num_kv_heads: the model's. Rows are the chunks concatenated in order
    (T = sum n). Every shard a peer holds of a sequence goes into that peer's one Group (one
    request per peer per layer, whatever the number of shards); a Group's `meta` is its entries
    stacked for the wire. Primaries come first (`num_primary`), replicas after. Pure: nothing is
    sent or changed. Raises nothing for valid sequences (placement guarantees a shard covers every
    position)."""
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
    groups, primaries = [], []
    # Primaries first: their results are merged; replicas only keep a copy of the KV.
    for (peer, h0, h1, replica), members in sorted(by_group.items(), key=lambda kv: kv[0][3]):
        # One array for the group's columns (views of it): this runs once a step on caches a pass over the weights
        # left cold, where each numpy call costs 5-40 us (tools/PERFORMANCE_LOG.md, stop 39).
        meta = np.array([m[:4] for m in members], np.int64).reshape(len(members), 4)
        seq_ids, context_lens, n_q, num_new = meta[:, 0], meta[:, 1], meta[:, 2], meta[:, 3]
        appending = all(m[3] for m in members)
        rows = _rows([(m[4], m[2]) for m in members], T)
        kv_rows = rows if appending else _rows([(m[4], m[2]) for m in members if m[3]], None)
        groups.append(Group(peer, h0, h1, seq_ids, context_lens, n_q, num_new, rows, kv_rows, replica, meta,
                            whole=rows is None and kv_rows is None and h0 == 0 and h1 == num_kv_heads and appending))
        if not replica:
            primaries.append((h0, h1, members))
    overlapping = _overlapping(primaries, T, num_kv_heads)
    return MicroBatch(seqs, n, torch.tensor(tokens, dtype=torch.long), torch.tensor(positions, dtype=torch.long),
                      groups, overlapping, torch.tensor(sample_rows, dtype=torch.long), sample_seqs,
                      num_primary=sum(not g.replica for g in groups), whole=all(g.whole for g in groups))


def _overlapping(primaries: list[tuple[int, int, list]], rows: int, num_kv_heads: int) -> bool:
    """Whether some (row, kv head) is covered by more than one primary entry: the merge then needs the LSE.
    primaries: (h0, h1, entries (key, context_len, n_q, num_new_tokens, first row)) per primary group. One group
    (every head range the same): its entries' row spans compared in order; several: every (row, head) counted."""
    if len(primaries) == 1:
        spans = sorted((m[4], m[4] + m[2]) for m in primaries[0][2])
        return any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    coverage = np.zeros((rows, num_kv_heads), np.int32)
    for h0, h1, members in primaries:
        for m in members:
            coverage[m[4] : m[4] + m[2], h0:h1] += 1
    return bool((coverage > 1).any())


def _slot_entries(shards: list[Shard], start: int, end: int, row: int) -> list[tuple[int, int, int, int]]:
    """Entries (context_len, n_q, num_new_tokens, first row) for a chunk of positions [start, end), whose first row is
    `row`, against one storage holding these shards' tokens in position order.

    The chunk's positions that land in the storage are appended and attend causally; the runs
    between them attend over the tokens stored before them (an attend-only entry whose context_len is
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


_WIRE_16BIT = (torch.bfloat16, torch.float16)


def to_wire(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy in the attention storage encoding (16-bit floats as uint16 bits)."""
    if t.dtype in _WIRE_16BIT and t.device.type == "cpu" and t.is_contiguous() and not t.requires_grad:
        return t.view(torch.int16).numpy().view(np.uint16)  # the per-layer case: a view, three calls
    t = t.detach().contiguous()
    if t.device.type != "cpu":
        t = t.cpu()
    if t.dtype == torch.float32:
        return t.numpy()
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    raise TypeError(f"unsupported activation dtype {t.dtype}")


def _wire(a) -> np.ndarray:
    return a if isinstance(a, np.ndarray) else to_wire(a)


def build_requests(owner: str, layer: int, mb: MicroBatch, q, k, v,
                   group_size: int, trace: bool = False) -> list[AttendRequest]:
    """Cut one layer's q [T,Hq,D], k/v [T,Hkv,D] into the micro-batch's per-group requests. q/k/v are
    tensors, or (only for a micro-batch whose groups are all `whole`: mb.whole) numpy arrays already in
    the storage encoding (Transformer.pre with wire=True)."""
    reqs = []
    for g in mb.groups:
        if g.whole:  # a peer that holds every head of every row (request placement, one peer): as they are
            reqs.append(AttendRequest(owner, layer, g.seq_ids, g.context_lens, g.n_q, g.num_new_tokens, g.h0, g.h1,
                                      _wire(q), _wire(k), _wire(v), trace, g.meta))
            continue
        qg = q if g.rows is None else q.index_select(0, g.rows)
        qg = qg[:, g.h0 * group_size : g.h1 * group_size]
        if g.num_new_tokens.any():
            kv_rows = g.rows if g.kv_rows is None else g.kv_rows
            kg = k if kv_rows is None else k.index_select(0, kv_rows)
            vg = v if kv_rows is None else v.index_select(0, kv_rows)
            kg, vg = kg[:, g.h0 : g.h1], vg[:, g.h0 : g.h1]
        else:
            kg = vg = k[:0, g.h0 : g.h1]
        reqs.append(AttendRequest(owner, layer, g.seq_ids, g.context_lens, g.n_q, g.num_new_tokens, g.h0, g.h1,
                                  to_wire(qg), to_wire(kg), to_wire(vg), trace, g.meta))
    return reqs


def merge_results(mb: MicroBatch, results: list[tuple[np.ndarray, np.ndarray]], num_heads: int, head_dim: int,
                  group_size: int) -> torch.Tensor | np.ndarray:
    """Assemble the micro-batch's attention output [T, Hq, D] (float32) from the groups' partials:
    a tensor, or, when one group holds every head of every row, its numpy output as it came (the
    model's post takes either; no copy, no tensor).

    results[i] = (out float32 [R_i, Hq_i, D], lse float32 [R_i, Hq_i]) of mb.groups[i] (primaries
    only, in order). A group's rows may repeat (several shards of one sequence in one request):
    such partials, and those of different peers covering the same rows, are merged exactly by LSE
    (lamina_kernels.merge.merge_partials). Raises ValueError when some query saw no token."""
    T = mb.num_tokens
    primaries = mb.groups[: mb.num_primary]
    if not mb.overlapping and len(results) == 1 and primaries[0].rows is None and \
            np.shape(results[0][0])[1] == num_heads:
        return np.asarray(results[0][0], dtype=np.float32)
    parts = [(g, torch.from_numpy(np.asarray(o, dtype=np.float32)), l) for g, (o, l) in zip(primaries, results)]
    if not mb.overlapping:
        out = torch.zeros(T, num_heads, head_dim, dtype=torch.float32)
        for g, o, _ in parts:
            hs = slice(g.h0 * group_size, g.h1 * group_size)
            if g.rows is None:
                out[:, hs] = o
            else:
                out[g.rows, hs] = o
        return out
    # Exact LSE merge (DESIGN.md section 4), repeated rows included: lamina_kernels' one implementation.
    out, _ = merge_partials(T, num_heads, head_dim, [
        (None if g.rows is None else g.rows.numpy(), g.h0 * group_size, g.h1 * group_size, o.numpy(), l)
        for g, o, l in parts])
    return torch.from_numpy(out)
