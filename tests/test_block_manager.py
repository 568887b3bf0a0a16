"""The paged KV bookkeeping without a model: allocation, reference counts, prefix caching, eviction and fork."""

from __future__ import annotations

import pytest

from serving.engine.block_manager import BlockManager
from serving.engine.sequence import Sequence
from tests.scheduling import new_request, sibling, tokens


def compute(blocks: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What one step does to a sequence's blocks: room for the tokens, then the full ones hashed."""
    assert blocks.allocate_slots(seq, num_tokens)
    seq.num_computed_tokens += num_tokens
    blocks.register_computed(seq)


def refs(blocks: BlockManager, seq: Sequence) -> list[int]:
    return [blocks.ref_counts[block] for block in seq.block_table]


def test_allocation_takes_whole_blocks_or_nothing_and_free_returns_them():
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    a = new_request("a", tokens(0, 10))
    assert blocks.allocate_slots(a, 10)
    assert len(set(a.block_table)) == 3 and refs(blocks, a) == [1, 1, 1]
    assert blocks.num_free_blocks == 5 and blocks.usage == 3 / 8
    a.num_computed_tokens = 10
    assert blocks.allocate_slots(a, 2) and len(a.block_table) == 3  # tokens 11 and 12 fit in the third block
    b = new_request("b", tokens(100, 24))
    assert not blocks.allocate_slots(b, 24)  # 6 blocks wanted, 5 free: it takes none
    assert b.block_table == [] and blocks.num_free_blocks == 5
    blocks.free(a)
    assert a.block_table == [] and blocks.ref_counts == [0] * 8 and blocks.num_free_blocks == 8 and blocks.usage == 0
    assert blocks.allocate_slots(b, 24) and len(set(b.block_table)) == 6


def test_identical_prompt_prefixes_share_their_full_blocks():
    blocks = BlockManager(16, 4, enable_prefix_caching=True)
    a = new_request("a", tokens(0, 10))
    assert blocks.match_prefix(a) and a.block_table == [] and a.num_computed_tokens == 0  # nothing cached yet
    compute(blocks, a, 10)
    assert (blocks.prefix_queries, blocks.prefix_hits) == (10, 0)

    b = new_request("b", tokens(0, 8) + [500, 501, 502])
    assert blocks.match_prefix(b)
    assert b.block_table == a.block_table[:2] and b.num_computed_tokens == 8  # a's partial third block is not shared
    assert refs(blocks, a) == [2, 2, 1]
    assert (blocks.prefix_queries, blocks.prefix_hits) == (10 + 11, 8)

    # the hash of a block covers every token before it: the same second block after another first one is a miss
    c = new_request("c", [7, 1, 2, 3] + tokens(4, 6))
    assert blocks.match_prefix(c) and c.block_table == [] and c.num_computed_tokens == 0

    # a prompt made of cached blocks only still computes its last token (the step needs its logits)
    d = new_request("d", tokens(0, 8))
    assert blocks.match_prefix(d) and d.block_table == a.block_table[:1] and d.num_computed_tokens == 4
    assert refs(blocks, a) == [3, 2, 1]
    assert (blocks.prefix_queries, blocks.prefix_hits) == (10 + 11 + 10 + 8, 8 + 4)


@pytest.mark.parametrize("caching, params", [(False, {}), (True, {"prompt_logprobs": 1})], ids=["caching-off", "prompt-logprobs"])
def test_no_prefix_is_taken_without_caching_or_with_prompt_logprobs(caching, params):
    """Prompt logprobs need the logits of every prompt token, so such a prompt computes them all."""
    blocks = BlockManager(16, 4, enable_prefix_caching=caching)
    a = new_request("a", tokens(0, 10))
    blocks.match_prefix(a)
    compute(blocks, a, 10)
    b = new_request("b", tokens(0, 10), **params)
    assert blocks.match_prefix(b)
    assert b.block_table == [] and b.num_computed_tokens == 0 and refs(blocks, a) == [1, 1, 1]
    assert blocks.prefix_hits == 0


def test_freed_blocks_stay_cached_until_memory_is_needed_and_the_last_block_goes_first():
    blocks = BlockManager(4, 4, enable_prefix_caching=True)
    a = new_request("a", tokens(0, 12))
    blocks.match_prefix(a)
    compute(blocks, a, 12)
    cached = list(a.block_table)
    blocks.free(a)
    assert blocks.num_free_blocks == 4 and blocks.ref_counts == [0] * 4  # cached but free count as free

    b = new_request("b", tokens(0, 13))
    assert blocks.match_prefix(b) and b.block_table == cached and b.num_computed_tokens == 12
    blocks.free(b)

    # one block never used is taken before any cached one; the next evicts the last block of the prefix
    c = new_request("c", tokens(100, 8))
    assert blocks.allocate_slots(c, 8)
    assert c.block_table[0] not in cached and c.block_table[1] == cached[2]
    d = new_request("d", tokens(0, 13))
    assert blocks.match_prefix(d) and d.block_table == cached[:2] and d.num_computed_tokens == 8
    assert blocks.num_free_blocks == 0


def test_a_prefix_block_being_computed_holds_back_a_new_prompt_until_it_is_cached_or_given_up():
    blocks = BlockManager(16, 4, enable_prefix_caching=True)
    a = new_request("a", tokens(0, 12))
    blocks.match_prefix(a)
    blocks.mark_computing(a)
    compute(blocks, a, 4)  # the first of its three prompt blocks is done, the second is next

    b = new_request("b", tokens(0, 12) + [7])
    assert not blocks.match_prefix(b)  # it would compute a's second block a second time
    assert b.block_table == [] and b.num_computed_tokens == 0 and blocks.prefix_queries == 12
    c = new_request("c", tokens(0, 4) + tokens(50, 9))  # shares only the finished first block: not held back
    assert blocks.match_prefix(c) and c.block_table == a.block_table[:1]

    compute(blocks, a, 8)
    assert blocks.match_prefix(b) and b.block_table == a.block_table and b.num_computed_tokens == 12

    e = new_request("e", tokens(200, 12))
    blocks.match_prefix(e)
    blocks.mark_computing(e)
    f = new_request("f", tokens(200, 12) + [7])
    assert not blocks.match_prefix(f)
    blocks.free(e)  # aborted or preempted before computing it: the next prompt computes it itself
    assert blocks.match_prefix(f) and f.block_table == []


def test_fork_shares_full_blocks_and_copies_the_partial_last_one():
    blocks = BlockManager(8, 4, enable_prefix_caching=True)
    parent = new_request("p", tokens(0, 10), n=2)
    compute(blocks, parent, 10)
    child = sibling(parent, 1)
    copy = blocks.fork(parent, child)
    assert child.block_table[:2] == parent.block_table[:2] and child.num_computed_tokens == 10
    assert child.block_table[2] not in parent.block_table
    assert copy == (parent.block_table[2], child.block_table[2])  # the partial block's KV, before the next step
    assert refs(blocks, parent) == [2, 2, 1] and refs(blocks, child) == [2, 2, 1]
    assert blocks.num_free_blocks == 8 - 4

    blocks.free(parent)  # the shared blocks stay with the child
    assert refs(blocks, child) == [1, 1, 1] and blocks.num_free_blocks == 8 - 3
    blocks.free(child)
    assert blocks.ref_counts == [0] * 8 and blocks.num_free_blocks == 8


def test_fork_of_a_prompt_of_whole_blocks_copies_nothing():
    blocks = BlockManager(8, 4, enable_prefix_caching=False)
    parent = new_request("p", tokens(0, 8), n=3)
    compute(blocks, parent, 8)
    children = [sibling(parent, i) for i in (1, 2)]
    assert [blocks.fork(parent, child) for child in children] == [None, None]
    assert all(child.block_table == parent.block_table for child in children)
    assert refs(blocks, parent) == [3, 3] and blocks.num_free_blocks == 6
