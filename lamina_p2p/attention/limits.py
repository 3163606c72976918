"""What a message may make an attention peer allocate: checks run before the service sees a request.

The wire decoder already bounds a message's bytes (wire.Limits). What it cannot see is memory that
*fields* ask for: a `register` declaring a million layers makes a pool whose arrays scale with
them, a block table scales with kv heads x blocks per sequence x sequences, every owner and every
(layers, head_dim, storage) pool costs a registration and an address-space reservation, and a
`free` walks every id it is given. Each of those is capped here; a refused request gets an error
reply naming the limit, and nothing is allocated.

The caps are generous for real models (Llama-3-405B: 126 layers, 128 heads, 8 kv heads, head_dim
128, 128k positions; a block-table row of 8 heads x 8192 blocks) and small enough that the worst
a peer holds for tables is max_sequences x max_table_row x 4 bytes (and each new pool starts with
64 slots of rows, times max_pools).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


class LimitError(ValueError):
    """A request that asks for more than the peer allows."""


@dataclass(frozen=True)
class PeerLimits:
    max_owner_len: int = 128
    max_owners: int = 64  # compute peers (or models) registered at once
    max_pools: int = 8  # distinct (layers, head_dim, storage) geometries
    max_layers: int = 1024
    max_heads: int = 1024
    max_head_dim: int = 1024
    max_positions: int = 1 << 20
    # kv heads x blocks per sequence (int32 entries): 10 kv heads x 128k positions / 16 fits, and a
    # row of this size times max_sequences (4 GiB) is the most block tables can ever take.
    max_table_row: int = 1 << 18
    max_sequences: int = 1 << 12  # shards held, all owners together
    max_seqs_per_request: int = 4096
    max_free_ids: int = 1 << 14


DEFAULT_PEER_LIMITS = PeerLimits()


def owner_of(fields: dict, limits: PeerLimits = DEFAULT_PEER_LIMITS) -> str:
    owner = fields.get("owner")
    if type(owner) is not str or not 0 < len(owner) <= limits.max_owner_len:
        raise LimitError(f"owner must be a str of 1..{limits.max_owner_len} chars")
    return owner


def check_register(fields: dict, service, limits: PeerLimits = DEFAULT_PEER_LIMITS) -> None:
    owner = owner_of(fields, limits)
    caps = {"num_layers": limits.max_layers, "num_heads": limits.max_heads, "num_kv_heads": limits.max_heads,
            "head_dim": limits.max_head_dim, "max_positions": limits.max_positions}
    for name, cap in caps.items():
        v = fields.get(name)
        if type(v) is not int or not 0 < v <= cap:
            raise LimitError(f"register: {name} must be an int in 1..{cap}, got {v!r}")
    if type(fields.get("storage")) is not str:
        raise LimitError("register: storage must be a str")
    if fields["num_kv_heads"] > fields["num_heads"]:
        raise LimitError("register: more kv heads than heads")
    blocks = -(-fields["max_positions"] // service.block_size)
    if fields["num_kv_heads"] * blocks > limits.max_table_row:
        raise LimitError(f"register: {fields['num_kv_heads']} kv heads x {blocks} blocks per sequence exceed "
                         f"{limits.max_table_row} block-table entries; lower max_positions")
    owners = service.owner_ids()
    if owner not in owners and len(owners) >= limits.max_owners:
        raise LimitError(f"register: this peer serves {limits.max_owners} owners already")
    pools = service.pool_keys()
    key = (fields["num_layers"], fields["head_dim"], fields["storage"])
    if len(pools) >= limits.max_pools and all((k.num_layers, k.head_dim, k.storage) != key for k in pools):
        raise LimitError(f"register: this peer holds {limits.max_pools} model geometries already")


def check_attend(meta: np.ndarray, service, limits: PeerLimits = DEFAULT_PEER_LIMITS) -> None:
    n = meta.shape[0]
    if n > limits.max_seqs_per_request:
        raise LimitError(f"attend: {n} sequences in one request, limit {limits.max_seqs_per_request}")
    # Counting every row as possibly new is conservative but needs no look at the shard table.
    if n and service.num_sequences() + n > limits.max_sequences and np.any(meta[:, 1] == 0):
        raise LimitError(f"attend: this peer holds {limits.max_sequences} sequences at most")


def check_free(ids, limits: PeerLimits = DEFAULT_PEER_LIMITS) -> None:
    if not isinstance(ids, list) or len(ids) > limits.max_free_ids:
        raise LimitError(f"free: seq_ids must be a list of at most {limits.max_free_ids} ints")
